//! How the study drives the server for one run: loading a base model, running its training
//! stages as server jobs (resuming a job recorded in the run's `jobs.json`), and scoring pairs.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use model_server::JobStart;
use serde_json::json;
use superficial_models::RewardReadout;
use w2s_proto::v1 as pb;

use super::{Scenario, Study, annotate_config, write_atomic};
use crate::data::HhPair;
use crate::spec::{ModelSpec, StageHyper};

/// The run folder's record of its server jobs: stage → job id.
const JOBS: &str = "jobs.json";

/// The jobs a run folder records (none when the file is missing or unreadable).
fn recorded_jobs(dir: &Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(dir.join(JOBS))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default()
}

impl Study<'_> {
    /// Drops a model from the server; best effort (it may already be gone).
    pub(super) async fn unload(&self, name: impl Into<String>) {
        let _ = self.client.unload_if_present(&name.into()).await;
    }

    /// Loads a fresh copy of a study model under `name` (with a reward head for reward runs).
    pub(super) async fn load_base(
        &self,
        model: &ModelSpec,
        name: &str,
        reward_head: bool,
    ) -> Result<String> {
        self.unload(name).await;
        let readout = match self.spec.reward.readout {
            RewardReadout::LastToken => pb::RewardReadout::LastToken,
            RewardReadout::LastTokenAndMeanLogprob => pb::RewardReadout::LastTokenAndMeanLogprob,
        };
        let load = pb::LoadModelRequest {
            name: name.into(),
            source: None,
            role: "base".into(),
            reward_head,
            reward_readout: readout as i32,
            seed: model.seed,
        };
        // A folder on this machine travels to the server (once: later loads go by digest).
        let info = match (&model.path, &model.preset) {
            (Some(path), _) => self.client.upload_model(load, path).await,
            (None, Some(preset)) => {
                self.client
                    .load_model(pb::LoadModelRequest {
                        source: Some(pb::load_model_request::Source::Preset(preset.clone())),
                        ..load
                    })
                    .await
            }
            _ => bail!("model `{}` has no source", model.name),
        }
        .with_context(|| format!("loading model {}", model.name))?;
        Ok(info.content_hash)
    }

    pub(super) fn hyper(
        &self,
        h: &StageHyper,
        epochs: u32,
        seed: u64,
        schedule: pb::LrSchedule,
        alpha: f64,
        orient: bool,
    ) -> pb::TrainingHyperparameters {
        pb::TrainingHyperparameters {
            lr: h.lr,
            batch_size: h.batch_size,
            minibatch_size: h.minibatch_size,
            shards: h.shards,
            epochs,
            schedule: schedule as i32,
            warmup_frac: Some(0.1),
            max_ctx: h.max_ctx,
            seed,
            shuffle: true,
            conflict_alpha: alpha,
            orient_slots: orient,
            ..Default::default()
        }
    }

    /// Deletes the server's jobs of the finished run in `dir` (its `jobs.json`), unless
    /// `keep_models`. Best effort: a job that cannot be deleted is reported and left.
    pub(super) async fn release_jobs(&mut self, dir: &Path) {
        if self.keep_models {
            return;
        }
        for id in recorded_jobs(dir).values() {
            if let Err(e) = self.client.delete_job_if_present(id).await {
                self.progress
                    .line(&format!("  could not delete job {id} on the server: {e}"));
            }
        }
    }

    /// Runs a training stage as a server job, resuming a job recorded in `jobs.json` when the
    /// server still knows it; returns the name of the trained model on the server.
    pub(super) async fn train(
        &mut self,
        dir: &Path,
        stage: &str,
        request: pb::StartJobRequest,
        log: &mut std::fs::File,
    ) -> Result<String> {
        let jobs_path = dir.join(JOBS);
        let mut jobs = recorded_jobs(dir);
        let output = request.output_model.clone();
        // A stale model of that name (from an earlier attempt) must not shadow the result.
        self.unload(output.clone()).await;
        let job_id = match self
            .client
            .resume_or_start_job(request, jobs.get(stage).map(String::as_str))
            .await
            .context("starting a job")?
        {
            JobStart::Finished(job) => {
                self.client
                    .load_model(pb::LoadModelRequest {
                        name: output.clone(),
                        source: Some(pb::load_model_request::Source::Job(job.id.clone())),
                        ..Default::default()
                    })
                    .await?;
                self.progress
                    .line(&format!("    {stage}: reusing finished job {}", job.id));
                return Ok(output);
            }
            JobStart::Resumed(job) => {
                self.progress.line(&format!(
                    "    {stage}: following resumed job {} at step {}",
                    job.id, job.step
                ));
                job.id
            }
            JobStart::Started(job) => {
                jobs.insert(stage.to_string(), job.id.clone());
                write_atomic(&jobs_path, serde_json::to_string_pretty(&jobs)?.as_bytes())?;
                job.id
            }
        };
        self.follow(stage, &job_id, log).await?;
        Ok(output)
    }

    /// Follows a running job to its end, showing progress and appending its steps to the run's
    /// `log.jsonl`; an error unless it succeeded.
    async fn follow(&mut self, stage: &str, job_id: &str, log: &mut std::fs::File) -> Result<()> {
        let mut last_print = std::time::Instant::now();
        let mut lines = Vec::new();
        let progress = &mut *self.progress;
        let ended = self
            .client
            .follow_job(job_id, &mut |event| {
                if let Some(step) = &event.step {
                    progress.step(stage, step.step, step.total_steps);
                    lines.push(json!({
                        "stage": stage, "step": step.step, "total_steps": step.total_steps, "loss": step.loss,
                        "lr": step.learning_rate, "grad_norm": step.grad_norm, "train_accuracy": step.accuracy,
                        "tokens_per_second": step.tokens_per_second,
                    }));
                    if last_print.elapsed().as_secs_f64() > 2.0 || step.step == step.total_steps {
                        last_print = std::time::Instant::now();
                        progress.line(&format!(
                            "    {stage}: step {}/{} loss {:.4} eta {:.0}s",
                            step.step, step.total_steps, step.loss, step.eta_seconds
                        ));
                    }
                }
            })
            .await?;
        for line in lines {
            writeln!(log, "{line}")?;
        }
        if ended.state != pb::JobState::Succeeded as i32 {
            bail!(
                "{stage} job {job_id} ended in state {:?}: {}",
                pb::JobState::try_from(ended.state),
                ended.error
            );
        }
        Ok(())
    }

    /// Scores pairs in human order; returns each pair's margin (chosen − rejected).
    pub(super) async fn margins(
        &self,
        model: &str,
        pairs: &[HhPair],
        scoring: pb::PairScoring,
        h: &StageHyper,
    ) -> Result<Vec<f64>> {
        let pairs: Vec<pb::PreferencePair> = pairs
            .iter()
            .map(|p| pb::PreferencePair {
                prompt: String::new(),
                chosen: p.chosen.clone(),
                rejected: p.rejected.clone(),
            })
            .collect();
        Ok(self
            .client
            .pair_margins(model, &pairs, scoring, h.max_ctx, h.eval_batch)
            .await?)
    }

    pub(super) fn scoring(&self, scenario: Scenario) -> (pb::PairScoring, StageHyper) {
        let plan = self.spec.plan(scenario);
        (plan.scoring, plan.hyper.clone())
    }

    /// Trains `model` for `scenario` on the datasets, one server job per stage of its plan
    /// (SFT first for SimPO/DPO), each stage starting from the previous one's model.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn train_scenario(
        &mut self,
        scenario: Scenario,
        dir: &Path,
        model: &ModelSpec,
        run_id: &str,
        datasets: Vec<String>,
        conflict_alpha: f64,
        seed: u64,
        log: &mut std::fs::File,
    ) -> Result<String> {
        let plan = self.spec.plan(scenario);
        let (hyper, stages) = (plan.hyper.clone(), plan.stages.clone());
        let mut current = format!("{run_id}:base");
        let hash = self.load_base(model, &current, plan.reward_head).await?;
        annotate_config(dir, "model_content_hash", &hash)?;
        for stage in stages {
            let request = pb::StartJobRequest {
                objective: stage.objective as i32,
                base_model: current.clone(),
                dataset_ids: datasets.clone(),
                hyperparameters: Some(self.hyper(
                    &hyper,
                    stage.epochs,
                    seed,
                    stage.schedule,
                    if stage.takes_conflict {
                        conflict_alpha
                    } else {
                        0.0
                    },
                    stage.orient_slots,
                )),
                output_model: format!("{run_id}:{}", stage.output_suffix),
            };
            let trained = self.train(dir, stage.key, request, log).await?;
            self.unload(std::mem::replace(&mut current, trained)).await;
        }
        Ok(current)
    }
}
