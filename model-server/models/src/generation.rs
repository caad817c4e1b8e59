//! Incremental decoding with a KV cache and seeded sampling (greedy, temperature, top-k,
//! top-p). The same seed, prompt and settings always produce the same tokens.

use candle_core::{D, DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{ModelError, Result};
use crate::model::{CausalLm, KvCache};

/// How the next token is chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// 0 means greedy (argmax); otherwise logits are divided by it.
    pub temperature: f64,
    /// Keep only the `top_k` most likely tokens (0 = no limit).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability mass reaches `top_p` (1 = no limit).
    pub top_p: f64,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplingConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(ModelError::InvalidInput(format!(
                "temperature must be a finite number >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::InvalidInput(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Draws tokens from logits according to a [`SamplingConfig`].
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplingConfig,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(config: SamplingConfig) -> Result<Self> {
        config.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        Ok(Self { config, rng })
    }

    /// Picks the next token from a `[vocab]` logit vector.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(ModelError::InvalidInput("empty logits".into()));
        }
        if logits.iter().any(|x| x.is_nan()) {
            return Err(ModelError::InvalidInput("logits contain NaN".into()));
        }
        if self.config.temperature == 0.0 {
            return Ok(argmax(logits));
        }
        // Candidates in descending logit order; ties broken by id so the order is stable.
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if self.config.top_k > 0 {
            order.truncate(self.config.top_k);
        }
        let max = logits[order[0]] as f64;
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((logits[i] as f64 - max) / self.config.temperature).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.config.top_p < 1.0 {
            let mut mass = 0.0;
            let mut keep = probs.len();
            for (i, p) in probs.iter().enumerate() {
                mass += p;
                if mass >= self.config.top_p {
                    keep = i + 1;
                    break;
                }
            }
            probs.truncate(keep);
            order.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut draw = self.rng.random::<f64>() * total;
        for (p, &token) in probs.iter().zip(&order) {
            draw -= p;
            if draw <= 0.0 {
                return Ok(token as u32);
            }
        }
        Ok(order[order.len() - 1] as u32)
    }
}

fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    /// Generation stops after emitting any of these (e.g. the EOS id).
    pub stop_tokens: Vec<u32>,
}

/// A generation in progress: the KV cache, the sampler's state and the tokens so far. Each
/// [`Generation::step`] adds one token, so a caller can interleave other work between tokens
/// (the server's device thread serves short requests between slices of a long generation).
pub struct Generation {
    sampler: Sampler,
    cache: KvCache,
    /// Ids the next forward pass consumes: the prompt first, then the last sampled token.
    input: Vec<u32>,
    out: Vec<u32>,
    max_new_tokens: usize,
    stop_tokens: Vec<u32>,
    finished: bool,
}

impl Generation {
    /// Checks the prompt and the length budget; computes nothing yet.
    pub fn new(model: &CausalLm, prompt: &[u32], config: &GenerationConfig) -> Result<Self> {
        if prompt.is_empty() {
            return Err(ModelError::InvalidInput(
                "generation needs a non-empty prompt".into(),
            ));
        }
        let max = model.config().max_positions();
        if prompt.len() + config.max_new_tokens > max {
            return Err(ModelError::SequenceTooLong {
                len: prompt.len() + config.max_new_tokens,
                max,
            });
        }
        Ok(Self {
            sampler: Sampler::new(config.sampling.clone())?,
            cache: model.new_cache(),
            input: prompt.to_vec(),
            out: Vec::with_capacity(config.max_new_tokens),
            max_new_tokens: config.max_new_tokens,
            stop_tokens: config.stop_tokens.clone(),
            finished: config.max_new_tokens == 0,
        })
    }

    /// One forward pass and one sampled token; `None` once the generation has finished (the
    /// token budget is spent or a stop token was emitted).
    pub fn step(&mut self, model: &CausalLm) -> Result<Option<u32>> {
        if self.finished {
            return Ok(None);
        }
        let input = Tensor::new(self.input.as_slice(), model.device())?.unsqueeze(0)?;
        let logits = model.forward_cached(&input, &mut self.cache)?;
        let last = logits
            .narrow(1, logits.dim(1)? - 1, 1)?
            .squeeze(1)?
            .squeeze(0)?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let token = self.sampler.sample(&last)?;
        self.out.push(token);
        self.input = vec![token];
        self.finished = self.out.len() >= self.max_new_tokens || self.stop_tokens.contains(&token);
        Ok(Some(token))
    }

    /// Ends the generation early (the caller's consumer has gone).
    pub fn finish(&mut self) {
        self.finished = true;
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The tokens generated so far.
    pub fn tokens(&self) -> &[u32] {
        &self.out
    }

    pub fn into_tokens(self) -> Vec<u32> {
        self.out
    }
}

/// Generates up to `max_new_tokens` after `prompt`, calling `on_token` with each new token as
/// soon as it is chosen (return `false` from it to stop early). Returns the new tokens.
pub fn generate(
    model: &CausalLm,
    prompt: &[u32],
    config: &GenerationConfig,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Vec<u32>> {
    let mut generation = Generation::new(model, prompt, config)?;
    while let Some(token) = generation.step(model)? {
        if !on_token(token) {
            generation.finish();
        }
    }
    Ok(generation.into_tokens())
}

/// Greedy continuation computed without a cache (full re-forward each step); used to check the
/// cached path.
pub fn greedy_without_cache(model: &CausalLm, prompt: &[u32], steps: usize) -> Result<Vec<u32>> {
    let mut seq = prompt.to_vec();
    for _ in 0..steps {
        let ids = Tensor::new(seq.as_slice(), model.device())?.unsqueeze(0)?;
        let logits = model.logits(&ids)?;
        let t = logits.dim(1)?;
        let next = logits
            .narrow(1, t - 1, 1)?
            .argmax(D::Minus1)?
            .flatten_all()?
            .to_vec1::<u32>()?[0];
        seq.push(next);
    }
    Ok(seq[prompt.len()..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_argmax() {
        let mut s = Sampler::new(SamplingConfig {
            temperature: 0.0,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, -1.0]).unwrap(), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_tiny_is_greedy() {
        let logits = [0.5f32, 0.1, 2.0, 1.9];
        for config in [
            SamplingConfig {
                top_k: 1,
                seed: 3,
                ..Default::default()
            },
            SamplingConfig {
                top_p: 1e-6,
                seed: 4,
                ..Default::default()
            },
        ] {
            let mut s = Sampler::new(config).unwrap();
            for _ in 0..20 {
                assert_eq!(s.sample(&logits).unwrap(), 2);
            }
        }
    }

    #[test]
    fn top_k_restricts_support_and_seed_reproduces() {
        let logits = [1.0f32, 0.9, 0.8, -5.0, 0.7];
        let config = SamplingConfig {
            top_k: 3,
            seed: 11,
            ..Default::default()
        };
        let draw = |c: SamplingConfig| {
            let mut s = Sampler::new(c).unwrap();
            (0..200)
                .map(|_| s.sample(&logits).unwrap())
                .collect::<Vec<_>>()
        };
        let a = draw(config.clone());
        assert!(a.iter().all(|t| [0, 1, 2].contains(t)));
        assert!([0, 1, 2].iter().all(|t| a.contains(t)));
        assert_eq!(a, draw(config));
    }

    #[test]
    fn sampling_frequencies_follow_the_softmax() {
        let logits = [0.0f32, (3.0f32).ln()];
        let mut s = Sampler::new(SamplingConfig {
            seed: 5,
            ..Default::default()
        })
        .unwrap();
        let n = 20000;
        let ones = (0..n).filter(|_| s.sample(&logits).unwrap() == 1).count();
        let freq = ones as f64 / n as f64;
        assert!((freq - 0.75).abs() < 0.02, "{freq}");
    }

    #[test]
    fn invalid_settings_are_rejected() {
        assert!(
            Sampler::new(SamplingConfig {
                temperature: -1.0,
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            Sampler::new(SamplingConfig {
                top_p: 0.0,
                ..Default::default()
            })
            .is_err()
        );
    }
}
