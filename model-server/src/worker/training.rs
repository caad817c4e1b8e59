//! Training jobs on the device thread: the queue, one step per scheduling round, checkpoints,
//! events for watchers, export and registration of finished models.

use std::time::Instant;

use superficial_training::objectives::attach_reference_logprobs;
use superficial_training::{TrainingRun, frozen_copy};
use tracing::{error, info, warn};

use super::*;
use crate::datasets::Row;
use crate::error::{ServiceError, ServiceResult};
use crate::jobs::{
    JobPaths, JobSpec, JobState, JobStatus, StepUpdate, build_examples, write_json_atomic,
};

impl Worker {
    pub(super) fn publish(&self, status: &JobStatus, step: Option<StepUpdate>) {
        if let Ok(mut table) = self.jobs.lock() {
            table.insert(status.id.clone(), status.clone());
        }
        let _ = self.events.send(JobEvent {
            status: status.clone(),
            step,
        });
    }

    pub(super) fn status_of(&self, id: &str) -> Option<JobStatus> {
        self.jobs.lock().ok().and_then(|t| t.get(id).cloned())
    }

    pub(super) fn persist(&self, paths: &JobPaths, status: &JobStatus) {
        if let Err(e) = write_json_atomic(&paths.state(), status) {
            error!(job = %status.id, "cannot persist job state: {e}");
        }
    }

    pub(super) fn enqueue_job(
        &mut self,
        spec: JobSpec,
        rows: Vec<Row>,
    ) -> ServiceResult<JobStatus> {
        spec.validate()?;
        let paths = JobPaths::new(&self.config.data_dir, &spec.id);
        std::fs::create_dir_all(&paths.dir)
            .map_err(|e| ServiceError::Internal(format!("job folder: {e}")))?;
        write_json_atomic(&paths.spec(), &spec)
            .map_err(|e| ServiceError::Internal(format!("job spec: {e}")))?;
        let mut status = self
            .status_of(&spec.id)
            .unwrap_or_else(|| JobStatus::new(&spec));
        status.state = JobState::Queued;
        self.persist(&paths, &status);
        self.publish(&status, None);
        self.queue.push_back(ActiveJob {
            spec,
            rows,
            run: None,
            tokenizer: None,
            paths,
            cancel: false,
            started: None,
            steps_this_session: 0,
            tokens_this_session: 0,
        });
        Ok(status)
    }

    pub(super) fn cancel_job(&mut self, id: &str) -> ServiceResult<JobStatus> {
        if let Some(job) = self.queue.iter_mut().find(|j| j.spec.id == id) {
            job.cancel = true;
            let mut status = self
                .status_of(id)
                .ok_or_else(|| ServiceError::UnknownJob(id.into()))?;
            // The job stops before its next step; report the state it is heading to.
            status.state = JobState::Cancelled;
            return Ok(status);
        }
        self.status_of(id)
            .ok_or_else(|| ServiceError::UnknownJob(id.into()))
    }

    /// Prepares the job at the head of the queue: base weights, examples, resume point.
    pub(super) fn start_head_job(&mut self) -> ServiceResult<()> {
        let Some(job) = self.queue.front() else {
            return Ok(());
        };
        let spec = job.spec.clone();
        let (base, tokenizer) = self.build_model(
            &spec.base_source,
            spec.base_reward_head,
            spec.base_reward_readout,
            spec.base_seed,
        )?;
        let mut examples = build_examples(&spec, &job.rows, &tokenizer)?;
        let objective = spec.objective();
        if objective.kind().needs_reference() {
            let reference =
                frozen_copy(&base).map_err(|e| ServiceError::Internal(e.to_string()))?;
            attach_reference_logprobs(&reference, &mut examples, spec.hyper.minibatch_size.max(1))
                .map_err(|e| ServiceError::Internal(e.to_string()))?;
        }
        let mut run = TrainingRun::new(base, examples, spec.train_config())
            .map_err(|e| ServiceError::invalid("job", e))?;
        let resumed = run
            .resume_from(&job.paths.checkpoint())
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        if resumed {
            info!(job = %spec.id, step = run.step(), "resumed from checkpoint");
        }
        let mut status = self
            .status_of(&spec.id)
            .unwrap_or_else(|| JobStatus::new(&spec));
        status.state = JobState::Running;
        status.step = run.step();
        status.total_steps = run.total_steps();
        let paths = job.paths.clone();
        if let Some(job) = self.queue.front_mut() {
            job.run = Some(run);
            job.tokenizer = Some(tokenizer);
            job.started = Some(Instant::now());
        }
        self.persist(&paths, &status);
        self.publish(&status, None);
        Ok(())
    }

    pub(super) fn fail_head_job(&mut self, error: String, state: JobState) {
        if let Some(job) = self.queue.pop_front() {
            let mut status = self
                .status_of(&job.spec.id)
                .unwrap_or_else(|| JobStatus::new(&job.spec));
            status.state = state;
            if state == JobState::Failed {
                warn!(job = %job.spec.id, "job failed: {error}");
                status.error = Some(error);
            }
            if let Some(run) = &job.run {
                // Keep the exact point reached, for inspection.
                let _ = run.save_checkpoint(&job.paths.checkpoint());
            }
            self.persist(&job.paths, &status);
            self.publish(&status, None);
        }
    }

    pub(super) fn train_one_step(&mut self) {
        let Some(head) = self.queue.front() else {
            return;
        };
        if head.cancel {
            self.fail_head_job(String::new(), JobState::Cancelled);
            return;
        }
        if head.run.is_none()
            && let Err(e) = self.start_head_job()
        {
            self.fail_head_job(e.to_string(), JobState::Failed);
            return;
        }
        let default_every = self.config.checkpoint_every;
        let Some(job) = self.queue.front_mut() else {
            return;
        };
        let Some(run) = job.run.as_mut() else { return };
        let metrics = match run.train_step() {
            Ok(m) => m,
            Err(e) => {
                let message = e.to_string();
                self.fail_head_job(message, JobState::Failed);
                return;
            }
        };
        job.steps_this_session += 1;
        job.tokens_this_session += metrics.tokens;
        let elapsed = job
            .started
            .map(|s| s.elapsed().as_secs_f64())
            .unwrap_or(0.0)
            .max(1e-9);
        let per_step = elapsed / job.steps_this_session as f64;
        let update = StepUpdate {
            tokens_per_second: job.tokens_this_session as f64 / elapsed,
            eta_seconds: per_step * (metrics.total_steps - metrics.step) as f64,
            metrics: metrics.clone(),
        };
        let every = if job.spec.hyper.checkpoint_every > 0 {
            job.spec.hyper.checkpoint_every
        } else {
            default_every
        };
        let finished = run.is_finished();
        let due = (every > 0 && metrics.step.is_multiple_of(every)) || finished;
        if due && let Err(e) = run.save_checkpoint(&job.paths.checkpoint()) {
            let message = format!("checkpoint: {e}");
            self.fail_head_job(message, JobState::Failed);
            return;
        }
        let id = job.spec.id.clone();
        let paths = job.paths.clone();
        let fresh = JobStatus::new(&job.spec);
        self.metrics.job_step.set(metrics.step as i64);
        self.metrics.job_total_steps.set(metrics.total_steps as i64);
        let mut status = self.status_of(&id).unwrap_or(fresh);
        status.state = JobState::Running;
        status.step = metrics.step;
        status.total_steps = metrics.total_steps;
        if metrics.step.is_multiple_of(every.max(1)) && !finished {
            self.persist(&paths, &status);
        }
        self.publish(&status, Some(update));
        if finished {
            self.finish_head_job(metrics.loss, metrics.accuracy);
        }
    }

    /// Exports the finished model, registers it, and records success.
    pub(super) fn finish_head_job(&mut self, loss: f64, accuracy: Option<f64>) {
        let Some(job) = self.queue.pop_front() else {
            return;
        };
        let id = job.spec.id.clone();
        let result = (|| -> ServiceResult<ModelSummary> {
            let run = job
                .run
                .as_ref()
                .ok_or_else(|| ServiceError::Internal("job has no run".into()))?;
            let model = run
                .frozen_model()
                .map_err(|e| ServiceError::Internal(e.to_string()))?;
            // The job's own output folder: a leftover from an interrupted attempt (possibly
            // written before exports carried a marker) is the job's to replace.
            let folder = job.paths.model();
            if folder.is_dir() && superficial_training::export::check_destination(&folder).is_err()
            {
                let _ = std::fs::remove_dir_all(&folder);
            }
            superficial_training::export::save_hf_folder(&model, job.tokenizer.as_ref(), &folder)
                .map_err(|e| ServiceError::Internal(format!("exporting the trained model: {e}")))?;
            self.models.remove(&job.spec.output_model);
            self.models_changed();
            self.load(LoadSpec {
                name: job.spec.output_model.clone(),
                source: ModelSource::Job {
                    id: id.clone(),
                    folder: job.paths.model(),
                },
                role: String::new(),
                reward_head: false,
                reward_readout: RewardReadout::LastToken,
                seed: 0,
            })
        })();
        let mut status = self
            .status_of(&id)
            .unwrap_or_else(|| JobStatus::new(&job.spec));
        match result {
            Ok(_) => {
                status.state = JobState::Succeeded;
                status.step = status.total_steps;
                status.final_loss = Some(loss);
                status.final_accuracy = accuracy;
                info!(job = %id, "job succeeded");
            }
            Err(e) => {
                status.state = JobState::Failed;
                status.error = Some(e.to_string());
            }
        }
        self.persist(&job.paths, &status);
        // A succeeded job is its exported model from now on (a restart loads that folder):
        // its resume checkpoint, three quarters of the job's bytes, is dead weight.
        if status.state == JobState::Succeeded {
            let checkpoint = job.paths.checkpoint();
            if checkpoint.is_dir()
                && let Err(e) = std::fs::remove_dir_all(&checkpoint)
            {
                warn!(job = %id, "removing the finished job's checkpoint: {e}");
            }
        }
        self.publish(&status, None);
    }

    pub(super) fn checkpoint_for_shutdown(&mut self) {
        for job in &self.queue {
            if let Some(run) = &job.run {
                match run.save_checkpoint(&job.paths.checkpoint()) {
                    Ok(()) => {
                        info!(job = %job.spec.id, step = run.step(), "checkpointed for shutdown")
                    }
                    Err(e) => error!(job = %job.spec.id, "checkpoint at shutdown failed: {e}"),
                }
            }
        }
    }
}
