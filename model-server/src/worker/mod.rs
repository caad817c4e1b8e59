//! The device worker: one OS thread owns a device, every model resident on it and the running
//! training job. Commands arrive on a bounded channel (full → RESOURCE_EXHAUSTED) and are
//! answered on oneshot channels; the async side never touches tensors.
//!
//! Scheduling: the worker drains every queued command, groups scoring/log-prob requests for the
//! same model into shared forward passes under a token budget (dynamic batching; padding never
//! changes a sequence's result), answers the rest in order, then runs one step of the active
//! training job, and repeats. Requests whose client has gone (deadline passed, cancelled) are
//! skipped.
//!
//! - this file: the command types, the handle, the loop, the model registry;
//! - [`inference`]: tokenizing, dynamic batches, scoring, generation, preference pairs;
//! - [`training`]: the queue of training jobs, one step at a time, persistence.

mod inference;
mod training;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use superficial_models::generation::SamplingConfig;
use superficial_models::{
    CausalLm, DType, Device, DeviceLocation, LoadOptions, ModelConfig, TextTokenizer,
};
use superficial_training::TrainingRun;
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{Span, error, info, instrument, warn};

use crate::datasets::Row;
use crate::error::{ServiceError, ServiceResult};
use crate::jobs::{JobEvent, JobPaths, JobSpec, JobStatus};
use crate::metrics::Metrics;

/// Where a model's weights come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelSource {
    /// An HF checkpoint folder (already resolved and confined by the caller).
    Folder(PathBuf),
    /// A built-in random-init configuration (with the built-in byte-level tokenizer).
    Preset(String),
    /// The model folder of a finished training job.
    Job { id: String, folder: PathBuf },
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSource::Folder(p) => write!(f, "{}", p.display()),
            ModelSource::Preset(p) => write!(f, "preset:{p}"),
            ModelSource::Job { id, .. } => write!(f, "job:{id}"),
        }
    }
}

/// What to load.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub name: String,
    pub source: ModelSource,
    pub role: String,
    pub reward_head: bool,
    pub seed: u64,
}

/// A resident model as the registry reports it.
#[derive(Debug, Clone)]
pub struct ModelSummary {
    pub name: String,
    pub config: ModelConfig,
    pub role: String,
    pub parameter_count: u64,
    pub dtype: String,
    pub device: String,
    pub source: ModelSource,
    pub reward_head_requested: bool,
    pub seed: u64,
    pub content_hash: String,
    pub has_reward_head: bool,
    pub memory_bytes: u64,
}

/// Time a request spent in each stage.
#[derive(Debug, Clone, Copy, Default)]
pub struct StageTimes {
    pub queue: Duration,
    pub tokenize: Duration,
    pub compute: Duration,
}

/// Per-token log-probs of one sequence.
#[derive(Debug, Clone)]
pub struct SequenceLogprobs {
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<f32>,
    pub response_mask: Vec<bool>,
    pub truncated: bool,
}

#[derive(Debug, Clone)]
pub struct LogprobsJob {
    pub model: String,
    pub texts: Vec<String>,
    pub split_dialogue: bool,
    pub max_ctx: usize,
    pub truncate: bool,
}

/// How a pair is scored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairScoring {
    Reward,
    MeanLogprob,
    SumLogprob,
    /// DPO implicit reward against this reference model.
    Dpo {
        reference: String,
    },
}

#[derive(Debug, Clone)]
pub struct Pair {
    /// Empty when `chosen`/`rejected` are whole dialogues.
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
}

#[derive(Debug, Clone)]
pub struct ScoreJob {
    pub model: String,
    pub pairs: Vec<Pair>,
    pub scoring: PairScoring,
    pub max_ctx: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct PairScore {
    pub chosen: f64,
    pub rejected: f64,
}

#[derive(Debug, Clone)]
pub struct TextsJob {
    pub model: String,
    pub texts: Vec<String>,
    pub max_ctx: usize,
}

#[derive(Debug, Clone)]
pub struct GenerateJob {
    pub model: String,
    pub prompt: String,
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    pub stop_at_eos: bool,
}

/// Streamed generation output.
#[derive(Debug, Clone)]
pub enum GenerationEvent {
    Token {
        id: u32,
        text: String,
    },
    Done {
        token_ids: Vec<u32>,
        text: String,
        times: StageTimes,
    },
}

/// How generated responses are judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JudgeKind {
    Reward,
    MeanLogprob,
    SumLogprob,
}

#[derive(Debug, Clone)]
pub struct PairsJob {
    pub policy: String,
    pub judge: String,
    pub judge_kind: JudgeKind,
    pub prompts: Vec<String>,
    pub samples_per_prompt: usize,
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
}

#[derive(Debug, Clone)]
pub struct GeneratedPair {
    pub prompt_index: usize,
    pub prompt: String,
    pub chosen: String,
    pub rejected: String,
    pub chosen_score: f64,
    pub rejected_score: f64,
}

type Reply<T> = oneshot::Sender<ServiceResult<T>>;

enum Command {
    Load(LoadSpec, Reply<ModelSummary>),
    Unload(String, Reply<()>),
    List(Reply<Vec<ModelSummary>>),
    Export(String, PathBuf, Reply<()>),
    Logprobs(LogprobsJob, Reply<(Vec<SequenceLogprobs>, StageTimes)>),
    Score(ScoreJob, Reply<(Vec<PairScore>, StageTimes)>),
    ScoreTexts(TextsJob, Reply<(Vec<f64>, StageTimes)>),
    Generate(GenerateJob, mpsc::Sender<ServiceResult<GenerationEvent>>),
    Pairs(PairsJob, Reply<(Vec<GeneratedPair>, StageTimes)>),
    StartJob(Box<JobSpec>, Vec<Row>, Reply<JobStatus>),
    CancelJob(String, Reply<JobStatus>),
    Shutdown(Reply<()>),
}

struct Job {
    command: Command,
    enqueued: Instant,
    span: Span,
}

/// Settings of a worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub device: Device,
    pub dtype: DType,
    /// Requests waiting beyond this are refused with RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
    /// Upper bound on padded tokens (rows x longest row) per forward pass.
    pub max_batch_tokens: usize,
    /// Most requests merged into one batch (1 disables dynamic batching).
    pub max_batch_requests: usize,
    /// Where jobs keep their files.
    pub data_dir: PathBuf,
    /// Default checkpoint interval of jobs, in steps.
    pub checkpoint_every: usize,
}

/// Shared, read-mostly view of the jobs for the services.
pub type JobTable = Arc<Mutex<BTreeMap<String, JobStatus>>>;

/// Cloneable handle to a device worker thread.
#[derive(Clone)]
pub struct WorkerHandle {
    sender: mpsc::Sender<Job>,
    capacity: usize,
    metrics: Arc<Metrics>,
}

impl WorkerHandle {
    /// Starts the worker thread.
    pub fn spawn(
        config: WorkerConfig,
        jobs: JobTable,
        events: broadcast::Sender<JobEvent>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let capacity = config.queue_capacity.max(1);
        let (sender, receiver) = mpsc::channel(capacity);
        let worker_metrics = metrics.clone();
        std::thread::Builder::new()
            .name("w2s-device-worker".into())
            .spawn(move || Worker::new(config, jobs, events, worker_metrics).run(receiver))?;
        Ok(Self {
            sender,
            capacity,
            metrics,
        })
    }

    /// Requests waiting for the worker.
    pub fn queue_depth(&self) -> usize {
        self.capacity - self.sender.capacity()
    }

    fn enqueue(&self, command: Command) -> ServiceResult<()> {
        let job = Job {
            command,
            enqueued: Instant::now(),
            span: Span::current(),
        };
        let result = self.sender.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => ServiceError::Overloaded(self.capacity),
            mpsc::error::TrySendError::Closed(_) => ServiceError::WorkerGone,
        });
        self.metrics.queue_depth.set(self.queue_depth() as i64);
        result
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> ServiceResult<T> {
        let (reply, receive) = oneshot::channel();
        self.enqueue(make(reply))?;
        receive.await.map_err(|_| ServiceError::WorkerGone)?
    }

    pub async fn load(&self, spec: LoadSpec) -> ServiceResult<ModelSummary> {
        self.call(|r| Command::Load(spec, r)).await
    }
    pub async fn unload(&self, name: String) -> ServiceResult<()> {
        self.call(|r| Command::Unload(name, r)).await
    }
    pub async fn list(&self) -> ServiceResult<Vec<ModelSummary>> {
        self.call(Command::List).await
    }
    pub async fn export(&self, name: String, dir: PathBuf) -> ServiceResult<()> {
        self.call(|r| Command::Export(name, dir, r)).await
    }
    pub async fn logprobs(
        &self,
        job: LogprobsJob,
    ) -> ServiceResult<(Vec<SequenceLogprobs>, StageTimes)> {
        self.call(|r| Command::Logprobs(job, r)).await
    }
    pub async fn score(&self, job: ScoreJob) -> ServiceResult<(Vec<PairScore>, StageTimes)> {
        self.call(|r| Command::Score(job, r)).await
    }
    pub async fn score_texts(&self, job: TextsJob) -> ServiceResult<(Vec<f64>, StageTimes)> {
        self.call(|r| Command::ScoreTexts(job, r)).await
    }
    /// Starts a generation; events arrive on the returned receiver.
    pub fn generate(
        &self,
        job: GenerateJob,
    ) -> ServiceResult<mpsc::Receiver<ServiceResult<GenerationEvent>>> {
        let (tx, rx) = mpsc::channel(64);
        self.enqueue(Command::Generate(job, tx))?;
        Ok(rx)
    }
    pub async fn generate_pairs(
        &self,
        job: PairsJob,
    ) -> ServiceResult<(Vec<GeneratedPair>, StageTimes)> {
        self.call(|r| Command::Pairs(job, r)).await
    }
    pub async fn start_job(&self, spec: JobSpec, rows: Vec<Row>) -> ServiceResult<JobStatus> {
        self.call(|r| Command::StartJob(Box::new(spec), rows, r))
            .await
    }
    pub async fn cancel_job(&self, id: String) -> ServiceResult<JobStatus> {
        self.call(|r| Command::CancelJob(id, r)).await
    }
    /// Checkpoints the running job and stops the worker. Waits for the queue ahead to drain.
    pub async fn shutdown(&self) -> ServiceResult<()> {
        let (reply, receive) = oneshot::channel();
        let job = Job {
            command: Command::Shutdown(reply),
            enqueued: Instant::now(),
            span: Span::current(),
        };
        // Shutdown waits for room rather than being refused.
        self.sender
            .send(job)
            .await
            .map_err(|_| ServiceError::WorkerGone)?;
        receive.await.map_err(|_| ServiceError::WorkerGone)?
    }
}

struct Resident {
    model: CausalLm,
    tokenizer: TextTokenizer,
    summary: ModelSummary,
}

/// A training job the worker owns: waiting (`run` is None) or running.
struct ActiveJob {
    spec: JobSpec,
    rows: Vec<Row>,
    run: Option<TrainingRun>,
    tokenizer: Option<TextTokenizer>,
    paths: JobPaths,
    cancel: bool,
    started: Option<Instant>,
    steps_this_session: usize,
    tokens_this_session: usize,
}

/// Which primitive a batchable request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Primitive {
    Logprobs,
    Rewards,
}

enum Output {
    Logprobs(Vec<Vec<f32>>),
    Rewards(Vec<f32>),
}

/// A tokenized request waiting for its forward pass.
struct Prepared {
    model: String,
    primitive: Primitive,
    sequences: Vec<Vec<u32>>,
    times: StageTimes,
    finish: Box<dyn FnOnce(ServiceResult<Output>, StageTimes)>,
}

struct Worker {
    config: WorkerConfig,
    models: BTreeMap<String, Resident>,
    jobs: JobTable,
    events: broadcast::Sender<JobEvent>,
    queue: VecDeque<ActiveJob>,
    metrics: Arc<Metrics>,
}

impl Worker {
    fn new(
        config: WorkerConfig,
        jobs: JobTable,
        events: broadcast::Sender<JobEvent>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            config,
            models: BTreeMap::new(),
            jobs,
            events,
            queue: VecDeque::new(),
            metrics,
        }
    }

    fn run(mut self, mut receiver: mpsc::Receiver<Job>) {
        let mut pending: VecDeque<Job> = VecDeque::new();
        loop {
            if pending.is_empty() {
                if self.queue.is_empty() {
                    match receiver.blocking_recv() {
                        Some(job) => pending.push_back(job),
                        None => break,
                    }
                }
                while let Ok(job) = receiver.try_recv() {
                    pending.push_back(job);
                }
            }
            self.metrics.queue_depth.set(pending.len() as i64);
            while let Some(job) = pending.pop_front() {
                if let Command::Shutdown(reply) = job.command {
                    self.checkpoint_for_shutdown();
                    let _ = reply.send(Ok(()));
                    return;
                }
                if Self::batchable(&job.command) {
                    let mut batch = vec![job];
                    let mut rest = VecDeque::new();
                    let key = self.batch_key(&batch[0].command);
                    while let Some(other) = pending.pop_front() {
                        if batch.len() < self.config.max_batch_requests.max(1)
                            && Self::batchable(&other.command)
                            && self.batch_key(&other.command) == key
                        {
                            batch.push(other);
                        } else {
                            rest.push_back(other);
                        }
                    }
                    pending = rest;
                    self.guarded("batch", |w| w.run_batch(batch));
                } else {
                    let span = job.span.clone();
                    let _entered = span.enter();
                    self.guarded("command", |w| w.execute(job));
                }
            }
            self.guarded("training step", Worker::train_one_step);
        }
    }

    /// Runs `work`; a panic (a bug) is logged and the worker keeps serving. The panicking
    /// request's reply channel is dropped, so its client sees UNAVAILABLE.
    fn guarded(&mut self, what: &str, work: impl FnOnce(&mut Self)) {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(self)));
        if let Err(panic) = outcome {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            error!("worker recovered from a panic in a {what}: {message}");
        }
    }

    fn batchable(command: &Command) -> bool {
        match command {
            Command::Logprobs(..) | Command::ScoreTexts(..) => true,
            Command::Score(job, _) => !matches!(job.scoring, PairScoring::Dpo { .. }),
            _ => false,
        }
    }

    fn batch_key(&self, command: &Command) -> Option<(String, Primitive)> {
        match command {
            Command::Logprobs(job, _) => Some((job.model.clone(), Primitive::Logprobs)),
            Command::ScoreTexts(job, _) => Some((job.model.clone(), Primitive::Rewards)),
            Command::Score(job, _) => Some((
                job.model.clone(),
                if job.scoring == PairScoring::Reward {
                    Primitive::Rewards
                } else {
                    Primitive::Logprobs
                },
            )),
            _ => None,
        }
    }

    fn execute(&mut self, job: Job) {
        let queued = job.enqueued.elapsed();
        match job.command {
            Command::Load(spec, reply) => {
                let _ = reply.send(self.load(spec));
            }
            Command::Unload(name, reply) => {
                let result = match self.models.remove(&name) {
                    Some(_) => Ok(()),
                    None => Err(ServiceError::UnknownModel(name)),
                };
                let _ = reply.send(result);
            }
            Command::List(reply) => {
                let _ = reply.send(Ok(self
                    .models
                    .values()
                    .map(|r| r.summary.clone())
                    .collect()));
            }
            Command::Export(name, dir, reply) => {
                let result = self.resident(&name).and_then(|r| {
                    superficial_training::export::save_hf_folder(&r.model, Some(&r.tokenizer), &dir)
                        .map_err(|e| match e {
                            superficial_training::TrainError::RefusedDestination { .. } => {
                                ServiceError::FailedPrecondition(format!("exporting {name}: {e}"))
                            }
                            e => ServiceError::Internal(format!("exporting {name}: {e}")),
                        })
                });
                let _ = reply.send(result);
            }
            Command::Score(job, reply) => {
                if reply.is_closed() {
                    return;
                }
                let result = self.dpo_scores(&job).map(|(s, mut t)| {
                    t.queue = queued;
                    (s, t)
                });
                let _ = reply.send(result);
            }
            Command::Generate(job, events) => self.generate(job, events, queued),
            Command::Pairs(job, reply) => {
                if reply.is_closed() {
                    return;
                }
                let result = self.generate_pairs(&job).map(|(p, mut t)| {
                    t.queue = queued;
                    (p, t)
                });
                let _ = reply.send(result);
            }
            Command::StartJob(spec, rows, reply) => {
                let _ = reply.send(self.enqueue_job(*spec, rows));
            }
            Command::CancelJob(id, reply) => {
                let _ = reply.send(self.cancel_job(&id));
            }
            Command::Logprobs(..) | Command::ScoreTexts(..) | Command::Shutdown(_) => {}
        }
    }

    #[instrument(skip_all, fields(name = %spec.name, source = %spec.source))]
    fn load(&mut self, spec: LoadSpec) -> ServiceResult<ModelSummary> {
        if spec.name.is_empty() {
            return Err(ServiceError::invalid("name", "must not be empty"));
        }
        if self.models.contains_key(&spec.name) {
            return Err(ServiceError::AlreadyLoaded(spec.name));
        }
        let (model, tokenizer) = self.build_model(&spec.source, spec.reward_head, spec.seed)?;
        let weights = model.weights();
        let summary = ModelSummary {
            name: spec.name.clone(),
            config: model.config().clone(),
            role: spec.role,
            parameter_count: weights.parameter_count(),
            dtype: format!("{:?}", model.dtype()).to_lowercase(),
            device: device_name(model.device()),
            source: spec.source,
            reward_head_requested: spec.reward_head,
            seed: spec.seed,
            content_hash: weights.content_hash()?,
            has_reward_head: model.has_reward_head(),
            memory_bytes: weights.memory_bytes(),
        };
        info!(parameters = summary.parameter_count, "model loaded");
        self.models.insert(
            spec.name,
            Resident {
                model,
                tokenizer,
                summary: summary.clone(),
            },
        );
        self.metrics.resident_models.set(self.models.len() as i64);
        Ok(summary)
    }

    /// Builds a model and its tokenizer from a source (presets get the byte-level tokenizer).
    fn build_model(
        &self,
        source: &ModelSource,
        reward_head: bool,
        seed: u64,
    ) -> ServiceResult<(CausalLm, TextTokenizer)> {
        let options = LoadOptions {
            device: self.config.device.clone(),
            dtype: self.config.dtype,
        };
        let (mut model, tokenizer) = match source {
            ModelSource::Folder(dir) | ModelSource::Job { folder: dir, .. } => {
                let model = CausalLm::from_folder(dir, &options)?;
                let tokenizer = TextTokenizer::from_folder(dir, model.config())?;
                (model, tokenizer)
            }
            ModelSource::Preset(preset) => {
                let config = ModelConfig::preset(preset).ok_or_else(|| {
                    ServiceError::invalid(
                        "preset",
                        format!(
                            "unknown preset `{preset}` (known: {})",
                            ModelConfig::PRESETS.join(", ")
                        ),
                    )
                })?;
                (
                    CausalLm::random_init(config, seed, &options)?,
                    TextTokenizer::bytes()?,
                )
            }
        };
        if reward_head && !model.has_reward_head() {
            model = model.with_fresh_reward_head(seed)?;
        }
        Ok((model, tokenizer))
    }

    fn resident(&self, name: &str) -> ServiceResult<&Resident> {
        self.models
            .get(name)
            .ok_or_else(|| ServiceError::UnknownModel(name.to_string()))
    }

    fn max_ctx(resident: &Resident, requested: usize) -> usize {
        let limit = resident.model.config().max_positions();
        if requested == 0 {
            limit
        } else {
            requested.min(limit)
        }
    }
}

/// "cpu" or "cuda:N".
pub fn device_name(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}"),
    }
}

/// Parses "cpu" or "cuda:N" into a device (CUDA needs the `cuda` feature).
pub fn parse_device(spec: &str) -> Result<Device, String> {
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = spec
        .strip_prefix("cuda:")
        .or_else(|| (spec == "cuda").then_some("0"))
        .ok_or_else(|| format!("device must be `cpu` or `cuda:N`, got `{spec}`"))?;
    let ordinal: usize = ordinal
        .parse()
        .map_err(|_| format!("bad CUDA ordinal in `{spec}`"))?;
    Device::new_cuda(ordinal).map_err(|e| format!("cannot open {spec}: {e}"))
}
