//! Inference on the device thread: tokenizing requests, running dynamic batches, DPO scoring,
//! generation and preference-pair generation.

use std::time::{Duration, Instant};

use superficial_models::generation::{GenerationConfig, SamplingConfig, generate};
use superficial_models::{CausalLm, EncodedDialogue};
use tokio::sync::mpsc;

use super::*;
use crate::error::{ServiceError, ServiceResult};

impl Worker {
    /// Tokenizes a batchable request; on error the request is answered at once.
    pub(super) fn prepare(&self, job: Job) -> Option<Prepared> {
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
                            if ids.is_empty() {
                                // A reward is read at the last token; a text without one is
                                // the client's error, not the server's.
                                return Err(ServiceError::invalid(
                                    format!("texts[{i}]"),
                                    "text has no tokens",
                                ));
                            }
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
    pub(super) fn run_batch(&mut self, batch: Vec<Job>) {
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

    pub(super) fn encode_logprobs(&self, job: &LogprobsJob) -> ServiceResult<Vec<EncodedDialogue>> {
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
    pub(super) fn encode_pairs_with(
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

    pub(super) fn encode_pairs(&self, job: &ScoreJob) -> ServiceResult<Vec<EncodedDialogue>> {
        let resident = self.resident(&job.model)?;
        let whole_text = job.scoring == PairScoring::Reward;
        if whole_text {
            Self::require_head(resident)?;
        }
        self.encode_pairs_with(resident, job, whole_text)
    }

    pub(super) fn require_head(resident: &Resident) -> ServiceResult<()> {
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
    pub(super) fn dpo_scores(&self, job: &ScoreJob) -> ServiceResult<(Vec<PairScore>, StageTimes)> {
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
    pub(super) fn batches<'a>(&self, sequences: &'a [Vec<u32>]) -> Vec<&'a [Vec<u32>]> {
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

    pub(super) fn batched_logprobs(
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

    pub(super) fn batched_rewards(
        &self,
        model: &CausalLm,
        sequences: &[Vec<u32>],
    ) -> ServiceResult<Vec<f32>> {
        let mut out = Vec::with_capacity(sequences.len());
        for batch in self.batches(sequences) {
            out.extend(model.sequence_rewards(batch)?);
        }
        Ok(out)
    }

    pub(super) fn generate(
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

    pub(super) fn generate_pairs(
        &self,
        job: &PairsJob,
    ) -> ServiceResult<(Vec<GeneratedPair>, StageTimes)> {
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

pub(super) fn check_ids(resident: &Resident, ids: &[u32], field: String) -> ServiceResult<()> {
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
