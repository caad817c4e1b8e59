//! Fused causal self-attention for the CPU (f32), forward and backward, without a KV cache.
//!
//! Composed from candle primitives, attention is three head-split copies, a transposed copy of
//! the keys, `batch × heads` separate small matrix products for the scores (each its own
//! thread-pool dispatch), the causal softmax, as many products again for the values, and a
//! merge copy; backward doubles all of it. For the sandbox's shapes (head width 8–16, 70
//! positions) that bookkeeping, not arithmetic, is the cost. Here one pass per sequence reads
//! q/k/v in place (also as column slices of GPT-2's packed `c_attn` output), computes each
//! query row's scores, softmax and weighted values, and writes the merged heads; backward
//! recomputes the probabilities row by row (as flash attention does) instead of storing the
//! `[batch, heads, t, t]` matrix, and writes the three gradients in one pass.
//!
//! Work is split across sequences (`par_chunks_mut` over the batch), so every thread owns a
//! disjoint output block and results do not depend on the thread count.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::{ModelError, Result};

/// `[batch, t, ·]` f32 values read in place: element `(b, i, c)` of the viewed block of
/// `width` columns is at `offset + b·batch_stride + i·row_stride + column + c`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    offset: usize,
    batch_stride: usize,
    row_stride: usize,
}

impl<'a> View<'a> {
    /// A view of a rank-3 CPU tensor whose last dimension is contiguous.
    fn new(storage: &'a CpuStorage, layout: &Layout, what: &str) -> candle_core::Result<Self> {
        let data = storage.as_slice::<f32>()?;
        let stride = layout.stride();
        if stride.len() != 3 || (stride[2] != 1 && layout.dims()[2] > 1) {
            candle_core::bail!(
                "fused attention: {what} must be [batch, t, width] with contiguous rows, got shape {:?} stride {stride:?}",
                layout.dims()
            );
        }
        Ok(Self {
            data,
            offset: layout.start_offset(),
            batch_stride: stride[0],
            row_stride: stride[1],
        })
    }

    #[inline]
    fn row(&self, b: usize, i: usize, column: usize, len: usize) -> &'a [f32] {
        let start = self.offset + b * self.batch_stride + i * self.row_stride + column;
        &self.data[start..start + len]
    }
}

/// Shape of one attention call.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    t: usize,
    width: usize,
    heads: usize,
}

impl Dims {
    fn head_dim(&self) -> usize {
        self.width / self.heads
    }
}

#[inline(always)]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// Copies head `h`'s columns of rows `0..t` of sequence `b` into `dst` `[t, d]`, or
/// transposed into `[d, t]`.
#[inline(always)]
fn gather(view: &View, b: usize, column: usize, dims: Dims, transposed: bool, dst: &mut [f32]) {
    let (t, d) = (dims.t, dims.head_dim());
    for i in 0..t {
        let row = view.row(b, i, column, d);
        if transposed {
            for (c, &x) in row.iter().enumerate() {
                dst[c * t + i] = x;
            }
        } else {
            dst[i * d..(i + 1) * d].copy_from_slice(row);
        }
    }
}

/// Softmax probabilities of query `i` over keys `0..=i` into `p[..=i]`:
/// `softmax(scale · q_i · k_j)`, from `keys_t` `[d, t]`.
#[inline(always)]
fn probabilities(q_i: &[f32], keys_t: &[f32], t: usize, i: usize, scale: f32, p: &mut [f32]) {
    let p = &mut p[..=i];
    p.fill(0.0);
    for (c, &qc) in q_i.iter().enumerate() {
        axpy(qc, &keys_t[c * t..c * t + i + 1], p);
    }
    let max = crate::fused::lane_max(p) * scale;
    for x in p.iter_mut() {
        *x = crate::fused::fast_exp(*x * scale - max);
    }
    let inv = 1.0 / crate::fused::lane_sum(p, |e| e);
    for x in p.iter_mut() {
        *x *= inv;
    }
}

/// Scratch buffers of one sequence's head.
struct Scratch {
    q: Vec<f32>,
    keys_t: Vec<f32>,
    v: Vec<f32>,
    p: Vec<f32>,
}

impl Scratch {
    fn new(dims: Dims) -> Self {
        let (t, d) = (dims.t, dims.head_dim());
        Self {
            q: vec![0.0; t * d],
            keys_t: vec![0.0; t * d],
            v: vec![0.0; t * d],
            p: vec![0.0; t],
        }
    }
}

/// Attention output `[batch, t, width]`, contiguous.
fn forward(q: View, k: View, v: View, dims: Dims, scale: f32) -> Vec<f32> {
    let (t, w) = (dims.t, dims.width);
    let mut out = vec![0f32; dims.batch * t * w];
    out.par_chunks_mut(t * w)
        .enumerate()
        .for_each(|(b, out)| forward_sequence(&q, &k, &v, dims, scale, b, out));
    out
}

crate::fused::avx2_dispatch! {
    /// One sequence's attention output `[t, width]`.
    fn forward_sequence(q: &View, k: &View, v: &View, dims: Dims, scale: f32, b: usize, out: &mut [f32])
        => forward_sequence_body
}

#[inline(always)]
fn forward_sequence_body(
    q: &View,
    k: &View,
    v: &View,
    dims: Dims,
    scale: f32,
    b: usize,
    out: &mut [f32],
) {
    let (t, w, d) = (dims.t, dims.width, dims.head_dim());
    let mut s = Scratch::new(dims);
    for h in 0..dims.heads {
        let column = h * d;
        gather(q, b, column, dims, false, &mut s.q);
        gather(k, b, column, dims, true, &mut s.keys_t);
        gather(v, b, column, dims, false, &mut s.v);
        for i in 0..t {
            probabilities(&s.q[i * d..(i + 1) * d], &s.keys_t, t, i, scale, &mut s.p);
            let o = &mut out[i * w + column..i * w + column + d];
            for (j, &pj) in s.p[..=i].iter().enumerate() {
                axpy(pj, &s.v[j * d..(j + 1) * d], o);
            }
        }
    }
}

/// Gradients `[batch, t, 3·width]` (q, k, v side by side) from the upstream gradient `dout`.
/// (Accumulating over key positions with transposed `[d, t]` gradients instead measured
/// slower at head width 16: it needs a horizontal reduction per column for `dQ`.)
fn backward(q: View, k: View, v: View, dout: View, dims: Dims, scale: f32) -> Vec<f32> {
    let (t, w) = (dims.t, dims.width);
    let mut grads = vec![0f32; dims.batch * t * 3 * w];
    grads
        .par_chunks_mut(t * 3 * w)
        .enumerate()
        .for_each(|(b, grads)| backward_sequence(&q, &k, &v, &dout, dims, scale, b, grads));
    grads
}

crate::fused::avx2_dispatch! {
    /// One sequence's gradients `[t, 3·width]`.
    fn backward_sequence(q: &View, k: &View, v: &View, dout: &View, dims: Dims, scale: f32, b: usize, grads: &mut [f32])
        => backward_sequence_body
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_sequence_body(
    q: &View,
    k: &View,
    v: &View,
    dout: &View,
    dims: Dims,
    scale: f32,
    b: usize,
    grads: &mut [f32],
) {
    let (t, w, d) = (dims.t, dims.width, dims.head_dim());
    let mut s = Scratch::new(dims);
    let mut values_t = vec![0f32; t * d];
    let mut dout_h = vec![0f32; t * d];
    let mut dp = vec![0f32; t];
    let mut dk = vec![0f32; t * d];
    let mut dv = vec![0f32; t * d];
    let mut keys = vec![0f32; t * d];
    let mut dq_i = vec![0f32; d];
    for h in 0..dims.heads {
        let column = h * d;
        gather(q, b, column, dims, false, &mut s.q);
        gather(k, b, column, dims, true, &mut s.keys_t);
        gather(v, b, column, dims, true, &mut values_t);
        gather(dout, b, column, dims, false, &mut dout_h);
        dk.fill(0.0);
        dv.fill(0.0);
        gather(k, b, column, dims, false, &mut keys);
        for i in 0..t {
            let q_i = &s.q[i * d..(i + 1) * d];
            let do_i = &dout_h[i * d..(i + 1) * d];
            probabilities(q_i, &s.keys_t, t, i, scale, &mut s.p);
            let p = &s.p[..=i];
            // dP_ij = dO_i · V_j.
            let dp = &mut dp[..=i];
            dp.fill(0.0);
            for (c, &g) in do_i.iter().enumerate() {
                axpy(g, &values_t[c * t..c * t + i + 1], dp);
            }
            // dS_ij = scale · P_ij (dP_ij − Σ_j P_ij dP_ij), in place of dP.
            let centre = crate::fused::lane_dot(p, dp);
            for (x, &pj) in dp.iter_mut().zip(p) {
                *x = scale * pj * (*x - centre);
            }
            let ds = &*dp;
            dq_i.fill(0.0);
            for j in 0..=i {
                axpy(ds[j], &keys[j * d..(j + 1) * d], &mut dq_i);
                axpy(ds[j], q_i, &mut dk[j * d..(j + 1) * d]);
                axpy(p[j], do_i, &mut dv[j * d..(j + 1) * d]);
            }
            grads[i * 3 * w + column..i * 3 * w + column + d].copy_from_slice(&dq_i);
        }
        for j in 0..t {
            let row = &mut grads[j * 3 * w..(j + 1) * 3 * w];
            row[w + column..w + column + d].copy_from_slice(&dk[j * d..(j + 1) * d]);
            row[2 * w + column..2 * w + column + d].copy_from_slice(&dv[j * d..(j + 1) * d]);
        }
    }
}

fn check_dims(
    layout: &Layout,
    width: usize,
    heads: usize,
    what: &str,
) -> candle_core::Result<Dims> {
    let (batch, t, _) = layout.shape().dims3()?;
    if heads == 0 || !width.is_multiple_of(heads) {
        candle_core::bail!(
            "fused attention: {what}: width {width} is not a multiple of {heads} heads"
        );
    }
    Ok(Dims {
        batch,
        t,
        width,
        heads,
    })
}

/// Attention over GPT-2's packed `[batch, t, 3·width]` q|k|v projection.
struct PackedAttention {
    heads: usize,
    scale: f32,
}

impl CustomOp1 for PackedAttention {
    fn name(&self) -> &'static str {
        "fused-attention-packed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let packed = l.dims()[2];
        if !packed.is_multiple_of(3) {
            candle_core::bail!("fused attention: packed width {packed} is not 3 × width");
        }
        let dims = check_dims(l, packed / 3, self.heads, "qkv")?;
        let view = View::new(s, l, "qkv")?;
        let w = dims.width;
        let (q, k, v) = (
            view,
            View {
                offset: view.offset + w,
                ..view
            },
            View {
                offset: view.offset + 2 * w,
                ..view
            },
        );
        let out = forward(q, k, v, dims, self.scale);
        Ok((CpuStorage::F32(out), Shape::from((dims.batch, dims.t, w))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = arg.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &PackedAttentionGrad {
                heads: self.heads,
                scale: self.scale,
            },
        )?;
        Ok(Some(grad))
    }
}

/// Gradient of [`PackedAttention`] with respect to its packed input, from the input and the
/// upstream gradient `[batch, t, width]`.
struct PackedAttentionGrad {
    heads: usize,
    scale: f32,
}

impl CustomOp2 for PackedAttentionGrad {
    fn name(&self) -> &'static str {
        "fused-attention-packed-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = check_dims(l1, l1.dims()[2] / 3, self.heads, "qkv")?;
        if l2.dims() != [dims.batch, dims.t, dims.width] {
            candle_core::bail!("fused attention: gradient of shape {:?}", l2.dims());
        }
        let view = View::new(s1, l1, "qkv")?;
        let dout = View::new(s2, l2, "gradient")?;
        let w = dims.width;
        let k = View {
            offset: view.offset + w,
            ..view
        };
        let v = View {
            offset: view.offset + 2 * w,
            ..view
        };
        let grads = backward(view, k, v, dout, dims, self.scale);
        Ok((CpuStorage::F32(grads), l1.shape().clone()))
    }
}

/// Attention over separate q, k, v projections (OPT).
struct SplitAttention {
    heads: usize,
    scale: f32,
}

impl CustomOp3 for SplitAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = check_dims(l1, l1.dims()[2], self.heads, "q")?;
        if l2.dims() != l1.dims() || l3.dims() != l1.dims() {
            candle_core::bail!(
                "fused attention: q {:?}, k {:?}, v {:?} differ",
                l1.dims(),
                l2.dims(),
                l3.dims()
            );
        }
        let out = forward(
            View::new(s1, l1, "q")?,
            View::new(s2, l2, "k")?,
            View::new(s3, l3, "v")?,
            dims,
            self.scale,
        );
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let width = q.dim(2)?;
        let packed = Tensor::cat(&[q, k, v], 2)?;
        let grads = packed.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &PackedAttentionGrad {
                heads: self.heads,
                scale: self.scale,
            },
        )?;
        Ok((
            Some(grads.narrow(2, 0, width)?),
            Some(grads.narrow(2, width, width)?),
            Some(grads.narrow(2, 2 * width, width)?),
        ))
    }
}

fn validated_scale(scale: f64) -> Result<f32> {
    if scale > 0.0 && scale.is_finite() {
        Ok(scale as f32)
    } else {
        Err(ModelError::InvalidInput(format!(
            "attention scale must be positive, got {scale}"
        )))
    }
}

/// Causal self-attention of a packed `[batch, t, 3·width]` q|k|v tensor (f32, CPU),
/// differentiable: `[batch, t, width]` with the heads merged.
pub fn packed_causal_attention(qkv: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let scale = validated_scale(scale)?;
    Ok(qkv.apply_op1(PackedAttention { heads, scale })?)
}

/// Causal self-attention of separate `[batch, t, width]` q, k, v (f32, CPU), differentiable.
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let scale = validated_scale(scale)?;
    Ok(q.apply_op3(k, v, SplitAttention { heads, scale })?)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::fused::tests::{assert_same_values_and_gradients, random_var};
    use crate::layers::{causal_mask, softmax_last_dim};

    /// Attention from differentiable candle primitives (the path other devices take).
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Tensor {
        let (batch, t, width) = q.dims3().unwrap();
        let split = |x: &Tensor| {
            x.reshape((batch, t, heads, width / heads))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (split(q), split(k), split(v));
        let scores = (q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap() * scale).unwrap();
        let mask = causal_mask(0, t, scores.dtype(), &Device::Cpu).unwrap();
        let probs = softmax_last_dim(&scores.broadcast_add(&mask).unwrap()).unwrap();
        probs
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((batch, t, width))
            .unwrap()
    }

    #[test]
    fn packed_attention_matches_composed_values_and_gradients() {
        for (batch, t, width, heads) in
            [(3, 11, 16, 2), (2, 70, 64, 4), (1, 1, 12, 4), (2, 9, 48, 4)]
        {
            let qkv = random_var(&[batch, t, 3 * width], 0.0, 1.5);
            let scale = 1.0 / ((width / heads) as f64).sqrt();
            let fused = packed_causal_attention(qkv.as_tensor(), heads, scale).unwrap();
            let x = qkv.as_tensor();
            let reference = composed(
                &x.narrow(2, 0, width).unwrap(),
                &x.narrow(2, width, width).unwrap(),
                &x.narrow(2, 2 * width, width).unwrap(),
                heads,
                scale,
            );
            assert_same_values_and_gradients(fused, reference, &[&qkv], 1e-5, 1e-4);
        }
    }

    #[test]
    fn split_attention_matches_composed_values_and_gradients_on_strided_inputs() {
        let (batch, t, width, heads) = (3, 13, 24, 3);
        let (q, k) = (
            random_var(&[batch, t, width], 0.0, 1.0),
            random_var(&[batch, t, width], 0.0, 1.0),
        );
        // v as a column slice of a wider tensor: read in place, not copied.
        let wide = random_var(&[batch, t, 2 * width], 0.0, 1.0);
        let v = wide.as_tensor().narrow(2, width, width).unwrap();
        let fused = causal_attention(q.as_tensor(), k.as_tensor(), &v, heads, 0.4).unwrap();
        let reference = composed(q.as_tensor(), k.as_tensor(), &v, heads, 0.4);
        assert_same_values_and_gradients(fused, reference, &[&q, &k, &wide], 1e-5, 1e-4);
    }

    #[test]
    fn a_query_ignores_later_positions() {
        let qkv = Tensor::randn(0f32, 1.0, (1, 8, 3 * 8), &Device::Cpu).unwrap();
        let out = packed_causal_attention(&qkv, 2, 0.5).unwrap();
        // Changing the last position's q/k/v leaves every earlier output unchanged.
        let tail = Tensor::randn(0f32, 1.0, (1, 1, 3 * 8), &Device::Cpu).unwrap();
        let changed = Tensor::cat(&[&qkv.narrow(1, 0, 7).unwrap(), &tail], 1).unwrap();
        let out2 = packed_causal_attention(&changed, 2, 0.5).unwrap();
        let a: Vec<f32> = out
            .narrow(1, 0, 7)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = out2
            .narrow(1, 0, 7)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn bad_shapes_and_scales_are_errors() {
        let qkv = Tensor::zeros((1, 4, 3 * 10), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(packed_causal_attention(&qkv, 3, 1.0).is_err());
        assert!(packed_causal_attention(&qkv, 2, 0.0).is_err());
        assert!(packed_causal_attention(&qkv, 2, f64::NAN).is_err());
    }
}
