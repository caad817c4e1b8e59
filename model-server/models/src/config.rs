//! Model configurations: serde mirrors of HF `config.json` for GPT-2 and OPT, dispatch on
//! `model_type`, validation, and named presets (the real model sizes and tiny test sizes).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Upper bounds on every dimension of a config, checked before anything that scales with them
/// (memory estimates, layouts, allocation). Each sits far above the largest supported real
/// model (GPT-2 XL: vocab 50257, width 1600, 48 layers, 1024 positions; OPT-6.7b: width 4096,
/// 32 layers, 2048 positions, FFN 16384), so they refuse only configs no checkpoint has.
pub const MAX_VOCAB: usize = 1 << 20;
pub const MAX_WIDTH: usize = 1 << 16;
pub const MAX_LAYERS: usize = 512;
pub const MAX_POSITIONS: usize = 1 << 16;
pub const MAX_FFN: usize = 1 << 18;
/// At most this many parameters (about 137 billion; OPT-6.7b has 6.7 billion).
pub const MAX_PARAMETERS: u64 = 1 << 37;

fn default_true() -> bool {
    true
}
fn default_gelu_new() -> String {
    "gelu_new".to_string()
}
fn default_relu() -> String {
    "relu".to_string()
}
fn default_ln_eps() -> f64 {
    1e-5
}
fn default_gpt2_special() -> u32 {
    50256
}
fn default_opt_pad() -> u32 {
    1
}
fn default_opt_bos() -> u32 {
    2
}

/// HF `GPT2Config` (the fields that change the computation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// MLP width; `None` means 4 * n_embd.
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_gelu_new")]
    pub activation_function: String,
    #[serde(default = "default_ln_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_gpt2_special")]
    pub bos_token_id: u32,
    #[serde(default = "default_gpt2_special")]
    pub eos_token_id: u32,
}

/// HF `OPTConfig` (the fields that change the computation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub ffn_dim: usize,
    pub max_position_embeddings: usize,
    pub num_attention_heads: usize,
    /// Pre-LayerNorm when true (all sizes but opt-350m), post-LayerNorm when false.
    #[serde(default = "default_true")]
    pub do_layer_norm_before: bool,
    /// Width of the token embeddings; differs from `hidden_size` only with project_in/out.
    #[serde(default)]
    pub word_embed_proj_dim: Option<usize>,
    #[serde(default = "default_relu")]
    pub activation_function: String,
    #[serde(default = "default_true")]
    pub enable_bias: bool,
    #[serde(default = "default_true")]
    pub layer_norm_elementwise_affine: bool,
    #[serde(default, rename = "_remove_final_layer_norm")]
    pub remove_final_layer_norm: bool,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_opt_pad")]
    pub pad_token_id: u32,
    #[serde(default = "default_opt_bos")]
    pub bos_token_id: u32,
    #[serde(default = "default_opt_bos")]
    pub eos_token_id: u32,
}

impl OptConfig {
    /// Width of token embeddings and of the output of the decoder (after project_out).
    pub fn embed_dim(&self) -> usize {
        self.word_embed_proj_dim.unwrap_or(self.hidden_size)
    }
    /// Whether the checkpoint has `project_in`/`project_out`.
    pub fn has_projections(&self) -> bool {
        self.embed_dim() != self.hidden_size
    }
    /// Whether the decoder ends with `final_layer_norm`.
    pub fn has_final_layer_norm(&self) -> bool {
        self.do_layer_norm_before && !self.remove_final_layer_norm
    }
}

/// The supported architectures, dispatched on `config.json`'s `model_type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "model_type")]
pub enum ModelConfig {
    #[serde(rename = "gpt2")]
    Gpt2(Gpt2Config),
    #[serde(rename = "opt")]
    Opt(OptConfig),
}

/// Which architecture a model is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Architecture {
    Gpt2,
    Opt,
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Architecture::Gpt2 => "gpt2",
            Architecture::Opt => "opt",
        })
    }
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses `config.json` text; `path` is used in error messages only.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let config_error = |reason: String| ModelError::Config {
            path: path.to_path_buf(),
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| config_error(e.to_string()))?;
        let model_type = value
            .get("model_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| config_error("no string field `model_type`".to_string()))?;
        let config = match model_type {
            "gpt2" => ModelConfig::Gpt2(
                serde_json::from_value(value.clone()).map_err(|e| config_error(e.to_string()))?,
            ),
            "opt" => ModelConfig::Opt(
                serde_json::from_value(value.clone()).map_err(|e| config_error(e.to_string()))?,
            ),
            other => {
                return Err(ModelError::UnknownModelType {
                    path: path.to_path_buf(),
                    model_type: other.to_string(),
                });
            }
        };
        config.validate().map_err(|e| config_error(e.to_string()))?;
        Ok(config)
    }

    /// JSON for `config.json` in an HF-layout folder that `transformers` loads.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        if let Some(object) = value.as_object_mut() {
            let architectures = match self {
                ModelConfig::Gpt2(_) => "GPT2LMHeadModel",
                ModelConfig::Opt(_) => "OPTForCausalLM",
            };
            object.insert("architectures".into(), serde_json::json!([architectures]));
            object.insert("torch_dtype".into(), serde_json::json!("float32"));
        }
        value
    }

    /// Checks the invariants the model code relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::InvalidConfig(m));
        let (vocab, width, heads, layers, positions, act) = match self {
            ModelConfig::Gpt2(c) => (
                c.vocab_size,
                c.n_embd,
                c.n_head,
                c.n_layer,
                c.n_positions,
                &c.activation_function,
            ),
            ModelConfig::Opt(c) => (
                c.vocab_size,
                c.hidden_size,
                c.num_attention_heads,
                c.num_hidden_layers,
                c.max_position_embeddings,
                &c.activation_function,
            ),
        };
        if vocab == 0 || width == 0 || heads == 0 || layers == 0 || positions == 0 {
            return bad("vocab size, width, heads, layers and positions must be positive".into());
        }
        let ffn = match self {
            ModelConfig::Gpt2(c) => c.n_inner.unwrap_or(4 * width.min(MAX_WIDTH)),
            ModelConfig::Opt(c) => c.ffn_dim,
        };
        let embed = match self {
            ModelConfig::Gpt2(_) => width,
            ModelConfig::Opt(c) => c.embed_dim(),
        };
        for (what, value, limit) in [
            ("vocab size", vocab, MAX_VOCAB),
            ("width", width, MAX_WIDTH),
            ("heads", heads, MAX_WIDTH),
            ("layers", layers, MAX_LAYERS),
            ("positions", positions, MAX_POSITIONS),
            ("FFN width", ffn, MAX_FFN),
            ("embedding width", embed, MAX_WIDTH),
        ] {
            if value > limit {
                return bad(format!(
                    "{what} {value} is above this server's limit of {limit}"
                ));
            }
        }
        if width % heads != 0 {
            return bad(format!("width {width} is not divisible by {heads} heads"));
        }
        if Activation::parse(act).is_none() {
            return bad(format!(
                "unsupported activation_function `{act}` (supported: gelu_new, gelu_pytorch_tanh, gelu, relu)"
            ));
        }
        if let ModelConfig::Opt(c) = self {
            if c.ffn_dim == 0 || c.embed_dim() == 0 {
                return bad("ffn_dim and word_embed_proj_dim must be positive".into());
            }
            if !c.enable_bias || !c.layer_norm_elementwise_affine {
                return bad(
                    "OPT without biases or without affine LayerNorm is not supported".into(),
                );
            }
        }
        match crate::model::checked_parameter_count(self) {
            Some(n) if n <= MAX_PARAMETERS => Ok(()),
            Some(n) => bad(format!(
                "{n} parameters is above this server's limit of {MAX_PARAMETERS}"
            )),
            None => bad("the parameter count overflows".into()),
        }
    }

    /// The same architecture with `layers` layers (every layer has the same shapes).
    pub fn with_layers(&self, layers: usize) -> Self {
        let mut config = self.clone();
        match &mut config {
            ModelConfig::Gpt2(c) => c.n_layer = layers,
            ModelConfig::Opt(c) => c.num_hidden_layers = layers,
        }
        config
    }

    pub fn architecture(&self) -> Architecture {
        match self {
            ModelConfig::Gpt2(_) => Architecture::Gpt2,
            ModelConfig::Opt(_) => Architecture::Opt,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.vocab_size,
            ModelConfig::Opt(c) => c.vocab_size,
        }
    }

    /// Number of positions the model can attend over.
    pub fn max_positions(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.n_positions,
            ModelConfig::Opt(c) => c.max_position_embeddings,
        }
    }

    /// Width of the final hidden states (the reward head's input).
    pub fn output_dim(&self) -> usize {
        match self {
            ModelConfig::Gpt2(c) => c.n_embd,
            ModelConfig::Opt(c) => c.embed_dim(),
        }
    }

    /// Token id used to right-pad batches. Padding is never attended by real tokens (causal
    /// attention, right padding), so any valid id works; we use the model's own pad/eos id.
    pub fn pad_token_id(&self) -> u32 {
        match self {
            ModelConfig::Gpt2(c) => c.eos_token_id,
            ModelConfig::Opt(c) => c.pad_token_id,
        }
    }

    pub fn eos_token_id(&self) -> u32 {
        match self {
            ModelConfig::Gpt2(c) => c.eos_token_id,
            ModelConfig::Opt(c) => c.eos_token_id,
        }
    }

    /// A named configuration: the real GPT-2/OPT sizes and tiny sizes for tests.
    pub fn preset(name: &str) -> Option<Self> {
        let gpt2 = |vocab, positions, width, layers, heads| {
            ModelConfig::Gpt2(Gpt2Config {
                vocab_size: vocab,
                n_positions: positions,
                n_embd: width,
                n_layer: layers,
                n_head: heads,
                n_inner: None,
                activation_function: default_gelu_new(),
                layer_norm_epsilon: 1e-5,
                scale_attn_weights: true,
                scale_attn_by_inverse_layer_idx: false,
                tie_word_embeddings: true,
                bos_token_id: (vocab - 1) as u32,
                eos_token_id: (vocab - 1) as u32,
            })
        };
        let opt = |vocab, positions, width, layers, heads, ffn, proj: Option<usize>, pre_ln| {
            ModelConfig::Opt(OptConfig {
                vocab_size: vocab,
                hidden_size: width,
                num_hidden_layers: layers,
                ffn_dim: ffn,
                max_position_embeddings: positions,
                num_attention_heads: heads,
                do_layer_norm_before: pre_ln,
                word_embed_proj_dim: Some(proj.unwrap_or(width)),
                activation_function: default_relu(),
                enable_bias: true,
                layer_norm_elementwise_affine: true,
                remove_final_layer_norm: false,
                tie_word_embeddings: true,
                pad_token_id: 1,
                bos_token_id: 2,
                eos_token_id: 2,
            })
        };
        Some(match name {
            "gpt2" => gpt2(50257, 1024, 768, 12, 12),
            "gpt2-medium" => gpt2(50257, 1024, 1024, 24, 16),
            "gpt2-large" => gpt2(50257, 1024, 1280, 36, 20),
            "gpt2-xl" => gpt2(50257, 1024, 1600, 48, 25),
            "opt-125m" => opt(50272, 2048, 768, 12, 12, 3072, None, true),
            "opt-350m" => opt(50272, 2048, 1024, 24, 16, 4096, Some(512), false),
            "opt-1.3b" => opt(50272, 2048, 2048, 24, 32, 8192, None, true),
            "opt-2.7b" => opt(50272, 2048, 2560, 32, 32, 10240, None, true),
            "opt-6.7b" => opt(50272, 2048, 4096, 32, 32, 16384, None, true),
            "tiny-gpt2" => gpt2(512, 128, 32, 2, 4),
            "small-gpt2" => gpt2(512, 256, 64, 4, 4),
            "tiny-opt" => opt(512, 128, 32, 2, 4, 64, None, true),
            "tiny-opt-post-ln" => opt(512, 128, 32, 2, 4, 64, Some(16), false),
            "small-opt" => opt(512, 256, 64, 4, 4, 256, None, true),
            _ => return None,
        })
    }

    /// Names accepted by [`ModelConfig::preset`].
    pub const PRESETS: &'static [&'static str] = &[
        "gpt2",
        "gpt2-medium",
        "gpt2-large",
        "gpt2-xl",
        "opt-125m",
        "opt-350m",
        "opt-1.3b",
        "opt-2.7b",
        "opt-6.7b",
        "tiny-gpt2",
        "small-gpt2",
        "tiny-opt",
        "tiny-opt-post-ln",
        "small-opt",
    ];
}

/// Feed-forward activations of the supported checkpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// exact erf GELU (`gelu`).
    GeluErf,
    Relu,
}

impl Activation {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Self::GeluTanh),
            "gelu" => Some(Self::GeluErf),
            "relu" => Some(Self::Relu),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_validates_and_round_trips_through_json() {
        for name in ModelConfig::PRESETS {
            let config = ModelConfig::preset(name).unwrap();
            config.validate().unwrap();
            let json = config.to_hf_json().to_string();
            let back = ModelConfig::from_json_str(&json, Path::new("mem")).unwrap();
            assert_eq!(back, config, "{name}");
        }
    }

    #[test]
    fn the_closed_form_parameter_count_equals_the_layout_sum() {
        for name in ModelConfig::PRESETS {
            let config = ModelConfig::preset(name).unwrap();
            for layers in [1, 3, 7] {
                let config = config.with_layers(layers);
                let by_layout: usize = crate::model::parameter_layout(&config)
                    .iter()
                    .map(|(_, shape, _)| shape.iter().product::<usize>())
                    .sum();
                assert_eq!(
                    crate::model::checked_parameter_count(&config),
                    Some(by_layout as u64),
                    "{name} with {layers} layers"
                );
            }
        }
    }

    #[test]
    fn absurd_dimensions_are_refused_before_anything_scales_with_them() {
        let base = ModelConfig::preset("tiny-gpt2").unwrap().to_hf_json();
        for (field, value, needle) in [
            ("n_layer", serde_json::json!(1u64 << 40), "layers"),
            ("n_layer", serde_json::json!(u64::MAX), "layers"),
            ("n_embd", serde_json::json!(u64::MAX), "width"),
            ("vocab_size", serde_json::json!(1u64 << 30), "vocab"),
            ("n_positions", serde_json::json!(1u64 << 40), "positions"),
            ("n_inner", serde_json::json!(1u64 << 40), "FFN"),
        ] {
            let mut json = base.clone();
            json[field] = value;
            let started = std::time::Instant::now();
            let err = ModelConfig::from_json_str(&json.to_string(), Path::new("c.json"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(needle) && err.contains("limit"),
                "{field}: {err}"
            );
            // No layout of the claimed size is built (that took minutes and all memory).
            assert!(started.elapsed().as_secs() < 5, "{field}");
        }
        // Every dimension within its bound, the product above the parameter limit.
        let mut json = base.clone();
        json["n_embd"] = serde_json::json!(MAX_WIDTH);
        json["n_head"] = serde_json::json!(16);
        json["n_layer"] = serde_json::json!(MAX_LAYERS);
        let err = ModelConfig::from_json_str(&json.to_string(), Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("parameters"), "{err}");
    }

    #[test]
    fn opt_350m_is_post_ln_with_projections() {
        let Some(ModelConfig::Opt(c)) = ModelConfig::preset("opt-350m") else {
            panic!("opt-350m preset")
        };
        assert!(c.has_projections() && !c.has_final_layer_norm());
    }

    #[test]
    fn unknown_model_type_names_file_and_type() {
        let err =
            ModelConfig::from_json_str(r#"{"model_type":"llama"}"#, Path::new("x/config.json"))
                .unwrap_err()
                .to_string();
        assert!(
            err.contains("x/config.json") && err.contains("llama"),
            "{err}"
        );
    }

    #[test]
    fn missing_field_is_reported_with_file() {
        let err = ModelConfig::from_json_str(r#"{"model_type":"gpt2"}"#, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("c.json") && err.contains("vocab_size"),
            "{err}"
        );
    }
}
