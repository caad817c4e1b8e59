//! Inference on the device thread, as resumable tasks: every long piece of work (a scoring
//! batch, DPO scoring, a generation, preference-pair generation) advances one forward pass at
//! a time, so the loop in `mod.rs` can serve short requests, notice cancelled clients and shut
//! down between slices. Texts arrive already encoded (`tokenize.rs`).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use superficial_models::generation::{BatchGeneration, Generation, GenerationConfig};
use superficial_models::{CausalLm, ChunkedOutput, ChunkedScoring, EncodedDialogue};
use tokio::sync::mpsc;

use super::tokenize::{DpoWork, GenerateWork, PairsWork, Prepared};
use super::*;
use crate::error::{ServiceError, ServiceResult};

/// Where a scoring request's results go and how they are shaped.
pub(super) enum ReplyTo {
    Logprobs {
        encoded: Vec<EncodedDialogue>,
        reply: Reply<(Vec<SequenceLogprobs>, StageTimes)>,
    },
    Texts {
        reply: Reply<(Vec<f64>, StageTimes)>,
    },
    Score {
        encoded: Vec<EncodedDialogue>,
        mean: bool,
        reply: Reply<(Vec<PairScore>, StageTimes)>,
    },
}

impl ReplyTo {
    fn is_closed(&self) -> bool {
        match self {
            ReplyTo::Logprobs { reply, .. } => reply.is_closed(),
            ReplyTo::Texts { reply } => reply.is_closed(),
            ReplyTo::Score { reply, .. } => reply.is_closed(),
        }
    }

    pub(super) fn fail(self, error: ServiceError) {
        match self {
            ReplyTo::Logprobs { reply, .. } => drop(reply.send(Err(error))),
            ReplyTo::Texts { reply } => drop(reply.send(Err(error))),
            ReplyTo::Score { reply, .. } => drop(reply.send(Err(error))),
        }
    }

    fn finish(self, output: Output, times: StageTimes) {
        let wrong = || ServiceError::Internal("wrong primitive".into());
        match (self, output) {
            (ReplyTo::Logprobs { encoded, reply }, Output::Logprobs(rows)) => {
                let rows = encoded
                    .into_iter()
                    .zip(rows)
                    .map(|(d, logprobs)| SequenceLogprobs {
                        response_mask: d.logprob_mask(),
                        token_ids: d.ids,
                        logprobs,
                        truncated: d.truncated,
                    })
                    .collect();
                let _ = reply.send(Ok((rows, times)));
            }
            (ReplyTo::Texts { reply }, Output::Rewards(values)) => {
                let _ = reply.send(Ok((values.into_iter().map(f64::from).collect(), times)));
            }
            (ReplyTo::Score { reply, .. }, Output::Rewards(values)) => {
                let values: Vec<f64> = values.into_iter().map(f64::from).collect();
                let _ = reply.send(Ok((pair_scores(&values), times)));
            }
            (
                ReplyTo::Score {
                    encoded,
                    mean,
                    reply,
                },
                Output::Logprobs(rows),
            ) => {
                let result = pool_rows(&rows, &encoded, mean).map(|v| (pair_scores(&v), times));
                let _ = reply.send(result);
            }
            (other, _) => other.fail(wrong()),
        }
    }
}

/// Whether a task has more to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Progress {
    /// Did work; call again.
    Working,
    /// Could not proceed (its consumer is not reading); call again later.
    Blocked,
    /// Finished, answered or abandoned: drop it.
    Done,
}

/// Forward passes over many sequences, one token-budget batch per call; under a pass target
/// (`--max-pass-ms`) a sequence longer than the budget runs a chunk of it per call through the
/// KV cache.
struct SlicedForward {
    model: String,
    primitive: Primitive,
    sequences: Vec<Vec<u32>>,
    /// Where each sequence's response starts (read by mean-log-prob reward heads only).
    response_starts: Vec<usize>,
    next: usize,
    /// Sequence `next`, part-way through chunked scoring.
    chunked: Option<Box<ChunkedScoring>>,
    logprobs: Vec<Vec<f32>>,
    rewards: Vec<f32>,
    compute: Duration,
}

impl SlicedForward {
    fn new(
        model: String,
        primitive: Primitive,
        sequences: Vec<Vec<u32>>,
        response_starts: Vec<usize>,
    ) -> Self {
        Self {
            model,
            primitive,
            sequences,
            response_starts,
            next: 0,
            chunked: None,
            logprobs: Vec::new(),
            rewards: Vec::new(),
            compute: Duration::ZERO,
        }
    }

    fn is_done(&self) -> bool {
        self.next >= self.sequences.len()
    }

    /// Runs the next batch of at most the pass's token budget (padded tokens), or the next
    /// chunk of a sequence longer than the budget.
    fn advance(&mut self, worker: &Worker) -> ServiceResult<()> {
        let started = Instant::now();
        let budget = worker.pass_budget(&self.model);
        let resident = worker.resident(&self.model)?;
        let chunk = budget.max(MIN_CHUNK_TOKENS);
        if self.chunked.is_none()
            && worker.config.max_pass.is_some()
            && self.sequences[self.next].len() > chunk
        {
            let output = match self.primitive {
                Primitive::Logprobs => ChunkedOutput::Logprobs,
                Primitive::Rewards => ChunkedOutput::Reward {
                    response_start: self.response_starts[self.next],
                },
            };
            let ids = self.sequences[self.next].clone();
            self.chunked = Some(Box::new(ChunkedScoring::new(&resident.model, ids, output)?));
        }
        if let Some(scoring) = &mut self.chunked {
            let ran = scoring.advance(&resident.model, chunk)?;
            if scoring.is_done() {
                match self.primitive {
                    Primitive::Logprobs => {
                        if let Some(done) = self.chunked.take() {
                            self.logprobs.push(done.into_logprobs()?);
                        }
                    }
                    Primitive::Rewards => {
                        self.rewards.push(scoring.reward(&resident.model)?);
                        self.chunked = None;
                    }
                }
                self.next += 1;
            }
            let elapsed = started.elapsed();
            worker.observe_pass(&self.model, ran, elapsed);
            self.compute += elapsed;
            return Ok(());
        }
        let end = batch_end_within(&self.sequences, self.next, budget);
        let batch = &self.sequences[self.next..end];
        let padded = padded_tokens(batch);
        match self.primitive {
            Primitive::Logprobs => self
                .logprobs
                .extend(resident.model.sequence_logprobs(batch)?),
            Primitive::Rewards => self.rewards.extend(
                resident
                    .model
                    .sequence_rewards(batch, &self.response_starts[self.next..end])?,
            ),
        }
        self.next = end;
        let elapsed = started.elapsed();
        worker.observe_pass(&self.model, padded, elapsed);
        self.compute += elapsed;
        Ok(())
    }

    fn take_output(&mut self) -> Output {
        match self.primitive {
            Primitive::Logprobs => Output::Logprobs(std::mem::take(&mut self.logprobs)),
            Primitive::Rewards => Output::Rewards(std::mem::take(&mut self.rewards)),
        }
    }
}

/// Scoring requests for one model and primitive, merged into shared forward passes.
pub(super) struct BatchTask {
    forward: SlicedForward,
    requests: Vec<Prepared>,
}

impl BatchTask {
    pub(super) fn new(requests: Vec<Prepared>) -> Option<Self> {
        let first = requests.first()?;
        let sequences = requests
            .iter()
            .flat_map(|p| p.sequences.iter().cloned())
            .collect();
        let starts = requests
            .iter()
            .flat_map(|p| p.response_starts.iter().copied())
            .collect();
        Some(Self {
            forward: SlicedForward::new(first.model.clone(), first.primitive, sequences, starts),
            requests,
        })
    }

    fn advance(&mut self, worker: &Worker) -> Progress {
        if self.requests.iter().all(|r| r.reply.is_closed()) {
            return Progress::Done;
        }
        if let Err(e) = self.forward.advance(worker) {
            let error = |e: &ServiceError| match e {
                ServiceError::UnknownModel(name) => ServiceError::UnknownModel(name.clone()),
                other => ServiceError::Internal(other.to_string()),
            };
            for request in self.requests.drain(..) {
                request.reply.fail(error(&e));
            }
            return Progress::Done;
        }
        if !self.forward.is_done() {
            return Progress::Working;
        }
        let compute = self.forward.compute;
        let mut output = self.forward.take_output();
        for request in self.requests.drain(..) {
            let n = request.sequences.len();
            let part = match &mut output {
                Output::Logprobs(rows) => Output::Logprobs(rows.drain(..n).collect()),
                Output::Rewards(values) => Output::Rewards(values.drain(..n).collect()),
            };
            request.reply.finish(
                part,
                StageTimes {
                    compute,
                    ..request.times
                },
            );
        }
        Progress::Done
    }
}

/// DPO implicit-reward scoring: the policy's summed response log-probs, then the reference's.
pub(super) struct DpoTask {
    work: DpoWork,
    policy: SlicedForward,
    reference: SlicedForward,
}

impl DpoTask {
    pub(super) fn new(work: DpoWork) -> Self {
        let ids = |encoded: &[EncodedDialogue]| encoded.iter().map(|d| d.ids.clone()).collect();
        let starts = |encoded: &[EncodedDialogue]| vec![0; encoded.len()];
        // The tokenizer only makes DPO work from DPO scoring.
        let reference = match &work.job.scoring {
            PairScoring::Dpo { reference } => reference.clone(),
            _ => String::new(),
        };
        Self {
            policy: SlicedForward::new(
                work.job.model.clone(),
                Primitive::Logprobs,
                ids(&work.policy_encoded),
                starts(&work.policy_encoded),
            ),
            reference: SlicedForward::new(
                reference,
                Primitive::Logprobs,
                ids(&work.reference_encoded),
                starts(&work.reference_encoded),
            ),
            work,
        }
    }

    fn advance(&mut self, worker: &Worker) -> Progress {
        if self.work.reply.is_closed() {
            return Progress::Done;
        }
        let result = if !self.policy.is_done() {
            self.policy.advance(worker)
        } else {
            self.reference.advance(worker)
        };
        if let Err(e) = result {
            answer(&mut self.work.reply, Err(e));
            return Progress::Done;
        }
        if !self.reference.is_done() {
            return Progress::Working;
        }
        let scores = (|| {
            let (Output::Logprobs(policy_rows), Output::Logprobs(reference_rows)) =
                (self.policy.take_output(), self.reference.take_output())
            else {
                return Err(ServiceError::Internal("wrong primitive".into()));
            };
            let policy_sums = pool_rows(&policy_rows, &self.work.policy_encoded, false)?;
            let reference_sums = pool_rows(&reference_rows, &self.work.reference_encoded, false)?;
            let values: Vec<f64> = policy_sums
                .iter()
                .zip(&reference_sums)
                .map(|(p, r)| p - r)
                .collect();
            Ok(pair_scores(&values))
        })();
        let times = StageTimes {
            compute: self.policy.compute + self.reference.compute,
            ..self.work.times
        };
        answer(&mut self.work.reply, scores.map(|s| (s, times)));
        Progress::Done
    }
}

/// Answers through a reply a task still holds; the task is dropped right after.
fn answer<T>(reply: &mut Reply<T>, result: ServiceResult<T>) {
    let (spent, _) = oneshot::channel();
    let _ = std::mem::replace(reply, spent).send(result);
}

/// A streamed generation, one token per call.
pub(super) struct GenerateTask {
    work: GenerateWork,
    generation: Option<Generation>,
    /// Events the client's stream had no room for yet.
    backlog: VecDeque<ServiceResult<GenerationEvent>>,
    compute: Duration,
    ended: bool,
}

impl GenerateTask {
    pub(super) fn new(work: GenerateWork) -> Self {
        Self {
            work,
            generation: None,
            backlog: VecDeque::new(),
            compute: Duration::ZERO,
            ended: false,
        }
    }

    /// Moves queued events into the stream; false while it is full.
    fn flush(&mut self) -> bool {
        while let Some(event) = self.backlog.pop_front() {
            match self.work.events.try_send(event) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(event)) => {
                    self.backlog.push_front(event);
                    return false;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.backlog.clear();
                    self.ended = true;
                    return true;
                }
            }
        }
        true
    }

    fn advance(&mut self, worker: &Worker) -> Progress {
        if self.work.events.is_closed() {
            return Progress::Done;
        }
        if !self.flush() {
            return Progress::Blocked;
        }
        if self.ended {
            return Progress::Done;
        }
        if let Err(e) = self.step(worker) {
            self.backlog.push_back(Err(e));
            self.ended = true;
        }
        self.flush();
        if self.ended && self.backlog.is_empty() {
            Progress::Done
        } else {
            Progress::Working
        }
    }

    fn step(&mut self, worker: &Worker) -> ServiceResult<()> {
        let resident = worker.resident(&self.work.job.model)?;
        let started = Instant::now();
        let job = &self.work.job;
        let generation = match &mut self.generation {
            Some(generation) => generation,
            None => {
                let config = GenerationConfig {
                    max_new_tokens: job.max_new_tokens,
                    sampling: job.sampling.clone(),
                    stop_tokens: if job.stop_at_eos {
                        vec![resident.model.config().eos_token_id()]
                    } else {
                        Vec::new()
                    },
                };
                self.generation.insert(
                    Generation::new(&resident.model, &self.work.prompt, &config)
                        .map_err(generation_error)?,
                )
            }
        };
        if let Some(id) = generation.step(&resident.model).map_err(generation_error)? {
            let text = resident.tokenizer.decode(&[id]).unwrap_or_default();
            self.backlog
                .push_back(Ok(GenerationEvent::Token { id, text }));
        }
        self.compute += started.elapsed();
        if generation.is_finished() {
            let token_ids = generation.tokens().to_vec();
            let text = resident.tokenizer.decode(&token_ids).unwrap_or_default();
            self.backlog.push_back(Ok(GenerationEvent::Done {
                token_ids,
                text,
                times: StageTimes {
                    compute: self.compute,
                    ..self.work.times
                },
            }));
            self.ended = true;
        }
        Ok(())
    }
}

fn generation_error(e: superficial_models::ModelError) -> ServiceError {
    match e {
        superficial_models::ModelError::SequenceTooLong { .. }
        | superficial_models::ModelError::InvalidInput(_) => {
            ServiceError::invalid("max_new_tokens", e)
        }
        other => ServiceError::Model(other),
    }
}

/// Preference-pair generation. Prompts of one token length are sampled together, all their
/// samples in one batch (up to `max_batch_tokens`), one token per call; when a chunk has
/// finished, the judge scores its responses as one step. Chunks depend only on the request and
/// the server's `max_batch_tokens`, never on timing, so a seed reproduces its pairs.
pub(super) struct PairsTask {
    work: PairsWork,
    /// Prompt indices still to sample, one chunk per entry.
    chunks: VecDeque<Vec<usize>>,
    generation: Option<(Vec<usize>, BatchGeneration)>,
    /// Pairs per prompt, in prompt order once every chunk is done.
    out: Vec<Vec<GeneratedPair>>,
    compute: Duration,
}

/// Groups prompt indices into chunks of one token length, at most `rows_budget` rows (prompt ×
/// samples) each but always one prompt; lengths ascending, indices ascending within a length.
fn pair_chunks(
    prompts: &[Vec<u32>],
    samples_per_prompt: usize,
    new_tokens: usize,
    max_batch_tokens: usize,
) -> VecDeque<Vec<usize>> {
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| (prompts[i].len(), i));
    let mut chunks: VecDeque<Vec<usize>> = VecDeque::new();
    let mut last_len = None;
    for i in order {
        let len = prompts[i].len();
        let per_prompt = samples_per_prompt.max(1) * (len + new_tokens);
        let fits = (max_batch_tokens / per_prompt.max(1)).max(1);
        match chunks.back_mut() {
            Some(chunk) if last_len == Some(len) && chunk.len() < fits => chunk.push(i),
            _ => chunks.push_back(vec![i]),
        }
        last_len = Some(len);
    }
    chunks
}

impl PairsTask {
    pub(super) fn new(work: PairsWork, max_batch_tokens: usize) -> Self {
        let chunks = pair_chunks(
            &work.prompts,
            work.job.samples_per_prompt,
            work.job.max_new_tokens,
            max_batch_tokens,
        );
        let out = vec![Vec::new(); work.prompts.len()];
        Self {
            work,
            chunks,
            generation: None,
            out,
            compute: Duration::ZERO,
        }
    }

    fn advance(&mut self, worker: &Worker) -> Progress {
        if self.work.reply.is_closed() {
            return Progress::Done;
        }
        let started = Instant::now();
        let result = self.step(worker);
        self.compute += started.elapsed();
        let finished = match result {
            Ok(()) if self.generation.is_some() || !self.chunks.is_empty() => {
                return Progress::Working;
            }
            Ok(()) => Ok((
                std::mem::take(&mut self.out)
                    .into_iter()
                    .flatten()
                    .collect(),
                StageTimes {
                    compute: self.compute,
                    ..self.work.times
                },
            )),
            Err(e) => Err(e),
        };
        answer(&mut self.work.reply, finished);
        Progress::Done
    }

    /// One forward pass of the current chunk (started from the next one if none), or its
    /// judging once it has finished.
    fn step(&mut self, worker: &Worker) -> ServiceResult<()> {
        let job = &self.work.job;
        let policy = worker.resident(&job.policy)?;
        let field = |chunk: &[usize]| format!("prompts[{}]", chunk.first().copied().unwrap_or(0));
        let (chunk, generation) = match &mut self.generation {
            Some(current) => current,
            None => {
                let Some(chunk) = self.chunks.pop_front() else {
                    return Ok(());
                };
                let k = job.samples_per_prompt;
                let mut prompts: Vec<&[u32]> = Vec::with_capacity(chunk.len() * k);
                let mut seeds = Vec::with_capacity(chunk.len() * k);
                for &p in &chunk {
                    for sample in 0..k {
                        prompts.push(&self.work.prompts[p]);
                        // The seed of a sample is its place in the request, whatever its chunk.
                        seeds.push(job.sampling.seed.wrapping_add((p * k + sample) as u64));
                    }
                }
                let config = GenerationConfig {
                    max_new_tokens: job.max_new_tokens,
                    sampling: job.sampling.clone(),
                    stop_tokens: vec![policy.model.config().eos_token_id()],
                };
                let generation = BatchGeneration::new(&policy.model, &prompts, &seeds, &config)
                    .map_err(|e| ServiceError::invalid(field(&chunk), e))?;
                self.generation.insert((chunk, generation))
            }
        };
        generation
            .step(&policy.model)
            .map_err(|e| ServiceError::invalid(field(chunk), e))?;
        if !generation.is_finished() {
            return Ok(());
        }
        let Some((chunk, generation)) = self.generation.take() else {
            return Ok(());
        };
        let eos = policy.model.config().eos_token_id();
        let responses: Vec<String> = generation
            .into_tokens()
            .into_iter()
            .map(|tokens| {
                let kept: Vec<u32> = tokens.into_iter().filter(|t| *t != eos).collect();
                let text = policy.tokenizer.decode(&kept).unwrap_or_default();
                // An immediately-ended sample still needs one response token to be judged.
                if text.is_empty() { " ".into() } else { text }
            })
            .collect();
        self.judge(worker, &chunk, responses)
    }

    /// Scores a chunk's responses with the judge; per prompt, the best is `chosen` against
    /// each other sample.
    fn judge(
        &mut self,
        worker: &Worker,
        chunk: &[usize],
        responses: Vec<String>,
    ) -> ServiceResult<()> {
        let job = &self.work.job;
        let judge = worker.resident(&job.judge)?;
        let whole_text = job.judge_kind == JudgeKind::Reward;
        let context = worker.context_of(judge);
        let k = job.samples_per_prompt;
        let as_pairs: Vec<Pair> = responses
            .iter()
            .enumerate()
            .map(|(row, r)| Pair {
                prompt: job.prompts[chunk[row / k]].clone(),
                chosen: r.clone(),
                rejected: r.clone(),
            })
            .collect();
        // Each response was encoded twice (as chosen and rejected); score each once.
        let singles: Vec<EncodedDialogue> = context
            .encode_pairs(&as_pairs, 0, whole_text)?
            .into_iter()
            .step_by(2)
            .collect();
        let sequences: Vec<Vec<u32>> = singles.iter().map(|d| d.ids.clone()).collect();
        let scores: Vec<f64> = if whole_text {
            let starts: Vec<usize> = singles
                .iter()
                .map(EncodedDialogue::response_start)
                .collect();
            worker
                .batched_rewards(&job.judge, &judge.model, &sequences, &starts)?
                .into_iter()
                .map(f64::from)
                .collect()
        } else {
            pool_rows(
                &worker.batched_logprobs(&job.judge, &judge.model, &sequences)?,
                &singles,
                job.judge_kind == JudgeKind::MeanLogprob,
            )?
        };
        for (place, &prompt_index) in chunk.iter().enumerate() {
            let rows = place * k..(place + 1) * k;
            let (scores, responses) = (&scores[rows.clone()], &responses[rows]);
            let best = (0..scores.len())
                .max_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(b.cmp(&a)))
                .unwrap_or(0);
            let prompt = &job.prompts[prompt_index];
            for (sample, response) in responses.iter().enumerate() {
                if sample == best {
                    continue;
                }
                self.out[prompt_index].push(GeneratedPair {
                    prompt_index,
                    prompt: prompt.clone(),
                    chosen: responses[best].clone(),
                    rejected: response.clone(),
                    chosen_score: scores[best],
                    rejected_score: scores[sample],
                });
            }
        }
        Ok(())
    }
}

/// Long work in progress on the device thread.
pub(super) enum Task {
    Batch(BatchTask),
    Dpo(Box<DpoTask>),
    Generate(Box<GenerateTask>),
    Pairs(Box<PairsTask>),
}

impl Task {
    /// One slice: at most one forward pass (or the judge's scoring of a chunk's samples).
    pub(super) fn advance(&mut self, worker: &Worker) -> Progress {
        match self {
            Task::Batch(task) => task.advance(worker),
            Task::Dpo(task) => task.advance(worker),
            Task::Generate(task) => task.advance(worker),
            Task::Pairs(task) => task.advance(worker),
        }
    }
}

impl Worker {
    /// End (exclusive) of the batch starting at `start`: as many sequences as fit the pass's
    /// token budget (`max_batch_tokens`, or less under `--max-pass-ms`), at least one.
    pub(super) fn batch_end(&self, model: &str, sequences: &[Vec<u32>], start: usize) -> usize {
        batch_end_within(sequences, start, self.pass_budget(model))
    }

    /// Padded tokens one pass on `model` may take (see [`token_budget`]).
    fn pass_budget(&self, model: &str) -> usize {
        let rate = self.pass_rates.borrow().get(model).copied();
        token_budget(self.config.max_batch_tokens, rate, self.config.max_pass)
    }

    /// Records how long a pass of `padded` tokens on `model` took.
    pub(super) fn observe_pass(&self, model: &str, padded: usize, elapsed: Duration) {
        let mut rates = self.pass_rates.borrow_mut();
        match rates.get_mut(model) {
            Some(rate) => rate.observe(padded, elapsed),
            None => {
                if let Some(rate) = PassRate::first(padded, elapsed) {
                    rates.insert(model.to_string(), rate);
                }
            }
        }
    }

    pub(super) fn batched_logprobs(
        &self,
        name: &str,
        model: &CausalLm,
        sequences: &[Vec<u32>],
    ) -> ServiceResult<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(sequences.len());
        let mut start = 0;
        while start < sequences.len() {
            let end = self.batch_end(name, sequences, start);
            out.extend(model.sequence_logprobs(&sequences[start..end])?);
            start = end;
        }
        Ok(out)
    }

    pub(super) fn batched_rewards(
        &self,
        name: &str,
        model: &CausalLm,
        sequences: &[Vec<u32>],
        response_starts: &[usize],
    ) -> ServiceResult<Vec<f32>> {
        let mut out = Vec::with_capacity(sequences.len());
        let mut start = 0;
        while start < sequences.len() {
            let end = self.batch_end(name, sequences, start);
            out.extend(
                model.sequence_rewards(&sequences[start..end], &response_starts[start..end])?,
            );
            start = end;
        }
        Ok(out)
    }
}

/// Masked response log-probs pooled per sequence (mean or sum).
pub(super) fn pool_rows(
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

pub(super) fn pair_scores(values: &[f64]) -> Vec<PairScore> {
    values
        .chunks(2)
        .map(|c| PairScore {
            chosen: c[0],
            rejected: c.get(1).copied().unwrap_or(f64::NAN),
        })
        .collect()
}

pub(super) fn truncate_dialogue(dialogue: EncodedDialogue, max_ctx: usize) -> EncodedDialogue {
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

/// The shortest chunk a sequence is split into under a pass target: shorter sequences run
/// whole, and a model's first (probe) pass on a long sequence is one such chunk. Below this a
/// pass is mostly fixed overhead.
const MIN_CHUNK_TOKENS: usize = 32;

/// Padded tokens of a batch: rows × longest row.
fn padded_tokens(batch: &[Vec<u32>]) -> usize {
    batch.len() * batch.iter().map(Vec::len).max().unwrap_or(0)
}

/// The end of the batch that starts at `start`: as many sequences as fit in `budget` padded
/// tokens, at least one.
pub(super) fn batch_end_within(sequences: &[Vec<u32>], start: usize, budget: usize) -> usize {
    let mut end = start;
    let mut longest = 0;
    while end < sequences.len() {
        let longest_with = longest.max(sequences[end].len());
        if end > start && longest_with * (end - start + 1) > budget {
            break;
        }
        longest = longest_with;
        end += 1;
    }
    end
}

/// Padded tokens one pass may take: `max_batch_tokens`, lowered to what the model's measured
/// rate gets through in `max_pass`. With a target but no rate yet, one sequence (of a long one,
/// one `MIN_CHUNK_TOKENS` chunk): the model's first pass is a short probe that measures it, not
/// a maximal pass of unknown length. No target: `max_batch_tokens`.
pub(super) fn token_budget(
    max_batch_tokens: usize,
    rate: Option<PassRate>,
    max_pass: Option<Duration>,
) -> usize {
    match (rate, max_pass) {
        (Some(rate), Some(pass)) => {
            let timed = (rate.tokens_per_second * pass.as_secs_f64()).floor();
            // `as` saturates; a budget below one sequence still runs one (batch_end_within).
            max_batch_tokens.min(timed.max(1.0) as usize)
        }
        (None, Some(_)) => 1,
        (_, None) => max_batch_tokens,
    }
}

/// A model's measured scoring throughput: an exponential moving average of padded tokens per
/// second over its passes (recent passes weigh 1/4), so it follows the sequence lengths in use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct PassRate {
    pub tokens_per_second: f64,
}

impl PassRate {
    /// The rate of a first pass; `None` for a pass too short to time.
    pub(super) fn first(padded: usize, elapsed: Duration) -> Option<Self> {
        let seconds = elapsed.as_secs_f64();
        (padded > 0 && seconds > 0.0).then(|| Self {
            tokens_per_second: padded as f64 / seconds,
        })
    }

    pub(super) fn observe(&mut self, padded: usize, elapsed: Duration) {
        if let Some(now) = Self::first(padded, elapsed) {
            self.tokens_per_second = 0.75 * self.tokens_per_second + 0.25 * now.tokens_per_second;
        }
    }
}

#[cfg(test)]
mod pass_sizing_tests {
    use super::*;

    #[test]
    fn pair_chunks_group_prompts_of_one_length_within_the_budget() {
        let prompts = vec![
            vec![1; 3],
            vec![1; 5],
            vec![1; 3],
            vec![1; 3],
            vec![1; 5],
            vec![1; 2],
        ];
        // 2 samples of (3 + 2) tokens = 10 per prompt of length 3: two fit 25 tokens; one
        // prompt of length 5 (14 tokens) does.
        let chunks: Vec<Vec<usize>> = pair_chunks(&prompts, 2, 2, 25).into();
        assert_eq!(chunks, vec![vec![5], vec![0, 2], vec![3], vec![1], vec![4]]);
        // A budget below one prompt still takes one prompt at a time.
        let chunks: Vec<Vec<usize>> = pair_chunks(&prompts, 2, 2, 1).into();
        assert_eq!(chunks.len(), 6);
        assert!(chunks.iter().all(|c| c.len() == 1));
    }

    #[test]
    fn batches_fit_the_budget_but_always_hold_one_sequence() {
        let seqs: Vec<Vec<u32>> = [3, 5, 2, 8, 1].iter().map(|&n| vec![0; n]).collect();
        assert_eq!(batch_end_within(&seqs, 0, 15), 3); // 3 rows x 5 = 15
        assert_eq!(batch_end_within(&seqs, 0, 14), 2);
        assert_eq!(batch_end_within(&seqs, 3, 1), 4); // one sequence longer than the budget
        assert_eq!(batch_end_within(&seqs, 4, 100), 5);
    }

    #[test]
    fn the_budget_follows_the_measured_rate_under_the_token_cap() {
        let rate = PassRate::first(1000, Duration::from_millis(100)).unwrap(); // 10k tokens/s
        let half_second = Some(Duration::from_millis(500));
        assert_eq!(token_budget(16384, Some(rate), half_second), 5000);
        // The token cap stays the hard limit; no target: the cap alone.
        assert_eq!(token_budget(4096, Some(rate), half_second), 4096);
        assert_eq!(token_budget(16384, None, None), 16384);
        assert_eq!(token_budget(16384, Some(rate), None), 16384);
        // A target but no rate yet: a one-sequence probe pass.
        assert_eq!(token_budget(16384, None, half_second), 1);
        // A model slower than one token per target still gets a budget (one sequence runs).
        let crawl = PassRate::first(1, Duration::from_secs(10)).unwrap();
        assert_eq!(token_budget(16384, Some(crawl), half_second), 1);
        // The average moves a quarter of the way to each new pass.
        let mut moving = rate;
        moving.observe(2000, Duration::from_millis(100)); // 20k tokens/s
        assert!((moving.tokens_per_second - 12_500.0).abs() < 1e-6);
        assert!(PassRate::first(0, Duration::from_millis(5)).is_none());
    }
}
