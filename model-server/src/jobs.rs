//! Training jobs: their persisted specification and state, and the conversion of dataset rows
//! into training examples. The worker runs them; this module holds no threads.
//!
//! On disk, `DATA_DIR/jobs/<id>/` holds `spec.json` (what to train), `state.json` (where it
//! is), `checkpoint/` (exact resume point) and, once finished, `model/` (an HF folder).

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use superficial_models::{RewardReadout, TextTokenizer};
pub use superficial_training::ObjectiveKind;
use superficial_training::checkpoint::write_file_atomic;
use superficial_training::objectives::{Example, ExampleShape};
use superficial_training::orientation::PythonRandom;
use superficial_training::{
    AdamConfig, DEFAULT_SHARDS, Objective, Schedule, StepMetrics, TrainConfig,
};

use crate::datasets::Row;
use crate::error::{ServiceError, ServiceResult};
use crate::worker::ModelSource;

/// Everything a job needs, persisted so that it can resume after a restart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub id: String,
    pub objective: ObjectiveKind,
    /// Name of the base model when the job was started (for listings).
    pub base_model: String,
    /// How to rebuild the base model's starting weights after a restart.
    pub base_source: ModelSource,
    pub base_reward_head: bool,
    /// What a fresh reward head of the base reads; records from before the field: last token.
    #[serde(default)]
    pub base_reward_readout: RewardReadout,
    pub base_seed: u64,
    pub dataset_ids: Vec<String>,
    pub hyper: Hyperparameters,
    pub output_model: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hyperparameters {
    pub lr: f64,
    pub batch_size: usize,
    pub minibatch_size: usize,
    pub epochs: usize,
    pub schedule: Schedule,
    pub weight_decay: f64,
    pub max_grad_norm: Option<f64>,
    pub max_ctx: usize,
    pub seed: u64,
    pub shuffle: bool,
    pub beta: Option<f64>,
    pub gamma: Option<f64>,
    pub conflict_alpha: Option<f64>,
    pub orient_slots: bool,
    pub checkpoint_every: usize,
    /// Minibatch shards (see `TrainConfig::shards`); job records from before the field have
    /// the default.
    #[serde(default = "default_shards")]
    pub shards: usize,
}

fn default_shards() -> usize {
    DEFAULT_SHARDS
}

impl JobSpec {
    pub fn objective(&self) -> Objective {
        self.objective
            .with(self.hyper.beta, self.hyper.gamma, self.hyper.conflict_alpha)
    }

    pub fn train_config(&self) -> TrainConfig {
        TrainConfig {
            objective: self.objective(),
            optimizer: AdamConfig {
                lr: self.hyper.lr,
                weight_decay: self.hyper.weight_decay,
                max_grad_norm: self.hyper.max_grad_norm,
                ..AdamConfig::default()
            },
            schedule: self.hyper.schedule,
            batch_size: self.hyper.batch_size,
            minibatch_size: self.hyper.minibatch_size,
            epochs: self.hyper.epochs,
            seed: self.hyper.seed,
            reshuffle_each_epoch: false,
            shards: self.hyper.shards,
        }
    }

    /// Checks what can be checked before any data is read.
    pub fn validate(&self) -> ServiceResult<()> {
        let bad = |field: &str, reason: &str| Err(ServiceError::invalid(field, reason));
        if self.output_model.is_empty() {
            return bad("output_model", "must not be empty");
        }
        if self.dataset_ids.is_empty() {
            return bad("dataset_ids", "give at least one dataset");
        }
        let h = &self.hyper;
        if !(h.lr.is_finite() && h.lr > 0.0) {
            return bad("hyperparameters.lr", "must be a positive number");
        }
        if h.batch_size == 0
            || h.minibatch_size == 0
            || !h.batch_size.is_multiple_of(h.minibatch_size)
        {
            return bad(
                "hyperparameters.minibatch_size",
                "batch_size and minibatch_size must be positive and minibatch_size must divide batch_size",
            );
        }
        if h.epochs == 0 {
            return bad("hyperparameters.epochs", "must be positive");
        }
        if !(h.weight_decay.is_finite() && h.weight_decay >= 0.0) {
            return bad(
                "hyperparameters.weight_decay",
                "must be a finite number ≥ 0",
            );
        }
        if let Schedule::LinearWarmupConstant { warmup_frac } = h.schedule
            && !(0.0..=1.0).contains(&warmup_frac)
        {
            return bad("hyperparameters.warmup_frac", "must lie in [0, 1]");
        }
        if h.max_ctx < 2 {
            return bad(
                "hyperparameters.max_ctx",
                "must be at least 2 tokens (0 = the model's context)",
            );
        }
        Ok(())
    }

    /// Checks the job's rows once read: their kind fits the objective and there is at least one
    /// batch of them.
    pub fn validate_rows(&self, rows: &[Row]) -> ServiceResult<()> {
        let needs_pairs = self.objective.needs_pairs();
        if let Some(i) = rows.iter().position(|row| match row {
            Row::Pair { .. } => false,
            Row::Text { .. } => needs_pairs,
            Row::Prompt { .. } => true,
        }) {
            return Err(ServiceError::invalid(
                "dataset_ids",
                format!(
                    "row {i} is a {:?} row; a {:?} job trains on {}",
                    rows[i].kind(),
                    self.objective,
                    if needs_pairs {
                        "pairs"
                    } else {
                        "pairs or texts"
                    }
                ),
            ));
        }
        if rows.len() < self.hyper.batch_size {
            return Err(ServiceError::invalid(
                "hyperparameters.batch_size",
                format!(
                    "{} is larger than the {} rows of the datasets",
                    self.hyper.batch_size,
                    rows.len()
                ),
            ));
        }
        Ok(())
    }
}

/// Lifecycle of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

/// The public state of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub id: String,
    pub state: JobState,
    pub objective: ObjectiveKind,
    pub base_model: String,
    pub output_model: String,
    pub step: usize,
    pub total_steps: usize,
    pub error: Option<String>,
    pub final_loss: Option<f64>,
    pub final_accuracy: Option<f64>,
}

impl JobStatus {
    pub fn new(spec: &JobSpec) -> Self {
        Self {
            id: spec.id.clone(),
            state: JobState::Queued,
            objective: spec.objective,
            base_model: spec.base_model.clone(),
            output_model: spec.output_model.clone(),
            step: 0,
            total_steps: 0,
            error: None,
            final_loss: None,
            final_accuracy: None,
        }
    }
}

/// A step as watchers see it: the training loop's own record plus the job's pace.
#[derive(Debug, Clone, PartialEq)]
pub struct StepUpdate {
    pub metrics: StepMetrics,
    /// Tokens per wall-clock second since the job (re)started, inference passes included.
    pub tokens_per_second: f64,
    pub eta_seconds: f64,
}

/// What is broadcast to watchers.
#[derive(Debug, Clone)]
pub struct JobEvent {
    pub status: JobStatus,
    pub step: Option<StepUpdate>,
}

/// Paths of a job's folder.
#[derive(Debug, Clone)]
pub struct JobPaths {
    pub dir: PathBuf,
}

impl JobPaths {
    pub fn new(data_dir: &Path, id: &str) -> Self {
        Self {
            dir: data_dir.join("jobs").join(id),
        }
    }
    pub fn spec(&self) -> PathBuf {
        self.dir.join("spec.json")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    pub fn checkpoint(&self) -> PathBuf {
        self.dir.join("checkpoint")
    }
    pub fn model(&self) -> PathBuf {
        self.dir.join("model")
    }
}

/// Prefix of a job folder being deleted: set aside first (one rename, so the job is gone from
/// its place at once), removed afterwards; a server that dies in between removes it at start.
pub const DELETED_JOB_PREFIX: &str = ".deleted-";

/// Removes a job's folder: renamed aside, then deleted. Returns the bytes it held.
pub fn remove_job_folder(dir: &Path) -> std::io::Result<u64> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let aside = dir.with_file_name(format!("{DELETED_JOB_PREFIX}{name}"));
    match std::fs::rename(dir, &aside) {
        Ok(()) => {}
        // Never written (a job that failed before its folder existed).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    }
    let bytes = folder_bytes(&aside);
    std::fs::remove_dir_all(&aside)?;
    Ok(bytes)
}

/// Bytes of the regular files below `dir` (what can be read; symlinks not followed).
pub fn folder_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => folder_bytes(&entry.path()),
            Ok(kind) if kind.is_file() => entry.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

/// Writes `value` as JSON atomically (see [`write_file_atomic`]).
pub fn write_json_atomic(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(value).map_err(std::io::Error::other)?;
    write_file_atomic(path, &text)
}

pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> std::io::Result<T> {
    let text = std::fs::read_to_string(path)?;
    serde_json::from_str(&text).map_err(std::io::Error::other)
}

/// Turns dataset rows into examples of the job's objective, tokenized with the base model's
/// tokenizer, oriented and shuffled as the hyperparameters say.
pub fn build_examples(
    spec: &JobSpec,
    rows: &[Row],
    tokenizer: &TextTokenizer,
) -> ServiceResult<Vec<Example>> {
    let max_ctx = spec.hyper.max_ctx;
    let mut orientation = spec
        .hyper
        .orient_slots
        .then(|| PythonRandom::new(spec.hyper.seed));
    let field = |i: usize| format!("rows[{i}]");
    let mut examples = Vec::with_capacity(rows.len());
    for (i, row) in rows.iter().enumerate() {
        let bad = |e: superficial_models::ModelError| ServiceError::invalid(field(i), e);
        let example = match (spec.objective.example_shape(), row) {
            (ExampleShape::Tokens, Row::Text { text }) => {
                Example::Tokens(tokenizer.encode_truncated(text, max_ctx).map_err(bad)?.0)
            }
            (ExampleShape::Tokens, Row::Pair { prompt, chosen, .. }) => Example::Tokens(
                tokenizer
                    .encode_truncated(&format!("{prompt}{chosen}"), max_ctx)
                    .map_err(bad)?
                    .0,
            ),
            (
                ExampleShape::RewardPair,
                Row::Pair {
                    prompt,
                    chosen,
                    rejected,
                    label,
                    chosen_is_human_choice,
                    conflict_prefers_chosen,
                },
            ) => {
                let conflict_prefers_chosen =
                    conflict_prefers_chosen.unwrap_or(!chosen_is_human_choice);
                let (c, start_c, _) = tokenizer
                    .encode_whole_text(prompt, chosen, max_ctx)
                    .map_err(bad)?;
                let (r, start_r, _) = tokenizer
                    .encode_whole_text(prompt, rejected, max_ctx)
                    .map_err(bad)?;
                let keep = orientation.as_mut().is_none_or(|rng| rng.random() < 0.5);
                if keep {
                    Example::RewardPair {
                        slot_c: c,
                        slot_r: r,
                        response_starts: [start_c, start_r],
                        target: *label,
                        conflict_prefers_slot_r: !conflict_prefers_chosen,
                    }
                } else {
                    Example::RewardPair {
                        slot_c: r,
                        slot_r: c,
                        response_starts: [start_r, start_c],
                        target: 1.0 - label,
                        conflict_prefers_slot_r: conflict_prefers_chosen,
                    }
                }
            }
            (ExampleShape::Sft, Row::Pair { prompt, chosen, .. }) => {
                Example::Sft(encode(tokenizer, prompt, chosen, max_ctx).map_err(bad)?)
            }
            (ExampleShape::Sft, Row::Text { text }) => {
                Example::Sft(tokenizer.encode_dialogue(text, max_ctx).map_err(bad)?)
            }
            (
                ExampleShape::Preference,
                Row::Pair {
                    prompt,
                    chosen,
                    rejected,
                    label,
                    chosen_is_human_choice,
                    conflict_prefers_chosen,
                },
            ) => {
                let conflict_prefers_chosen =
                    conflict_prefers_chosen.unwrap_or(!chosen_is_human_choice);
                let c = encode(tokenizer, prompt, chosen, max_ctx).map_err(bad)?;
                let r = encode(tokenizer, prompt, rejected, max_ctx).map_err(bad)?;
                // The preferred response goes first; a label below 0.5 prefers `rejected`.
                if *label >= 0.5 {
                    Example::Preference {
                        chosen: c,
                        rejected: r,
                        conflict_prefers_rejected: !conflict_prefers_chosen,
                        reference: None,
                    }
                } else {
                    Example::Preference {
                        chosen: r,
                        rejected: c,
                        conflict_prefers_rejected: conflict_prefers_chosen,
                        reference: None,
                    }
                }
            }
            (_, row) => {
                return Err(ServiceError::invalid(
                    field(i),
                    format!(
                        "{:?} rows cannot train the {:?} objective",
                        row.kind(),
                        spec.objective
                    ),
                ));
            }
        };
        examples.push(example);
    }
    if spec.hyper.shuffle {
        let mut rng = ChaCha8Rng::seed_from_u64(spec.hyper.seed);
        examples.shuffle(&mut rng);
    }
    Ok(examples)
}

fn encode(
    tokenizer: &TextTokenizer,
    prompt: &str,
    response: &str,
    max_ctx: usize,
) -> superficial_models::Result<superficial_models::EncodedDialogue> {
    if prompt.is_empty() {
        tokenizer.encode_dialogue(response, max_ctx)
    } else {
        tokenizer.encode_prompt_response(prompt, response, max_ctx)
    }
}
