//! Fused CPU kernels, with their backward passes, for the ops that dominate small models: the
//! vocabulary log-softmax gathered at the target token, the causal softmax of attention scores,
//! GPT-2's tanh GELU, LayerNorm and bias addition (whose broadcast backward candle reduces
//! element by element). Composed from candle primitives, each is 5–8 ops forward and more backward,
//! every one a full pass over (and a fresh allocation of) a tensor that for small widths is
//! 10–25× larger than the hidden states. Here each is one pass forward and one backward.
//!
//! Only f32 on the CPU takes these kernels; other devices and dtypes use the composed
//! primitives (see [`crate::layers`] and [`crate::model`]), so results agree to float rounding.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use crate::error::Result;

/// Whether the fused kernels apply to `t`: f32 on the CPU, and not empty (the kernels chunk
/// by the last dimension, which must not be 0; empty tensors take the composed path).
pub fn fused_applies(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && t.elem_count() > 0
}

/// The contiguous values of a CPU tensor of element type `T` (f32 data, u32 targets).
pub(crate) fn contiguous<'a, T: WithDType>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    let values = storage.as_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&values[start..end]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

/// `e^x` to about 1 ulp on `[-87, 88]` (0 below), written so loops over it vectorise; glibc's
/// `expf` is a call per element and was the largest single cost of these kernels.
#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer with plain SSE2.
    const ROUNDER: f32 = 12_582_912.0;
    let clamped = x.clamp(-87.0, 88.0);
    let shifted = clamped * LOG2_E + ROUNDER;
    let n = shifted - ROUNDER;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    // Taylor series of e^r to degree 7 on |r| ≤ ln2/2: truncation error below 1e-8 relative.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // The low bits of `shifted` hold n (|n| ≤ 127): adding the bias and shifting into the
    // exponent field builds 2^n with integer ops only (`n as i32` does not vectorise).
    let scale = f32::from_bits(shifted.to_bits().wrapping_add(127) << 23);
    // Below the clamp the result is 0, via a bit mask: a branch here stops vectorisation.
    // NaN is kept, so a NaN input stays NaN and reaches the non-finite checks.
    let keep = ((x >= -87.0 || x.is_nan()) as u32).wrapping_neg();
    f32::from_bits((p * scale).to_bits() & keep)
}

/// `tanh(x)` as `1 − 2 / (e^{2x} + 1)`, odd-symmetrised: absolute error about 1e-7.
#[inline(always)]
fn fast_tanh(x: f32) -> f32 {
    // Not `min`: it would turn NaN into 15.
    let a = if x.abs() > 15.0 { 15.0 } else { x.abs() };
    let t = 1.0 - 2.0 / (fast_exp(2.0 * a) + 1.0);
    t.copysign(x)
}

/// Defines `$name(args)` that runs `$body(args)` compiled for AVX2 + FMA when the CPU has them
/// (then the kernels' loops run 8 lanes wide; the x86-64 baseline has 4-lane SSE2), and the
/// baseline build otherwise. `$body` and everything it calls must be `#[inline(always)]` so
/// that it is compiled into the AVX2 copy.
macro_rules! avx2_dispatch {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) => $body:ident) => {
        $(#[$doc])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn avx2($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use avx2_dispatch;

/// Rows per parallel task: enough work to amortise the hand-off.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).max(1)
}

/// Independent accumulators per reduction: float reductions do not vectorise on their own
/// (addition order is fixed), lane-wise updates of a small array do.
const LANES: usize = 8;

/// Largest element (NaNs are skipped, as by `f32::max`).
#[inline(always)]
pub(crate) fn lane_max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a = if x > *a { x } else { *a };
        }
    }
    acc.iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// `Σ f(x)` over a slice.
#[inline(always)]
pub(crate) fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for chunk in chunks {
        for (a, &x) in acc.iter_mut().zip(chunk) {
            *a += f(x);
        }
    }
    acc.iter().sum::<f32>() + rest.iter().map(|&x| f(x)).sum::<f32>()
}

/// `Σ a·b` over two slices of equal length.
#[inline(always)]
pub(crate) fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (xa, xb) in ca.zip(cb) {
        for ((acc, &x), &y) in acc.iter_mut().zip(xa).zip(xb) {
            *acc += x * y;
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// `max` and `log(sum(exp(x - max)))` of one row.
#[inline(always)]
fn row_log_normaliser(row: &[f32]) -> (f32, f32) {
    let max = lane_max(row);
    (max, lane_sum(row, |x| fast_exp(x - max)).ln())
}

/// `log_softmax(logits)[n, targets[n]]` for logits `[N, V]` and targets `[N]`.
struct TargetLogprob;

impl CustomOp2 for TargetLogprob {
    fn name(&self) -> &'static str {
        "target-logprob"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, vocab) = l1.shape().dims2()?;
        let logits = contiguous::<f32>(s1, l1, "logits")?;
        let targets = contiguous::<u32>(s2, l2, "targets")?;
        if targets.len() != rows {
            candle_core::bail!("{} targets for {rows} rows of logits", targets.len());
        }
        if let Some(bad) = targets.iter().find(|&&t| t as usize >= vocab) {
            candle_core::bail!("target token {bad} outside the vocabulary of {vocab}");
        }
        let chunk = rows_per_task(vocab);
        let mut out = vec![0f32; rows];
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(task, out_rows)| {
                let rows = task * chunk..task * chunk + out_rows.len();
                target_logprob_rows(
                    &logits[rows.start * vocab..rows.end * vocab],
                    &targets[rows],
                    out_rows,
                );
            });
        Ok((CpuStorage::F32(out), Shape::from(rows)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // The forward result gives each row's normaliser back: x[t] − res = max + log Σ exp.
        let upstream = Tensor::stack(&[grad_res.contiguous()?, res.contiguous()?], 1)?;
        let grad = logits.apply_op3_no_bwd(targets, &upstream, &TargetLogprobGrad)?;
        Ok((Some(grad), None))
    }
}

avx2_dispatch! {
    /// `log_softmax(row)[target]` of consecutive rows of width `logits.len() / out.len()`.
    pub(crate) fn target_logprob_rows(logits: &[f32], targets: &[u32], out: &mut [f32]) => target_logprob_rows_body
}

#[inline(always)]
fn target_logprob_rows_body(logits: &[f32], targets: &[u32], out: &mut [f32]) {
    let vocab = logits.len() / out.len().max(1);
    for ((slot, row), &target) in out.iter_mut().zip(logits.chunks(vocab)).zip(targets) {
        let (max, log_sum) = row_log_normaliser(row);
        *slot = row[target as usize] - max - log_sum;
    }
}

avx2_dispatch! {
    /// `g · (onehot(target) − softmax(row))` of consecutive rows, in place of the logits, from
    /// the upstream gradients `g` and the forward results (`row[target] − result` is each
    /// row's log normaliser).
    pub(crate) fn target_logprob_grad_rows_in_place(rows: &mut [f32], targets: &[u32], g: &[f32], results: &[f32])
        => target_logprob_grad_rows_in_place_body
}

#[inline(always)]
fn target_logprob_grad_rows_in_place_body(
    rows: &mut [f32],
    targets: &[u32],
    g: &[f32],
    results: &[f32],
) {
    let vocab = rows.len() / targets.len().max(1);
    for (((row, &target), &g), &result) in rows.chunks_mut(vocab).zip(targets).zip(g).zip(results) {
        if g == 0.0 {
            row.fill(0.0);
            continue;
        }
        let shift = row[target as usize] - result;
        for x in row.iter_mut() {
            *x = -g * fast_exp(*x - shift);
        }
        row[target as usize] += g;
    }
}

/// Gradient of [`TargetLogprob`]: `g[n] · (onehot(targets[n]) − softmax(logits[n]))`, from
/// the logits, the targets and `[N, 2]` rows of (upstream gradient, forward result).
struct TargetLogprobGrad;

impl CustomOp3 for TargetLogprobGrad {
    fn name(&self) -> &'static str {
        "target-logprob-grad"
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
        let (rows, vocab) = l1.shape().dims2()?;
        let logits = contiguous::<f32>(s1, l1, "logits")?;
        let targets = contiguous::<u32>(s2, l2, "targets")?;
        let upstream = contiguous::<f32>(s3, l3, "gradient and result")?;
        if targets.len() != rows || upstream.len() != 2 * rows {
            candle_core::bail!("target-logprob-grad: mismatched row counts");
        }
        let (g, results): (Vec<f32>, Vec<f32>) =
            upstream.chunks(2).map(|pair| (pair[0], pair[1])).unzip();
        let mut out = logits.to_vec();
        let chunk = rows_per_task(vocab);
        out.par_chunks_mut(chunk * vocab)
            .enumerate()
            .for_each(|(task, out_rows)| {
                let rows = task * chunk..task * chunk + out_rows.len() / vocab;
                target_logprob_grad_rows_in_place(
                    out_rows,
                    &targets[rows.clone()],
                    &g[rows.clone()],
                    &results[rows],
                );
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `log_softmax(logits, -1)` gathered at `targets`, for logits `[N, V]` (f32, CPU) and targets
/// `[N]` (u32): `[N]`, differentiable with respect to the logits.
pub fn target_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    Ok(logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, TargetLogprob)?)
}

/// Softmax over the last dimension of scores `[.., q, k]` scaled by `scale`, where query `i`
/// (absolute position `past + i`, `past = k − q`) sees keys `0..=past + i`; masked entries are
/// exactly 0. Matches `softmax(scores · scale + causal_mask)`.
struct CausalSoftmax {
    scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims();
        if dims.len() < 2 {
            candle_core::bail!("causal-softmax needs at least 2 dimensions, got {dims:?}");
        }
        let (queries, keys) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        if queries > keys {
            candle_core::bail!("causal-softmax: {queries} queries over only {keys} keys");
        }
        let past = keys - queries;
        let scores = contiguous::<f32>(s, l, "scores")?;
        let mut out = vec![0f32; scores.len()];
        let chunk = rows_per_task(keys);
        let scale = self.scale;
        out.par_chunks_mut(chunk * keys)
            .enumerate()
            .for_each(|(task, out_rows)| {
                for (k, out_row) in out_rows.chunks_mut(keys).enumerate() {
                    let r = task * chunk + k;
                    let visible = past + r % queries + 1;
                    let row = &scores[r * keys..r * keys + visible];
                    // scale > 0 (1/√head_dim), so max(x · scale) = max(x) · scale.
                    let max = lane_max(row) * scale;
                    for (o, &x) in out_row[..visible].iter_mut().zip(row) {
                        *o = fast_exp(x * scale - max);
                    }
                    let inv = 1.0 / lane_sum(&out_row[..visible], |e| e);
                    for o in &mut out_row[..visible] {
                        *o *= inv;
                    }
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = res.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &CausalSoftmaxGrad { scale: self.scale },
        )?;
        Ok(Some(grad))
    }
}

/// Gradient of [`CausalSoftmax`] from its output `y` and upstream `g`:
/// `scale · y · (g − Σ_j g_j y_j)` per row (0 where masked, since `y` is 0 there).
struct CausalSoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for CausalSoftmaxGrad {
    fn name(&self) -> &'static str {
        "causal-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let keys = l1.shape().dims().last().copied().unwrap_or(1).max(1);
        let probs = contiguous::<f32>(s1, l1, "softmax output")?;
        let upstream = contiguous::<f32>(s2, l2, "gradient")?;
        if probs.len() != upstream.len() {
            candle_core::bail!("causal-softmax-grad: mismatched sizes");
        }
        let mut out = vec![0f32; probs.len()];
        let chunk = rows_per_task(keys);
        let scale = self.scale;
        out.par_chunks_mut(chunk * keys)
            .enumerate()
            .for_each(|(task, out_rows)| {
                for (k, out_row) in out_rows.chunks_mut(keys).enumerate() {
                    let start = (task * chunk + k) * keys;
                    let y = &probs[start..start + keys];
                    let g = &upstream[start..start + keys];
                    let dot = lane_dot(y, g);
                    for ((o, &yj), &gj) in out_row.iter_mut().zip(y).zip(g) {
                        *o = scale * yj * (gj - dot);
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `softmax(scores · scale + causal_mask)` over the last dimension of `[.., q, k]` (f32, CPU),
/// differentiable; query `i` sees keys `0..=k − q + i`.
pub fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    if scale <= 0.0 {
        return Err(crate::error::ModelError::InvalidInput(format!(
            "attention scale must be positive, got {scale}"
        )));
    }
    Ok(scores.contiguous()?.apply_op1(CausalSoftmax {
        scale: scale as f32,
    })?)
}

const SQRT_TWO_OVER_PI: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044715;

/// `gelu_new`, the tanh approximation GPT-2 uses:
/// `0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 x³)))`, as candle's `gelu` computes it.
struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous::<f32>(s, l, "gelu input")?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(16_384)
            .zip(x.par_chunks(16_384))
            .for_each(|(o, x)| gelu_chunk(x, o));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(
            &grad_res.contiguous()?,
            &GeluTanhGrad,
        )?))
    }
}

avx2_dispatch! {
    fn gelu_chunk(x: &[f32], out: &mut [f32]) => gelu_chunk_body
}

#[inline(always)]
fn gelu_chunk_body(x: &[f32], out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = 0.5 * v * (1.0 + fast_tanh(SQRT_TWO_OVER_PI * v * (1.0 + GELU_CUBIC * v * v)));
    }
}

avx2_dispatch! {
    fn gelu_grad_chunk(x: &[f32], g: &[f32], out: &mut [f32]) => gelu_grad_chunk_body
}

#[inline(always)]
fn gelu_grad_chunk_body(x: &[f32], g: &[f32], out: &mut [f32]) {
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(g) {
        let v2 = v * v;
        let t = fast_tanh(SQRT_TWO_OVER_PI * v * (1.0 + GELU_CUBIC * v2));
        let inner = SQRT_TWO_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * v2);
        *o = g * (0.5 * (1.0 + t) + 0.5 * v * (1.0 - t * t) * inner);
    }
}

/// Gradient of [`GeluTanh`] from its input `x` and upstream `g`:
/// `g · (0.5 (1 + t) + 0.5 x (1 − t²) √(2/π) (1 + 3 · 0.044715 x²))`, `t` the tanh above.
struct GeluTanhGrad;

impl CustomOp2 for GeluTanhGrad {
    fn name(&self) -> &'static str {
        "gelu-tanh-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous::<f32>(s1, l1, "gelu input")?;
        let upstream = contiguous::<f32>(s2, l2, "gradient")?;
        if x.len() != upstream.len() {
            candle_core::bail!("gelu-tanh-grad: mismatched sizes");
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(16_384)
            .zip(x.par_chunks(16_384).zip(upstream.par_chunks(16_384)))
            .for_each(|(o, (x, g))| gelu_grad_chunk(x, g, o));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `gelu_new` of `x` (f32, CPU), differentiable.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(GeluTanh)?)
}

/// LayerNorm of rows `[N, d]` with weight and bias `[d]`:
/// `(x − mean) / √(var + eps) · weight + bias`, biased variance, as `torch.nn.LayerNorm`.
struct LayerNormRows {
    eps: f32,
}

avx2_dispatch! {
    /// LayerNorm of whole rows of width `weight.len()`.
    fn layer_norm_rows(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32])
        => layer_norm_rows_body
}

#[inline(always)]
fn layer_norm_rows_body(x: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    for (o, row) in out.chunks_mut(d).zip(x.chunks(d)) {
        let (mean, rstd) = row_moments(row, eps);
        for (((o, &x), &w), &b) in o.iter_mut().zip(row).zip(weight).zip(bias) {
            *o = (x - mean) * rstd * w + b;
        }
    }
}

/// Mean and `1 / √(var + eps)` of one row.
#[inline(always)]
fn row_moments(row: &[f32], eps: f32) -> (f32, f32) {
    let d = row.len() as f32;
    let mean = lane_sum(row, |x| x) / d;
    let var = lane_sum(row, |x| (x - mean) * (x - mean)) / d;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNormRows {
    fn name(&self) -> &'static str {
        "layer-norm"
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
        let (_, d) = l1.shape().dims2()?;
        let x = contiguous::<f32>(s1, l1, "layer-norm input")?;
        let weight = contiguous::<f32>(s2, l2, "layer-norm weight")?;
        let bias = contiguous::<f32>(s3, l3, "layer-norm bias")?;
        if weight.len() != d || bias.len() != d {
            candle_core::bail!(
                "layer-norm: weight/bias of {} / {} for width {d}",
                weight.len(),
                bias.len()
            );
        }
        let mut out = vec![0f32; x.len()];
        let chunk = rows_per_task(d) * d;
        let eps = self.eps;
        out.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(out_rows, x_rows)| {
                layer_norm_rows(x_rows, weight, bias, eps, out_rows);
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let rows = x.dim(0)?;
        let packed = x.apply_op3_no_bwd(
            weight,
            &grad_res.contiguous()?,
            &LayerNormRowsGrad { eps: self.eps },
        )?;
        Ok((
            Some(packed.narrow(0, 0, rows)?),
            Some(packed.get(rows)?),
            Some(packed.get(rows + 1)?),
        ))
    }
}

/// Gradients of [`LayerNormRows`] packed as `[N + 2, d]`: the input's rows, then the weight's,
/// then the bias's. With `x̂` the normalised row and `ĝ = g · weight`:
/// `dx = rstd · (ĝ − mean(ĝ) − x̂ · mean(ĝ · x̂))`, `dweight = Σ g · x̂`, `dbias = Σ g`.
struct LayerNormRowsGrad {
    eps: f32,
}

impl CustomOp3 for LayerNormRowsGrad {
    fn name(&self) -> &'static str {
        "layer-norm-grad"
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
        let (rows, d) = l1.shape().dims2()?;
        let x = contiguous::<f32>(s1, l1, "layer-norm input")?;
        let weight = contiguous::<f32>(s2, l2, "layer-norm weight")?;
        let upstream = contiguous::<f32>(s3, l3, "gradient")?;
        if upstream.len() != x.len() || weight.len() != d {
            candle_core::bail!("layer-norm-grad: mismatched sizes");
        }
        let mut out = vec![0f32; (rows + 2) * d];
        let (dx, params) = out.split_at_mut(rows * d);
        let chunk = rows_per_task(d) * d;
        let eps = self.eps;
        // Each task returns its partial weight/bias sums; they are added up afterwards.
        let partials: Vec<Vec<f32>> = dx
            .par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk).zip(upstream.par_chunks(chunk)))
            .map(|(dx_rows, (x_rows, g_rows))| {
                let mut sums = vec![0f32; 2 * d];
                layer_norm_grad_rows(x_rows, g_rows, weight, eps, dx_rows, &mut sums);
                sums
            })
            .collect();
        for sums in partials {
            for (p, s) in params.iter_mut().zip(sums) {
                *p += s;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, d))))
    }
}

avx2_dispatch! {
    /// Input gradients of whole rows into `dx`; weight and bias gradients added to
    /// `sums[..d]` and `sums[d..]`.
    fn layer_norm_grad_rows(x: &[f32], g: &[f32], weight: &[f32], eps: f32, dx: &mut [f32], sums: &mut [f32])
        => layer_norm_grad_rows_body
}

#[inline(always)]
fn layer_norm_grad_rows_body(
    x: &[f32],
    g: &[f32],
    weight: &[f32],
    eps: f32,
    dx: &mut [f32],
    sums: &mut [f32],
) {
    let d = weight.len();
    let (weight_sums, bias_sums) = sums.split_at_mut(d);
    let mut g_hat = vec![0f32; d];
    let mut x_hat = vec![0f32; d];
    for ((dx_row, row), g) in dx.chunks_mut(d).zip(x.chunks(d)).zip(g.chunks(d)) {
        let (mean, rstd) = row_moments(row, eps);
        for ((((xh, gh), &x), &g), &w) in
            x_hat.iter_mut().zip(&mut g_hat).zip(row).zip(g).zip(weight)
        {
            *xh = (x - mean) * rstd;
            *gh = g * w;
        }
        let mean_g_hat = lane_sum(&g_hat, |v| v) / d as f32;
        let mean_g_hat_x_hat = lane_dot(&g_hat, &x_hat) / d as f32;
        for (((ws, bs), &g), &xh) in weight_sums
            .iter_mut()
            .zip(bias_sums.iter_mut())
            .zip(g)
            .zip(&x_hat)
        {
            *ws += g * xh;
            *bs += g;
        }
        for ((o, &gh), &xh) in dx_row.iter_mut().zip(&g_hat).zip(&x_hat) {
            *o = rstd * (gh - mean_g_hat - xh * mean_g_hat_x_hat);
        }
    }
}

/// LayerNorm over the last dimension of `x` (f32, CPU) with `weight` and `bias` `[d]`,
/// differentiable in all three.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let d = dims.last().copied().unwrap_or(1).max(1);
    let rows = x.elem_count() / d;
    let y = x.reshape((rows, d))?.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNormRows { eps: eps as f32 },
    )?;
    Ok(y.reshape(dims)?)
}

/// `x + bias` for rows `[N, d]` and a bias `[d]`. Its backward sums the gradient over rows in
/// one contiguous pass, where candle's broadcast backward reduces over the leading (strided)
/// dimension element by element.
struct AddBias;

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "add-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, d) = l1.shape().dims2()?;
        let x = contiguous::<f32>(s1, l1, "input")?;
        let bias = contiguous::<f32>(s2, l2, "bias")?;
        if bias.len() != d {
            candle_core::bail!("add-bias: bias of {} for width {d}", bias.len());
        }
        let mut out = vec![0f32; x.len()];
        let chunk = rows_per_task(d) * d;
        out.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(o, x)| add_bias_rows(x, bias, o));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let bias_grad = grad_res.contiguous()?.apply_op1_no_bwd(&SumRows)?;
        Ok((Some(grad_res.clone()), Some(bias_grad)))
    }
}

avx2_dispatch! {
    fn add_bias_rows(x: &[f32], bias: &[f32], out: &mut [f32]) => add_bias_rows_body
}

#[inline(always)]
fn add_bias_rows_body(x: &[f32], bias: &[f32], out: &mut [f32]) {
    for (o, x) in out.chunks_mut(bias.len()).zip(x.chunks(bias.len())) {
        for ((o, &x), &b) in o.iter_mut().zip(x).zip(bias) {
            *o = x + b;
        }
    }
}

avx2_dispatch! {
    /// Adds `bias` to every row of width `bias.len()`.
    pub(crate) fn add_bias_in_place(rows: &mut [f32], bias: &[f32]) => add_bias_in_place_body
}

#[inline(always)]
fn add_bias_in_place_body(rows: &mut [f32], bias: &[f32]) {
    for row in rows.chunks_mut(bias.len()) {
        for (o, &b) in row.iter_mut().zip(bias) {
            *o += b;
        }
    }
}

avx2_dispatch! {
    /// Adds the column sums of rows of width `sums.len()` into `sums`.
    pub(crate) fn sum_rows_into(x: &[f32], sums: &mut [f32]) => sum_rows_into_body
}

#[inline(always)]
fn sum_rows_into_body(x: &[f32], sums: &mut [f32]) {
    for row in x.chunks(sums.len()) {
        for (s, &v) in sums.iter_mut().zip(row) {
            *s += v;
        }
    }
}

/// Column sums of rows `[N, d]`: `[d]`.
struct SumRows;

impl CustomOp1 for SumRows {
    fn name(&self) -> &'static str {
        "sum-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, d) = l.shape().dims2()?;
        let x = contiguous::<f32>(s, l, "gradient")?;
        let mut sums = vec![0f32; d];
        sum_rows_into(x, &mut sums);
        Ok((CpuStorage::F32(sums), Shape::from(d)))
    }
}

/// `x + bias` for `x` `[N, d]` and `bias` `[d]` (f32, CPU), differentiable in both.
pub fn add_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op2(&bias.contiguous()?, AddBias)?)
}

#[cfg(test)]
pub(crate) mod tests {
    use candle_core::{D, Device, Var};

    use super::*;
    use crate::layers::{causal_mask, softmax_last_dim};

    pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    pub(crate) fn random_var(shape: &[usize], mean: f32, std: f32) -> Var {
        Var::from_tensor(&Tensor::randn(mean, std, shape, &Device::Cpu).unwrap()).unwrap()
    }

    /// Asserts that `fused` and `composed` agree within `value_tol`, and so do the gradients of
    /// a random weighted sum of each with respect to every var (within `grad_tol`).
    pub(crate) fn assert_same_values_and_gradients(
        fused: Tensor,
        composed: Tensor,
        vars: &[&Var],
        value_tol: f32,
        grad_tol: f32,
    ) {
        let diff = max_abs_diff(&fused, &composed);
        assert!(diff < value_tol, "values differ by {diff}");
        let weights = Tensor::randn(0f32, 1.0, fused.shape(), &Device::Cpu).unwrap();
        let gradients = |t: Tensor| {
            (t * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let (g_fused, g_composed) = (gradients(fused), gradients(composed));
        for var in vars {
            let a = g_fused.get(var.as_tensor()).expect("fused gradient");
            let b = g_composed.get(var.as_tensor()).expect("composed gradient");
            let diff = max_abs_diff(a, b);
            assert!(diff < grad_tol, "gradients differ by {diff}");
        }
    }

    #[test]
    fn target_logprobs_match_composed_values_and_gradients() {
        let logits = random_var(&[37, 50], 0.0, 3.0);
        let targets = Tensor::from_vec(
            (0..37u32).map(|i| (i * 7) % 50).collect::<Vec<_>>(),
            37,
            &Device::Cpu,
        )
        .unwrap();
        let fused = target_logprobs(logits.as_tensor(), &targets).unwrap();
        let composed = candle_nn::ops::log_softmax(logits.as_tensor(), D::Minus1)
            .unwrap()
            .gather(&targets.unsqueeze(1).unwrap(), 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        assert_same_values_and_gradients(fused, composed, &[&logits], 1e-5, 1e-5);
    }

    #[test]
    fn gelu_tanh_matches_candle_values_and_gradients() {
        let x = random_var(&[3, 7, 11], 0.0, 2.0);
        let fused = gelu_tanh(x.as_tensor()).unwrap();
        let composed = x.as_tensor().gelu().unwrap();
        // candle's backward uses 6-digit constants.
        assert_same_values_and_gradients(fused, composed, &[&x], 1e-6, 2e-5);
    }

    #[test]
    fn layer_norm_matches_composed_values_and_gradients() {
        let x = random_var(&[4, 9, 24], 0.5, 2.0);
        let w = random_var(&[24], 1.0, 0.3);
        let b = random_var(&[24], 0.0, 0.3);
        let fused = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
        let composed =
            crate::layers::LayerNorm::new(w.as_tensor().clone(), b.as_tensor().clone(), 1e-5)
                .forward_composed(x.as_tensor())
                .unwrap();
        assert_same_values_and_gradients(fused, composed, &[&x, &w, &b], 1e-5, 1e-4);
    }

    #[test]
    fn add_bias_matches_broadcast_add_values_and_gradients() {
        let x = random_var(&[13, 6], 0.0, 1.0);
        let b = random_var(&[6], 0.0, 1.0);
        let fused = add_bias(x.as_tensor(), b.as_tensor()).unwrap();
        let composed = x.as_tensor().broadcast_add(b.as_tensor()).unwrap();
        assert_same_values_and_gradients(fused, composed, &[&x, &b], 1e-7, 1e-5);
    }

    #[test]
    fn causal_softmax_matches_composed_values_and_gradients() {
        // (5, 8): past = 3, as in a cached decode step.
        for (queries, keys) in [(6usize, 6usize), (5, 8)] {
            let scores = random_var(&[2, 3, queries, keys], 0.0, 2.0);
            let scale = 0.35;
            let fused = causal_softmax(scores.as_tensor(), scale).unwrap();
            let mask = causal_mask(keys - queries, queries, DType::F32, &Device::Cpu).unwrap();
            let composed = softmax_last_dim(
                &(scores.as_tensor() * scale)
                    .unwrap()
                    .broadcast_add(&mask)
                    .unwrap(),
            )
            .unwrap();
            assert_same_values_and_gradients(fused, composed, &[&scores], 1e-6, 1e-5);
        }
    }

    #[test]
    fn causal_softmax_rejects_a_non_positive_scale() {
        let scores = Tensor::zeros((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(causal_softmax(&scores, 0.0).is_err());
    }

    #[test]
    fn empty_tensors_take_the_composed_path() {
        let empty = Tensor::zeros((0, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(!fused_applies(&empty));
        assert!(fused_applies(
            &Tensor::zeros((1, 4), DType::F32, &Device::Cpu).unwrap()
        ));
    }

    #[test]
    fn fast_exp_and_tanh_are_accurate_over_their_range() {
        let mut worst_exp = 0f64;
        let mut worst_tanh = 0f64;
        for i in -200_000..=200_000 {
            let x = i as f32 * 4.35e-4; // [-87, 87]
            let exact = (x as f64).exp();
            worst_exp = worst_exp.max((fast_exp(x) as f64 - exact).abs() / exact);
            let y = x / 8.0;
            worst_tanh = worst_tanh.max((fast_tanh(y) as f64 - (y as f64).tanh()).abs());
        }
        assert!(worst_exp < 5e-7, "exp relative error {worst_exp:e}");
        assert!(worst_tanh < 3e-7, "tanh absolute error {worst_tanh:e}");
        assert_eq!(fast_exp(-100.0), 0.0);
        assert!(fast_exp(f32::NAN).is_nan());
        assert!(fast_tanh(f32::NAN).is_nan());
        assert_eq!(fast_exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(fast_tanh(-30.0), -1.0);
    }

    #[test]
    fn target_logprobs_reject_out_of_vocabulary_targets() {
        let dev = Device::Cpu;
        let logits = Tensor::zeros((2, 4), DType::F32, &dev).unwrap();
        let targets = Tensor::new(&[1u32, 4], &dev).unwrap();
        let err = target_logprobs(&logits, &targets).unwrap_err().to_string();
        assert!(err.contains("target token 4"), "{err}");
    }
}
