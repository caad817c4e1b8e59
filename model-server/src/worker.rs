//! The device worker: one OS thread owns a device, every model resident on it and the running
//! training job. Commands arrive on a bounded channel (full → RESOURCE_EXHAUSTED) and are
//! answered on oneshot channels; the async side never touches tensors.
//!
//! Scheduling: the worker drains every queued command, groups scoring/log-prob requests for the
//! same model into shared forward passes under a token budget (dynamic batching; padding never
//! changes a sequence's result), answers the rest in order, then runs one step of the active
//! training job, and repeats. Requests whose client has gone (deadline passed, cancelled) are
//! skipped.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use superficial_models::generation::{GenerationConfig, SamplingConfig, generate};
use superficial_models::{
    CausalLm, DType, Device, DeviceLocation, EncodedDialogue, LoadOptions, ModelConfig,
    TextTokenizer,
};
use superficial_training::objectives::attach_reference_logprobs;
use superficial_training::{Objective, TrainingRun, frozen_copy};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{Span, error, info, instrument, warn};

use crate::datasets::Row;
use crate::error::{ServiceError, ServiceResult};
use crate::jobs::{
    JobEvent, JobPaths, JobSpec, JobState, JobStatus, StepUpdate, build_examples, write_json_atomic,
};
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
                        .map_err(|e| ServiceError::Internal(format!("exporting {name}: {e}")))
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

    /// Tokenizes a batchable request; on error the request is answered at once.
    fn prepare(&self, job: Job) -> Option<Prepared> {
        let queued = job.enqueued.elapsed();
        let started = Instant::now();
        match job.command {
            Command::Logprobs(request, reply) => {
                if reply.is_closed() {
                    return None;
                }
                match self.encode_logprobs(&request) {
                    Ok(encoded) => Some(Prepared {
                        model: request.model,
                        primitive: Primitive::Logprobs,
                        sequences: encoded.iter().map(|d| d.ids.clone()).collect(),
                        times: StageTimes {
                            queue: queued,
                            tokenize: started.elapsed(),
                            compute: Duration::ZERO,
                        },
                        finish: Box::new(move |output, times| {
                            let result = output.and_then(|o| match o {
                                Output::Logprobs(rows) => Ok((
                                    encoded
                                        .into_iter()
                                        .zip(rows)
                                        .map(|(d, logprobs)| SequenceLogprobs {
                                            response_mask: d.logprob_mask(),
                                            token_ids: d.ids,
                                            logprobs,
                                            truncated: d.truncated,
                                        })
                                        .collect(),
                                    times,
                                )),
                                Output::Rewards(_) => {
                                    Err(ServiceError::Internal("wrong primitive".into()))
                                }
                            });
                            let _ = reply.send(result);
                        }),
                    }),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        None
                    }
                }
            }
            Command::ScoreTexts(request, reply) => {
                if reply.is_closed() {
                    return None;
                }
                let encoded = self.resident(&request.model).and_then(|resident| {
                    Self::require_head(resident)?;
                    let max_ctx = Self::max_ctx(resident, request.max_ctx);
                    request
                        .texts
                        .iter()
                        .enumerate()
                        .map(|(i, text)| {
                            let (ids, _) = resident
                                .tokenizer
                                .encode_truncated(text, max_ctx)
                                .map_err(|e| ServiceError::invalid(format!("texts[{i}]"), e))?;
                            check_ids(resident, &ids, format!("texts[{i}]"))?;
                            Ok(ids)
                        })
                        .collect::<ServiceResult<Vec<_>>>()
                });
                match encoded {
                    Ok(sequences) => Some(Prepared {
                        model: request.model,
                        primitive: Primitive::Rewards,
                        sequences,
                        times: StageTimes {
                            queue: queued,
                            tokenize: started.elapsed(),
                            compute: Duration::ZERO,
                        },
                        finish: Box::new(move |output, times| {
                            let result = output.and_then(|o| match o {
                                Output::Rewards(values) => {
                                    Ok((values.into_iter().map(f64::from).collect(), times))
                                }
                                Output::Logprobs(_) => {
                                    Err(ServiceError::Internal("wrong primitive".into()))
                                }
                            });
                            let _ = reply.send(result);
                        }),
                    }),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        None
                    }
                }
            }
            Command::Score(request, reply) => {
                if reply.is_closed() {
                    return None;
                }
                match self.encode_pairs(&request) {
                    Ok(encoded) => {
                        let scoring = request.scoring.clone();
                        Some(Prepared {
                            model: request.model,
                            primitive: if scoring == PairScoring::Reward {
                                Primitive::Rewards
                            } else {
                                Primitive::Logprobs
                            },
                            sequences: encoded.iter().map(|d| d.ids.clone()).collect(),
                            times: StageTimes {
                                queue: queued,
                                tokenize: started.elapsed(),
                                compute: Duration::ZERO,
                            },
                            finish: Box::new(move |output, times| {
                                let result = output.and_then(|o| {
                                    let values = match o {
                                        Output::Rewards(values) => {
                                            values.into_iter().map(f64::from).collect()
                                        }
                                        Output::Logprobs(rows) => pool_rows(
                                            &rows,
                                            &encoded,
                                            scoring == PairScoring::MeanLogprob,
                                        )?,
                                    };
                                    Ok((pair_scores(&values), times))
                                });
                                let _ = reply.send(result);
                            }),
                        })
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        None
                    }
                }
            }
            _ => None,
        }
    }

    /// Runs batchable requests for one model in shared forward passes.
    fn run_batch(&mut self, batch: Vec<Job>) {
        let prepared: Vec<Prepared> = batch
            .into_iter()
            .filter_map(|job| self.prepare(job))
            .collect();
        let Some(first) = prepared.first() else {
            return;
        };
        let (model_name, primitive) = (first.model.clone(), first.primitive);
        self.metrics.observe_batch(
            prepared.len(),
            prepared.iter().map(|p| p.sequences.len()).sum(),
        );
        let all: Vec<Vec<u32>> = prepared
            .iter()
            .flat_map(|p| p.sequences.iter().cloned())
            .collect();
        let started = Instant::now();
        let computed = self.resident(&model_name).and_then(|r| match primitive {
            Primitive::Logprobs => self.batched_logprobs(&r.model, &all).map(Output::Logprobs),
            Primitive::Rewards => self.batched_rewards(&r.model, &all).map(Output::Rewards),
        });
        let compute = started.elapsed();
        match computed {
            Ok(output) => {
                let mut offset = 0;
                for p in prepared {
                    let n = p.sequences.len();
                    let part = match &output {
                        Output::Logprobs(rows) => {
                            Output::Logprobs(rows[offset..offset + n].to_vec())
                        }
                        Output::Rewards(values) => {
                            Output::Rewards(values[offset..offset + n].to_vec())
                        }
                    };
                    offset += n;
                    (p.finish)(Ok(part), StageTimes { compute, ..p.times });
                }
            }
            Err(e) => {
                let message = e.to_string();
                let code = e.code();
                for p in prepared {
                    let error = if code == tonic::Code::NotFound {
                        ServiceError::UnknownModel(model_name.clone())
                    } else {
                        ServiceError::Internal(message.clone())
                    };
                    (p.finish)(Err(error), p.times);
                }
            }
        }
    }

    fn encode_logprobs(&self, job: &LogprobsJob) -> ServiceResult<Vec<EncodedDialogue>> {
        let resident = self.resident(&job.model)?;
        let tokenizer = &resident.tokenizer;
        let max_ctx = Self::max_ctx(resident, job.max_ctx);
        let mut encoded = Vec::with_capacity(job.texts.len());
        for (i, text) in job.texts.iter().enumerate() {
            let field = || format!("texts[{i}]");
            let dialogue = if job.split_dialogue {
                tokenizer
                    .encode_dialogue(text, usize::MAX)
                    .map_err(|e| ServiceError::invalid(field(), e))?
            } else {
                let ids = tokenizer
                    .encode(text)
                    .map_err(|e| ServiceError::invalid(field(), e))?;
                let n = ids.len();
                EncodedDialogue::assemble(Vec::new(), ids, n)
            };
            if dialogue.ids.is_empty() {
                return Err(ServiceError::invalid(field(), "text has no tokens"));
            }
            let dialogue = if dialogue.ids.len() > max_ctx {
                if !job.truncate {
                    return Err(ServiceError::invalid(
                        field(),
                        format!(
                            "{} tokens exceed max_ctx {max_ctx} (set truncate to keep the last {max_ctx})",
                            dialogue.ids.len()
                        ),
                    ));
                }
                truncate_dialogue(dialogue, max_ctx)
            } else {
                dialogue
            };
            check_ids(resident, &dialogue.ids, field())?;
            encoded.push(dialogue);
        }
        Ok(encoded)
    }

    /// Sequences of a pair request in the order chosen_0, rejected_0, chosen_1, ...
    fn encode_pairs_with(
        &self,
        resident: &Resident,
        job: &ScoreJob,
        whole_text: bool,
    ) -> ServiceResult<Vec<EncodedDialogue>> {
        let tokenizer = &resident.tokenizer;
        let max_ctx = Self::max_ctx(resident, job.max_ctx);
        let mut encoded = Vec::with_capacity(job.pairs.len() * 2);
        for (i, pair) in job.pairs.iter().enumerate() {
            for (side, response) in [("chosen", &pair.chosen), ("rejected", &pair.rejected)] {
                let field = || format!("pairs[{i}].{side}");
                let dialogue = if whole_text {
                    let text = format!("{}{}", pair.prompt, response);
                    let (ids, truncated) = tokenizer
                        .encode_truncated(&text, max_ctx)
                        .map_err(|e| ServiceError::invalid(field(), e))?;
                    let n = ids.len();
                    EncodedDialogue {
                        response_mask: vec![true; n],
                        ids,
                        truncated,
                    }
                } else if pair.prompt.is_empty() {
                    tokenizer
                        .encode_dialogue(response, max_ctx)
                        .map_err(|e| ServiceError::invalid(field(), e))?
                } else {
                    tokenizer
                        .encode_prompt_response(&pair.prompt, response, max_ctx)
                        .map_err(|e| ServiceError::invalid(field(), e))?
                };
                if dialogue.ids.is_empty() {
                    return Err(ServiceError::invalid(field(), "text has no tokens"));
                }
                if !whole_text && !dialogue.logprob_mask().iter().any(|m| *m) {
                    return Err(ServiceError::invalid(
                        field(),
                        "response has no tokens to score",
                    ));
                }
                check_ids(resident, &dialogue.ids, field())?;
                encoded.push(dialogue);
            }
        }
        Ok(encoded)
    }

    fn encode_pairs(&self, job: &ScoreJob) -> ServiceResult<Vec<EncodedDialogue>> {
        let resident = self.resident(&job.model)?;
        let whole_text = job.scoring == PairScoring::Reward;
        if whole_text {
            Self::require_head(resident)?;
        }
        self.encode_pairs_with(resident, job, whole_text)
    }

    fn require_head(resident: &Resident) -> ServiceResult<()> {
        if resident.model.has_reward_head() {
            Ok(())
        } else {
            Err(ServiceError::FailedPrecondition(format!(
                "model `{}` has no reward head (load it with reward_head = true)",
                resident.summary.name
            )))
        }
    }

    /// DPO implicit-reward scoring: policy and reference summed response log-probs.
    fn dpo_scores(&self, job: &ScoreJob) -> ServiceResult<(Vec<PairScore>, StageTimes)> {
        let PairScoring::Dpo { reference } = &job.scoring else {
            return Err(ServiceError::Internal("not a DPO request".into()));
        };
        let policy = self.resident(&job.model)?;
        let reference_model = self.resident(reference)?;
        let started = Instant::now();
        let encoded = self.encode_pairs_with(policy, job, false)?;
        let ref_encoded = self.encode_pairs_with(reference_model, job, false)?;
        let tokenize = started.elapsed();
        let started = Instant::now();
        let sequences: Vec<Vec<u32>> = encoded.iter().map(|d| d.ids.clone()).collect();
        let ref_sequences: Vec<Vec<u32>> = ref_encoded.iter().map(|d| d.ids.clone()).collect();
        let policy_sums = pool_rows(
            &self.batched_logprobs(&policy.model, &sequences)?,
            &encoded,
            false,
        )?;
        let ref_sums = pool_rows(
            &self.batched_logprobs(&reference_model.model, &ref_sequences)?,
            &ref_encoded,
            false,
        )?;
        let values: Vec<f64> = policy_sums
            .iter()
            .zip(&ref_sums)
            .map(|(p, r)| p - r)
            .collect();
        Ok((
            pair_scores(&values),
            StageTimes {
                queue: Duration::ZERO,
                tokenize,
                compute: started.elapsed(),
            },
        ))
    }

    /// Splits sequences into batches of at most `max_batch_tokens` padded tokens, in order.
    fn batches<'a>(&self, sequences: &'a [Vec<u32>]) -> Vec<&'a [Vec<u32>]> {
        let mut out = Vec::new();
        let mut start = 0;
        while start < sequences.len() {
            let mut end = start;
            let mut longest = 0;
            while end < sequences.len() {
                let longest_with = longest.max(sequences[end].len());
                if end > start && longest_with * (end - start + 1) > self.config.max_batch_tokens {
                    break;
                }
                longest = longest_with;
                end += 1;
            }
            out.push(&sequences[start..end]);
            start = end;
        }
        out
    }

    fn batched_logprobs(
        &self,
        model: &CausalLm,
        sequences: &[Vec<u32>],
    ) -> ServiceResult<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(sequences.len());
        for batch in self.batches(sequences) {
            out.extend(model.sequence_logprobs(batch)?);
        }
        Ok(out)
    }

    fn batched_rewards(&self, model: &CausalLm, sequences: &[Vec<u32>]) -> ServiceResult<Vec<f32>> {
        let mut out = Vec::with_capacity(sequences.len());
        for batch in self.batches(sequences) {
            out.extend(model.sequence_rewards(batch)?);
        }
        Ok(out)
    }

    fn generate(
        &mut self,
        job: GenerateJob,
        events: mpsc::Sender<ServiceResult<GenerationEvent>>,
        queued: Duration,
    ) {
        let result = (|| -> ServiceResult<()> {
            let resident = self.resident(&job.model)?;
            let started = Instant::now();
            let prompt = resident
                .tokenizer
                .encode(&job.prompt)
                .map_err(|e| ServiceError::invalid("prompt", e))?;
            check_ids(resident, &prompt, "prompt".into())?;
            let tokenize = started.elapsed();
            let started = Instant::now();
            let config = GenerationConfig {
                max_new_tokens: job.max_new_tokens,
                sampling: job.sampling.clone(),
                stop_tokens: if job.stop_at_eos {
                    vec![resident.model.config().eos_token_id()]
                } else {
                    Vec::new()
                },
            };
            let tokenizer = &resident.tokenizer;
            let tokens = generate(&resident.model, &prompt, &config, |id| {
                let text = tokenizer.decode(&[id]).unwrap_or_default();
                events
                    .blocking_send(Ok(GenerationEvent::Token { id, text }))
                    .is_ok()
            })
            .map_err(|e| match e {
                superficial_models::ModelError::SequenceTooLong { .. }
                | superficial_models::ModelError::InvalidInput(_) => {
                    ServiceError::invalid("max_new_tokens", e)
                }
                other => ServiceError::Model(other),
            })?;
            let text = tokenizer.decode(&tokens).unwrap_or_default();
            let _ = events.blocking_send(Ok(GenerationEvent::Done {
                token_ids: tokens,
                text,
                times: StageTimes {
                    queue: queued,
                    tokenize,
                    compute: started.elapsed(),
                },
            }));
            Ok(())
        })();
        if let Err(e) = result {
            let _ = events.blocking_send(Err(e));
        }
    }

    fn generate_pairs(&self, job: &PairsJob) -> ServiceResult<(Vec<GeneratedPair>, StageTimes)> {
        if job.samples_per_prompt < 2 {
            return Err(ServiceError::invalid(
                "samples_per_prompt",
                "must be at least 2",
            ));
        }
        let policy = self.resident(&job.policy)?;
        let judge = self.resident(&job.judge)?;
        if job.judge_kind == JudgeKind::Reward {
            Self::require_head(judge)?;
        }
        let started = Instant::now();
        let mut out = Vec::new();
        for (p, prompt) in job.prompts.iter().enumerate() {
            let field = format!("prompts[{p}]");
            let prompt_ids = policy
                .tokenizer
                .encode(prompt)
                .map_err(|e| ServiceError::invalid(field.clone(), e))?;
            check_ids(policy, &prompt_ids, field.clone())?;
            let mut responses = Vec::with_capacity(job.samples_per_prompt);
            for k in 0..job.samples_per_prompt {
                let sampling = SamplingConfig {
                    seed: job
                        .sampling
                        .seed
                        .wrapping_add((p * job.samples_per_prompt + k) as u64),
                    ..job.sampling.clone()
                };
                let config = GenerationConfig {
                    max_new_tokens: job.max_new_tokens,
                    sampling,
                    stop_tokens: vec![policy.model.config().eos_token_id()],
                };
                let tokens = generate(&policy.model, &prompt_ids, &config, |_| true)
                    .map_err(|e| ServiceError::invalid(field.clone(), e))?;
                let eos = policy.model.config().eos_token_id();
                let kept: Vec<u32> = tokens.into_iter().filter(|t| *t != eos).collect();
                let mut text = policy.tokenizer.decode(&kept).unwrap_or_default();
                if text.is_empty() {
                    // An immediately-ended sample still needs one response token to be judged.
                    text = " ".into();
                }
                responses.push(text);
            }
            let score_job = ScoreJob {
                model: job.judge.clone(),
                pairs: responses
                    .iter()
                    .map(|r| Pair {
                        prompt: prompt.clone(),
                        chosen: r.clone(),
                        rejected: r.clone(),
                    })
                    .collect(),
                scoring: match job.judge_kind {
                    JudgeKind::Reward => PairScoring::Reward,
                    JudgeKind::MeanLogprob => PairScoring::MeanLogprob,
                    JudgeKind::SumLogprob => PairScoring::SumLogprob,
                },
                max_ctx: 0,
            };
            let whole_text = job.judge_kind == JudgeKind::Reward;
            let encoded = self.encode_pairs_with(judge, &score_job, whole_text)?;
            // Every response was encoded twice (as chosen and rejected); score each once.
            let singles: Vec<EncodedDialogue> = encoded.into_iter().step_by(2).collect();
            let sequences: Vec<Vec<u32>> = singles.iter().map(|d| d.ids.clone()).collect();
            let scores: Vec<f64> = if whole_text {
                self.batched_rewards(&judge.model, &sequences)?
                    .into_iter()
                    .map(f64::from)
                    .collect()
            } else {
                pool_rows(
                    &self.batched_logprobs(&judge.model, &sequences)?,
                    &singles,
                    job.judge_kind == JudgeKind::MeanLogprob,
                )?
            };
            let best = (0..scores.len())
                .max_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(b.cmp(&a)))
                .unwrap_or(0);
            for (k, response) in responses.iter().enumerate() {
                if k == best {
                    continue;
                }
                out.push(GeneratedPair {
                    prompt_index: p,
                    prompt: prompt.clone(),
                    chosen: responses[best].clone(),
                    rejected: response.clone(),
                    chosen_score: scores[best],
                    rejected_score: scores[k],
                });
            }
        }
        Ok((
            out,
            StageTimes {
                queue: Duration::ZERO,
                tokenize: Duration::ZERO,
                compute: started.elapsed(),
            },
        ))
    }

    // ---- training jobs ----

    fn publish(&self, status: &JobStatus, step: Option<StepUpdate>) {
        if let Ok(mut table) = self.jobs.lock() {
            table.insert(status.id.clone(), status.clone());
        }
        let _ = self.events.send(JobEvent {
            status: status.clone(),
            step,
        });
    }

    fn status_of(&self, id: &str) -> Option<JobStatus> {
        self.jobs.lock().ok().and_then(|t| t.get(id).cloned())
    }

    fn persist(&self, paths: &JobPaths, status: &JobStatus) {
        if let Err(e) = write_json_atomic(&paths.state(), status) {
            error!(job = %status.id, "cannot persist job state: {e}");
        }
    }

    fn enqueue_job(&mut self, spec: JobSpec, rows: Vec<Row>) -> ServiceResult<JobStatus> {
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

    fn cancel_job(&mut self, id: &str) -> ServiceResult<JobStatus> {
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
    fn start_head_job(&mut self) -> ServiceResult<()> {
        let Some(job) = self.queue.front() else {
            return Ok(());
        };
        let spec = job.spec.clone();
        let (base, tokenizer) =
            self.build_model(&spec.base_source, spec.base_reward_head, spec.base_seed)?;
        let mut examples = build_examples(&spec, &job.rows, &tokenizer)?;
        let objective = spec.objective();
        if matches!(objective, Objective::Dpo { .. }) {
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

    fn fail_head_job(&mut self, error: String, state: JobState) {
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

    fn train_one_step(&mut self) {
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
            step: metrics.step,
            total_steps: metrics.total_steps,
            loss: metrics.loss,
            lr: metrics.lr,
            grad_norm: metrics.grad_norm,
            accuracy: metrics.accuracy,
            tokens_per_second: job.tokens_this_session as f64 / elapsed,
            eta_seconds: per_step * (metrics.total_steps - metrics.step) as f64,
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
    fn finish_head_job(&mut self, loss: f64, accuracy: Option<f64>) {
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
            superficial_training::export::save_hf_folder(
                &model,
                job.tokenizer.as_ref(),
                &job.paths.model(),
            )
            .map_err(|e| ServiceError::Internal(format!("exporting the trained model: {e}")))?;
            self.models.remove(&job.spec.output_model);
            self.load(LoadSpec {
                name: job.spec.output_model.clone(),
                source: ModelSource::Job {
                    id: id.clone(),
                    folder: job.paths.model(),
                },
                role: String::new(),
                reward_head: false,
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
        self.publish(&status, None);
    }

    fn checkpoint_for_shutdown(&mut self) {
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

/// Masked response log-probs pooled per sequence (mean or sum).
fn pool_rows(
    rows: &[Vec<f32>],
    encoded: &[EncodedDialogue],
    mean: bool,
) -> ServiceResult<Vec<f64>> {
    rows.iter()
        .zip(encoded)
        .map(|(row, dialogue)| {
            let mask = dialogue.logprob_mask();
            let (sum, count) = row
                .iter()
                .zip(&mask)
                .filter(|(_, m)| **m)
                .fold((0.0f64, 0usize), |(s, c), (lp, _)| (s + *lp as f64, c + 1));
            if count == 0 {
                return Err(ServiceError::invalid(
                    "pairs",
                    "response has no tokens to score",
                ));
            }
            Ok(if mean { sum / count as f64 } else { sum })
        })
        .collect()
}

fn pair_scores(values: &[f64]) -> Vec<PairScore> {
    values
        .chunks(2)
        .map(|c| PairScore {
            chosen: c[0],
            rejected: c.get(1).copied().unwrap_or(f64::NAN),
        })
        .collect()
}

fn check_ids(resident: &Resident, ids: &[u32], field: String) -> ServiceResult<()> {
    let vocab = resident.model.config().vocab_size();
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(ServiceError::invalid(
            field,
            format!(
                "token id {bad} from the tokenizer is outside the model's vocabulary of {vocab}"
            ),
        ));
    }
    let max = resident.model.config().max_positions();
    if ids.len() > max {
        return Err(ServiceError::invalid(
            field,
            format!("{} tokens exceed the model's {max} positions", ids.len()),
        ));
    }
    Ok(())
}

fn truncate_dialogue(dialogue: EncodedDialogue, max_ctx: usize) -> EncodedDialogue {
    let (mut prompt, mut response) = (Vec::new(), Vec::new());
    for (id, is_response) in dialogue.ids.iter().zip(&dialogue.response_mask) {
        if *is_response {
            response.push(*id);
        } else {
            prompt.push(*id);
        }
    }
    EncodedDialogue::assemble(prompt, response, max_ctx)
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
