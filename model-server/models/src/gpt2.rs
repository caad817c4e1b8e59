//! GPT-2 (Radford et al. 2019) as in HF `GPT2Model`: learned positions, pre-LayerNorm blocks,
//! fused QKV `Conv1D` projections stored `[in, out]`, tanh-GELU MLP, final `ln_f`.
//! Tensor names mirror HF without the `transformer.` prefix.

use candle_core::Tensor;

use crate::config::{Activation, Gpt2Config};
use crate::error::{ModelError, Result};
use crate::fused::fused_applies;
use crate::fused_attention::packed_causal_attention;
use crate::layers::{Affine, LayerCache, LayerNorm, activate, causal_self_attention, embed};
use crate::packed::PackedSequences;
use crate::weights::{Init, Weights};

#[derive(Debug, Clone)]
struct Block {
    ln_1: LayerNorm,
    c_attn: Affine,
    attn_c_proj: Affine,
    ln_2: LayerNorm,
    c_fc: Affine,
    mlp_c_proj: Affine,
    attn_scale: f64,
}

/// The GPT-2 transformer body.
#[derive(Debug, Clone)]
pub struct Gpt2 {
    config: Gpt2Config,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    activation: Activation,
}

fn inner_dim(config: &Gpt2Config) -> usize {
    config.n_inner.unwrap_or(4 * config.n_embd)
}

/// Names, shapes and initialisers of every GPT-2 parameter (HF `_init_weights`, including the
/// 1/sqrt(2 * n_layer) scaling of residual projections).
pub fn layout(config: &Gpt2Config) -> Vec<(String, Vec<usize>, Init)> {
    let d = config.n_embd;
    let inner = inner_dim(config);
    let std = 0.02f32;
    let residual_std = std / (2.0 * config.n_layer as f32).sqrt();
    let mut out = vec![
        (
            "wte.weight".to_string(),
            vec![config.vocab_size, d],
            Init::Normal(std),
        ),
        (
            "wpe.weight".to_string(),
            vec![config.n_positions, d],
            Init::Normal(std),
        ),
    ];
    let norm = |out: &mut Vec<(String, Vec<usize>, Init)>, prefix: String| {
        out.push((format!("{prefix}.weight"), vec![d], Init::Ones));
        out.push((format!("{prefix}.bias"), vec![d], Init::Zeros));
    };
    for i in 0..config.n_layer {
        let p = format!("h.{i}");
        norm(&mut out, format!("{p}.ln_1"));
        out.push((
            format!("{p}.attn.c_attn.weight"),
            vec![d, 3 * d],
            Init::Normal(std),
        ));
        out.push((format!("{p}.attn.c_attn.bias"), vec![3 * d], Init::Zeros));
        out.push((
            format!("{p}.attn.c_proj.weight"),
            vec![d, d],
            Init::Normal(residual_std),
        ));
        out.push((format!("{p}.attn.c_proj.bias"), vec![d], Init::Zeros));
        norm(&mut out, format!("{p}.ln_2"));
        out.push((
            format!("{p}.mlp.c_fc.weight"),
            vec![d, inner],
            Init::Normal(std),
        ));
        out.push((format!("{p}.mlp.c_fc.bias"), vec![inner], Init::Zeros));
        out.push((
            format!("{p}.mlp.c_proj.weight"),
            vec![inner, d],
            Init::Normal(residual_std),
        ));
        out.push((format!("{p}.mlp.c_proj.bias"), vec![d], Init::Zeros));
    }
    norm(&mut out, "ln_f".to_string());
    out
}

impl Gpt2 {
    pub fn load(config: &Gpt2Config, weights: &Weights) -> Result<Self> {
        let d = config.n_embd;
        let inner = inner_dim(config);
        let eps = config.layer_norm_epsilon;
        let norm = |prefix: &str| -> Result<LayerNorm> {
            Ok(LayerNorm::new(
                weights.get(&format!("{prefix}.weight"), &[d])?,
                weights.get(&format!("{prefix}.bias"), &[d])?,
                eps,
            ))
        };
        let conv = |prefix: &str, n_in: usize, n_out: usize| -> Result<Affine> {
            Ok(Affine::conv1d(
                weights.get(&format!("{prefix}.weight"), &[n_in, n_out])?,
                weights.get(&format!("{prefix}.bias"), &[n_out])?,
            ))
        };
        let head_dim = d / config.n_head;
        let mut blocks = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let p = format!("h.{i}");
            let mut attn_scale = 1.0;
            if config.scale_attn_weights {
                attn_scale /= (head_dim as f64).sqrt();
            }
            if config.scale_attn_by_inverse_layer_idx {
                attn_scale /= (i + 1) as f64;
            }
            blocks.push(Block {
                ln_1: norm(&format!("{p}.ln_1"))?,
                c_attn: conv(&format!("{p}.attn.c_attn"), d, 3 * d)?,
                attn_c_proj: conv(&format!("{p}.attn.c_proj"), d, d)?,
                ln_2: norm(&format!("{p}.ln_2"))?,
                c_fc: conv(&format!("{p}.mlp.c_fc"), d, inner)?,
                mlp_c_proj: conv(&format!("{p}.mlp.c_proj"), inner, d)?,
                attn_scale,
            });
        }
        let activation = Activation::parse(&config.activation_function).ok_or_else(|| {
            ModelError::InvalidConfig(format!(
                "unsupported activation_function `{}`",
                config.activation_function
            ))
        })?;
        Ok(Self {
            config: config.clone(),
            wte: weights.get("wte.weight", &[config.vocab_size, d])?,
            wpe: weights.get("wpe.weight", &[config.n_positions, d])?,
            blocks,
            ln_f: norm("ln_f")?,
            activation,
        })
    }

    /// Token embedding matrix `[vocab, n_embd]` (the tied LM head).
    pub fn token_embeddings(&self) -> &Tensor {
        &self.wte
    }

    /// Final hidden states `[b, t, n_embd]` (after `ln_f`) for ids `[b, t]` at positions
    /// `past..past + t`.
    pub fn forward(
        &self,
        ids: &Tensor,
        past: usize,
        mut caches: Option<&mut [LayerCache]>,
    ) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let positions = Tensor::arange(past as u32, (past + t) as u32, ids.device())?;
        let d = self.config.n_embd;
        let heads = self.config.n_head;
        self.run_blocks(ids, &positions, |i, scale, qkv| {
            let cache = caches.as_deref_mut().map(|c| &mut c[i]);
            if cache.is_none() && fused_applies(qkv) {
                return packed_causal_attention(qkv, heads, scale, None);
            }
            let q = qkv.narrow(2, 0, d)?;
            let k = qkv.narrow(2, d, d)?;
            let v = qkv.narrow(2, 2 * d, d)?;
            causal_self_attention(&q, &k, &v, heads, scale, cache, None)
        })
    }

    /// Final hidden states `[1, n, n_embd]` of packed rows (see [`PackedSequences`]).
    pub fn forward_packed(&self, packed: &PackedSequences) -> Result<Tensor> {
        let d = self.config.n_embd;
        let heads = self.config.n_head;
        self.run_blocks(packed.ids(), &packed.position_ids(0)?, |_, scale, qkv| {
            let qkv = packed.to_sequences(qkv)?;
            let out = if fused_applies(&qkv) {
                packed_causal_attention(&qkv, heads, scale, Some(packed.query_rows()))?
            } else {
                let q = qkv.narrow(2, 0, d)?;
                let k = qkv.narrow(2, d, d)?;
                let v = qkv.narrow(2, 2 * d, d)?;
                causal_self_attention(&q, &k, &v, heads, scale, None, None)?
            };
            packed.from_sequences(&out)
        })
    }

    /// Embeddings, the blocks and `ln_f`; `attend(layer, scale, qkv)` maps the packed
    /// projections `[.., 3·n_embd]` to the merged heads `[.., n_embd]`.
    fn run_blocks(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mut attend: impl FnMut(usize, f64, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut h = embed(&self.wte, ids)?.broadcast_add(&embed(&self.wpe, positions)?)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let x = block.ln_1.forward(&h)?;
            let qkv = block.c_attn.forward(&x)?;
            let attn = attend(i, block.attn_scale, &qkv)?;
            h = (h + block.attn_c_proj.forward(&attn)?)?;
            let x = block.ln_2.forward(&h)?;
            let x = activate(&block.c_fc.forward(&x)?, self.activation)?;
            h = (h + block.mlp_c_proj.forward(&x)?)?;
        }
        self.ln_f.forward(&h)
    }

    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }
}
