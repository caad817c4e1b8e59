//! Incremental decoding with a KV cache and seeded sampling (greedy, temperature, top-k,
//! top-p). The same seed, prompt and settings always produce the same tokens.

use candle_core::{D, DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

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

/// Several generations advanced together, one forward pass per token for all rows still
/// going: prompts of one length (so no padding is needed), each row with its own sampler seed.
/// A finished row leaves the batch (and the KV cache), so short answers stop costing compute.
/// Row `i` follows exactly the recipe of a [`Generation`] of `prompts[i]` with seed `seeds[i]`.
pub struct BatchGeneration {
    rows: Vec<BatchRow>,
    /// Rows still generating, in the order of the cache's batch dimension.
    active: Vec<usize>,
    cache: KvCache,
    max_new_tokens: usize,
    stop_tokens: Vec<u32>,
}

struct BatchRow {
    sampler: Sampler,
    /// Ids the row's next pass consumes: its prompt first, then its last sampled token.
    input: Vec<u32>,
    out: Vec<u32>,
}

impl BatchGeneration {
    /// Checks that the prompts are non-empty, of one length and within the context with the
    /// token budget; computes nothing yet. `config.sampling.seed` is replaced by `seeds[i]`.
    pub fn new(
        model: &CausalLm,
        prompts: &[&[u32]],
        seeds: &[u64],
        config: &GenerationConfig,
    ) -> Result<Self> {
        if prompts.len() != seeds.len() {
            return Err(ModelError::InvalidInput(format!(
                "{} prompts but {} seeds",
                prompts.len(),
                seeds.len()
            )));
        }
        let len = prompts.first().map_or(0, |p| p.len());
        if len == 0 || prompts.iter().any(|p| p.len() != len) {
            return Err(ModelError::InvalidInput(
                "a batched generation needs non-empty prompts of one length".into(),
            ));
        }
        let max = model.config().max_positions();
        if len + config.max_new_tokens > max {
            return Err(ModelError::SequenceTooLong {
                len: len + config.max_new_tokens,
                max,
            });
        }
        let rows = prompts
            .iter()
            .zip(seeds)
            .map(|(prompt, &seed)| {
                Ok(BatchRow {
                    sampler: Sampler::new(SamplingConfig {
                        seed,
                        ..config.sampling.clone()
                    })?,
                    input: prompt.to_vec(),
                    out: Vec::with_capacity(config.max_new_tokens),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let active = if config.max_new_tokens == 0 {
            Vec::new()
        } else {
            (0..rows.len()).collect()
        };
        Ok(Self {
            rows,
            active,
            cache: model.new_cache(),
            max_new_tokens: config.max_new_tokens,
            stop_tokens: config.stop_tokens.clone(),
        })
    }

    /// One forward pass over the rows still going and one sampled token for each; returns how
    /// many rows it advanced (0 once every row has finished).
    pub fn step(&mut self, model: &CausalLm) -> Result<usize> {
        let advanced = self.active.len();
        if advanced == 0 {
            return Ok(0);
        }
        let width = self.rows[self.active[0]].input.len();
        let ids: Vec<u32> = self
            .active
            .iter()
            .flat_map(|&r| self.rows[r].input.iter().copied())
            .collect();
        let input = Tensor::from_vec(ids, (advanced, width), model.device())?;
        let logits = model.forward_cached(&input, &mut self.cache)?;
        let last = logits
            .narrow(1, width - 1, 1)?
            .squeeze(1)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        // Rows draw in parallel (each draw sorts the vocabulary); each row has its own
        // generator, so the tokens do not depend on the threads. `active` is ascending.
        let mut going: Vec<&mut BatchRow> = Vec::with_capacity(advanced);
        let mut next_active = self.active.iter().peekable();
        for (r, row) in self.rows.iter_mut().enumerate() {
            if next_active.peek() == Some(&&r) {
                next_active.next();
                going.push(row);
            }
        }
        let tokens: Vec<u32> = going
            .par_iter_mut()
            .zip(last.par_iter())
            .map(|(row, logits)| row.sampler.sample(logits))
            .collect::<Result<_>>()?;
        let mut kept = Vec::with_capacity(advanced);
        for (position, (row, token)) in going.into_iter().zip(tokens).enumerate() {
            row.out.push(token);
            row.input = vec![token];
            if row.out.len() < self.max_new_tokens && !self.stop_tokens.contains(&token) {
                kept.push(position);
            }
        }
        if kept.len() < advanced {
            self.active = kept.iter().map(|&p| self.active[p]).collect();
            if !kept.is_empty() {
                let positions: Vec<u32> = kept.iter().map(|&p| p as u32).collect();
                self.cache.keep_rows(&positions, model.device())?;
            }
        }
        Ok(advanced)
    }

    pub fn is_finished(&self) -> bool {
        self.active.is_empty()
    }

    /// Each row's generated tokens, in the order of the prompts.
    pub fn into_tokens(self) -> Vec<Vec<u32>> {
        self.rows.into_iter().map(|row| row.out).collect()
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

    #[test]
    fn a_batched_generation_samples_what_single_generations_sample() {
        use crate::{CausalLm, LoadOptions, ModelConfig};
        let model = CausalLm::random_init(
            ModelConfig::preset("tiny-gpt2").unwrap(),
            7,
            &LoadOptions::default(),
        )
        .unwrap();
        let prompts: [&[u32]; 4] = [
            &[5, 9, 14, 3],
            &[7, 7, 7, 7],
            &[100, 2, 30, 4],
            &[5, 9, 14, 3],
        ];
        let seeds = [1u64, 2, 3, 4];
        // A stop token that ends the second row's greedy answer early, so rows leave the batch.
        let greedy = GenerationConfig {
            max_new_tokens: 12,
            sampling: SamplingConfig {
                temperature: 0.0,
                ..Default::default()
            },
            stop_tokens: vec![],
        };
        let stop = generate(&model, prompts[1], &greedy, |_| true).unwrap()[2];
        for (temperature, stop) in [
            (0.0, vec![]),
            (1.0, vec![]),
            (0.0, vec![stop]),
            (1.5, vec![stop]),
        ] {
            let config = GenerationConfig {
                max_new_tokens: 12,
                sampling: SamplingConfig {
                    temperature,
                    ..Default::default()
                },
                stop_tokens: stop,
            };
            let mut batch = BatchGeneration::new(&model, &prompts, &seeds, &config).unwrap();
            let mut passes = 0;
            while batch.step(&model).unwrap() > 0 {
                passes += 1;
            }
            assert!(batch.is_finished() && passes <= 12);
            let batched = batch.into_tokens();
            if !config.stop_tokens.is_empty() && temperature == 0.0 {
                assert!(batched[1].len() <= 3 && batched.iter().any(|t| t.len() == 12));
            }
            for ((prompt, seed), tokens) in prompts.iter().zip(seeds).zip(&batched) {
                let single = GenerationConfig {
                    sampling: SamplingConfig {
                        seed,
                        ..config.sampling.clone()
                    },
                    ..config.clone()
                };
                assert_eq!(
                    &generate(&model, prompt, &single, |_| true).unwrap(),
                    tokens
                );
            }
        }
    }

    #[test]
    fn a_batched_generation_refuses_prompts_of_different_lengths() {
        use crate::{CausalLm, LoadOptions, ModelConfig};
        let model = CausalLm::random_init(
            ModelConfig::preset("tiny-gpt2").unwrap(),
            7,
            &LoadOptions::default(),
        )
        .unwrap();
        let config = GenerationConfig {
            max_new_tokens: 4,
            sampling: SamplingConfig::default(),
            stop_tokens: vec![],
        };
        let prompts: [&[u32]; 2] = [&[1, 2], &[1, 2, 3]];
        assert!(BatchGeneration::new(&model, &prompts, &[0, 1], &config).is_err());
        assert!(BatchGeneration::new(&model, &prompts[..1], &[0, 1], &config).is_err());
        let long = vec![1u32; 126];
        assert!(BatchGeneration::new(&model, &[long.as_slice()], &[0], &config).is_err());
    }
}
