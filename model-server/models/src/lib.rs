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
//! - [`fused`]: fused f32 CPU kernels with their own backward (target log-softmax, causal
//!   attention softmax, tanh GELU, LayerNorm, bias add); [`layers`] and [`model`] pick them on
//!   the CPU and fall back to composed candle ops elsewhere.
//! - [`gpt2`], [`opt`]: the transformer bodies, tensor names mirroring HF.
//! - [`model`]: [`CausalLm`] — logits, per-token log-probs, reward head, KV-cached decoding.
//! - [`packed`]: sequences without padding, pairs sharing their prompt, for training passes.
//! - [`generation`]: seeded sampling and the decode loop.
//! - [`tokenizer`]: HF tokenizers with the reference's special tokens, dialogue split,
//!   truncation.

pub mod chunked;
pub mod config;
pub mod error;
pub mod fused;
pub mod fused_affine;
pub mod fused_attention;
pub mod fused_lm_head;
pub mod generation;
pub mod gpt2;
pub mod layers;
mod matmul;
pub mod model;
pub mod opt;
pub mod packed;
pub mod tokenizer;
pub mod weights;

pub use candle_core::{DType, Device, DeviceLocation, Tensor};
pub use chunked::{ChunkedOutput, ChunkedScoring};
pub use config::{Architecture, ModelConfig};
pub use error::{ModelError, Result};
pub use model::{CausalLm, KvCache, LoadOptions, PaddedBatch, RewardReadout};
pub use packed::{PackedSequences, Prediction, PrefixSharing};
pub use tokenizer::{EncodedDialogue, TextTokenizer};
pub use weights::{REWARD_HEAD_TENSOR, REWARD_LOGLIK_SCALE_TENSOR, Weights};

/// Sets candle's CPU threading up once, before any thread exists:
/// - makes the thread count a cheap lookup: candle 0.11 asks `get_num_threads()` on every
///   matrix product, and without `RAYON_NUM_THREADS` that parses `/proc/cpuinfo` each time (5–7 %
///   of a pair-scoring server profile; unbatched tiny-model throughput rose 1.5× without it), so
///   this sets the variable to the value candle would compute;
/// - turns off candle's second pool (`CANDLE_NUM_THREADS=1`): its "barrier pool" for
///   elementwise ops keeps `n − 1` threads spinning after each op next to rayon's `n` gemm
///   workers, so on a few cores the spinners take the gemm workers' time (sandbox training
///   steps 10–20 % faster without it on 2 cores; the fused kernels use rayon anyway).
///
/// A variable the user already set is left alone. Returns the rayon thread count.
///
/// # Safety
/// Changes the process environment: call it before any other thread exists (first thing in a
/// synchronous `main`).
pub unsafe fn pin_cpu_thread_count() -> usize {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: the caller guarantees that no other thread reads or writes the environment.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    let preset = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .filter(|n| *n > 0);
    if let Some(n) = preset {
        return n;
    }
    let n = candle_core::utils::get_num_threads();
    // SAFETY: as above.
    unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    n
}
