//! Building blocks shared by GPT-2 and OPT, written only with ops that candle can
//! differentiate. candle's fused `LayerNorm`, `ops::layer_norm` and `ops::softmax_last_dim` have
//! no backward pass and would silently drop gradients, so they are not used anywhere here. On
//! the CPU in f32, LayerNorm, bias add, tanh GELU and the attention softmax take this crate's
//! own fused kernels ([`crate::fused`]), which do have a backward pass.

use candle_core::{D, DType, Device, Tensor};

use crate::config::Activation;
use crate::error::Result;
use crate::fused::{causal_softmax, fused_applies, gelu_tanh, layer_norm};
use crate::fused_affine::{WeightLayout, affine};
use crate::fused_attention::QueryRows;

/// LayerNorm over the last dimension: `(x - mean) / sqrt(var + eps) * weight + bias`, with the
/// biased variance, as `torch.nn.LayerNorm`.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if fused_applies(x) {
            return layer_norm(x, &self.weight, &self.bias, self.eps);
        }
        self.forward_composed(x)
    }

    /// The same from candle primitives (any device and dtype).
    pub fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let variance = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normalised = centered.broadcast_div(&(variance + self.eps)?.sqrt()?)?;
        Ok(normalised
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?)
    }
}

/// An affine map whose weight is stored `[in, out]` (GPT-2's `Conv1D`) or `[out, in]`
/// (`torch.nn.Linear`, OPT). Applies to `[..., in]` inputs.
#[derive(Debug, Clone)]
pub struct Affine {
    weight: Tensor,
    bias: Option<Tensor>,
    weight_is_in_out: bool,
}

impl Affine {
    /// `torch.nn.Linear` layout: weight `[out, in]`.
    pub fn linear(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            weight_is_in_out: false,
        }
    }

    /// GPT-2 `Conv1D` layout: weight `[in, out]`.
    pub fn conv1d(weight: Tensor, bias: Tensor) -> Self {
        Self {
            weight,
            bias: Some(bias),
            weight_is_in_out: true,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(bias) = &self.bias
            && fused_applies(x)
        {
            let layout = if self.weight_is_in_out {
                WeightLayout::InOut
            } else {
                WeightLayout::OutIn
            };
            return affine(x, &self.weight, bias, layout);
        }
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows = x.elem_count() / in_dim.max(1);
        let x2 = x.reshape((rows, in_dim))?;
        let y = if self.weight_is_in_out {
            x2.matmul(&self.weight)?
        } else {
            x2.matmul(&self.weight.t()?)?
        };
        // A bias on the CPU in f32 took the fused op above.
        let y = match &self.bias {
            Some(bias) => y.broadcast_add(bias)?,
            None => y,
        };
        let out_dim = y.dim(1)?;
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = out_dim;
        Ok(y.reshape(out_dims)?)
    }
}

/// Row lookup into an embedding matrix `[n, d]` for ids of any shape.
pub fn embed(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let mut dims = ids.dims().to_vec();
    let flat = ids.flatten_all()?;
    let rows = table.index_select(&flat, 0)?;
    dims.push(table.dim(1)?);
    Ok(rows.reshape(dims)?)
}

pub fn activate(x: &Tensor, activation: Activation) -> Result<Tensor> {
    Ok(match activation {
        Activation::GeluTanh if fused_applies(x) => gelu_tanh(x)?,
        Activation::GeluTanh => x.gelu()?,
        Activation::GeluErf => x.gelu_erf()?,
        Activation::Relu => x.relu()?,
    })
}

/// Softmax over the last dimension from differentiable primitives. The max is detached: the
/// result does not depend on it, and this keeps it out of the graph.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let exp = x.broadcast_sub(&max)?.exp()?;
    Ok(exp.broadcast_div(&exp.sum_keepdim(D::Minus1)?)?)
}

/// Additive causal mask `[new, past + new]`: 0 where query `i` (at absolute position
/// `past + i`) may attend key `j`, -inf elsewhere.
pub fn causal_mask(past: usize, new: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let total = past + new;
    let values: Vec<f32> = (0..new)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j <= past + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(values, (new, total), device)?.to_dtype(dtype)?)
}

/// Key/value tensors of one layer kept between decoding steps, `[batch, heads, seq, head_dim]`.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    pub keys: Option<Tensor>,
    pub values: Option<Tensor>,
}

/// Scaled dot-product attention with a causal mask; q/k/v are `[b, t, width]` and are split
/// into heads here. With a cache, new keys/values are appended and attend over the past.
/// `spans` (per sequence, no cache) names the query rows the caller reads: the fused CPU
/// kernel computes only those, the composed ops all of them.
pub fn causal_self_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    cache: Option<&mut LayerCache>,
    spans: Option<&[QueryRows]>,
) -> Result<Tensor> {
    if cache.is_none() && fused_applies(q) {
        return crate::fused_attention::causal_attention(q, k, v, heads, scale, spans);
    }
    let (batch, new, width) = q.dims3()?;
    let head_dim = width / heads;
    let split = |x: &Tensor| -> Result<Tensor> {
        Ok(x.reshape((batch, new, heads, head_dim))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let (q, mut k, mut v) = (split(q)?, split(k)?, split(v)?);
    let mut past = 0;
    if let Some(cache) = cache {
        if let (Some(pk), Some(pv)) = (&cache.keys, &cache.values) {
            past = pk.dim(2)?;
            k = Tensor::cat(&[pk, &k], 2)?;
            v = Tensor::cat(&[pv, &v], 2)?;
        }
        cache.keys = Some(k.clone());
        cache.values = Some(v.clone());
    }
    let raw_scores = q.matmul(&k.t()?.contiguous()?)?;
    let probs = if fused_applies(&raw_scores) {
        causal_softmax(&raw_scores, scale)?
    } else {
        let scores = (raw_scores * scale)?;
        let mask = causal_mask(past, new, scores.dtype(), scores.device())?;
        softmax_last_dim(&scores.broadcast_add(&mask)?)?
    };
    let out = probs.matmul(&v)?;
    Ok(out.transpose(1, 2)?.reshape((batch, new, width))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_matches_hand_computation() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1f32, 2., 3., 6.]], &dev).unwrap();
        let ln = LayerNorm::new(
            Tensor::new(&[1f32, 2., 1., 1.], &dev).unwrap(),
            Tensor::new(&[0f32, 0., 1., 0.], &dev).unwrap(),
            1e-5,
        );
        let y = ln.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        // mean 3, biased variance (4+1+0+9)/4 = 3.5
        let s = (3.5f32 + 1e-5).sqrt();
        // gain 2 on the second element, bias 1 on the third
        let expected = [-2.0 / s, -2.0 / s, 1.0, 3.0 / s];
        for (a, b) in y[0].iter().zip(expected) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn softmax_rows_sum_to_one_and_respect_the_mask() {
        let dev = Device::Cpu;
        let scores = Tensor::new(&[[0.5f32, 2.0, -1.0], [3.0, 1.0, 0.0]], &dev).unwrap();
        let mask = causal_mask(1, 2, DType::F32, &dev).unwrap();
        let probs = softmax_last_dim(&scores.broadcast_add(&mask).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(probs[0][2], 0.0);
        assert!((probs[0].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((probs[1].iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn conv1d_and_linear_layouts_agree_on_transposed_weights() {
        let dev = Device::Cpu;
        let w_out_in = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &dev).unwrap();
        let bias = Tensor::new(&[0.1f32, 0.2, 0.3], &dev).unwrap();
        let x = Tensor::new(&[[[1f32, -1.]]], &dev).unwrap();
        let a = Affine::linear(w_out_in.clone(), Some(bias.clone()))
            .forward(&x)
            .unwrap();
        let b = Affine::conv1d(w_out_in.t().unwrap().contiguous().unwrap(), bias)
            .forward(&x)
            .unwrap();
        assert_eq!(a.to_vec3::<f32>().unwrap(), b.to_vec3::<f32>().unwrap());
        assert_eq!(a.dims(), &[1, 1, 3]);
    }
}
