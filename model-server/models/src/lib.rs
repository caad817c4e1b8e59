//! superficial-models: GPT-2 and OPT causal language models on candle, loaded from Hugging Face
//! checkpoint folders and computing what `transformers` computes, plus their tokenizers.
//!
//! This crate owns tensors and nothing else: no async runtime, no gRPC. The model server wraps
//! it in a thread per device; tests and the trainer use it directly.
//!
//! - [`config`]: `config.json` mirrors, presets, validation.
//! - [`weights`]: named tensors from safetensors / sharded safetensors / `pytorch_model.bin`,
//!   random init, saving, content hashes.
//! - [`layers`]: differentiable LayerNorm, softmax, attention, affine maps.
//! - [`fused`]: fused CPU kernels (with backward) for the target log-softmax and the causal
//!   attention softmax.
//! - [`gpt2`], [`opt`]: the transformer bodies, tensor names mirroring HF.
//! - [`model`]: [`CausalLm`] — logits, per-token log-probs, reward head, KV-cached decoding.
//! - [`generation`]: seeded sampling and the decode loop.
//! - [`tokenizer`]: HF tokenizers with the reference's special tokens, dialogue split,
//!   truncation.

pub mod config;
pub mod error;
pub mod fused;
pub mod generation;
pub mod gpt2;
pub mod layers;
pub mod model;
pub mod opt;
pub mod tokenizer;
pub mod weights;

pub use candle_core::{DType, Device, DeviceLocation, Tensor};
pub use config::{Architecture, ModelConfig};
pub use error::{ModelError, Result};
pub use model::{CausalLm, KvCache, LoadOptions, PaddedBatch};
pub use tokenizer::{EncodedDialogue, TextTokenizer};
pub use weights::{REWARD_HEAD_TENSOR, Weights};
