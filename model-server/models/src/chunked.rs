//! Scoring one sequence a chunk of tokens at a time through the KV cache (chunked prefill), so
//! a caller that must stay responsive can split a sequence whose single forward pass would take
//! too long: each [`ChunkedScoring::advance`] runs the next `max_tokens` positions attending to
//! the cached keys and values of the earlier ones. The results are those of one whole pass
//! (per-token log-probs, or the reward), up to floating-point summation order.

use candle_core::{DType, Tensor};

use crate::error::{ModelError, Result};
use crate::model::{CausalLm, KvCache};
use crate::packed::Prediction;

/// What a chunked sequence computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkedOutput {
    /// Log-prob of every token after the first (`len - 1` values), as
    /// [`CausalLm::sequence_logprobs`].
    Logprobs,
    /// The reward head's score, as [`CausalLm::sequence_rewards`] with this response start.
    Reward { response_start: usize },
}

/// A sequence being scored chunk by chunk; holds the KV cache between chunks.
#[derive(Debug)]
pub struct ChunkedScoring {
    ids: Vec<u32>,
    output: ChunkedOutput,
    cache: KvCache,
    /// `logprobs[j]` = log p(ids[j + 1] | ids[..=j]) for the positions computed so far (all of
    /// them for log-probs; those of the response for a log-prob reward read-out).
    logprobs: Vec<f32>,
    /// The head's score of the last position, once the last chunk has run.
    head_score: Option<f32>,
}

impl ChunkedScoring {
    /// Checks the sequence against the model (length, vocabulary, a reward head where one is
    /// read); computes nothing yet.
    pub fn new(model: &CausalLm, ids: Vec<u32>, output: ChunkedOutput) -> Result<Self> {
        if ids.is_empty() {
            return Err(ModelError::InvalidInput("sequence has no tokens".into()));
        }
        let max = model.config().max_positions();
        if ids.len() > max {
            return Err(ModelError::SequenceTooLong {
                len: ids.len(),
                max,
            });
        }
        let vocab = model.config().vocab_size();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(ModelError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary of {vocab} tokens"
            )));
        }
        if matches!(output, ChunkedOutput::Reward { .. }) && !model.has_reward_head() {
            return Err(ModelError::InvalidInput(
                "this model has no reward head".into(),
            ));
        }
        Ok(Self {
            logprobs: vec![0.0; ids.len() - 1],
            ids,
            output,
            cache: model.new_cache(),
            head_score: None,
        })
    }

    /// Positions not yet run.
    pub fn remaining(&self) -> usize {
        self.ids.len() - self.cache.len()
    }

    pub fn is_done(&self) -> bool {
        self.remaining() == 0
    }

    /// Runs the next at most `max_tokens` (at least one) positions; returns how many ran.
    pub fn advance(&mut self, model: &CausalLm, max_tokens: usize) -> Result<usize> {
        let start = self.cache.len();
        let take = max_tokens.max(1).min(self.remaining());
        if take == 0 {
            return Ok(0);
        }
        let end = start + take;
        let chunk = Tensor::new(&self.ids[start..end], model.device())?.unsqueeze(0)?;
        let hidden = model.forward_cached_hidden(&chunk, &mut self.cache)?;
        // Row r of this chunk (position start + r) predicts ids[start + r + 1].
        let predictions: Vec<Prediction> = (start..end.min(self.ids.len() - 1))
            .filter(|&j| self.reads_logprob(j))
            .map(|j| Prediction {
                row: j - start,
                target: self.ids[j + 1],
            })
            .collect();
        if !predictions.is_empty() {
            let values = model
                .packed_logprobs(&hidden, &predictions)?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            for (p, v) in predictions.iter().zip(values) {
                self.logprobs[start + p.row] = v;
            }
        }
        if end == self.ids.len() && matches!(self.output, ChunkedOutput::Reward { .. }) {
            let last = hidden.narrow(1, take - 1, 1)?;
            self.head_score = Some(model.reward_head_score(&last)?);
        }
        Ok(take)
    }

    /// Whether the result reads log p(ids[j + 1]).
    fn reads_logprob(&self, j: usize) -> bool {
        match self.output {
            ChunkedOutput::Logprobs => true,
            ChunkedOutput::Reward { response_start } => j + 1 >= response_start.max(1),
        }
    }

    /// The per-token log-probs (`len - 1` values) once done.
    pub fn into_logprobs(self) -> Result<Vec<f32>> {
        if !self.is_done() || self.output != ChunkedOutput::Logprobs {
            return Err(ModelError::InvalidInput(
                "log-probs of a chunked sequence read before it finished or for a reward".into(),
            ));
        }
        Ok(self.logprobs)
    }

    /// The reward once done: the head's score plus, for a log-prob read-out, the scaled mean
    /// log-prob of the response's tokens (0 without one), as [`CausalLm::rewards`].
    pub fn reward(&self, model: &CausalLm) -> Result<f32> {
        let (Some(head), ChunkedOutput::Reward { response_start }) = (self.head_score, self.output)
        else {
            return Err(ModelError::InvalidInput(
                "reward of a chunked sequence read before it finished or for log-probs".into(),
            ));
        };
        let Some(scale) = model.reward_loglik_scale_value()? else {
            return Ok(head);
        };
        let first = response_start.max(1);
        if first >= self.ids.len() {
            return Ok(head);
        }
        let response = &self.logprobs[first - 1..];
        let mean = response.iter().sum::<f32>() / response.len() as f32;
        Ok(head + scale * mean)
    }
}
