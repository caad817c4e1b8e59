//! Training examples and objectives: turns a minibatch of examples into the model forward
//! passes and the loss of §1.7 of the paper spec. Implicit conflict needs no objective: it is
//! data mixing, done by the experiment layer.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use superficial_models::packed::PooledPredictions;
use superficial_models::{CausalLm, EncodedDialogue, PackedSequences, PrefixSharing};

use crate::error::{Result, TrainError};
use crate::losses::{PreferenceBatch, preference_pair_loss_sum, reward_pair_loss_sum};

/// One training example; which kind an objective needs is checked before training.
#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    /// A token sequence for next-token pretraining.
    Tokens(Vec<u32>),
    /// A reward-model pair in slot order, with its training target (hard or soft) and which
    /// slot the explicit conflict's goal favours (`conflict_prefers_slot_r`; official form:
    /// slot c holds the human-chosen text). `response_starts`: where each slot's response
    /// begins (read by a mean-log-prob reward read-out only).
    RewardPair {
        slot_c: Vec<u32>,
        slot_r: Vec<u32>,
        response_starts: [usize; 2],
        target: f32,
        conflict_prefers_slot_r: bool,
    },
    /// A dialogue whose response is the SFT target.
    Sft(EncodedDialogue),
    /// A preference pair in training order (c' preferred over r'); `conflict_prefers_rejected`
    /// says whether the explicit conflict's goal favours r' (official form: c' is the
    /// human-chosen response); `reference` holds the frozen reference
    /// policy's summed response log-probs of (c', r') for DPO.
    Preference {
        chosen: EncodedDialogue,
        rejected: EncodedDialogue,
        conflict_prefers_rejected: bool,
        reference: Option<[f64; 2]>,
    },
}

impl Example {
    /// Number of real tokens the example feeds through the model.
    pub fn tokens(&self) -> usize {
        match self {
            Example::Tokens(ids) => ids.len(),
            Example::RewardPair { slot_c, slot_r, .. } => slot_c.len() + slot_r.len(),
            Example::Sft(d) => d.ids.len(),
            Example::Preference {
                chosen, rejected, ..
            } => chosen.ids.len() + rejected.ids.len(),
        }
    }
}

/// What a training run minimises.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Objective {
    /// Mean next-token cross-entropy over all real tokens (sandbox pretraining).
    CausalLm,
    /// Pairwise BCE on reward margins; `explicit_alpha` adds the reward-mechanism conflict.
    Reward { explicit_alpha: Option<f64> },
    /// Response-only NLL: per-sequence token mean, then batch mean.
    Sft,
    /// SimPO (β 2, γ 1 in the paper); `reverse_alpha` adds the explicit conflict.
    Simpo {
        beta: f64,
        gamma: f64,
        reverse_alpha: Option<f64>,
    },
    /// DPO against a frozen reference (β 0.1); `reverse_alpha` adds the explicit conflict.
    Dpo {
        beta: f64,
        reverse_alpha: Option<f64>,
    },
    /// IPO (Azar et al. 2023) against a frozen reference: the squared distance of the
    /// reference-relative log-ratio margin from 1 / (2τ), so preferences stop being pushed once
    /// the margin is reached. No conflict term (the paper defines none for it).
    Ipo { tau: f64 },
}

/// Which objective, without its parameters: what a job asks for, what persists in its record
/// and what a client names over gRPC. Everything that depends only on the kind lives here —
/// the rows it trains on, its defaults, whether it reads a reward head or a frozen reference,
/// and how its parameters make an [`Objective`] — so a new objective is a new variant here, its
/// loss below, and its protobuf value (`OBJECTIVE_KIND_` + [`ObjectiveKind::name`] upper-cased,
/// which the server maps by name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ObjectiveKind {
    CausalLm,
    Reward,
    Sft,
    Simpo,
    Dpo,
    Ipo,
}

/// Which [`Example`] an objective trains on: the server builds it from a job's rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExampleShape {
    /// [`Example::Tokens`]: a text row, or a pair's prompt and chosen response.
    Tokens,
    /// [`Example::RewardPair`] from a pair row.
    RewardPair,
    /// [`Example::Sft`]: a text row, or a pair's chosen response after its prompt.
    Sft,
    /// [`Example::Preference`] from a pair row, the preferred response first.
    Preference,
}

impl ObjectiveKind {
    pub const ALL: [ObjectiveKind; 6] = [
        ObjectiveKind::CausalLm,
        ObjectiveKind::Reward,
        ObjectiveKind::Sft,
        ObjectiveKind::Simpo,
        ObjectiveKind::Dpo,
        ObjectiveKind::Ipo,
    ];

    /// The name job records use; the protobuf value is `OBJECTIVE_KIND_` + it upper-cased.
    pub fn name(self) -> &'static str {
        match self {
            ObjectiveKind::CausalLm => "causal_lm",
            ObjectiveKind::Reward => "reward",
            ObjectiveKind::Sft => "sft",
            ObjectiveKind::Simpo => "simpo",
            ObjectiveKind::Dpo => "dpo",
            ObjectiveKind::Ipo => "ipo",
        }
    }

    /// The examples it trains on.
    pub fn example_shape(self) -> ExampleShape {
        match self {
            ObjectiveKind::CausalLm => ExampleShape::Tokens,
            ObjectiveKind::Reward => ExampleShape::RewardPair,
            ObjectiveKind::Sft => ExampleShape::Sft,
            ObjectiveKind::Simpo | ObjectiveKind::Dpo | ObjectiveKind::Ipo => {
                ExampleShape::Preference
            }
        }
    }

    /// Whether it has an explicit-conflict term (`conflict_alpha`).
    pub fn has_conflict_term(self) -> bool {
        matches!(
            self,
            ObjectiveKind::Reward | ObjectiveKind::Simpo | ObjectiveKind::Dpo
        )
    }

    /// Whether it trains on pairs only (texts: only the language-model objectives).
    pub fn needs_pairs(self) -> bool {
        matches!(
            self.example_shape(),
            ExampleShape::RewardPair | ExampleShape::Preference
        )
    }

    /// Whether the model needs a reward head.
    pub fn needs_reward_head(self) -> bool {
        self == ObjectiveKind::Reward
    }

    /// Whether its examples carry log-probs of a frozen reference (a copy of the base model).
    pub fn needs_reference(self) -> bool {
        matches!(self, ObjectiveKind::Dpo | ObjectiveKind::Ipo)
    }

    /// β when the job leaves it unset: the paper's SimPO 2, DPO 0.1; IPO's τ (which the job's
    /// β sets) 0.1.
    pub fn default_beta(self) -> Option<f64> {
        match self {
            ObjectiveKind::Simpo => Some(2.0),
            ObjectiveKind::Dpo | ObjectiveKind::Ipo => Some(0.1),
            _ => None,
        }
    }

    /// γ when the job leaves it unset: the paper's SimPO 1.
    pub fn default_gamma(self) -> Option<f64> {
        (self == ObjectiveKind::Simpo).then_some(1.0)
    }

    /// The objective with these parameters (`None`: the default; the conflict term off).
    pub fn with(
        self,
        beta: Option<f64>,
        gamma: Option<f64>,
        conflict_alpha: Option<f64>,
    ) -> Objective {
        let beta = beta.or(self.default_beta()).unwrap_or_default();
        match self {
            ObjectiveKind::CausalLm => Objective::CausalLm,
            ObjectiveKind::Reward => Objective::Reward {
                explicit_alpha: conflict_alpha,
            },
            ObjectiveKind::Sft => Objective::Sft,
            ObjectiveKind::Simpo => Objective::Simpo {
                beta,
                gamma: gamma.or(self.default_gamma()).unwrap_or_default(),
                reverse_alpha: conflict_alpha,
            },
            ObjectiveKind::Dpo => Objective::Dpo {
                beta,
                reverse_alpha: conflict_alpha,
            },
            ObjectiveKind::Ipo => Objective::Ipo { tau: beta },
        }
    }
}

/// The loss of a minibatch (or, from [`Objective::loss_sum`], the undivided sum over a shard)
/// plus what the step log reports.
pub struct LossOutput {
    pub loss: Tensor,
    /// Pairs whose prediction agrees with the training target (pair objectives only).
    pub correct: usize,
    pub judged: usize,
}

impl Objective {
    /// The paper's SimPO (β = 2, γ = 1).
    pub fn simpo(reverse_alpha: Option<f64>) -> Self {
        ObjectiveKind::Simpo.with(None, None, reverse_alpha)
    }

    /// The paper's DPO (β = 0.1).
    pub fn dpo(reverse_alpha: Option<f64>) -> Self {
        ObjectiveKind::Dpo.with(None, None, reverse_alpha)
    }

    /// Which objective this is.
    pub fn kind(&self) -> ObjectiveKind {
        match self {
            Objective::CausalLm => ObjectiveKind::CausalLm,
            Objective::Reward { .. } => ObjectiveKind::Reward,
            Objective::Sft => ObjectiveKind::Sft,
            Objective::Simpo { .. } => ObjectiveKind::Simpo,
            Objective::Dpo { .. } => ObjectiveKind::Dpo,
            Objective::Ipo { .. } => ObjectiveKind::Ipo,
        }
    }

    /// Whether the model needs a reward head.
    pub fn needs_reward_head(&self) -> bool {
        self.kind().needs_reward_head()
    }

    /// Checks that every example is of the kind this objective trains on.
    pub fn validate(&self, examples: &[Example]) -> Result<()> {
        for (i, example) in examples.iter().enumerate() {
            let ok = match (self, example) {
                (Objective::CausalLm, Example::Tokens(ids)) => ids.len() >= 2,
                (
                    Objective::Reward { .. },
                    Example::RewardPair {
                        slot_c,
                        slot_r,
                        target,
                        ..
                    },
                ) => !slot_c.is_empty() && !slot_r.is_empty() && (0.0..=1.0).contains(target),
                (Objective::Sft, Example::Sft(d)) => d.logprob_mask().iter().any(|m| *m),
                (
                    Objective::Simpo { .. },
                    Example::Preference {
                        chosen, rejected, ..
                    },
                ) => has_response(chosen) && has_response(rejected),
                (
                    Objective::Dpo { .. } | Objective::Ipo { .. },
                    Example::Preference {
                        chosen,
                        rejected,
                        reference,
                        ..
                    },
                ) => has_response(chosen) && has_response(rejected) && reference.is_some(),
                _ => false,
            };
            if !ok {
                return Err(TrainError::InvalidData(format!(
                    "example {i} does not fit objective {self:?} (wrong kind, empty sequence or response, target outside [0, 1], or missing DPO reference)"
                )));
            }
        }
        Ok(())
    }

    /// Forward passes and loss of a minibatch: [`Self::loss_sum`] over it divided by
    /// [`Self::normalizer`] of it.
    pub fn loss(&self, model: &CausalLm, batch: &[Example]) -> Result<LossOutput> {
        let mut output = self.loss_sum(model, batch)?;
        output.loss = (output.loss / self.normalizer(batch))?;
        Ok(output)
    }

    /// The denominator of a minibatch's loss: its number of predicted tokens (causal LM: every
    /// position but the last of each sequence), else its number of examples.
    pub fn normalizer(&self, batch: &[Example]) -> f64 {
        let count = match self {
            Objective::CausalLm => batch.iter().map(|e| e.tokens().saturating_sub(1)).sum(),
            _ => batch.len(),
        };
        count.max(1) as f64
    }

    /// Forward passes over `batch` (a minibatch or a shard of one) and the sum of its loss
    /// terms, undivided: the minibatch loss is the sum over its shards divided by
    /// [`Self::normalizer`] of the whole minibatch, so a shard's gradient is its share of the
    /// minibatch's.
    pub fn loss_sum(&self, model: &CausalLm, batch: &[Example]) -> Result<LossOutput> {
        match *self {
            Objective::CausalLm => causal_lm_loss(model, batch),
            Objective::Reward { explicit_alpha } => reward_loss(model, batch, explicit_alpha),
            Objective::Sft => sft_loss(model, batch),
            Objective::Simpo {
                beta,
                gamma,
                reverse_alpha,
            } => preference_loss(
                model,
                batch,
                PairLoss::Sigmoid {
                    beta,
                    gamma,
                    reverse_alpha,
                },
                Pooling::Mean,
            ),
            Objective::Dpo {
                beta,
                reverse_alpha,
            } => preference_loss(
                model,
                batch,
                PairLoss::Sigmoid {
                    beta,
                    gamma: 0.0,
                    reverse_alpha,
                },
                Pooling::Sum,
            ),
            Objective::Ipo { tau } => {
                preference_loss(model, batch, PairLoss::Squared { tau }, Pooling::Sum)
            }
        }
    }
}

fn has_response(d: &EncodedDialogue) -> bool {
    d.logprob_mask().iter().any(|m| *m)
}

/// How response log-probs are pooled into one score per sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Sum,
}

/// Masked response log-probs of dialogues, pooled per sequence: `[n]`, differentiable. With
/// [`PrefixSharing::Pairs`] dialogues `2k` and `2k + 1` (a preference pair) run their common
/// prompt once.
pub fn pooled_response_logprobs(
    model: &CausalLm,
    dialogues: &[&EncodedDialogue],
    pooling: Pooling,
    sharing: PrefixSharing,
) -> Result<Tensor> {
    let sequences: Vec<Vec<u32>> = dialogues.iter().map(|d| d.ids.clone()).collect();
    let packed = PackedSequences::new(&sequences, sharing, model.device())?;
    let mut pooled = PooledPredictions::default();
    for (k, d) in dialogues.iter().enumerate() {
        // Entry i of the mask is whether token i + 1 is a response token.
        let response = d.logprob_mask().into_iter().enumerate().filter(|(_, m)| *m);
        pooled.push(
            k,
            response.map(|(i, _)| packed.prediction(k, i + 1)),
            pooling == Pooling::Mean,
        );
    }
    // Only the response's positions reach the LM head.
    let hidden = model.packed_hidden_states(&packed)?;
    let logprobs = model.packed_logprobs(&hidden, &pooled.predictions)?;
    Ok(pooled.pool(&logprobs, dialogues.len())?)
}

fn causal_lm_loss(model: &CausalLm, batch: &[Example]) -> Result<LossOutput> {
    let sequences: Vec<Vec<u32>> = batch
        .iter()
        .map(|e| match e {
            Example::Tokens(ids) => ids.clone(),
            _ => Vec::new(),
        })
        .collect();
    let packed = PackedSequences::new(&sequences, PrefixSharing::None, model.device())?;
    let predictions: Vec<_> = sequences
        .iter()
        .enumerate()
        .flat_map(|(k, seq)| packed.predictions(k, 0..seq.len()))
        .collect();
    let hidden = model.packed_hidden_states(&packed)?;
    let loss = model
        .packed_logprobs(&hidden, &predictions)?
        .sum_all()?
        .neg()?;
    Ok(LossOutput {
        loss,
        correct: 0,
        judged: 0,
    })
}

fn reward_loss(
    model: &CausalLm,
    batch: &[Example],
    explicit_alpha: Option<f64>,
) -> Result<LossOutput> {
    let n = batch.len();
    let mut sequences = Vec::with_capacity(2 * n);
    let mut starts = Vec::with_capacity(2 * n);
    let mut targets = Vec::with_capacity(n);
    let mut labels = Vec::with_capacity(n);
    for example in batch {
        if let Example::RewardPair {
            slot_c,
            slot_r,
            response_starts,
            target,
            conflict_prefers_slot_r,
        } = example
        {
            sequences.push(slot_c.clone());
            sequences.push(slot_r.clone());
            starts.extend(response_starts);
            targets.push(*target);
            labels.push(if *conflict_prefers_slot_r { 1f32 } else { 0.0 });
        }
    }
    // The two slots of a pair share their prompt's rows.
    let packed = PackedSequences::new(&sequences, PrefixSharing::Pairs, model.device())?;
    let rewards = model.packed_rewards(&packed, &starts)?.reshape((n, 2))?;
    let margins = (rewards.narrow(1, 0, 1)? - rewards.narrow(1, 1, 1)?)?.squeeze(1)?;
    let dtype = margins.dtype();
    let targets_t = Tensor::from_vec(targets.clone(), n, model.device())?.to_dtype(dtype)?;
    let labels_t = Tensor::from_vec(labels, n, model.device())?.to_dtype(dtype)?;
    let loss = reward_pair_loss_sum(&margins, &targets_t, explicit_alpha.map(|a| (&labels_t, a)))?;
    let margin_values: Vec<f32> = margins.detach().to_dtype(DType::F32)?.to_vec1()?;
    let correct = margin_values
        .iter()
        .zip(&targets)
        .filter(|(z, t)| (**z >= 0.0) == (**t >= 0.5))
        .count();
    Ok(LossOutput {
        loss,
        correct,
        judged: n,
    })
}

fn sft_loss(model: &CausalLm, batch: &[Example]) -> Result<LossOutput> {
    let dialogues: Vec<&EncodedDialogue> = batch
        .iter()
        .filter_map(|e| match e {
            Example::Sft(d) => Some(d),
            _ => None,
        })
        .collect();
    let means = pooled_response_logprobs(model, &dialogues, Pooling::Mean, PrefixSharing::None)?;
    Ok(LossOutput {
        loss: means.sum_all()?.neg()?,
        correct: 0,
        judged: 0,
    })
}

/// The loss of a preference pair's (reference-relative, for summed pooling) margin.
#[derive(Debug, Clone, Copy)]
enum PairLoss {
    /// SimPO / DPO: `−log σ(β·margin − γ)`, plus the explicit conflict's reverse term.
    Sigmoid {
        beta: f64,
        gamma: f64,
        reverse_alpha: Option<f64>,
    },
    /// IPO: `(margin − 1/(2τ))²`.
    Squared { tau: f64 },
}

fn preference_loss(
    model: &CausalLm,
    batch: &[Example],
    pair_loss: PairLoss,
    pooling: Pooling,
) -> Result<LossOutput> {
    let n = batch.len();
    let mut dialogues = Vec::with_capacity(2 * n);
    let mut conflict = Vec::with_capacity(n);
    let mut references = Vec::with_capacity(2 * n);
    for example in batch {
        if let Example::Preference {
            chosen,
            rejected,
            conflict_prefers_rejected,
            reference,
        } = example
        {
            dialogues.push(chosen);
            dialogues.push(rejected);
            conflict.push(if *conflict_prefers_rejected {
                1f32
            } else {
                0.0
            });
            if let Some([c, r]) = reference {
                references.push(*c as f32);
                references.push(*r as f32);
            }
        }
    }
    let scores = pooled_response_logprobs(model, &dialogues, pooling, PrefixSharing::Pairs)?
        .reshape((n, 2))?;
    let chosen = scores.narrow(1, 0, 1)?.squeeze(1)?;
    let rejected = scores.narrow(1, 1, 1)?.squeeze(1)?;
    let dtype = chosen.dtype();
    let conflict = Tensor::from_vec(conflict, n, model.device())?.to_dtype(dtype)?;
    let reference = if pooling == Pooling::Sum {
        let refs = Tensor::from_vec(references, (n, 2), model.device())?.to_dtype(dtype)?;
        Some((
            refs.narrow(1, 0, 1)?.squeeze(1)?,
            refs.narrow(1, 1, 1)?.squeeze(1)?,
        ))
    } else {
        None
    };
    let loss = match pair_loss {
        PairLoss::Sigmoid {
            beta,
            gamma,
            reverse_alpha,
        } => preference_pair_loss_sum(
            &PreferenceBatch {
                chosen: &chosen,
                rejected: &rejected,
                reference: reference.as_ref().map(|(c, r)| (c, r)),
                conflict_prefers_rejected: &conflict,
            },
            beta,
            gamma,
            reverse_alpha,
        )?,
        PairLoss::Squared { tau } => {
            let (ref_c, ref_r) = reference.as_ref().ok_or_else(|| {
                TrainError::InvalidData("IPO needs the reference's log-probs".into())
            })?;
            let margin = ((&chosen - ref_c)? - (&rejected - ref_r)?)?;
            margin.affine(1.0, -1.0 / (2.0 * tau))?.sqr()?.sum_all()?
        }
    };
    let deltas: Vec<f32> = (&chosen - &rejected)?
        .detach()
        .to_dtype(DType::F32)?
        .to_vec1()?;
    Ok(LossOutput {
        loss,
        correct: deltas.iter().filter(|d| **d >= 0.0).count(),
        judged: n,
    })
}

/// Fills the frozen-reference sums of DPO examples with `reference` (the post-SFT policy),
/// `batch_size` examples at a time. The reference runs without gradient tracking, so it costs no
/// gradient memory, and it is computed once instead of at every step.
pub fn attach_reference_logprobs(
    reference: &CausalLm,
    examples: &mut [Example],
    batch_size: usize,
) -> Result<()> {
    for chunk in examples.chunks_mut(batch_size.max(1)) {
        let dialogues: Vec<&EncodedDialogue> = chunk
            .iter()
            .flat_map(|e| match e {
                Example::Preference {
                    chosen, rejected, ..
                } => vec![chosen, rejected],
                _ => Vec::new(),
            })
            .collect();
        if dialogues.is_empty() {
            continue;
        }
        let sums: Vec<f32> =
            pooled_response_logprobs(reference, &dialogues, Pooling::Sum, PrefixSharing::Pairs)?
                .detach()
                .to_dtype(DType::F32)?
                .to_vec1()?;
        let mut values = sums.chunks(2);
        for example in chunk.iter_mut() {
            if let Example::Preference { reference, .. } = example
                && let Some(pair) = values.next()
            {
                *reference = Some([pair[0] as f64, pair[1] as f64]);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_builds_its_objective_with_the_papers_defaults() {
        for kind in ObjectiveKind::ALL {
            assert_eq!(kind.with(None, None, None).kind(), kind);
            assert_eq!(kind.with(None, None, Some(0.5)).kind(), kind);
        }
        assert_eq!(
            ObjectiveKind::Simpo.with(None, None, None),
            Objective::Simpo {
                beta: 2.0,
                gamma: 1.0,
                reverse_alpha: None
            }
        );
        assert_eq!(
            ObjectiveKind::Dpo.with(Some(0.3), Some(9.0), Some(1.0)),
            Objective::Dpo {
                beta: 0.3,
                reverse_alpha: Some(1.0)
            }
        );
        assert!(ObjectiveKind::Reward.needs_reward_head() && ObjectiveKind::Reward.needs_pairs());
        assert!(ObjectiveKind::Dpo.needs_reference() && ObjectiveKind::Ipo.needs_reference());
        assert_eq!(
            ObjectiveKind::Ipo.with(None, None, None),
            Objective::Ipo { tau: 0.1 }
        );
        assert!(!ObjectiveKind::Ipo.has_conflict_term());
        assert!(!ObjectiveKind::Sft.needs_pairs() && !ObjectiveKind::CausalLm.needs_pairs());
    }

    #[test]
    fn kinds_keep_the_names_job_records_persist() {
        let names: Vec<String> = ObjectiveKind::ALL
            .iter()
            .map(|k| serde_json::to_string(k).unwrap())
            .collect();
        assert_eq!(
            names,
            [
                r#""causal_lm""#,
                r#""reward""#,
                r#""sft""#,
                r#""simpo""#,
                r#""dpo""#,
                r#""ipo""#
            ]
        );
        for kind in ObjectiveKind::ALL {
            assert_eq!(
                serde_json::to_string(&kind).unwrap(),
                format!("\"{}\"", kind.name())
            );
        }
    }
}
