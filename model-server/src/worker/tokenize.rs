//! Tokenization off the device thread. The worker hands every request that carries text to a
//! tokenizer thread together with a snapshot of the resident models' tokenizers and limits
//! ([`Contexts`]); the thread encodes and validates the texts (errors name the field and are
//! answered from there) and sends the encoded work back to the worker's own queue as one
//! [`Command::Tokenized`] message per group, so requests that arrived together are still
//! batched together. A 256 KB prompt costs the device nothing, and two lanes (small and bulk
//! requests) keep a one-pair request from waiting behind the encoding of a 4096-pair one.
//! While long work or a training job runs, requests with at most 4 KiB of text skip the
//! threads: the device thread encodes them in microseconds ([`encode`]), which spares them a
//! turn of the loop (one more pass or step) spent waiting for the encoded result. With the
//! device otherwise idle they take the small lane, which encodes while the device computes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use superficial_models::{EncodedDialogue, TextTokenizer};
use tokio::sync::mpsc;
use tracing::{Span, error};

use super::inference::{ReplyTo, truncate_dialogue};
use super::*;
use crate::error::{ServiceError, ServiceResult};

/// What tokenizing a request needs to know about one resident model.
pub(super) struct TokenizeContext {
    pub name: String,
    pub tokenizer: Arc<TextTokenizer>,
    /// SHA-256 of the tokenizer's JSON (see `Resident`).
    pub tokenizer_digest: Arc<str>,
    pub vocab_size: usize,
    pub max_positions: usize,
    pub has_reward_head: bool,
}

/// The resident models at the time a group of requests left the worker, by name.
pub(super) type Contexts = Arc<BTreeMap<String, TokenizeContext>>;

impl TokenizeContext {
    fn of<'a>(contexts: &'a Contexts, name: &str) -> ServiceResult<&'a Self> {
        contexts
            .get(name)
            .ok_or_else(|| ServiceError::UnknownModel(name.to_string()))
    }

    fn max_ctx(&self, requested: usize) -> usize {
        if requested == 0 {
            self.max_positions
        } else {
            requested.min(self.max_positions)
        }
    }

    fn require_head(&self) -> ServiceResult<()> {
        if self.has_reward_head {
            Ok(())
        } else {
            Err(ServiceError::FailedPrecondition(format!(
                "model `{}` has no reward head (load it with reward_head = true)",
                self.name
            )))
        }
    }

    /// Token ids the model can take: inside its vocabulary and its positions.
    pub(super) fn check_ids(&self, ids: &[u32], field: String) -> ServiceResult<()> {
        let vocab = self.vocab_size;
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(ServiceError::invalid(
                field,
                format!(
                    "token id {bad} from the tokenizer is outside the model's vocabulary of {vocab}"
                ),
            ));
        }
        if ids.len() > self.max_positions {
            return Err(ServiceError::invalid(
                field,
                format!(
                    "{} tokens exceed the model's {} positions",
                    ids.len(),
                    self.max_positions
                ),
            ));
        }
        Ok(())
    }

    fn encode_logprobs(&self, job: &LogprobsJob) -> ServiceResult<Vec<EncodedDialogue>> {
        let max_ctx = self.max_ctx(job.max_ctx);
        let mut encoded = Vec::with_capacity(job.texts.len());
        for (i, text) in job.texts.iter().enumerate() {
            let field = || format!("texts[{i}]");
            let dialogue = if job.split_dialogue {
                self.tokenizer
                    .encode_dialogue(text, usize::MAX)
                    .map_err(|e| ServiceError::invalid(field(), e))?
            } else {
                let ids = self
                    .tokenizer
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
            self.check_ids(&dialogue.ids, field())?;
            encoded.push(dialogue);
        }
        Ok(encoded)
    }

    /// Each text's ids and where its response starts (after its last `"\n\nAssistant:"`).
    fn encode_texts(&self, job: &TextsJob) -> ServiceResult<Vec<(Vec<u32>, usize)>> {
        self.require_head()?;
        let max_ctx = self.max_ctx(job.max_ctx);
        job.texts
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let (ids, start, _) = self
                    .tokenizer
                    .encode_whole_dialogue(text, max_ctx)
                    .map_err(|e| ServiceError::invalid(format!("texts[{i}]"), e))?;
                if ids.is_empty() {
                    // A reward is read at the last token; a text without one is the client's
                    // error, not the server's.
                    return Err(ServiceError::invalid(
                        format!("texts[{i}]"),
                        "text has no tokens",
                    ));
                }
                self.check_ids(&ids, format!("texts[{i}]"))?;
                Ok((ids, start))
            })
            .collect()
    }

    /// Sequences of a pair request in the order chosen_0, rejected_0, chosen_1, ...
    /// `whole_text`: prompt and response as one text (reward scoring), else a dialogue whose
    /// response tokens are marked.
    pub(super) fn encode_pairs(
        &self,
        pairs: &[Pair],
        max_ctx: usize,
        whole_text: bool,
    ) -> ServiceResult<Vec<EncodedDialogue>> {
        if whole_text {
            self.require_head()?;
        }
        let max_ctx = self.max_ctx(max_ctx);
        let mut encoded = Vec::with_capacity(pairs.len() * 2);
        for (i, pair) in pairs.iter().enumerate() {
            for (side, response) in [("chosen", &pair.chosen), ("rejected", &pair.rejected)] {
                let field = || format!("pairs[{i}].{side}");
                let dialogue = if whole_text {
                    let (ids, start, truncated) = if pair.prompt.is_empty() {
                        self.tokenizer.encode_whole_dialogue(response, max_ctx)
                    } else {
                        self.tokenizer
                            .encode_whole_text(&pair.prompt, response, max_ctx)
                    }
                    .map_err(|e| ServiceError::invalid(field(), e))?;
                    let n = ids.len();
                    let mut response_mask = vec![false; start];
                    response_mask.extend(std::iter::repeat_n(true, n - start));
                    EncodedDialogue {
                        response_mask,
                        ids,
                        truncated,
                    }
                } else if pair.prompt.is_empty() {
                    self.tokenizer
                        .encode_dialogue(response, max_ctx)
                        .map_err(|e| ServiceError::invalid(field(), e))?
                } else {
                    self.tokenizer
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
                self.check_ids(&dialogue.ids, field())?;
                encoded.push(dialogue);
            }
        }
        Ok(encoded)
    }

    fn encode_prompt(&self, prompt: &str, field: String) -> ServiceResult<Vec<u32>> {
        let ids = self
            .tokenizer
            .encode(prompt)
            .map_err(|e| ServiceError::invalid(field.clone(), e))?;
        self.check_ids(&ids, field)?;
        Ok(ids)
    }
}

/// A scoring request whose texts are encoded: one slice of forward passes may serve several.
pub(super) struct Prepared {
    pub model: String,
    pub primitive: Primitive,
    pub sequences: Vec<Vec<u32>>,
    /// Where each sequence's response starts (see `CausalLm::rewards`).
    pub response_starts: Vec<usize>,
    pub times: StageTimes,
    pub reply: ReplyTo,
}

/// DPO scoring: the pair texts encoded for the policy and for the reference model.
pub(super) struct DpoWork {
    pub job: ScoreJob,
    pub policy_encoded: Vec<EncodedDialogue>,
    pub reference_encoded: Vec<EncodedDialogue>,
    pub times: StageTimes,
    pub reply: Reply<(Vec<PairScore>, StageTimes)>,
}

pub(super) struct GenerateWork {
    pub job: GenerateJob,
    pub prompt: Vec<u32>,
    pub times: StageTimes,
    pub events: mpsc::Sender<ServiceResult<GenerationEvent>>,
}

pub(super) struct PairsWork {
    pub job: PairsJob,
    pub prompts: Vec<Vec<u32>>,
    pub times: StageTimes,
    pub reply: Reply<(Vec<GeneratedPair>, StageTimes)>,
}

/// Encoded work coming back to the device thread.
pub(super) enum Tokenized {
    Batch(Prepared),
    Dpo(DpoWork),
    Generate(GenerateWork),
    Pairs(PairsWork),
}

/// Whether a command carries text to encode before the device sees it.
pub(super) fn needs_tokenizing(command: &Command) -> bool {
    matches!(
        command,
        Command::Logprobs(..)
            | Command::ScoreTexts(..)
            | Command::Score(..)
            | Command::Generate(..)
            | Command::Pairs(..)
    )
}

/// Encodes one request; `None` when it was answered here (an error) or its client has gone.
fn tokenize(job: Job, contexts: &Contexts) -> Option<Tokenized> {
    let queue = job.enqueued.elapsed();
    let started = Instant::now();
    let times = |started: Instant| StageTimes {
        queue,
        tokenize: started.elapsed(),
        compute: Duration::ZERO,
    };
    match job.command {
        Command::Logprobs(request, reply) => {
            if reply.is_closed() {
                return None;
            }
            let encoded = TokenizeContext::of(contexts, &request.model)
                .and_then(|c| c.encode_logprobs(&request));
            match encoded {
                Ok(encoded) => Some(Tokenized::Batch(Prepared {
                    sequences: encoded.iter().map(|d| d.ids.clone()).collect(),
                    response_starts: encoded
                        .iter()
                        .map(EncodedDialogue::response_start)
                        .collect(),
                    model: request.model,
                    primitive: Primitive::Logprobs,
                    times: times(started),
                    reply: ReplyTo::Logprobs { encoded, reply },
                })),
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
            let encoded = TokenizeContext::of(contexts, &request.model)
                .and_then(|c| c.encode_texts(&request));
            match encoded {
                Ok(encoded) => Some(Tokenized::Batch(Prepared {
                    model: request.model,
                    primitive: Primitive::Rewards,
                    sequences: encoded.iter().map(|(ids, _)| ids.clone()).collect(),
                    response_starts: encoded.iter().map(|(_, start)| *start).collect(),
                    times: times(started),
                    reply: ReplyTo::Texts { reply },
                })),
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
            if let PairScoring::Dpo { reference } = &request.scoring {
                let encoded = (|| {
                    let policy = TokenizeContext::of(contexts, &request.model)?;
                    let reference_context = TokenizeContext::of(contexts, reference)?;
                    // DPO's implicit reward compares the two models' log-probs of the same
                    // tokens; with different tokenizers the sums cover different units.
                    if policy.tokenizer_digest != reference_context.tokenizer_digest {
                        return Err(ServiceError::invalid(
                            "reference_model",
                            format!(
                                "`{reference}` has a different tokenizer than `{}`: DPO scoring needs both to read the same tokens",
                                request.model
                            ),
                        ));
                    }
                    Ok::<_, ServiceError>((
                        policy.encode_pairs(&request.pairs, request.max_ctx, false)?,
                        reference_context.encode_pairs(&request.pairs, request.max_ctx, false)?,
                    ))
                })();
                return match encoded {
                    Ok((policy_encoded, reference_encoded)) => Some(Tokenized::Dpo(DpoWork {
                        job: request,
                        policy_encoded,
                        reference_encoded,
                        times: times(started),
                        reply,
                    })),
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        None
                    }
                };
            }
            let whole_text = request.scoring == PairScoring::Reward;
            let encoded = TokenizeContext::of(contexts, &request.model)
                .and_then(|c| c.encode_pairs(&request.pairs, request.max_ctx, whole_text));
            match encoded {
                Ok(encoded) => Some(Tokenized::Batch(Prepared {
                    sequences: encoded.iter().map(|d| d.ids.clone()).collect(),
                    response_starts: encoded
                        .iter()
                        .map(EncodedDialogue::response_start)
                        .collect(),
                    model: request.model,
                    primitive: if whole_text {
                        Primitive::Rewards
                    } else {
                        Primitive::Logprobs
                    },
                    times: times(started),
                    reply: ReplyTo::Score {
                        mean: request.scoring == PairScoring::MeanLogprob,
                        encoded,
                        reply,
                    },
                })),
                Err(e) => {
                    let _ = reply.send(Err(e));
                    None
                }
            }
        }
        Command::Generate(request, events) => {
            if events.is_closed() {
                return None;
            }
            let prompt = TokenizeContext::of(contexts, &request.model)
                .and_then(|c| c.encode_prompt(&request.prompt, "prompt".into()));
            match prompt {
                Ok(prompt) => Some(Tokenized::Generate(GenerateWork {
                    job: request,
                    prompt,
                    times: times(started),
                    events,
                })),
                Err(e) => {
                    let _ = events.blocking_send(Err(e));
                    None
                }
            }
        }
        Command::Pairs(request, reply) => {
            if reply.is_closed() {
                return None;
            }
            let prompts = (|| {
                if request.samples_per_prompt < 2 {
                    return Err(ServiceError::invalid(
                        "samples_per_prompt",
                        "must be at least 2",
                    ));
                }
                let policy = TokenizeContext::of(contexts, &request.policy)?;
                let judge = TokenizeContext::of(contexts, &request.judge)?;
                if request.judge_kind == JudgeKind::Reward {
                    judge.require_head()?;
                }
                request
                    .prompts
                    .iter()
                    .enumerate()
                    .map(|(p, prompt)| policy.encode_prompt(prompt, format!("prompts[{p}]")))
                    .collect::<ServiceResult<Vec<_>>>()
            })();
            match prompts {
                Ok(prompts) => Some(Tokenized::Pairs(PairsWork {
                    job: request,
                    prompts,
                    times: times(started),
                    reply,
                })),
                Err(e) => {
                    let _ = reply.send(Err(e));
                    None
                }
            }
        }
        _ => None,
    }
}

/// While long work runs, requests with at most this much text are encoded on the device thread
/// itself, in microseconds: a round trip through a tokenizer thread would cost them one more
/// forward pass or training step.
pub(super) const INLINE_TEXT_BYTES: usize = 4 * 1024;

/// Requests whose texts together exceed this go to the bulk lane: a batch of long dialogues
/// takes the tokenizer hundreds of milliseconds, which a one-pair request should not wait for.
const BULK_TEXT_BYTES: usize = 32 * 1024;

/// The bytes of text a command carries (what its encoding costs, roughly).
pub(super) fn text_bytes(command: &Command) -> usize {
    let total = |texts: &[String]| texts.iter().map(String::len).sum::<usize>();
    match command {
        Command::Logprobs(job, _) => total(&job.texts),
        Command::ScoreTexts(job, _) => total(&job.texts),
        Command::Score(job, _) => job
            .pairs
            .iter()
            .map(|p| p.prompt.len() + p.chosen.len() + p.rejected.len())
            .sum(),
        Command::Generate(job, _) => job.prompt.len(),
        Command::Pairs(job, _) => total(&job.prompts),
        _ => 0,
    }
}

/// What a lane receives: a group of requests and the models they are encoded against.
type LaneMessage = (Vec<Job>, Contexts);

/// The tokenizer threads' end of the handoff: one lane for small requests and one for bulk
/// ones, so a short request is never queued behind a long encoding. Each lane keeps the order
/// of what it is given; requests in different lanes were independent anyway.
pub(super) struct TokenizerHandle {
    small: std::sync::mpsc::Sender<LaneMessage>,
    bulk: std::sync::mpsc::Sender<LaneMessage>,
}

impl TokenizerHandle {
    /// Starts both lanes' threads. They hold only weak senders to the worker's queue, so the
    /// worker still stops once every [`WorkerHandle`] is gone.
    pub(super) fn spawn(worker: mpsc::WeakSender<Job>) -> std::io::Result<Self> {
        Ok(Self {
            small: spawn_lane("w2s-tokenizer", worker.clone())?,
            bulk: spawn_lane("w2s-tokenizer-bulk", worker)?,
        })
    }

    /// Hands a group of requests over; each lane's share comes back as one
    /// [`Command::Tokenized`].
    pub(super) fn submit(&self, jobs: Vec<Job>, contexts: Contexts) {
        let (bulk, small): (Vec<Job>, Vec<Job>) = jobs
            .into_iter()
            .partition(|job| text_bytes(&job.command) > BULK_TEXT_BYTES);
        for (lane, jobs) in [(&self.small, small), (&self.bulk, bulk)] {
            if jobs.is_empty() {
                continue;
            }
            if let Err(std::sync::mpsc::SendError((jobs, _))) = lane.send((jobs, contexts.clone()))
            {
                // The thread is gone (a panic in a tokenizer): dropping the replies answers
                // UNAVAILABLE, which beats hanging.
                error!(
                    "tokenizer thread has stopped; refusing {} requests",
                    jobs.len()
                );
            }
        }
    }
}

/// Encodes one request in its span; `None` when it was answered (an error) or its client has
/// gone. A panic (a bug in a tokenizer) drops this request's reply, so its client sees
/// UNAVAILABLE; the caller keeps serving.
pub(super) fn encode(job: Job, contexts: &Contexts) -> Option<Tokenized> {
    let span = job.span.clone();
    let _entered = span.enter();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| tokenize(job, contexts)))
        .unwrap_or_else(|_| {
            error!("a tokenizer panicked; the request was dropped");
            None
        })
}

/// One tokenizer thread: encodes each group it receives and sends the result to the worker.
fn spawn_lane(
    name: &str,
    worker: mpsc::WeakSender<Job>,
) -> std::io::Result<std::sync::mpsc::Sender<LaneMessage>> {
    let (sender, receiver) = std::sync::mpsc::channel::<LaneMessage>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            for (jobs, contexts) in receiver {
                let span = jobs
                    .first()
                    .map(|j| j.span.clone())
                    .unwrap_or_else(Span::none);
                let encoded: Vec<Tokenized> = jobs
                    .into_iter()
                    .filter_map(|job| encode(job, &contexts))
                    .collect();
                if encoded.is_empty() {
                    continue;
                }
                let Some(worker) = worker.upgrade() else {
                    return;
                };
                let job = Job {
                    command: Command::Tokenized(encoded),
                    enqueued: Instant::now(),
                    span,
                };
                // Waits for room: encoded work is never refused once accepted.
                if worker.blocking_send(job).is_err() {
                    return;
                }
            }
        })?;
    Ok(sender)
}
