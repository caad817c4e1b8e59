//! The device worker: one OS thread owns a device, every model resident on it and the running
//! training job. Commands arrive on a bounded channel (full → RESOURCE_EXHAUSTED) and are
//! answered on oneshot channels; the async side never touches tensors.
//!
//! Requests that carry text are encoded before they are queued, by the handle on the caller's
//! side against the registry's published tokenizers ([`tokenize`]); the device thread sees
//! only ready work. Scheduling, one turn of the loop: drain every queued command; answer the
//! commands in order; turn encoded work into tasks (after checking that the models it was
//! encoded for are still the resident ones), grouping scoring requests for the same model into
//! shared forward passes under a token budget (dynamic batching; padding never changes a
//! sequence's result); advance the tasks round-robin, one forward pass each, until the turn's
//! slice (`--slice-ms`) is spent; run one step of the active training job; repeat.
//! So no request holds the device for longer than one forward pass plus one training step
//! before queued requests are looked at again. Work whose client has gone (deadline passed,
//! cancelled) is dropped between slices. A heartbeat ([`Heartbeat`]) records the last time the
//! loop made progress, for the health watchdog.
//!
//! - this file: the command types, the handle, the loop, the model registry;
//! - [`tokenize`]: the published tokenizer snapshot and the encoding rules of every request;
//! - [`inference`]: the resumable tasks (scoring batches, DPO, generation, preference pairs);
//! - [`training`]: the queue of training jobs, one step at a time, persistence.

mod inference;
mod tokenize;
mod training;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use superficial_models::generation::SamplingConfig;
use superficial_models::{
    CausalLm, DType, Device, DeviceLocation, LoadOptions, ModelConfig, RewardReadout, TextTokenizer,
};
use superficial_training::TrainingRun;
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{Span, error, info, instrument, warn};

use crate::config::ConfigError;
use crate::datasets::Row;
use crate::error::{ServiceError, ServiceResult};
use crate::jobs::{JobEvent, JobPaths, JobSpec, JobStatus};
use crate::metrics::Metrics;
use inference::{BatchTask, DpoTask, GenerateTask, PairsTask, Progress, Task};
use tokenize::{
    Contexts, Encoded, INLINE_TEXT_BYTES, ModelStamp, TextRequest, TokenizeContext, Tokenized,
};

/// A file-system error of an export: the client's mistake where its path caused it (a path
/// through a file, a missing parent), named without the server's absolute paths.
fn export_io_error(name: &str, source: &std::io::Error) -> ServiceError {
    let message = format!("exporting {name}: {source}");
    match crate::error::io_code(source) {
        Some(tonic::Code::NotFound) => ServiceError::PathNotFound(message),
        Some(tonic::Code::InvalidArgument) => ServiceError::invalid("path", message),
        Some(tonic::Code::PermissionDenied) => ServiceError::FailedPrecondition(message),
        _ => ServiceError::Internal(message),
    }
}

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
    /// A folder a client uploaded (`DATA_DIR/models/<digest>`).
    Uploaded { digest: String, folder: PathBuf },
    /// A random initialisation of an HF config (validated by the caller), with a
    /// `tokenizer.json` text or, when empty, the byte-level tokenizer.
    RandomInit {
        config_json: String,
        tokenizer_json: String,
    },
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSource::Folder(p) => write!(f, "{}", p.display()),
            ModelSource::Preset(p) => write!(f, "preset:{p}"),
            ModelSource::Job { id, .. } => write!(f, "job:{id}"),
            ModelSource::Uploaded { digest, .. } => write!(f, "uploaded:{digest}"),
            ModelSource::RandomInit { config_json, .. } => {
                use sha2::Digest;
                let digest = crate::model_store::hex(&sha2::Sha256::digest(config_json));
                write!(f, "random-init:{}", &digest[..12])
            }
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
    /// What a fresh reward head reads (a checkpoint's own head keeps its read-out).
    pub reward_readout: RewardReadout,
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
    pub reward_readout_requested: RewardReadout,
    pub seed: u64,
    pub content_hash: String,
    pub has_reward_head: bool,
    /// What the model's reward head reads (`LastToken` without a head).
    pub reward_readout: RewardReadout,
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
    /// Prompts too long for the context with the new tokens keep their last tokens.
    pub keep_prompt_end: bool,
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
    /// A request whose texts the handle has encoded (scoring, log-probs, generation, pairs).
    Encoded(Box<Encoded>),
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
    /// How long one turn of the loop may advance long work (generation, big scoring) before
    /// queued requests are looked at again. Each task advances by at least one forward pass.
    pub slice: Duration,
    /// Target duration of one scoring/log-prob forward pass (`--max-pass-ms`); `None`: passes
    /// are sized by `max_batch_tokens` alone.
    pub max_pass: Option<Duration>,
    /// Threads of a compute pool of the worker's own (`--threads`); 0: the process's pool.
    pub threads: usize,
}

/// When the device loop last made progress, for the health watchdog: milliseconds since the
/// worker started, and whether it has work (an idle worker makes no progress and is healthy).
#[derive(Debug, Default)]
pub struct Heartbeat {
    started: std::sync::OnceLock<Instant>,
    last_progress_ms: AtomicU64,
    busy: AtomicBool,
}

impl Heartbeat {
    fn origin(&self) -> Instant {
        *self.started.get_or_init(Instant::now)
    }

    fn beat(&self, busy: bool) {
        let ms = self.origin().elapsed().as_millis() as u64;
        self.last_progress_ms.store(ms, Ordering::Relaxed);
        self.busy.store(busy, Ordering::Relaxed);
    }

    /// How long a busy worker has gone without progress (zero when idle).
    pub fn stalled_for(&self) -> Duration {
        if !self.busy.load(Ordering::Relaxed) {
            return Duration::ZERO;
        }
        let now = self.origin().elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_progress_ms.load(Ordering::Relaxed)))
    }
}

/// Shared, read-mostly view of the jobs for the services.
pub type JobTable = Arc<Mutex<BTreeMap<String, JobStatus>>>;

/// The registry's tokenizers as the worker last published them (replaced whole on every
/// load and unload, before the load's or unload's reply is sent).
type Published = Arc<Mutex<Contexts>>;

/// Cloneable handle to a device worker thread.
#[derive(Clone)]
pub struct WorkerHandle {
    sender: mpsc::Sender<Job>,
    capacity: usize,
    metrics: Arc<Metrics>,
    heartbeat: Arc<Heartbeat>,
    published: Published,
    /// Encodings running on the blocking pool at once (big requests only).
    encoding_permits: Arc<tokio::sync::Semaphore>,
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
        let published: Published = Arc::new(Mutex::new(Arc::new(BTreeMap::new())));
        let worker_published = published.clone();
        let heartbeat = Arc::new(Heartbeat::default());
        heartbeat.beat(false);
        let worker_heartbeat = heartbeat.clone();
        // Tensor work parallelises over the current rayon pool: a pool of the worker's own
        // when it has a thread count, so servers in one process split the cores between them.
        let pool = match config.threads {
            0 => None,
            threads => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("w2s-compute-{i}"))
                    .build()
                    .map_err(std::io::Error::other)?,
            ),
        };
        std::thread::Builder::new()
            .name("w2s-device-worker".into())
            .spawn(move || {
                let work = move || {
                    Worker::new(
                        config,
                        jobs,
                        events,
                        worker_metrics,
                        worker_published,
                        worker_heartbeat,
                    )
                    .run(receiver)
                };
                match pool {
                    Some(pool) => pool.install(work),
                    None => work(),
                }
            })?;
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(Self {
            sender,
            capacity,
            metrics,
            heartbeat,
            published,
            encoding_permits: Arc::new(tokio::sync::Semaphore::new(cores.max(2))),
        })
    }

    /// The device loop's progress record (the health watchdog reads it).
    pub fn heartbeat(&self) -> Arc<Heartbeat> {
        self.heartbeat.clone()
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

    /// Encodes a request that carries text against the published tokenizers and queues the
    /// ready work; errors in the request are answered through its own reply channel.
    async fn submit_text(&self, request: TextRequest) -> ServiceResult<()> {
        // A full queue refuses before any encoding is spent on the request.
        if self.sender.capacity() == 0 {
            return Err(ServiceError::Overloaded(self.capacity));
        }
        let contexts = self
            .published
            .lock()
            .map(|published| published.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone());
        let span = Span::current();
        let encoded = if request.text_bytes() <= INLINE_TEXT_BYTES {
            tokenize::encode(request, &contexts, &span)
        } else {
            let _permit = self
                .encoding_permits
                .acquire()
                .await
                .map_err(|_| ServiceError::WorkerGone)?;
            tokio::task::spawn_blocking(move || tokenize::encode(request, &contexts, &span))
                .await
                .map_err(|e| ServiceError::Internal(format!("encoding a request: {e}")))?
        };
        match encoded {
            Some(encoded) => self.enqueue(Command::Encoded(Box::new(encoded))),
            None => Ok(()),
        }
    }

    async fn call_text<T>(&self, make: impl FnOnce(Reply<T>) -> TextRequest) -> ServiceResult<T> {
        let (reply, receive) = oneshot::channel();
        self.submit_text(make(reply)).await?;
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
        self.call_text(|r| TextRequest::Logprobs(job, r)).await
    }
    pub async fn score(&self, job: ScoreJob) -> ServiceResult<(Vec<PairScore>, StageTimes)> {
        self.call_text(|r| TextRequest::Score(job, r)).await
    }
    pub async fn score_texts(&self, job: TextsJob) -> ServiceResult<(Vec<f64>, StageTimes)> {
        self.call_text(|r| TextRequest::ScoreTexts(job, r)).await
    }
    /// Starts a generation; events arrive on the returned receiver.
    pub async fn generate(
        &self,
        job: GenerateJob,
    ) -> ServiceResult<mpsc::Receiver<ServiceResult<GenerationEvent>>> {
        let (tx, rx) = mpsc::channel(64);
        self.submit_text(TextRequest::Generate(job, tx)).await?;
        Ok(rx)
    }
    pub async fn generate_pairs(
        &self,
        job: PairsJob,
    ) -> ServiceResult<(Vec<GeneratedPair>, StageTimes)> {
        self.call_text(|r| TextRequest::Pairs(job, r)).await
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
    tokenizer: Arc<TextTokenizer>,
    /// SHA-256 of the tokenizer's JSON: two models read the same ids the same way only when
    /// these agree.
    tokenizer_digest: Arc<str>,
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

struct Worker {
    config: WorkerConfig,
    models: BTreeMap<String, Resident>,
    /// What encoding a request needs of `models`, republished whenever `models` changes.
    published: Published,
    /// Inference work in progress, advanced round-robin.
    tasks: VecDeque<Task>,
    heartbeat: Arc<Heartbeat>,
    jobs: JobTable,
    events: broadcast::Sender<JobEvent>,
    queue: VecDeque<ActiveJob>,
    metrics: Arc<Metrics>,
    /// Measured throughput of each model's scoring passes, in padded tokens per second (a
    /// moving average; see [`inference::PassRate`]).
    pass_rates: std::cell::RefCell<BTreeMap<String, inference::PassRate>>,
}

impl Worker {
    fn new(
        config: WorkerConfig,
        jobs: JobTable,
        events: broadcast::Sender<JobEvent>,
        metrics: Arc<Metrics>,
        published: Published,
        heartbeat: Arc<Heartbeat>,
    ) -> Self {
        Self {
            config,
            models: BTreeMap::new(),
            published,
            tasks: VecDeque::new(),
            heartbeat,
            jobs,
            events,
            queue: VecDeque::new(),
            metrics,
            pass_rates: Default::default(),
        }
    }

    fn run(mut self, mut receiver: mpsc::Receiver<Job>) {
        loop {
            let mut pending: VecDeque<Job> = VecDeque::new();
            if self.queue.is_empty() && self.tasks.is_empty() {
                // Idle: whatever the gauge last showed has been served.
                self.metrics.queue_depth.set(receiver.len() as i64);
                self.heartbeat.beat(false);
                match receiver.blocking_recv() {
                    Some(job) => pending.push_back(job),
                    None => break,
                }
            }
            while let Ok(job) = receiver.try_recv() {
                pending.push_back(job);
            }
            self.heartbeat.beat(true);
            self.metrics.queue_depth.set(pending.len() as i64);
            if !self.serve_commands(pending) {
                return;
            }
            // The drained requests are no longer waiting; only what arrived meanwhile is.
            self.metrics.queue_depth.set(receiver.len() as i64);
            self.advance_tasks();
            self.metrics.active_tasks.set(self.tasks.len() as i64);
            self.guarded("training step", Worker::train_one_step);
            self.heartbeat.beat(true);
        }
    }

    /// Answers or dispatches one drained group of commands in order; false on shutdown.
    fn serve_commands(&mut self, pending: VecDeque<Job>) -> bool {
        let mut encoded = Vec::new();
        for job in pending {
            match job.command {
                Command::Shutdown(reply) => {
                    self.checkpoint_for_shutdown();
                    let _ = reply.send(Ok(()));
                    return false;
                }
                Command::Encoded(mut work) => {
                    work.work.add_queue_time(job.enqueued.elapsed());
                    encoded.push(*work);
                }
                command => {
                    let span = job.span.clone();
                    let _entered = span.enter();
                    let job = Job { command, ..job };
                    self.guarded("command", |w| w.execute(job));
                }
            }
            self.heartbeat.beat(true);
        }
        self.start_tasks(encoded);
        true
    }

    /// The models `stamps` name are resident and still the ones the work was encoded for.
    fn check_stamps(&self, stamps: &[ModelStamp]) -> ServiceResult<()> {
        for stamp in stamps {
            let resident = self.resident(&stamp.name)?;
            if *resident.summary.content_hash != *stamp.content_hash
                || resident.tokenizer_digest != stamp.tokenizer_digest
            {
                return Err(ServiceError::FailedPrecondition(format!(
                    "model `{}` was replaced after this request was encoded; send it again",
                    stamp.name
                )));
            }
        }
        Ok(())
    }

    /// Turns encoded work into tasks; scoring requests for the same model and primitive share
    /// forward passes (at most `max_batch_requests` per batch).
    fn start_tasks(&mut self, encoded: Vec<Encoded>) {
        let mut groups: Vec<Vec<tokenize::Prepared>> = Vec::new();
        for Encoded { work, stamps } in encoded {
            if let Err(error) = self.check_stamps(&stamps) {
                work.fail(error);
                continue;
            }
            match work {
                Tokenized::Batch(prepared) => {
                    let limit = self.config.max_batch_requests.max(1);
                    match groups.iter_mut().find(|g| {
                        g.len() < limit
                            && g[0].model == prepared.model
                            && g[0].primitive == prepared.primitive
                    }) {
                        Some(group) => group.push(prepared),
                        None => groups.push(vec![prepared]),
                    }
                }
                Tokenized::Dpo(work) => self
                    .tasks
                    .push_back(Task::Dpo(Box::new(DpoTask::new(work)))),
                Tokenized::Generate(work) => self
                    .tasks
                    .push_back(Task::Generate(Box::new(GenerateTask::new(work)))),
                Tokenized::Pairs(work) => {
                    let task = PairsTask::new(work, self.config.max_batch_tokens);
                    self.tasks.push_back(Task::Pairs(Box::new(task)));
                }
            }
        }
        for group in groups {
            self.metrics
                .observe_batch(group.len(), group.iter().map(|p| p.sequences.len()).sum());
            if let Some(task) = BatchTask::new(group) {
                // Short scoring goes ahead of long generations already running.
                self.tasks.push_front(Task::Batch(task));
            }
        }
    }

    /// Advances tasks round-robin, one slice each, until the turn's slice is spent (every
    /// task present at the start gets at least one slice when there is time for it).
    fn advance_tasks(&mut self) {
        let deadline = Instant::now() + self.config.slice;
        let mut blocked_in_a_row = 0;
        while let Some(mut task) = self.tasks.pop_front() {
            let mut progress = Progress::Done;
            self.guarded("task", |w| progress = task.advance(w));
            self.heartbeat.beat(true);
            match progress {
                Progress::Done => blocked_in_a_row = 0,
                Progress::Working => {
                    blocked_in_a_row = 0;
                    self.tasks.push_back(task);
                }
                Progress::Blocked => {
                    blocked_in_a_row += 1;
                    self.tasks.push_back(task);
                }
            }
            if Instant::now() >= deadline {
                break;
            }
            if blocked_in_a_row >= self.tasks.len() && !self.tasks.is_empty() {
                // Every task waits for its client to read: don't spin on them.
                if self.queue.is_empty() {
                    std::thread::sleep(Duration::from_millis(1));
                }
                break;
            }
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

    fn execute(&mut self, job: Job) {
        match job.command {
            Command::Load(spec, reply) => {
                let _ = reply.send(self.load(spec));
            }
            Command::Unload(name, reply) => {
                let result = match self.models.remove(&name) {
                    Some(_) => Ok(()),
                    None => Err(ServiceError::UnknownModel(name)),
                };
                self.models_changed();
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
                    let needed = crate::resources::export_bytes(r.model.config(), r.model.dtype());
                    crate::resources::check_disk(&name, &dir, needed)?;
                    superficial_training::export::save_hf_folder(&r.model, Some(&r.tokenizer), &dir)
                        .map_err(|e| match e {
                            superficial_training::TrainError::RefusedDestination { .. } => {
                                ServiceError::FailedPrecondition(format!("exporting {name}: {e}"))
                            }
                            superficial_training::TrainError::Io { source, .. }
                            | superficial_training::TrainError::Model(
                                superficial_models::ModelError::Io { source, .. },
                            ) => export_io_error(&name, &source),
                            e => ServiceError::Internal(format!("exporting {name}: {e}")),
                        })
                });
                let _ = reply.send(result);
            }
            Command::StartJob(spec, rows, reply) => {
                let _ = reply.send(self.enqueue_job(*spec, rows));
            }
            Command::CancelJob(id, reply) => {
                let _ = reply.send(self.cancel_job(&id));
            }
            // Handled by the loop.
            Command::Encoded(_) | Command::Shutdown(_) => {}
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
        let config = match &spec.source {
            ModelSource::Folder(dir)
            | ModelSource::Job { folder: dir, .. }
            | ModelSource::Uploaded { folder: dir, .. } => crate::resources::folder_config(dir),
            ModelSource::Preset(preset) => ModelConfig::preset(preset),
            ModelSource::RandomInit { config_json, .. } => {
                ModelConfig::from_json_str(config_json, std::path::Path::new("config_json")).ok()
            }
        };
        if let Some(config) = config {
            crate::resources::check_fits(
                &spec.name,
                &config,
                self.config.dtype,
                self.config.device.is_cpu(),
            )?;
        }
        let (model, tokenizer) = self.build_model(
            &spec.source,
            spec.reward_head,
            spec.reward_readout,
            spec.seed,
        )?;
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
            reward_readout_requested: spec.reward_readout,
            seed: spec.seed,
            content_hash: weights.content_hash()?,
            has_reward_head: model.has_reward_head(),
            reward_readout: model.reward_readout(),
            memory_bytes: weights.memory_bytes(),
        };
        info!(parameters = summary.parameter_count, "model loaded");
        let tokenizer_digest = {
            use sha2::Digest;
            let json = tokenizer
                .to_json_string()
                .map_err(|e| ServiceError::Internal(format!("serialising the tokenizer: {e}")))?;
            format!("{:x}", sha2::Sha256::digest(json.as_bytes())).into()
        };
        self.models.insert(
            spec.name,
            Resident {
                model,
                tokenizer: Arc::new(tokenizer),
                tokenizer_digest,
                summary: summary.clone(),
            },
        );
        self.models_changed();
        Ok(summary)
    }

    /// Builds a model and its tokenizer from a source (presets get the byte-level tokenizer).
    fn build_model(
        &self,
        source: &ModelSource,
        reward_head: bool,
        reward_readout: RewardReadout,
        seed: u64,
    ) -> ServiceResult<(CausalLm, TextTokenizer)> {
        let options = LoadOptions {
            device: self.config.device.clone(),
            dtype: self.config.dtype,
        };
        let (mut model, tokenizer) = match source {
            ModelSource::Folder(dir)
            | ModelSource::Job { folder: dir, .. }
            | ModelSource::Uploaded { folder: dir, .. } => {
                let model = CausalLm::from_folder(dir, &options)?;
                let tokenizer = TextTokenizer::from_folder(dir, model.config())?;
                (model, tokenizer)
            }
            ModelSource::RandomInit {
                config_json,
                tokenizer_json,
            } => {
                let config = ModelConfig::from_json_str(
                    config_json,
                    std::path::Path::new("random_init.config_json"),
                )?;
                let tokenizer = if tokenizer_json.is_empty() {
                    TextTokenizer::bytes()?
                } else {
                    TextTokenizer::from_json_str(tokenizer_json)?
                };
                (CausalLm::random_init(config, seed, &options)?, tokenizer)
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
            model = model.with_fresh_reward_head(seed, reward_readout)?;
        }
        Ok((model, tokenizer))
    }

    /// Republishes what encoding a request needs of the registry.
    fn models_changed(&mut self) {
        let contexts: Contexts = Arc::new(
            self.models
                .iter()
                .map(|(name, resident)| (name.clone(), self.context_of(resident)))
                .collect(),
        );
        match self.published.lock() {
            Ok(mut published) => *published = contexts,
            Err(poisoned) => *poisoned.into_inner() = contexts,
        }
        self.metrics.resident_models.set(self.models.len() as i64);
    }

    fn context_of(&self, resident: &Resident) -> TokenizeContext {
        let config = resident.model.config();
        TokenizeContext {
            name: resident.summary.name.clone(),
            tokenizer: resident.tokenizer.clone(),
            stamp: ModelStamp {
                name: resident.summary.name.clone(),
                content_hash: resident.summary.content_hash.as_str().into(),
                tokenizer_digest: resident.tokenizer_digest.clone(),
            },
            vocab_size: config.vocab_size(),
            max_positions: config.max_positions(),
            has_reward_head: resident.model.has_reward_head(),
        }
    }

    fn resident(&self, name: &str) -> ServiceResult<&Resident> {
        self.models
            .get(name)
            .ok_or_else(|| ServiceError::UnknownModel(name.to_string()))
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
pub fn parse_device(spec: &str) -> Result<Device, ConfigError> {
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
    Ok(Device::new_cuda(ordinal).map_err(|e| format!("cannot open {spec}: {e}"))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spawn_worker(dir: &std::path::Path) -> WorkerHandle {
        let (events, _) = broadcast::channel(16);
        WorkerHandle::spawn(
            WorkerConfig {
                device: Device::Cpu,
                dtype: DType::F32,
                queue_capacity: 16,
                max_batch_tokens: 4096,
                max_batch_requests: 8,
                data_dir: dir.to_path_buf(),
                checkpoint_every: 100,
                slice: Duration::from_millis(50),
                max_pass: None,
                threads: 1,
            },
            Arc::new(Mutex::new(BTreeMap::new())),
            events,
            Arc::new(Metrics::default()),
        )
        .unwrap()
    }

    fn tiny(seed: u64) -> LoadSpec {
        LoadSpec {
            name: "m".into(),
            source: ModelSource::Preset("tiny-gpt2".into()),
            role: "strong".into(),
            reward_head: true,
            reward_readout: RewardReadout::LastToken,
            seed,
        }
    }

    fn texts() -> TextsJob {
        TextsJob {
            model: "m".into(),
            texts: vec!["\n\nHuman: hi\n\nAssistant: hello".into()],
            max_ctx: 0,
        }
    }

    #[tokio::test]
    async fn work_encoded_for_a_model_that_was_replaced_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let worker = spawn_worker(dir.path());
        worker.load(tiny(1)).await.unwrap();
        // Encoded against the published snapshot, as `submit_text` does...
        let contexts = worker.published.lock().unwrap().clone();
        let (reply, answer) = oneshot::channel();
        let stale = tokenize::encode(
            TextRequest::ScoreTexts(texts(), reply),
            &contexts,
            &Span::none(),
        )
        .expect("encodes");
        // ... then the model is swapped for another under the same name before it is queued.
        worker.unload("m".into()).await.unwrap();
        worker.load(tiny(2)).await.unwrap();
        worker.enqueue(Command::Encoded(Box::new(stale))).unwrap();
        let error = answer.await.unwrap().unwrap_err();
        assert!(
            matches!(&error, ServiceError::FailedPrecondition(m) if m.contains("was replaced")),
            "{error}"
        );
        // Unloaded outright: the model is unknown.
        let contexts = worker.published.lock().unwrap().clone();
        let (reply, answer) = oneshot::channel();
        let orphan = tokenize::encode(
            TextRequest::ScoreTexts(texts(), reply),
            &contexts,
            &Span::none(),
        )
        .expect("encodes");
        worker.unload("m".into()).await.unwrap();
        worker.enqueue(Command::Encoded(Box::new(orphan))).unwrap();
        let error = answer.await.unwrap().unwrap_err();
        assert!(matches!(error, ServiceError::UnknownModel(_)), "{error}");
        // Requests through the handle see every load before its reply.
        worker.load(tiny(3)).await.unwrap();
        let (scores, _) = worker.score_texts(texts()).await.unwrap();
        assert_eq!(scores.len(), 1);
        assert!(scores[0].is_finite());
    }

    #[tokio::test]
    async fn big_requests_are_encoded_off_the_runtime_and_errors_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let worker = spawn_worker(dir.path());
        worker.load(tiny(1)).await.unwrap();
        // More than INLINE_TEXT_BYTES of text goes through the blocking pool.
        let long = format!("\n\nHuman: {}\n\nAssistant: yes", "word ".repeat(1000));
        assert!(long.len() > INLINE_TEXT_BYTES);
        let job = TextsJob {
            model: "m".into(),
            texts: vec![long.clone(), long],
            max_ctx: 64,
        };
        let (scores, times) = worker.score_texts(job).await.unwrap();
        assert_eq!(scores.len(), 2);
        assert_eq!(scores[0], scores[1]);
        assert!(times.tokenize > Duration::ZERO);
        let empty = TextsJob {
            model: "m".into(),
            texts: vec!["".into()],
            max_ctx: 0,
        };
        let error = worker.score_texts(empty).await.unwrap_err();
        assert!(error.to_string().contains("texts[0]"), "{error}");
        let unknown = TextsJob {
            model: "absent".into(),
            ..texts()
        };
        let error = worker.score_texts(unknown).await.unwrap_err();
        assert!(matches!(error, ServiceError::UnknownModel(_)), "{error}");
    }
}
