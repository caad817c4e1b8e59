//! [`CausalLm`]: one causal language model of either architecture, with its outputs —
//! full-sequence logits, per-token log-probs with a response mask, and a scalar reward head read
//! at each sequence's last real token — plus loading from HF folders and random init.

use std::path::Path;

use candle_core::{D, DType, Device, Tensor};

use crate::config::{Architecture, ModelConfig};
use crate::error::{ModelError, Result};
use crate::fused::{fused_applies, target_logprobs};
use crate::fused_lm_head::{lm_head_row_logprobs, lm_head_target_logprobs};
use crate::gpt2::{self, Gpt2};
use crate::layers::{LayerCache, embed};
use crate::opt::{self, Opt};
use crate::packed::{PackedSequences, PooledPredictions, Prediction, check_batch};
use crate::weights::{Init, REWARD_HEAD_TENSOR, REWARD_LOGLIK_SCALE_TENSOR, Weights};

#[derive(Debug, Clone)]
enum Body {
    Gpt2(Gpt2),
    Opt(Opt),
}

/// Names, shapes and initialisers of the parameters of `config` (no reward head).
/// Number of trainable parameters of an architecture (without a reward head).
pub fn parameter_count(config: &ModelConfig) -> usize {
    checked_parameter_count(config)
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(usize::MAX)
}

/// The parameter count in closed form: the layouts of a one- and a two-layer model give the
/// parameters outside the layers and per layer, so the cost does not grow with the depth the
/// config claims (an untrusted config may claim 2^40 layers). `None` on overflow.
pub fn checked_parameter_count(config: &ModelConfig) -> Option<u64> {
    let count = |layers: usize| -> Option<u64> {
        parameter_layout(&config.with_layers(layers))
            .iter()
            .try_fold(0u64, |sum, (_, shape, _)| {
                let size = shape
                    .iter()
                    .try_fold(1u64, |p, &d| p.checked_mul(u64::try_from(d).ok()?))?;
                sum.checked_add(size)
            })
    };
    let (one, two) = (count(1)?, count(2)?);
    let per_layer = two.checked_sub(one)?;
    let outside = one.checked_sub(per_layer)?;
    let layers = match config {
        ModelConfig::Gpt2(c) => c.n_layer,
        ModelConfig::Opt(c) => c.num_hidden_layers,
    };
    per_layer
        .checked_mul(u64::try_from(layers).ok()?)?
        .checked_add(outside)
}

pub fn parameter_layout(config: &ModelConfig) -> Vec<(String, Vec<usize>, Init)> {
    match config {
        ModelConfig::Gpt2(c) => gpt2::layout(c),
        ModelConfig::Opt(c) => opt::layout(c),
    }
}

/// Where the device and dtype of a model come from.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DType,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
        }
    }
}

/// A right-padded batch of token sequences.
#[derive(Debug, Clone)]
pub struct PaddedBatch {
    /// `[batch, max_len]` u32 ids, right-padded.
    pub ids: Tensor,
    /// Number of real tokens of each row.
    pub lengths: Vec<usize>,
}

impl PaddedBatch {
    /// Right-pads `sequences` with `pad_id`. Every sequence must be non-empty.
    pub fn new(sequences: &[Vec<u32>], pad_id: u32, device: &Device) -> Result<Self> {
        check_batch(sequences)?;
        let max_len = sequences.iter().map(Vec::len).max().unwrap_or(0);
        let mut flat = Vec::with_capacity(sequences.len() * max_len);
        for seq in sequences {
            flat.extend_from_slice(seq);
            flat.extend(std::iter::repeat_n(pad_id, max_len - seq.len()));
        }
        Ok(Self {
            ids: Tensor::from_vec(flat, (sequences.len(), max_len), device)?,
            lengths: sequences.iter().map(Vec::len).collect(),
        })
    }

    /// Which next-token log-probs `[b·(t − 1)]` (row-major) predict a real token, not padding:
    /// the mask [`CausalLm::token_logprobs_where`] takes for whole sequences.
    pub fn real_predictions(&self) -> Vec<bool> {
        let width = self
            .lengths
            .iter()
            .max()
            .map_or(0, |&t| t.saturating_sub(1));
        self.lengths
            .iter()
            .flat_map(|&len| (0..width).map(move |i| i + 1 < len))
            .collect()
    }
}

/// What a fresh reward head reads.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum RewardReadout {
    /// The reference reward model: a linear head on the last real token's hidden state.
    #[default]
    LastToken,
    /// The same head plus `scale ·` the mean log-prob of the response's tokens under the
    /// model itself, `scale` a learned scalar starting at 1: the reward starts from what the
    /// language model knows zero-shot (the margin of two responses is the mean-log-prob
    /// comparison SimPO and the sandbox's probe make), and fine-tuning adjusts from there. A
    /// mean, not a sum, so that a model that knows nothing has no built-in preference for the
    /// shorter response.
    LastTokenAndMeanLogprob,
}

/// A GPT-2 or OPT causal LM, optionally with a scalar reward head.
#[derive(Debug, Clone)]
pub struct CausalLm {
    config: ModelConfig,
    body: Body,
    lm_head: Tensor,
    reward_head: Option<Tensor>,
    /// `[1]`: the log-likelihood term's weight of a [`RewardReadout::LastTokenAndMeanLogprob`] head.
    reward_loglik_scale: Option<Tensor>,
    weights: Weights,
    device: Device,
    dtype: DType,
}

impl CausalLm {
    /// Loads `config.json` and the weights of an HF checkpoint folder.
    pub fn from_folder(dir: &Path, options: &LoadOptions) -> Result<Self> {
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let weights = Weights::from_folder(dir, &config, options.dtype, &options.device)?;
        Self::from_weights(config, weights)
    }

    /// A freshly initialised model (see [`Weights::random_init`]).
    pub fn random_init(config: ModelConfig, seed: u64, options: &LoadOptions) -> Result<Self> {
        config.validate()?;
        let weights = Weights::random_init(&config, seed, options.dtype, &options.device)?;
        Self::from_weights(config, weights)
    }

    /// Builds the model from named tensors. A tensor named [`REWARD_HEAD_TENSOR`] becomes the
    /// reward head; an untied `lm_head.weight` is used when `tie_word_embeddings` is false.
    pub fn from_weights(config: ModelConfig, weights: Weights) -> Result<Self> {
        config.validate()?;
        let body = match &config {
            ModelConfig::Gpt2(c) => Body::Gpt2(Gpt2::load(c, &weights)?),
            ModelConfig::Opt(c) => Body::Opt(Opt::load(c, &weights)?),
        };
        let tied = match &config {
            ModelConfig::Gpt2(c) => c.tie_word_embeddings,
            ModelConfig::Opt(c) => c.tie_word_embeddings,
        };
        let lm_head = if tied {
            match &body {
                Body::Gpt2(m) => m.token_embeddings().clone(),
                Body::Opt(m) => m.token_embeddings().clone(),
            }
        } else {
            weights.get(
                "lm_head.weight",
                &[config.vocab_size(), config.output_dim()],
            )?
        };
        let reward_head = if weights.contains(REWARD_HEAD_TENSOR) {
            Some(weights.get(REWARD_HEAD_TENSOR, &[1, config.output_dim()])?)
        } else {
            None
        };
        let reward_loglik_scale = if weights.contains(REWARD_LOGLIK_SCALE_TENSOR) {
            if reward_head.is_none() {
                return Err(ModelError::InvalidInput(format!(
                    "`{REWARD_LOGLIK_SCALE_TENSOR}` without `{REWARD_HEAD_TENSOR}`"
                )));
            }
            Some(weights.get(REWARD_LOGLIK_SCALE_TENSOR, &[1])?)
        } else {
            None
        };
        let device = lm_head.device().clone();
        let dtype = lm_head.dtype();
        Ok(Self {
            config,
            body,
            lm_head,
            reward_head,
            reward_loglik_scale,
            weights,
            device,
            dtype,
        })
    }

    /// Adds a fresh reward head, `Linear(hidden, 1, bias=False)` with PyTorch's default
    /// uniform(-1/sqrt(hidden), 1/sqrt(hidden)) init, as the reference reward model. Returns the
    /// model rebuilt with the head (weights are shared, not copied). `readout` decides whether
    /// the head also carries a log-likelihood scale (initialised to 1; the linear head then
    /// starts at zero).
    pub fn with_fresh_reward_head(self, seed: u64, readout: RewardReadout) -> Result<Self> {
        use rand::{Rng, SeedableRng};
        let hidden = self.config.output_dim();
        let bound = 1.0 / (hidden as f32).sqrt();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let values: Vec<f32> = (0..hidden)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let head = Tensor::from_vec(values, (1, hidden), &self.device)?.to_dtype(self.dtype)?;
        // With the log-prob term the head starts at zero: a random head's scores are as large
        // as the log-prob margins and would hide what the model knows at the first step.
        let head = match readout {
            RewardReadout::LastToken => head,
            RewardReadout::LastTokenAndMeanLogprob => head.zeros_like()?,
        };
        let mut weights = self.weights;
        weights.insert(REWARD_HEAD_TENSOR, head);
        if readout == RewardReadout::LastTokenAndMeanLogprob {
            let scale = Tensor::ones(1, self.dtype, &self.device)?;
            weights.insert(REWARD_LOGLIK_SCALE_TENSOR, scale);
        }
        Self::from_weights(self.config, weights)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }
    pub fn architecture(&self) -> Architecture {
        self.config.architecture()
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// The named tensors the model was built from (shared storage).
    pub fn weights(&self) -> &Weights {
        &self.weights
    }
    pub fn has_reward_head(&self) -> bool {
        self.reward_head.is_some()
    }
    /// What the reward head reads (meaningful only with a head).
    pub fn reward_readout(&self) -> RewardReadout {
        if self.reward_loglik_scale.is_some() {
            RewardReadout::LastTokenAndMeanLogprob
        } else {
            RewardReadout::LastToken
        }
    }
    pub fn num_layers(&self) -> usize {
        match &self.body {
            Body::Gpt2(m) => m.num_layers(),
            Body::Opt(m) => m.num_layers(),
        }
    }

    fn check_ids(&self, ids: &Tensor, past: usize) -> Result<()> {
        let (_, t) = ids.dims2()?;
        if t == 0 {
            return Err(ModelError::InvalidInput("sequence has no tokens".into()));
        }
        let max = self.config.max_positions();
        if past + t > max {
            return Err(ModelError::SequenceTooLong { len: past + t, max });
        }
        self.check_vocabulary(ids)
    }

    fn check_vocabulary(&self, ids: &Tensor) -> Result<()> {
        let max_id = ids
            .flatten_all()?
            .max(0)?
            .to_dtype(DType::U32)?
            .to_scalar::<u32>()?;
        if max_id as usize >= self.config.vocab_size() {
            return Err(ModelError::InvalidInput(format!(
                "token id {max_id} is outside the vocabulary of {} tokens",
                self.config.vocab_size()
            )));
        }
        Ok(())
    }

    /// Final hidden states `[b, t, output_dim]` for ids `[b, t]` (u32).
    pub fn hidden_states(&self, ids: &Tensor) -> Result<Tensor> {
        self.check_ids(ids, 0)?;
        match &self.body {
            Body::Gpt2(m) => m.forward(ids, 0, None),
            Body::Opt(m) => m.forward(ids, 0, None),
        }
    }

    /// Vocabulary logits `[b, t, vocab]` from hidden states.
    pub fn logits_from_hidden(&self, hidden: &Tensor) -> Result<Tensor> {
        let (b, t, h) = hidden.dims3()?;
        let logits = hidden.reshape((b * t, h))?.matmul(&self.lm_head.t()?)?;
        Ok(logits.reshape((b, t, self.config.vocab_size()))?)
    }

    /// Vocabulary logits `[b, t, vocab]` for ids `[b, t]`.
    pub fn logits(&self, ids: &Tensor) -> Result<Tensor> {
        self.logits_from_hidden(&self.hidden_states(ids)?)
    }

    /// Per-token log-probs `[b, t-1]`: entry `i` is `log p(ids[i+1] | ids[..=i])`. Entries past
    /// a row's length are meaningless and must be masked by the caller.
    pub fn token_logprobs(&self, ids: &Tensor) -> Result<Tensor> {
        self.token_logprobs_from_hidden(&self.hidden_states(ids)?, ids)
    }

    /// [`Self::token_logprobs`] from the final hidden states of `ids`.
    pub fn token_logprobs_from_hidden(&self, hidden: &Tensor, ids: &Tensor) -> Result<Tensor> {
        if fused_applies(hidden) && ids.dim(1)? >= 2 {
            return lm_head_target_logprobs(hidden, &self.lm_head, ids, None);
        }
        token_logprobs_from_logits(&self.logits_from_hidden(hidden)?, ids)
    }

    /// [`Self::token_logprobs_from_hidden`] at the positions `wanted` marks (`[b·(t − 1)]`,
    /// row-major); every other entry is 0 and passes no gradient. On the CPU the logits of
    /// unwanted positions (a prompt, padding) are never computed.
    pub fn token_logprobs_where(
        &self,
        hidden: &Tensor,
        ids: &Tensor,
        wanted: &[bool],
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if wanted.len() != b * t.saturating_sub(1) {
            return Err(ModelError::InvalidInput(format!(
                "a mask of {} positions for log-probs of {b} × {}",
                wanted.len(),
                t.saturating_sub(1)
            )));
        }
        if fused_applies(hidden) && t >= 2 {
            return lm_head_target_logprobs(hidden, &self.lm_head, ids, Some(wanted));
        }
        let all = token_logprobs_from_logits(&self.logits_from_hidden(hidden)?, ids)?;
        let mask: Vec<f32> = wanted.iter().map(|&w| if w { 1.0 } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, (b, t.saturating_sub(1)), &self.device)?
            .to_dtype(all.dtype())?;
        Ok(all.mul(&mask)?)
    }

    /// Reward of each row: the head applied to the hidden state of the last real token
    /// (`lengths[i] - 1`). Returns `[b]`.
    pub fn rewards_from_hidden(&self, hidden: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let head = self
            .reward_head
            .as_ref()
            .ok_or_else(|| ModelError::InvalidInput("this model has no reward head".into()))?;
        let (b, t, _) = hidden.dims3()?;
        if lengths.len() != b {
            return Err(ModelError::InvalidInput(format!(
                "{} lengths for a batch of {b}",
                lengths.len()
            )));
        }
        if let Some(bad) = lengths.iter().find(|&&l| l == 0 || l > t) {
            return Err(ModelError::InvalidInput(format!(
                "sequence length {bad} outside 1..={t}"
            )));
        }
        let last: Vec<u32> = lengths.iter().map(|&l| (l - 1) as u32).collect();
        let index = Tensor::from_vec(last, (b, 1), hidden.device())?;
        // Scores at every position, then one gather: cheap next to the body and differentiable.
        let per_position = hidden.broadcast_matmul(&head.t()?)?.squeeze(2)?;
        Ok(per_position.gather(&index, 1)?.squeeze(1)?)
    }

    /// Rewards `[b]` of a right-padded batch: the head's score, plus for a
    /// [`RewardReadout::LastTokenAndMeanLogprob`] head the scaled mean log-prob of each row's
    /// response, the tokens from `response_starts[i]` on (0: the whole row; a row with no
    /// predicted response token adds 0). The head-only read-out ignores `response_starts`.
    pub fn rewards(&self, batch: &PaddedBatch, response_starts: &[usize]) -> Result<Tensor> {
        let hidden = self.hidden_states(&batch.ids)?;
        let head = self.rewards_from_hidden(&hidden, &batch.lengths)?;
        let Some(scale) = &self.reward_loglik_scale else {
            return Ok(head);
        };
        let (b, t) = batch.ids.dims2()?;
        if response_starts.len() != b {
            return Err(ModelError::InvalidInput(format!(
                "{} response starts for a batch of {b}",
                response_starts.len()
            )));
        }
        if t < 2 {
            return Ok(head);
        }
        // Entry j predicts token j + 1; each response token weighs 1 / (its row's count).
        let mut weights = vec![0f32; b * (t - 1)];
        for (row, (&len, &start)) in batch.lengths.iter().zip(response_starts).enumerate() {
            let first = start.max(1);
            if first < len {
                let w = 1.0 / (len - first) as f32;
                for j in first - 1..len - 1 {
                    weights[row * (t - 1) + j] = w;
                }
            }
        }
        let wanted: Vec<bool> = weights.iter().map(|&w| w != 0.0).collect();
        let logprobs = self.token_logprobs_where(&hidden, &batch.ids, &wanted)?;
        let weights =
            Tensor::from_vec(weights, (b, t - 1), &self.device)?.to_dtype(logprobs.dtype())?;
        let mean_logprob = (logprobs * weights)?.sum(1)?;
        Ok((head + mean_logprob.broadcast_mul(scale)?)?)
    }

    /// Final hidden states `[1, n, output_dim]` of packed rows (see [`PackedSequences`]).
    pub fn packed_hidden_states(&self, packed: &PackedSequences) -> Result<Tensor> {
        let max = self.config.max_positions();
        if packed.max_len() > max {
            return Err(ModelError::SequenceTooLong {
                len: packed.max_len(),
                max,
            });
        }
        self.check_vocabulary(packed.ids())?;
        match &self.body {
            Body::Gpt2(m) => m.forward_packed(packed),
            Body::Opt(m) => m.forward_packed(packed),
        }
    }

    /// `log p(target | row)` `[predictions.len()]` from packed hidden states `[1, n, h]`,
    /// differentiable; on the CPU only the predicting rows' logits are computed.
    pub fn packed_logprobs(&self, hidden: &Tensor, predictions: &[Prediction]) -> Result<Tensor> {
        if predictions.is_empty() {
            return Ok(Tensor::zeros(0, hidden.dtype(), hidden.device())?);
        }
        if fused_applies(hidden) {
            let pairs: Vec<(usize, u32)> = predictions.iter().map(|p| (p.row, p.target)).collect();
            return lm_head_row_logprobs(hidden, &self.lm_head, &pairs);
        }
        let width = hidden.dims().last().copied().unwrap_or(0);
        let rows: Vec<u32> = predictions.iter().map(|p| p.row as u32).collect();
        let targets: Vec<u32> = predictions.iter().map(|p| p.target).collect();
        let m = predictions.len();
        let rows = Tensor::from_vec(rows, m, hidden.device())?;
        let targets = Tensor::from_vec(targets, (m, 1), hidden.device())?;
        let gathered = hidden
            .reshape((hidden.elem_count() / width, width))?
            .index_select(&rows, 0)?;
        let logits = gathered.matmul(&self.lm_head.t()?)?;
        let logprobs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        Ok(logprobs.gather(&targets, 1)?.squeeze(1)?)
    }

    /// [`Self::rewards`] of packed sequences (pairs may share their prompt): `[sequences]`.
    pub fn packed_rewards(
        &self,
        packed: &PackedSequences,
        response_starts: &[usize],
    ) -> Result<Tensor> {
        let head = self
            .reward_head
            .as_ref()
            .ok_or_else(|| ModelError::InvalidInput("this model has no reward head".into()))?;
        let count = packed.sequences();
        if response_starts.len() != count {
            return Err(ModelError::InvalidInput(format!(
                "{} response starts for a batch of {count}",
                response_starts.len()
            )));
        }
        let hidden = self.packed_hidden_states(packed)?;
        let width = hidden.dims().last().copied().unwrap_or(0);
        let last: Vec<u32> = (0..count)
            .map(|k| packed.row(k, packed.sequence_len(k) - 1) as u32)
            .collect();
        let last = Tensor::from_vec(last, count, &self.device)?;
        let scores = hidden
            .reshape((packed.len(), width))?
            .index_select(&last, 0)?
            .matmul(&head.t()?)?
            .squeeze(1)?;
        let Some(scale) = &self.reward_loglik_scale else {
            return Ok(scores);
        };
        // The mean over each response's tokens; a sequence without one adds 0.
        let mut pooled = PooledPredictions::default();
        for (k, &start) in response_starts.iter().enumerate() {
            pooled.push(
                k,
                packed.predictions(k, start..packed.sequence_len(k)),
                true,
            );
        }
        let logprobs = self.packed_logprobs(&hidden, &pooled.predictions)?;
        let means = pooled.pool(&logprobs, count)?;
        Ok((scores + means.broadcast_mul(scale)?)?)
    }

    /// Per-token log-probs of each sequence (length `len - 1` each), computed as right-padded
    /// batches (see [`Self::in_halves`]).
    pub fn sequence_logprobs(&self, sequences: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        self.in_halves(sequences.len(), |rows| {
            let batch =
                PaddedBatch::new(&sequences[rows], self.config.pad_token_id(), &self.device)?;
            let hidden = self.hidden_states(&batch.ids)?;
            let rows: Vec<Vec<f32>> = self
                .token_logprobs_where(&hidden, &batch.ids, &batch.real_predictions())?
                .to_dtype(DType::F32)?
                .to_vec2()?;
            Ok(rows
                .into_iter()
                .zip(&batch.lengths)
                .map(|(row, len)| row[..len - 1].to_vec())
                .collect())
        })
    }

    /// Reward of each sequence, computed as right-padded batches (see [`Self::in_halves`]);
    /// `response_starts[i]` as in [`Self::rewards`].
    pub fn sequence_rewards(
        &self,
        sequences: &[Vec<u32>],
        response_starts: &[usize],
    ) -> Result<Vec<f32>> {
        if response_starts.len() != sequences.len() {
            return Err(ModelError::InvalidInput(format!(
                "{} response starts for {} sequences",
                response_starts.len(),
                sequences.len()
            )));
        }
        self.in_halves(sequences.len(), |rows| {
            let batch = PaddedBatch::new(
                &sequences[rows.clone()],
                self.config.pad_token_id(),
                &self.device,
            )?;
            Ok(self
                .rewards(&batch, &response_starts[rows])?
                .to_dtype(DType::F32)?
                .to_vec1()?)
        })
    }

    /// Runs `forward` on the two halves of the rows `0..len` concurrently on CPU, each padded
    /// to its own longest: two independent passes keep both cores busy with few hand-offs,
    /// where one pass splits every small product between threads (the trainer shards its
    /// minibatches for the same reason). Always two halves, whatever the core count, so results
    /// never depend on the machine; other devices run one batch.
    fn in_halves<T: Send>(
        &self,
        len: usize,
        forward: impl Fn(std::ops::Range<usize>) -> Result<Vec<T>> + Sync,
    ) -> Result<Vec<T>> {
        if !self.device.is_cpu() || len < 2 {
            return forward(0..len);
        }
        let middle = len.div_ceil(2);
        let (first, second) = rayon::join(|| forward(0..middle), || forward(middle..len));
        let mut out = first?;
        out.extend(second?);
        Ok(out)
    }

    /// A fresh KV cache for incremental decoding.
    pub fn new_cache(&self) -> KvCache {
        KvCache {
            layers: vec![LayerCache::default(); self.num_layers()],
            len: 0,
        }
    }

    /// Logits `[b, t, vocab]` of `ids` appended after what `cache` already holds.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let hidden = self.forward_cached_hidden(ids, cache)?;
        self.logits_from_hidden(&hidden)
    }

    /// Final hidden states `[b, t, output_dim]` of `ids` appended after what `cache` holds.
    pub fn forward_cached_hidden(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        self.check_ids(ids, cache.len)?;
        let (_, t) = ids.dims2()?;
        let hidden = match &self.body {
            Body::Gpt2(m) => m.forward(ids, cache.len, Some(&mut cache.layers)),
            Body::Opt(m) => m.forward(ids, cache.len, Some(&mut cache.layers)),
        }?;
        cache.len += t;
        Ok(hidden)
    }

    /// The reward head's score of one position's final hidden state (any shape holding
    /// `output_dim` values).
    pub fn reward_head_score(&self, hidden: &Tensor) -> Result<f32> {
        let head = self
            .reward_head
            .as_ref()
            .ok_or_else(|| ModelError::InvalidInput("this model has no reward head".into()))?;
        let width = head.dim(1)?;
        let score = hidden
            .reshape((1, width))?
            .matmul(&head.t()?)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(score[0])
    }

    /// The learned scale of a [`RewardReadout::LastTokenAndMeanLogprob`] head; `None` for
    /// other read-outs.
    pub fn reward_loglik_scale_value(&self) -> Result<Option<f32>> {
        let Some(scale) = &self.reward_loglik_scale else {
            return Ok(None);
        };
        let values = scale
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(values.first().copied())
    }

    /// The token embedding of `ids` (for tests of tying).
    pub fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        embed(&self.lm_head, ids)
    }

    /// Saves the model as an HF folder: `config.json` and `model.safetensors` (with the reward
    /// head under [`REWARD_HEAD_TENSOR`] when present). Tokenizer files are the caller's.
    pub fn save_folder(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let config_path = dir.join("config.json");
        let text = serde_json::to_string_pretty(&self.config.to_hf_json()).map_err(|e| {
            ModelError::Config {
                path: config_path.clone(),
                reason: e.to_string(),
            }
        })?;
        std::fs::write(&config_path, text).map_err(|e| ModelError::io(&config_path, e))?;
        self.weights
            .save_safetensors(&self.config, &dir.join("model.safetensors"))
    }
}

/// Log-probs of each next token: `log_softmax(logits)[:, :-1]` gathered at `ids[:, 1:]`,
/// `[b, t-1]`.
pub fn token_logprobs_from_logits(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, t, _) = logits.dims3()?;
    if t < 2 {
        return Ok(Tensor::zeros((b, 0), logits.dtype(), logits.device())?);
    }
    let predicting = logits.narrow(1, 0, t - 1)?;
    let targets = ids.narrow(1, 1, t - 1)?.contiguous()?;
    if fused_applies(logits) {
        let vocab = logits.dim(2)?;
        let flat = target_logprobs(
            &predicting.reshape((b * (t - 1), vocab))?,
            &targets.flatten_all()?,
        )?;
        return Ok(flat.reshape((b, t - 1))?);
    }
    let log_probs = candle_nn::ops::log_softmax(&predicting, D::Minus1)?;
    Ok(log_probs.gather(&targets.unsqueeze(2)?, 2)?.squeeze(2)?)
}

/// Per-layer key/value cache of an incremental decode.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
}

impl KvCache {
    /// Number of positions already processed.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps only the given rows (positions along the batch dimension), in that order.
    pub fn keep_rows(&mut self, rows: &[u32], device: &Device) -> Result<()> {
        let index = Tensor::new(rows, device)?;
        for layer in &mut self.layers {
            for tensor in [&mut layer.keys, &mut layer.values] {
                if let Some(t) = tensor.as_mut() {
                    *t = t.index_select(&index, 0)?;
                }
            }
        }
        Ok(())
    }
}
