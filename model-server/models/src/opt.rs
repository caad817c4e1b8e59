//! OPT (Zhang et al. 2022) as in HF `OPTDecoder`: learned positions offset by 2, separate
//! q/k/v/out projections, ReLU MLP (`fc1`/`fc2`), pre-LayerNorm for most sizes and
//! post-LayerNorm with `project_in`/`project_out` (`word_embed_proj_dim != hidden_size`) for
//! opt-350m. Tensor names mirror HF without the `model.` prefix.

use candle_core::Tensor;

use crate::config::{Activation, OptConfig};
use crate::error::{ModelError, Result};
use crate::layers::{Affine, LayerCache, LayerNorm, activate, causal_self_attention, embed};
use crate::packed::PackedSequences;
use crate::weights::{Init, Weights};

/// HF OPT's learned position table has two extra rows at the front.
const POSITION_OFFSET: usize = 2;
const LAYER_NORM_EPS: f64 = 1e-5;

#[derive(Debug, Clone)]
struct Layer {
    q_proj: Affine,
    k_proj: Affine,
    v_proj: Affine,
    out_proj: Affine,
    self_attn_layer_norm: LayerNorm,
    fc1: Affine,
    fc2: Affine,
    final_layer_norm: LayerNorm,
}

/// The OPT decoder body.
#[derive(Debug, Clone)]
pub struct Opt {
    config: OptConfig,
    embed_tokens: Tensor,
    embed_positions: Tensor,
    project_in: Option<Affine>,
    project_out: Option<Affine>,
    layers: Vec<Layer>,
    final_layer_norm: Option<LayerNorm>,
    activation: Activation,
}

/// Names, shapes and initialisers of every OPT parameter (normal(0, 0.02) as HF `_init_weights`).
pub fn layout(config: &OptConfig) -> Vec<(String, Vec<usize>, Init)> {
    let d = config.hidden_size;
    let e = config.embed_dim();
    let f = config.ffn_dim;
    let std = Init::Normal(0.02);
    let mut out = vec![
        (
            "decoder.embed_tokens.weight".to_string(),
            vec![config.vocab_size, e],
            std,
        ),
        (
            "decoder.embed_positions.weight".to_string(),
            vec![config.max_position_embeddings + POSITION_OFFSET, d],
            std,
        ),
    ];
    if config.has_projections() {
        out.push(("decoder.project_in.weight".to_string(), vec![d, e], std));
        out.push(("decoder.project_out.weight".to_string(), vec![e, d], std));
    }
    let norm = |out: &mut Vec<(String, Vec<usize>, Init)>, prefix: String| {
        out.push((format!("{prefix}.weight"), vec![d], Init::Ones));
        out.push((format!("{prefix}.bias"), vec![d], Init::Zeros));
    };
    if config.has_final_layer_norm() {
        norm(&mut out, "decoder.final_layer_norm".to_string());
    }
    for i in 0..config.num_hidden_layers {
        let p = format!("decoder.layers.{i}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            out.push((format!("{p}.self_attn.{proj}.weight"), vec![d, d], std));
            out.push((format!("{p}.self_attn.{proj}.bias"), vec![d], Init::Zeros));
        }
        norm(&mut out, format!("{p}.self_attn_layer_norm"));
        out.push((format!("{p}.fc1.weight"), vec![f, d], std));
        out.push((format!("{p}.fc1.bias"), vec![f], Init::Zeros));
        out.push((format!("{p}.fc2.weight"), vec![d, f], std));
        out.push((format!("{p}.fc2.bias"), vec![d], Init::Zeros));
        norm(&mut out, format!("{p}.final_layer_norm"));
    }
    out
}

impl Opt {
    pub fn load(config: &OptConfig, weights: &Weights) -> Result<Self> {
        let d = config.hidden_size;
        let e = config.embed_dim();
        let f = config.ffn_dim;
        let norm = |prefix: &str| -> Result<LayerNorm> {
            Ok(LayerNorm::new(
                weights.get(&format!("{prefix}.weight"), &[d])?,
                weights.get(&format!("{prefix}.bias"), &[d])?,
                LAYER_NORM_EPS,
            ))
        };
        let linear = |prefix: &str, n_in: usize, n_out: usize| -> Result<Affine> {
            Ok(Affine::linear(
                weights.get(&format!("{prefix}.weight"), &[n_out, n_in])?,
                Some(weights.get(&format!("{prefix}.bias"), &[n_out])?),
            ))
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("decoder.layers.{i}");
            layers.push(Layer {
                q_proj: linear(&format!("{p}.self_attn.q_proj"), d, d)?,
                k_proj: linear(&format!("{p}.self_attn.k_proj"), d, d)?,
                v_proj: linear(&format!("{p}.self_attn.v_proj"), d, d)?,
                out_proj: linear(&format!("{p}.self_attn.out_proj"), d, d)?,
                self_attn_layer_norm: norm(&format!("{p}.self_attn_layer_norm"))?,
                fc1: linear(&format!("{p}.fc1"), d, f)?,
                fc2: linear(&format!("{p}.fc2"), f, d)?,
                final_layer_norm: norm(&format!("{p}.final_layer_norm"))?,
            });
        }
        let (project_in, project_out) = if config.has_projections() {
            (
                Some(Affine::linear(
                    weights.get("decoder.project_in.weight", &[d, e])?,
                    None,
                )),
                Some(Affine::linear(
                    weights.get("decoder.project_out.weight", &[e, d])?,
                    None,
                )),
            )
        } else {
            (None, None)
        };
        let final_layer_norm = if config.has_final_layer_norm() {
            Some(norm("decoder.final_layer_norm")?)
        } else {
            None
        };
        let activation = Activation::parse(&config.activation_function).ok_or_else(|| {
            ModelError::InvalidConfig(format!(
                "unsupported activation_function `{}`",
                config.activation_function
            ))
        })?;
        Ok(Self {
            config: config.clone(),
            embed_tokens: weights.get("decoder.embed_tokens.weight", &[config.vocab_size, e])?,
            embed_positions: weights.get(
                "decoder.embed_positions.weight",
                &[config.max_position_embeddings + POSITION_OFFSET, d],
            )?,
            project_in,
            project_out,
            layers,
            final_layer_norm,
            activation,
        })
    }

    /// Token embedding matrix `[vocab, word_embed_proj_dim]` (the tied LM head).
    pub fn token_embeddings(&self) -> &Tensor {
        &self.embed_tokens
    }

    /// Final hidden states `[b, t, word_embed_proj_dim]` (after the final LayerNorm and
    /// `project_out` when present) for ids `[b, t]` at positions `past..past + t`. Batches are
    /// right-padded, so HF's mask-derived positions equal these for every real token.
    pub fn forward(
        &self,
        ids: &Tensor,
        past: usize,
        mut caches: Option<&mut [LayerCache]>,
    ) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let positions = Tensor::arange(
            (past + POSITION_OFFSET) as u32,
            (past + t + POSITION_OFFSET) as u32,
            ids.device(),
        )?;
        let heads = self.config.num_attention_heads;
        self.run_layers(ids, &positions, |i, scale, q, k, v| {
            let cache = caches.as_deref_mut().map(|c| &mut c[i]);
            causal_self_attention(q, k, v, heads, scale, cache, None)
        })
    }

    /// Final hidden states `[1, n, word_embed_proj_dim]` of packed rows (see
    /// [`PackedSequences`]).
    pub fn forward_packed(&self, packed: &PackedSequences) -> Result<Tensor> {
        let heads = self.config.num_attention_heads;
        let positions = packed.position_ids(POSITION_OFFSET as u32)?;
        self.run_layers(packed.ids(), &positions, |_, scale, q, k, v| {
            let out = causal_self_attention(
                &packed.to_sequences(q)?,
                &packed.to_sequences(k)?,
                &packed.to_sequences(v)?,
                heads,
                scale,
                None,
                Some(packed.query_rows()),
            )?;
            packed.from_sequences(&out)
        })
    }

    /// Embeddings, the decoder layers, the final LayerNorm and `project_out`;
    /// `attend(layer, scale, q, k, v)` returns the merged heads.
    fn run_layers(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        mut attend: impl FnMut(usize, f64, &Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut tokens = embed(&self.embed_tokens, ids)?;
        if let Some(project_in) = &self.project_in {
            tokens = project_in.forward(&tokens)?;
        }
        let mut h = tokens.broadcast_add(&embed(&self.embed_positions, positions)?)?;
        let pre_ln = self.config.do_layer_norm_before;
        let heads = self.config.num_attention_heads;
        let scale = 1.0 / ((self.config.hidden_size / heads) as f64).sqrt();
        for (i, layer) in self.layers.iter().enumerate() {
            let residual = h.clone();
            let mut x = if pre_ln {
                layer.self_attn_layer_norm.forward(&h)?
            } else {
                h.clone()
            };
            let q = layer.q_proj.forward(&x)?;
            let k = layer.k_proj.forward(&x)?;
            let v = layer.v_proj.forward(&x)?;
            x = layer.out_proj.forward(&attend(i, scale, &q, &k, &v)?)?;
            h = (residual + x)?;
            if !pre_ln {
                h = layer.self_attn_layer_norm.forward(&h)?;
            }
            let residual = h.clone();
            let mut x = if pre_ln {
                layer.final_layer_norm.forward(&h)?
            } else {
                h.clone()
            };
            x = layer
                .fc2
                .forward(&activate(&layer.fc1.forward(&x)?, self.activation)?)?;
            h = (residual + x)?;
            if !pre_ln {
                h = layer.final_layer_norm.forward(&h)?;
            }
        }
        if let Some(norm) = &self.final_layer_norm {
            h = norm.forward(&h)?;
        }
        if let Some(project_out) = &self.project_out {
            h = project_out.forward(&h)?;
        }
        Ok(h)
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
}
