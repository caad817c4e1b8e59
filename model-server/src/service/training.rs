//! The Training service: start, watch, cancel, delete and list training jobs.

use super::*;

/// Protobuf view of a job.
pub fn job_info(status: &JobStatus) -> pb::JobInfo {
    pb::JobInfo {
        id: status.id.clone(),
        state: match status.state {
            JobState::Queued => pb::JobState::Queued,
            JobState::Running => pb::JobState::Running,
            JobState::Succeeded => pb::JobState::Succeeded,
            JobState::Failed => pb::JobState::Failed,
            JobState::Cancelled => pb::JobState::Cancelled,
        } as i32,
        objective: objective_to_pb(status.objective) as i32,
        base_model: status.base_model.clone(),
        output_model: status.output_model.clone(),
        step: status.step as u64,
        total_steps: status.total_steps as u64,
        error: status.error.clone().unwrap_or_default(),
        final_metrics: status.final_loss.map(|loss| pb::JobMetrics {
            loss,
            accuracy: status.final_accuracy.unwrap_or(0.0),
            has_accuracy: status.final_accuracy.is_some(),
        }),
    }
}

fn job_event(event: &JobEvent) -> pb::JobEvent {
    pb::JobEvent {
        job: Some(job_info(&event.status)),
        step: event.step.as_ref().map(|s| pb::StepEvent {
            step: s.metrics.step as u64,
            total_steps: s.metrics.total_steps as u64,
            loss: s.metrics.loss,
            learning_rate: s.metrics.lr,
            grad_norm: s.metrics.grad_norm,
            accuracy: s.metrics.accuracy,
            tokens_per_second: s.tokens_per_second,
            eta_seconds: s.eta_seconds,
        }),
    }
}

/// The protobuf value of an objective: `OBJECTIVE_KIND_` + its name upper-cased (the one
/// mapping between the two enums, with [`objective_from_pb`]; by name, so a new objective needs
/// no line here). UNSPECIFIED for a kind the proto lacks, which a unit test rules out.
fn objective_to_pb(kind: ObjectiveKind) -> pb::ObjectiveKind {
    let name = format!("OBJECTIVE_KIND_{}", kind.name().to_ascii_uppercase());
    pb::ObjectiveKind::from_str_name(&name).unwrap_or(pb::ObjectiveKind::Unspecified)
}

/// The objective a StartJob request names; UNSPECIFIED or an unknown value is the client's error.
fn objective_from_pb(value: i32) -> ServiceResult<ObjectiveKind> {
    ObjectiveKind::ALL
        .into_iter()
        .find(|&kind| objective_to_pb(kind) as i32 == value)
        .ok_or_else(|| ServiceError::invalid("objective", "choose an OBJECTIVE_KIND"))
}

/// A readable, unique job id.
fn new_job_id(objective: ObjectiveKind, output: &str) -> String {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let clean: String = output
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    format!(
        "job-{}-{clean}-{:x}",
        format!("{objective:?}").to_lowercase(),
        stamp & 0xffff_ffff_ffff
    )
}

/// The numeric checks of a StartJob's hyperparameters (every weight finite and ≥ 0, a conflict
/// dose only for an objective with a conflict term) and its LR schedule.
fn checked_hyperparameters(
    h: &pb::TrainingHyperparameters,
    objective: ObjectiveKind,
) -> ServiceResult<Schedule> {
    for (field, value) in [
        ("hyperparameters.beta", h.beta),
        ("hyperparameters.gamma", h.gamma),
        ("hyperparameters.conflict_alpha", h.conflict_alpha),
        ("hyperparameters.max_grad_norm", h.max_grad_norm),
        ("hyperparameters.weight_decay", h.weight_decay),
    ] {
        if !(value.is_finite() && value >= 0.0) {
            return Err(ServiceError::invalid(
                field,
                "must be a finite number ≥ 0 (0 = default/off)",
            ));
        }
    }
    if h.conflict_alpha > 0.0 && !objective.has_conflict_term() {
        return Err(ServiceError::invalid(
            "hyperparameters.conflict_alpha",
            format!(
                "the {} objective has no explicit-conflict term",
                objective.name()
            ),
        ));
    }
    match pb::LrSchedule::try_from(h.schedule) {
        Ok(pb::LrSchedule::Constant) => Ok(Schedule::Constant),
        Ok(pb::LrSchedule::CosineToZero) => Ok(Schedule::CosineToZero),
        Ok(pb::LrSchedule::WarmupConstant) => Ok(Schedule::LinearWarmupConstant {
            warmup_frac: h.warmup_frac.unwrap_or(0.1),
        }),
        _ => Err(ServiceError::invalid(
            "hyperparameters.schedule",
            "choose an LR_SCHEDULE",
        )),
    }
}

/// The job's hyperparameters from the request's, zeros read as "default" (the whole batch as
/// one minibatch, the base model's context, the default shard count) or "off".
fn hyperparameters(
    h: &pb::TrainingHyperparameters,
    schedule: Schedule,
    max_positions: usize,
) -> Hyperparameters {
    let positive = |x: f64| (x > 0.0).then_some(x);
    let or_default = |x: u32, default: usize| if x == 0 { default } else { x as usize };
    Hyperparameters {
        lr: h.lr,
        batch_size: h.batch_size as usize,
        minibatch_size: or_default(h.minibatch_size, h.batch_size as usize),
        epochs: h.epochs.max(1) as usize,
        schedule,
        weight_decay: h.weight_decay,
        max_grad_norm: positive(h.max_grad_norm),
        max_ctx: or_default(h.max_ctx, max_positions),
        seed: h.seed,
        shuffle: h.shuffle,
        beta: positive(h.beta),
        gamma: positive(h.gamma),
        conflict_alpha: positive(h.conflict_alpha),
        orient_slots: h.orient_slots,
        checkpoint_every: h.checkpoint_every as usize,
        shards: or_default(h.shards, DEFAULT_SHARDS),
    }
}

#[tonic::async_trait]
impl pb::training_server::Training for TrainingService {
    async fn start_job(
        &self,
        request: Request<pb::StartJobRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        let request = request.into_inner();
        self.0
            .unary("StartJob", |_| async move {
                let objective = objective_from_pb(request.objective)?;
                require("base_model", &request.base_model)?;
                check_name("output_model", &request.output_model)?;
                let h = request
                    .hyperparameters
                    .ok_or_else(|| ServiceError::invalid("hyperparameters", "required"))?;
                let schedule = checked_hyperparameters(&h, objective)?;
                let busy = self.0.jobs.lock().ok().and_then(|jobs| {
                    jobs.values()
                        .find(|j| {
                            j.output_model == request.output_model
                                && matches!(j.state, JobState::Queued | JobState::Running)
                        })
                        .map(|j| j.id.clone())
                });
                if let Some(id) = busy {
                    return Err(ServiceError::AlreadyLoaded(format!(
                        "{} (the output of running job {id})",
                        request.output_model
                    )));
                }
                let models = self.0.worker.list().await?;
                let base = models
                    .iter()
                    .find(|m| m.name == request.base_model)
                    .ok_or_else(|| ServiceError::UnknownModel(request.base_model.clone()))?;
                if models.iter().any(|m| m.name == request.output_model) {
                    return Err(ServiceError::AlreadyLoaded(request.output_model.clone()));
                }
                let spec = JobSpec {
                    id: new_job_id(objective, &request.output_model),
                    objective,
                    base_model: base.name.clone(),
                    base_source: base.source.clone(),
                    base_reward_head: base.reward_head_requested || objective.needs_reward_head(),
                    base_reward_readout: base.reward_readout_requested,
                    base_seed: base.seed,
                    dataset_ids: request.dataset_ids.clone(),
                    hyper: hyperparameters(&h, schedule, base.config.max_positions()),
                    output_model: request.output_model,
                };
                spec.validate()?;
                let store = self.0.datasets.clone();
                let ids = spec.dataset_ids.clone();
                let rows = tokio::task::spawn_blocking(move || -> ServiceResult<Vec<Row>> {
                    let mut rows = Vec::new();
                    for id in &ids {
                        rows.extend(store.rows(id)?.1);
                    }
                    Ok(rows)
                })
                .await
                .map_err(|e| ServiceError::Internal(e.to_string()))??;
                spec.validate_rows(&rows)?;
                let status = self.0.worker.start_job(spec, rows).await?;
                Ok(job_info(&status))
            })
            .await
    }

    type WatchJobStream = EventStream<pb::JobEvent>;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let started = Instant::now();
        let id = request.into_inner().id;
        // Subscribe before reading the state so that no event falls between the two.
        let mut events = self.0.events.subscribe();
        let current = match self.0.job_status(&id) {
            Ok(s) => s,
            Err(e) => return Err(self.0.fail("WatchJob", started, e)),
        };
        self.0
            .metrics
            .observe_request("WatchJob", tonic::Code::Ok, started.elapsed());
        let mut closing = self.0.closing.clone();
        let stream = async_stream(move |tx| async move {
            let first = JobEvent {
                status: current.clone(),
                step: None,
            };
            if tx.send(Ok(job_event(&first))).await.is_err() || current.state.is_terminal() {
                return;
            }
            loop {
                let received = tokio::select! {
                    received = events.recv() => received,
                    // A watch outlives any drain: end it so shutdown need not wait for the job.
                    _ = shutting_down(&mut closing) => {
                        let _ = tx
                            .send(Err(Status::unavailable("server is shutting down")))
                            .await;
                        return;
                    }
                };
                match received {
                    Ok(event) if event.status.id == id => {
                        let terminal = event.status.state.is_terminal();
                        if tx.send(Ok(job_event(&event))).await.is_err() || terminal {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => {
                        let _ = tx
                            .send(Err(Status::unavailable("server is shutting down")))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        let id = request.into_inner().id;
        self.0
            .unary("CancelJob", |_| async move {
                self.0.job_status(&id)?;
                Ok(job_info(&self.0.worker.cancel_job(id).await?))
            })
            .await
    }

    async fn delete_job(
        &self,
        request: Request<pb::DeleteJobRequest>,
    ) -> Result<Response<pb::DeleteJobResponse>, Status> {
        let id = request.into_inner().id;
        self.0
            .unary("DeleteJob", |_| async move {
                require("id", &id)?;
                {
                    let mut table = self
                        .0
                        .jobs
                        .lock()
                        .map_err(|_| ServiceError::Internal("job table poisoned".into()))?;
                    let state = table
                        .get(&id)
                        .map(|status| status.state)
                        .ok_or_else(|| ServiceError::UnknownJob(id.clone()))?;
                    if !state.is_terminal() {
                        return Err(ServiceError::FailedPrecondition(format!(
                            "job {id} is {state:?}; cancel it before deleting it"
                        )));
                    }
                    // Out of the table before the folder goes: a LoadModel of it now answers
                    // NOT_FOUND instead of meeting a half-removed folder.
                    table.remove(&id);
                }
                let dir = JobPaths::new(&self.0.data_dir, &id).dir;
                let freed =
                    tokio::task::spawn_blocking(move || crate::jobs::remove_job_folder(&dir))
                        .await
                        .map_err(|e| ServiceError::Internal(e.to_string()))?
                        .map_err(|e| ServiceError::Internal(format!("removing job {id}: {e}")))?;
                Ok(pb::DeleteJobResponse { freed_bytes: freed })
            })
            .await
    }

    async fn list_jobs(
        &self,
        _: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let started = Instant::now();
        let result = self
            .0
            .jobs
            .lock()
            .map_err(|_| ServiceError::Internal("job table poisoned".into()))
            .map(|table| pb::ListJobsResponse {
                jobs: table.values().map(job_info).collect(),
            });
        self.0.finish("ListJobs", started, result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_objective_has_its_protobuf_value_and_back() {
        for kind in ObjectiveKind::ALL {
            let value = objective_to_pb(kind);
            assert_ne!(value, pb::ObjectiveKind::Unspecified, "{kind:?}");
            assert_eq!(objective_from_pb(value as i32).unwrap(), kind);
        }
        assert!(objective_from_pb(pb::ObjectiveKind::Unspecified as i32).is_err());
        assert!(objective_from_pb(999).is_err());
    }

    #[test]
    fn hyperparameter_checks_name_the_field_and_zeros_mean_defaults() {
        let ok = pb::TrainingHyperparameters {
            lr: 1e-4,
            batch_size: 8,
            schedule: pb::LrSchedule::Constant as i32,
            ..Default::default()
        };
        let simpo = ObjectiveKind::ALL
            .into_iter()
            .find(|k| k.has_conflict_term())
            .unwrap();
        let without_term = ObjectiveKind::ALL
            .into_iter()
            .find(|k| !k.has_conflict_term())
            .unwrap();
        assert_eq!(
            checked_hyperparameters(&ok, simpo).unwrap(),
            Schedule::Constant
        );
        let field_of =
            |h: pb::TrainingHyperparameters, kind| match checked_hyperparameters(&h, kind)
                .unwrap_err()
            {
                ServiceError::InvalidArgument { field, .. } => field,
                other => panic!("{other:?}"),
            };
        for (h, field) in [
            (
                pb::TrainingHyperparameters {
                    beta: f64::NAN,
                    ..ok
                },
                "hyperparameters.beta",
            ),
            (
                pb::TrainingHyperparameters {
                    weight_decay: -1.0,
                    ..ok
                },
                "hyperparameters.weight_decay",
            ),
            (
                pb::TrainingHyperparameters { schedule: 99, ..ok },
                "hyperparameters.schedule",
            ),
        ] {
            assert_eq!(field_of(h, simpo), field);
        }
        let dosed = pb::TrainingHyperparameters {
            conflict_alpha: 1.0,
            ..ok
        };
        assert!(checked_hyperparameters(&dosed, simpo).is_ok());
        assert_eq!(
            field_of(dosed, without_term),
            "hyperparameters.conflict_alpha"
        );
        let hyper = hyperparameters(&ok, Schedule::Constant, 1024);
        assert_eq!(
            (
                hyper.minibatch_size,
                hyper.max_ctx,
                hyper.shards,
                hyper.epochs
            ),
            (8, 1024, DEFAULT_SHARDS, 1)
        );
        assert_eq!((hyper.beta, hyper.max_grad_norm), (None, None));
        let set = pb::TrainingHyperparameters {
            minibatch_size: 2,
            max_ctx: 64,
            shards: 3,
            beta: 2.0,
            ..ok
        };
        let hyper = hyperparameters(&set, Schedule::Constant, 1024);
        assert_eq!(
            (hyper.minibatch_size, hyper.max_ctx, hyper.shards),
            (2, 64, 3)
        );
        assert_eq!(hyper.beta, Some(2.0));
    }
}
