//! The device worker: one OS thread owns a device and every model resident on it, and executes
//! commands sent over a bounded channel, replying on oneshot channels. The async side never
//! touches tensors; a full queue is reported as overload instead of growing without limit.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use superficial_models::{
    CausalLm, DType, Device, DeviceLocation, EncodedDialogue, LoadOptions, ModelConfig,
    TextTokenizer,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{Span, info, instrument};

use crate::error::{ServiceError, ServiceResult};

/// Where a model's weights come from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// An HF checkpoint folder (already resolved and confined by the caller).
    Folder(PathBuf),
    /// A built-in random-init configuration.
    Preset(String),
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSource::Folder(p) => write!(f, "{}", p.display()),
            ModelSource::Preset(p) => write!(f, "preset:{p}"),
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
    pub source: String,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairScoring {
    Reward,
    MeanLogprob,
    SumLogprob,
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

type Reply<T> = oneshot::Sender<ServiceResult<T>>;

enum Command {
    Load(LoadSpec, Reply<ModelSummary>),
    Unload(String, Reply<()>),
    List(Reply<Vec<ModelSummary>>),
    Logprobs(LogprobsJob, Reply<(Vec<SequenceLogprobs>, StageTimes)>),
    Score(ScoreJob, Reply<(Vec<PairScore>, StageTimes)>),
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
}

/// Cloneable handle to a device worker thread.
#[derive(Clone)]
pub struct WorkerHandle {
    sender: mpsc::Sender<Job>,
    capacity: usize,
}

impl WorkerHandle {
    /// Starts the worker thread.
    pub fn spawn(config: WorkerConfig) -> std::io::Result<Self> {
        let capacity = config.queue_capacity.max(1);
        let (sender, receiver) = mpsc::channel(capacity);
        std::thread::Builder::new()
            .name("w2s-device-worker".into())
            .spawn(move || Worker::new(config).run(receiver))?;
        Ok(Self { sender, capacity })
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> ServiceResult<T> {
        let (reply, receive) = oneshot::channel();
        let job = Job {
            command: make(reply),
            enqueued: Instant::now(),
            span: Span::current(),
        };
        self.sender.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => ServiceError::Overloaded(self.capacity),
            mpsc::error::TrySendError::Closed(_) => ServiceError::WorkerGone,
        })?;
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
    pub async fn logprobs(
        &self,
        job: LogprobsJob,
    ) -> ServiceResult<(Vec<SequenceLogprobs>, StageTimes)> {
        self.call(|r| Command::Logprobs(job, r)).await
    }
    pub async fn score(&self, job: ScoreJob) -> ServiceResult<(Vec<PairScore>, StageTimes)> {
        self.call(|r| Command::Score(job, r)).await
    }
}

struct Resident {
    model: CausalLm,
    tokenizer: Option<TextTokenizer>,
    summary: ModelSummary,
}

struct Worker {
    config: WorkerConfig,
    models: BTreeMap<String, Resident>,
}

impl Worker {
    fn new(config: WorkerConfig) -> Self {
        Self {
            config,
            models: BTreeMap::new(),
        }
    }

    fn run(mut self, mut receiver: mpsc::Receiver<Job>) {
        while let Some(job) = receiver.blocking_recv() {
            let _entered = job.span.enter();
            let queued = job.enqueued.elapsed();
            // A reply that cannot be delivered means the client went away; nothing to do.
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
                Command::Logprobs(request, reply) => {
                    if reply.is_closed() {
                        continue;
                    }
                    let result = self.logprobs(&request).map(|(seqs, mut times)| {
                        times.queue = queued;
                        (seqs, times)
                    });
                    let _ = reply.send(result);
                }
                Command::Score(request, reply) => {
                    if reply.is_closed() {
                        continue;
                    }
                    let result = self.score(&request).map(|(scores, mut times)| {
                        times.queue = queued;
                        (scores, times)
                    });
                    let _ = reply.send(result);
                }
            }
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
        let options = LoadOptions {
            device: self.config.device.clone(),
            dtype: self.config.dtype,
        };
        let (mut model, tokenizer) = match &spec.source {
            ModelSource::Folder(dir) => {
                let model = CausalLm::from_folder(dir, &options)?;
                let has_tokenizer_files =
                    dir.join("tokenizer.json").is_file() || dir.join("vocab.json").is_file();
                let tokenizer = if has_tokenizer_files {
                    Some(TextTokenizer::from_folder(dir, model.config())?)
                } else {
                    None
                };
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
                (CausalLm::random_init(config, spec.seed, &options)?, None)
            }
        };
        if spec.reward_head && !model.has_reward_head() {
            model = model.with_fresh_reward_head(spec.seed)?;
        }
        let weights = model.weights();
        let summary = ModelSummary {
            name: spec.name.clone(),
            config: model.config().clone(),
            role: spec.role,
            parameter_count: weights.parameter_count(),
            dtype: format!("{:?}", model.dtype()).to_lowercase(),
            device: device_name(model.device()),
            source: spec.source.to_string(),
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
        Ok(summary)
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

    #[instrument(skip_all, fields(model = %job.model, texts = job.texts.len()))]
    fn logprobs(&self, job: &LogprobsJob) -> ServiceResult<(Vec<SequenceLogprobs>, StageTimes)> {
        let resident = self.resident(&job.model)?;
        let tokenizer = tokenizer_of(resident)?;
        let mut times = StageTimes::default();
        let started = Instant::now();
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
            encoded.push(dialogue);
        }
        times.tokenize = started.elapsed();
        let started = Instant::now();
        let sequences: Vec<Vec<u32>> = encoded.iter().map(|d| d.ids.clone()).collect();
        let rows = self.batched_logprobs(&resident.model, &sequences)?;
        times.compute = started.elapsed();
        let out = encoded
            .into_iter()
            .zip(rows)
            .map(|(d, logprobs)| SequenceLogprobs {
                response_mask: d.logprob_mask(),
                token_ids: d.ids,
                logprobs,
                truncated: d.truncated,
            })
            .collect();
        Ok((out, times))
    }

    #[instrument(skip_all, fields(model = %job.model, pairs = job.pairs.len()))]
    fn score(&self, job: &ScoreJob) -> ServiceResult<(Vec<PairScore>, StageTimes)> {
        let resident = self.resident(&job.model)?;
        let tokenizer = tokenizer_of(resident)?;
        let max_ctx = Self::max_ctx(resident, job.max_ctx);
        let mut times = StageTimes::default();
        let started = Instant::now();
        // Sequences in the order chosen_0, rejected_0, chosen_1, ...
        let mut encoded = Vec::with_capacity(job.pairs.len() * 2);
        for (i, pair) in job.pairs.iter().enumerate() {
            for (side, response) in [("chosen", &pair.chosen), ("rejected", &pair.rejected)] {
                let field = || format!("pairs[{i}].{side}");
                let dialogue = match job.scoring {
                    PairScoring::Reward => {
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
                    }
                    PairScoring::MeanLogprob | PairScoring::SumLogprob => if pair.prompt.is_empty()
                    {
                        tokenizer.encode_dialogue(response, max_ctx)
                    } else {
                        tokenizer.encode_prompt_response(&pair.prompt, response, max_ctx)
                    }
                    .map_err(|e| ServiceError::invalid(field(), e))?,
                };
                if dialogue.ids.is_empty() {
                    return Err(ServiceError::invalid(field(), "text has no tokens"));
                }
                encoded.push(dialogue);
            }
        }
        times.tokenize = started.elapsed();
        let started = Instant::now();
        let sequences: Vec<Vec<u32>> = encoded.iter().map(|d| d.ids.clone()).collect();
        let values: Vec<f64> = match job.scoring {
            PairScoring::Reward => self.batched_rewards(&resident.model, &sequences)?,
            PairScoring::MeanLogprob | PairScoring::SumLogprob => {
                let rows = self.batched_logprobs(&resident.model, &sequences)?;
                let mut values = Vec::with_capacity(rows.len());
                for (k, (row, dialogue)) in rows.iter().zip(&encoded).enumerate() {
                    let mask = dialogue.logprob_mask();
                    let (sum, count) = row
                        .iter()
                        .zip(&mask)
                        .filter(|(_, m)| **m)
                        .fold((0.0f64, 0usize), |(s, c), (lp, _)| (s + *lp as f64, c + 1));
                    if count == 0 {
                        let side = if k % 2 == 0 { "chosen" } else { "rejected" };
                        return Err(ServiceError::invalid(
                            format!("pairs[{}].{side}", k / 2),
                            "response has no tokens to score",
                        ));
                    }
                    values.push(if job.scoring == PairScoring::MeanLogprob {
                        sum / count as f64
                    } else {
                        sum
                    });
                }
                values
            }
        };
        times.compute = started.elapsed();
        let scores = values
            .chunks(2)
            .map(|c| PairScore {
                chosen: c[0],
                rejected: c[1],
            })
            .collect();
        Ok((scores, times))
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

    fn batched_rewards(&self, model: &CausalLm, sequences: &[Vec<u32>]) -> ServiceResult<Vec<f64>> {
        if !model.has_reward_head() {
            return Err(ServiceError::FailedPrecondition(
                "model has no reward head (load it with reward_head = true)".into(),
            ));
        }
        let mut out = Vec::with_capacity(sequences.len());
        for batch in self.batches(sequences) {
            out.extend(model.sequence_rewards(batch)?.into_iter().map(f64::from));
        }
        Ok(out)
    }
}

fn tokenizer_of(resident: &Resident) -> ServiceResult<&TextTokenizer> {
    resident.tokenizer.as_ref().ok_or_else(|| {
        ServiceError::FailedPrecondition(format!(
            "model `{}` has no tokenizer (its source has no tokenizer files)",
            resident.summary.name
        ))
    })
}

fn truncate_dialogue(dialogue: EncodedDialogue, max_ctx: usize) -> EncodedDialogue {
    let response: Vec<u32> = dialogue
        .ids
        .iter()
        .zip(&dialogue.response_mask)
        .filter(|(_, m)| **m)
        .map(|(id, _)| *id)
        .collect();
    let prompt: Vec<u32> = dialogue
        .ids
        .iter()
        .zip(&dialogue.response_mask)
        .filter(|(_, m)| !**m)
        .map(|(id, _)| *id)
        .collect();
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
