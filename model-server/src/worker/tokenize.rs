//! Tokenization before the queue, as text-embeddings-inference does it. The worker publishes a
//! snapshot of the resident models' tokenizers and limits ([`Contexts`]) whenever its registry
//! changes; a request that carries text ([`TextRequest`]) is encoded against the current
//! snapshot by the caller's side of the [`WorkerHandle`] (inline for at most 4 KiB of text, on
//! the blocking pool beyond), errors naming the field are answered from there, and only ready
//! work ([`Encoded`]) enters the device queue. The device thread never encodes, and a request
//! never waits a turn of the loop for its own encoding. The work carries the identity of every
//! model it was encoded for ([`ModelStamp`]: weights' content hash and tokenizer digest); the
//! worker checks it when the task starts, so a model unloaded or replaced in between is an
//! error, never ids read by the wrong tokenizer.

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
    /// What the encoded work must find resident when it starts.
    pub stamp: ModelStamp,
    pub vocab_size: usize,
    pub max_positions: usize,
    pub has_reward_head: bool,
}

/// The resident models as the worker last published them, by name.
pub(super) type Contexts = Arc<BTreeMap<String, TokenizeContext>>;

/// Which model a piece of encoded work was encoded for: ids from one tokenizer mean nothing to
/// another, and a model reloaded under the same name may be a different one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ModelStamp {
    pub name: String,
    /// SHA-256 of the weights (`ModelSummary::content_hash`).
    pub content_hash: Arc<str>,
    /// SHA-256 of the tokenizer's JSON (see `Resident`).
    pub tokenizer_digest: Arc<str>,
}

/// A request that carries text, before it is encoded.
pub(super) enum TextRequest {
    Logprobs(LogprobsJob, Reply<(Vec<SequenceLogprobs>, StageTimes)>),
    Score(ScoreJob, Reply<(Vec<PairScore>, StageTimes)>),
    ScoreTexts(TextsJob, Reply<(Vec<f64>, StageTimes)>),
    Generate(GenerateJob, mpsc::Sender<ServiceResult<GenerationEvent>>),
    Pairs(PairsJob, Reply<(Vec<GeneratedPair>, StageTimes)>),
}

impl TextRequest {
    /// The bytes of text it carries (what its encoding costs, roughly).
    pub(super) fn text_bytes(&self) -> usize {
        let total = |texts: &[String]| texts.iter().map(String::len).sum::<usize>();
        match self {
            TextRequest::Logprobs(job, _) => total(&job.texts),
            TextRequest::ScoreTexts(job, _) => total(&job.texts),
            TextRequest::Score(job, _) => job
                .pairs
                .iter()
                .map(|p| p.prompt.len() + p.chosen.len() + p.rejected.len())
                .sum(),
            TextRequest::Generate(job, _) => job.prompt.len(),
            TextRequest::Pairs(job, _) => total(&job.prompts),
        }
    }
}

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

    /// A generation prompt's ids; with `keep_last`, only that many of its last tokens.
    fn encode_prompt(
        &self,
        prompt: &str,
        keep_last: Option<usize>,
        field: String,
    ) -> ServiceResult<Vec<u32>> {
        let mut ids = self
            .tokenizer
            .encode(prompt)
            .map_err(|e| ServiceError::invalid(field.clone(), e))?;
        if let Some(keep) = keep_last {
            ids.drain(..ids.len().saturating_sub(keep));
        }
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

/// Encodes one request; `None` when it was answered here (an error) or its client has gone.
fn tokenize(request: TextRequest, contexts: &Contexts) -> Option<Tokenized> {
    let started = Instant::now();
    // The queue's share is added when the device thread picks the work up.
    let times = move || StageTimes {
        queue: Duration::ZERO,
        tokenize: started.elapsed(),
        compute: Duration::ZERO,
    };
    match request {
        TextRequest::Logprobs(request, reply) => {
            if reply.is_closed() {
                return None;
            }
            let encoded = TokenizeContext::of(contexts, &request.model)
                .and_then(|c| c.encode_logprobs(&request));
            answer_errors(reply, encoded, |encoded, reply| {
                Tokenized::Batch(Prepared {
                    sequences: encoded.iter().map(|d| d.ids.clone()).collect(),
                    response_starts: encoded
                        .iter()
                        .map(EncodedDialogue::response_start)
                        .collect(),
                    model: request.model,
                    primitive: Primitive::Logprobs,
                    times: times(),
                    reply: ReplyTo::Logprobs { encoded, reply },
                })
            })
        }
        TextRequest::ScoreTexts(request, reply) => {
            if reply.is_closed() {
                return None;
            }
            let encoded = TokenizeContext::of(contexts, &request.model)
                .and_then(|c| c.encode_texts(&request));
            answer_errors(reply, encoded, |encoded, reply| {
                Tokenized::Batch(Prepared {
                    model: request.model,
                    primitive: Primitive::Rewards,
                    sequences: encoded.iter().map(|(ids, _)| ids.clone()).collect(),
                    response_starts: encoded.iter().map(|(_, start)| *start).collect(),
                    times: times(),
                    reply: ReplyTo::Texts { reply },
                })
            })
        }
        TextRequest::Score(request, reply) => {
            if reply.is_closed() {
                return None;
            }
            if let PairScoring::Dpo { reference } = &request.scoring {
                let encoded = encode_dpo_pairs(contexts, &request, reference);
                return answer_errors(
                    reply,
                    encoded,
                    |(policy_encoded, reference_encoded), reply| {
                        Tokenized::Dpo(DpoWork {
                            job: request,
                            policy_encoded,
                            reference_encoded,
                            times: times(),
                            reply,
                        })
                    },
                );
            }
            let whole_text = request.scoring == PairScoring::Reward;
            let encoded = TokenizeContext::of(contexts, &request.model)
                .and_then(|c| c.encode_pairs(&request.pairs, request.max_ctx, whole_text));
            answer_errors(reply, encoded, |encoded, reply| {
                Tokenized::Batch(Prepared {
                    sequences: encoded.iter().map(|d| d.ids.clone()).collect(),
                    response_starts: encoded
                        .iter()
                        .map(EncodedDialogue::response_start)
                        .collect(),
                    primitive: if whole_text {
                        Primitive::Rewards
                    } else {
                        Primitive::Logprobs
                    },
                    times: times(),
                    reply: ReplyTo::Score {
                        mean: request.scoring == PairScoring::MeanLogprob,
                        encoded,
                        reply,
                    },
                    model: request.model,
                })
            })
        }
        TextRequest::Generate(request, events) => {
            if events.is_closed() {
                return None;
            }
            let prompt = TokenizeContext::of(contexts, &request.model)
                .and_then(|c| c.encode_prompt(&request.prompt, None, "prompt".into()));
            match prompt {
                Ok(prompt) => Some(Tokenized::Generate(GenerateWork {
                    job: request,
                    prompt,
                    times: times(),
                    events,
                })),
                Err(e) => {
                    // A fresh channel has room; `blocking_send` would panic on a runtime thread.
                    let _ = events.try_send(Err(e));
                    None
                }
            }
        }
        TextRequest::Pairs(request, reply) => {
            if reply.is_closed() {
                return None;
            }
            let prompts = encode_pair_prompts(contexts, &request);
            answer_errors(reply, prompts, |prompts, reply| {
                Tokenized::Pairs(PairsWork {
                    job: request,
                    prompts,
                    times: times(),
                    reply,
                })
            })
        }
    }
}

/// The work built from an encoding, or its error sent to the client (`None`).
fn answer_errors<T, R>(
    reply: Reply<R>,
    encoded: ServiceResult<T>,
    work: impl FnOnce(T, Reply<R>) -> Tokenized,
) -> Option<Tokenized> {
    match encoded {
        Ok(encoded) => Some(work(encoded, reply)),
        Err(e) => {
            let _ = reply.send(Err(e));
            None
        }
    }
}

/// A DPO-scored request's pairs, encoded for the policy and for the reference model.
fn encode_dpo_pairs(
    contexts: &Contexts,
    request: &ScoreJob,
    reference: &str,
) -> ServiceResult<(Vec<EncodedDialogue>, Vec<EncodedDialogue>)> {
    let policy = TokenizeContext::of(contexts, &request.model)?;
    let reference_context = TokenizeContext::of(contexts, reference)?;
    // DPO's implicit reward compares the two models' log-probs of the same tokens; with
    // different tokenizers the sums cover different units.
    if policy.stamp.tokenizer_digest != reference_context.stamp.tokenizer_digest {
        return Err(ServiceError::invalid(
            "reference_model",
            format!(
                "`{reference}` has a different tokenizer than `{}`: DPO scoring needs both to read the same tokens",
                request.model
            ),
        ));
    }
    Ok((
        policy.encode_pairs(&request.pairs, request.max_ctx, false)?,
        reference_context.encode_pairs(&request.pairs, request.max_ctx, false)?,
    ))
}

/// A preference-pair request's prompts, encoded for its policy (its judge checked too).
fn encode_pair_prompts(contexts: &Contexts, request: &PairsJob) -> ServiceResult<Vec<Vec<u32>>> {
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
    // Room for the prompt: the context less the new tokens.
    let room = policy.max_positions.saturating_sub(request.max_new_tokens);
    if request.keep_prompt_end && room == 0 {
        return Err(ServiceError::invalid(
            "max_new_tokens",
            format!(
                "{} new tokens leave no room for a prompt in the policy's {} positions",
                request.max_new_tokens, policy.max_positions
            ),
        ));
    }
    let keep_last = request.keep_prompt_end.then_some(room);
    request
        .prompts
        .iter()
        .enumerate()
        .map(|(p, prompt)| policy.encode_prompt(prompt, keep_last, format!("prompts[{p}]")))
        .collect()
}

/// Requests with at most this much text are encoded on the calling thread (microseconds);
/// larger ones on the blocking pool, so an async runtime thread never encodes for long.
pub(super) const INLINE_TEXT_BYTES: usize = 4 * 1024;

/// Encoded work on its way to the device thread, with the models it was encoded for.
pub(super) struct Encoded {
    pub work: Tokenized,
    pub stamps: Vec<ModelStamp>,
}

impl Tokenized {
    /// The resident models the work reads (each checked when it starts).
    fn models(&self) -> Vec<&str> {
        match self {
            Tokenized::Batch(p) => vec![p.model.as_str()],
            Tokenized::Dpo(w) => match &w.job.scoring {
                PairScoring::Dpo { reference } => vec![w.job.model.as_str(), reference.as_str()],
                _ => vec![w.job.model.as_str()],
            },
            Tokenized::Generate(w) => vec![w.job.model.as_str()],
            Tokenized::Pairs(w) => vec![w.job.policy.as_str(), w.job.judge.as_str()],
        }
    }

    /// Time the work waited in the device queue.
    pub(super) fn add_queue_time(&mut self, queued: Duration) {
        let times = match self {
            Tokenized::Batch(p) => &mut p.times,
            Tokenized::Dpo(w) => &mut w.times,
            Tokenized::Generate(w) => &mut w.times,
            Tokenized::Pairs(w) => &mut w.times,
        };
        times.queue += queued;
    }

    /// Answers the request with `error`.
    pub(super) fn fail(self, error: ServiceError) {
        match self {
            Tokenized::Batch(p) => p.reply.fail(error),
            Tokenized::Dpo(w) => drop(w.reply.send(Err(error))),
            Tokenized::Generate(w) => drop(w.events.try_send(Err(error))),
            Tokenized::Pairs(w) => drop(w.reply.send(Err(error))),
        }
    }
}

/// Encodes one request against `contexts` in `span`; `None` when it was answered (an error) or
/// its client has gone. A panic (a bug in a tokenizer) drops this request's reply, so its
/// client sees UNAVAILABLE; the caller keeps serving.
pub(super) fn encode(request: TextRequest, contexts: &Contexts, span: &Span) -> Option<Encoded> {
    let _entered = span.enter();
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let work = tokenize(request, contexts)?;
        let stamps = work
            .models()
            .into_iter()
            .filter_map(|name| contexts.get(name).map(|c| c.stamp.clone()))
            .collect();
        Some(Encoded { work, stamps })
    }))
    .unwrap_or_else(|_| {
        error!("a tokenizer panicked; the request was dropped");
        None
    })
}
