//! The training loop: batches of `batch_size` examples built from minibatches (gradient
//! accumulation, each minibatch loss divided by the number of minibatches), one optimizer step
//! per batch, the learning-rate schedule, non-finite checks, periodic exact checkpoints.
//!
//! Data order is the official one: the examples (already shuffled by the caller) are repeated
//! `epochs` times in the same order; step `s` consumes positions `s·B .. (s+1)·B`; the leftover
//! after `floor(N·epochs / B)` steps is never seen. Optional per-epoch reshuffling draws each
//! epoch's order from `(seed, epoch)`.

use std::path::Path;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use superficial_models::{CausalLm, Weights};
use tracing::{debug, instrument};

use crate::checkpoint::{self, CheckpointState};
use crate::error::{Result, TrainError};
use crate::objectives::{Example, Objective};
use crate::optimizer::{Adam, AdamConfig};
use crate::schedule::Schedule;

/// Everything that decides what a training run computes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub objective: Objective,
    pub optimizer: AdamConfig,
    pub schedule: Schedule,
    /// Examples per optimizer step (32 in the paper).
    pub batch_size: usize,
    /// Examples per forward/backward pass; must divide `batch_size`.
    pub minibatch_size: usize,
    pub epochs: usize,
    pub seed: u64,
    /// Reshuffle the examples at each epoch (the official code does not).
    pub reshuffle_each_epoch: bool,
    /// Contiguous shards each minibatch is split into: each shard's forward and backward is
    /// one pass whose gradient is its share of the minibatch's (see
    /// [`Objective::loss_sum`]); on CPU the shards run concurrently, one per core, which on
    /// small models beats splitting every product between threads. Part of the arithmetic (the
    /// minibatch's sums are taken per shard, then added), so fixed by the configuration, never
    /// by the machine's core count: results do not depend on how many threads run them.
    #[serde(default = "default_shards")]
    pub shards: usize,
}

/// Two shards: both cores of the small machines this runs on; bigger machines parallelise
/// inside each shard as well.
pub const DEFAULT_SHARDS: usize = 2;

fn default_shards() -> usize {
    DEFAULT_SHARDS
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        self.optimizer.validate()?;
        if self.batch_size == 0 || self.minibatch_size == 0 || self.epochs == 0 || self.shards == 0
        {
            return Err(TrainError::InvalidConfig(
                "batch_size, minibatch_size, epochs and shards must be positive".into(),
            ));
        }
        if !self.batch_size.is_multiple_of(self.minibatch_size) {
            return Err(TrainError::InvalidConfig(format!(
                "minibatch_size {} does not divide batch_size {}",
                self.minibatch_size, self.batch_size
            )));
        }
        Ok(())
    }

    /// `floor(N · epochs / batch_size)`.
    pub fn total_steps(&self, examples: usize) -> usize {
        examples * self.epochs / self.batch_size
    }
}

/// What one optimizer step reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// 1-based index of the step just taken.
    pub step: usize,
    pub total_steps: usize,
    /// Mean of the minibatch losses of the step.
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Fraction of pairs predicted in the target's direction (pair objectives).
    pub accuracy: Option<f64>,
    pub tokens: usize,
    pub seconds: f64,
}

/// A model being trained on a fixed list of examples.
pub struct TrainingRun {
    config: TrainConfig,
    model: CausalLm,
    optimizer: Adam,
    examples: Vec<Example>,
    step: usize,
    total_steps: usize,
    fingerprint: String,
}

impl TrainingRun {
    /// Prepares a run: validates config and data, makes the model's weights trainable.
    pub fn new(model: CausalLm, examples: Vec<Example>, config: TrainConfig) -> Result<Self> {
        config.validate()?;
        config.objective.validate(&examples)?;
        if config.objective.needs_reward_head() && !model.has_reward_head() {
            return Err(TrainError::InvalidConfig(
                "the reward objective needs a model with a reward head".into(),
            ));
        }
        let total_steps = config.total_steps(examples.len());
        if total_steps == 0 {
            return Err(TrainError::InvalidConfig(format!(
                "{} examples x {} epochs is less than one batch of {}",
                examples.len(),
                config.epochs,
                config.batch_size
            )));
        }
        let model_config = model.config().clone();
        let initial_hash = model.weights().content_hash()?;
        let (weights, vars) = model.weights().clone().into_trainable()?;
        let model = CausalLm::from_weights(model_config, weights)?;
        let fingerprint = fingerprint(&config, &examples, &initial_hash);
        let optimizer = Adam::new(vars, config.optimizer)?;
        Ok(Self {
            config,
            model,
            optimizer,
            examples,
            step: 0,
            total_steps,
            fingerprint,
        })
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }
    /// Optimizer steps completed.
    pub fn step(&self) -> usize {
        self.step
    }
    pub fn total_steps(&self) -> usize {
        self.total_steps
    }
    pub fn is_finished(&self) -> bool {
        self.step >= self.total_steps
    }
    /// The model with its current (trainable) weights.
    pub fn model(&self) -> &CausalLm {
        &self.model
    }
    /// Identifies this run's configuration, data and initial weights.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// A copy of the current model that shares nothing with the run and tracks no gradients.
    pub fn frozen_model(&self) -> Result<CausalLm> {
        frozen_copy(&self.model)
    }

    fn example_index(&self, position: usize) -> usize {
        let n = self.examples.len();
        let epoch = position / n;
        let offset = position % n;
        if !self.config.reshuffle_each_epoch {
            return offset;
        }
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(
            self.config.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        order.shuffle(&mut rng);
        order[offset]
    }

    /// Runs one optimizer step.
    #[instrument(skip_all, fields(step = self.step + 1))]
    pub fn train_step(&mut self) -> Result<StepMetrics> {
        if self.is_finished() {
            return Err(TrainError::InvalidConfig(
                "the run is already finished".into(),
            ));
        }
        let started = Instant::now();
        let step_number = self.step + 1;
        let b = self.config.batch_size;
        let mb = self.config.minibatch_size;
        let parts = b / mb;
        let vars: Vec<Var> = self.optimizer.vars().map(|(_, v)| v.clone()).collect();
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let (mut loss_sum, mut correct, mut judged, mut tokens) = (0f64, 0usize, 0usize, 0usize);
        for part in 0..parts {
            let first = self.step * b + part * mb;
            let batch: Vec<Example> = (first..first + mb)
                .map(|p| self.examples[self.example_index(p)].clone())
                .collect();
            tokens += batch.iter().map(Example::tokens).sum::<usize>();
            let normalizer = self.config.objective.normalizer(&batch);
            let shards = shard_ranges(batch.len(), self.config.shards);
            let pass = |range: &std::ops::Range<usize>| {
                shard_pass(
                    self.config.objective,
                    &self.model,
                    &batch[range.clone()],
                    normalizer * parts as f64,
                    step_number,
                )
            };
            let passes: Vec<Result<ShardPass>> = if self.model.device().is_cpu() && shards.len() > 1
            {
                shards.par_iter().map(pass).collect()
            } else {
                shards.iter().map(pass).collect()
            };
            let mut minibatch_sum = 0f64;
            for shard in passes {
                let shard = shard?;
                minibatch_sum += shard.loss_sum;
                correct += shard.correct;
                judged += shard.judged;
                for (slot, var) in grads.iter_mut().zip(&vars) {
                    if let Some(g) = shard.grads.get(var.as_tensor()) {
                        *slot = Some(match slot.take() {
                            Some(acc) => (acc + g)?,
                            None => g.clone(),
                        });
                    }
                }
            }
            loss_sum += minibatch_sum / normalizer;
        }
        let lr = self
            .config
            .schedule
            .lr(self.config.optimizer.lr, self.step, self.total_steps);
        let report = self.optimizer.step(&grads, lr, step_number)?;
        self.step += 1;
        let metrics = StepMetrics {
            step: self.step,
            total_steps: self.total_steps,
            loss: loss_sum / parts as f64,
            lr,
            grad_norm: report.grad_norm,
            accuracy: (judged > 0).then(|| correct as f64 / judged as f64),
            tokens,
            seconds: started.elapsed().as_secs_f64(),
        };
        debug!(?metrics, "step");
        Ok(metrics)
    }

    /// Trains to the end. With `checkpoints = Some((dir, every))` a checkpoint is written every
    /// `every` steps and at the end, and an existing checkpoint of this run is resumed from
    /// first. `on_step` sees each step's metrics; returning `false` stops with
    /// [`TrainError::Cancelled`] after checkpointing.
    pub fn run(
        &mut self,
        checkpoints: Option<(&Path, usize)>,
        mut on_step: impl FnMut(&StepMetrics) -> bool,
    ) -> Result<()> {
        if let Some((dir, _)) = checkpoints {
            self.resume_from(dir)?;
        }
        while !self.is_finished() {
            let metrics = self.train_step()?;
            let keep_going = on_step(&metrics);
            if let Some((dir, every)) = checkpoints {
                let due = every > 0 && self.step.is_multiple_of(every);
                if due || self.is_finished() || !keep_going {
                    self.save_checkpoint(dir)?;
                }
            }
            if !keep_going {
                return Err(TrainError::Cancelled { step: self.step });
            }
        }
        Ok(())
    }

    /// Writes a checkpoint of the current state to `dir` (atomically).
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        let weights: Vec<(String, Tensor)> = self
            .optimizer
            .vars()
            .map(|(name, var)| (name.to_string(), var.as_tensor().clone()))
            .collect();
        let state = CheckpointState {
            step: self.step,
            total_steps: self.total_steps,
            examples_seen: self.step * self.config.batch_size,
            seed: self.config.seed,
            fingerprint: self.fingerprint.clone(),
        };
        checkpoint::save(dir, &state, &weights, &self.optimizer.moments()?)
    }

    /// Restores the checkpoint in `dir` if there is one; returns whether it did. A checkpoint
    /// of a different run (configuration, data or initial weights) is an error.
    pub fn resume_from(&mut self, dir: &Path) -> Result<bool> {
        let Some(saved) = checkpoint::load(dir, self.model.device())? else {
            return Ok(false);
        };
        if saved.state.fingerprint != self.fingerprint {
            return Err(TrainError::Checkpoint {
                path: dir.to_path_buf(),
                reason:
                    "it belongs to a different run (configuration, data or initial weights differ)"
                        .into(),
            });
        }
        for (name, var) in self.optimizer.vars() {
            let tensor = saved
                .weights
                .get(name)
                .ok_or_else(|| TrainError::Checkpoint {
                    path: dir.to_path_buf(),
                    reason: format!("no weights for {name}"),
                })?;
            var.set(&tensor.to_dtype(var.dtype())?)?;
        }
        let moments = &saved.moments;
        self.optimizer
            .restore(|name| moments.get(name).cloned(), saved.state.step as u64)?;
        self.step = saved.state.step;
        Ok(true)
    }
}

/// What one shard's forward and backward leave for the step.
struct ShardPass {
    /// The shard's undivided loss sum (see [`Objective::loss_sum`]).
    loss_sum: f64,
    correct: usize,
    judged: usize,
    grads: GradStore,
}

/// Forward and backward of one shard; its loss sum is divided by `divisor` (the minibatch's
/// normalizer times the minibatches per step) before the backward, so the gradients of all
/// shards of all minibatches of a step add up to the step's gradient.
#[instrument(skip_all, fields(examples = shard.len()))]
fn shard_pass(
    objective: Objective,
    model: &CausalLm,
    shard: &[Example],
    divisor: f64,
    step: usize,
) -> Result<ShardPass> {
    let output = objective.loss_sum(model, shard)?;
    let loss_sum = output.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    if !loss_sum.is_finite() {
        return Err(TrainError::NonFinite {
            step,
            what: format!("loss ({loss_sum})"),
        });
    }
    Ok(ShardPass {
        loss_sum,
        correct: output.correct,
        judged: output.judged,
        grads: (output.loss / divisor)?.backward()?,
    })
}

/// `len` examples in `shards` contiguous ranges, sizes differing by at most one (larger
/// first); fewer ranges when there are fewer examples than shards.
fn shard_ranges(len: usize, shards: usize) -> Vec<std::ops::Range<usize>> {
    let count = shards.clamp(1, len.max(1));
    let (size, extra) = (len / count, len % count);
    let mut start = 0;
    (0..count)
        .map(|i| {
            let end = start + size + usize::from(i < extra);
            let range = start..end;
            start = end;
            range
        })
        .collect()
}

/// A deep copy of a model's weights as plain tensors (no variables, no shared storage): for
/// frozen references and for inference after training.
pub fn frozen_copy(model: &CausalLm) -> Result<CausalLm> {
    let mut tensors = std::collections::BTreeMap::new();
    for (name, tensor) in model.weights().iter() {
        tensors.insert(name.clone(), tensor.detach().copy()?);
    }
    let weights = Weights::new(tensors, model.weights().origin().to_string());
    Ok(CausalLm::from_weights(model.config().clone(), weights)?)
}

fn fingerprint(config: &TrainConfig, examples: &[Example], initial_weights: &str) -> String {
    use std::hash::{Hash, Hasher};
    // Two independent 64-bit hashes of the same canonical description; collisions between
    // distinct runs of one study are not a practical concern.
    let description = format!(
        "{}|{}|{}",
        serde_json::to_string(config).unwrap_or_default(),
        initial_weights,
        examples.len()
    );
    let mut a = std::collections::hash_map::DefaultHasher::new();
    let mut b = std::collections::hash_map::DefaultHasher::new();
    1u8.hash(&mut b);
    description.hash(&mut a);
    description.hash(&mut b);
    for example in examples {
        let text = format!("{example:?}");
        text.hash(&mut a);
        text.hash(&mut b);
    }
    format!("{:016x}{:016x}", a.finish(), b.finish())
}
