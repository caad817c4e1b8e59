//! superficial-training: the training engine the model server runs next to resident weights.
//! No gRPC, no async runtime.
//!
//! - [`losses`]: stable log-sigmoid, BCE, reward-pair loss with the reward-mechanism conflict,
//!   SimPO/DPO with the "reverse" conflict — pure functions of model outputs.
//! - [`objectives`]: training examples and how each objective turns a minibatch into a loss.
//! - [`optimizer`]: in-place Adam/AdamW with parameter groups and global-norm clipping.
//! - [`schedule`]: cosine-to-zero and linear-warm-up-then-constant learning rates.
//! - [`trainer`]: the loop (gradient accumulation, non-finite checks, checkpoints, resume).
//! - [`checkpoint`]: atomic training checkpoints.
//! - [`orientation`]: the official seeded slot orientation of ground-truth reward pairs.
//! - [`export`]: HF-layout folders with tokenizer files.

pub mod checkpoint;
pub mod error;
pub mod export;
pub mod losses;
pub mod objectives;
pub mod optimizer;
pub mod orientation;
pub mod schedule;
pub mod trainer;

pub use error::{Result, TrainError};
pub use objectives::{Example, Objective, ObjectiveKind};
pub use optimizer::AdamConfig;
pub use schedule::Schedule;
pub use trainer::{DEFAULT_SHARDS, StepMetrics, TrainConfig, TrainingRun, frozen_copy};
