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

/// Query rows per register tile.
const TILE_ROWS: usize = 4;
/// f32 lanes of one AVX2 register; padded dimensions are multiples of it.
const LANES: usize = 8;

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

/// One register tile of a small matrix product: rows `0..TILE_ROWS` and columns `n0..n0 + N`
/// of `C = A · B` over `k` in `ks`, written (not accumulated) into `c`. `A` is row-major with
/// row stride `lda`, `B` row-major with row stride `ldb`. With `N` = 8 or 16 the
/// `TILE_ROWS × N` accumulators stay in 4–8 AVX2 registers: per `k` one or two loads of `B`,
/// four broadcasts of `A` and four or eight fused multiply-adds.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile<const N: usize>(
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    ks: std::ops::Range<usize>,
    n0: usize,
    c: &mut [f32],
    ldc: usize,
) {
    let mut acc = [[0f32; N]; TILE_ROWS];
    for k in ks {
        let bk = &b[k * ldb + n0..][..N];
        for (r, acc) in acc.iter_mut().enumerate() {
            let ar = a[r * lda + k];
            for (acc, &bk) in acc.iter_mut().zip(bk) {
                *acc = ar.mul_add(bk, *acc);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        c[r * ldc + n0..][..N].copy_from_slice(acc);
    }
}

/// Rows `0..TILE_ROWS`, columns `0..n` (a multiple of [`LANES`]) of `C = A · B` over `ks`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile_rows(
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    ks: std::ops::Range<usize>,
    n: usize,
    c: &mut [f32],
    ldc: usize,
) {
    let mut n0 = 0;
    while n0 + 2 * LANES <= n {
        tile::<16>(a, lda, b, ldb, ks.clone(), n0, c, ldc);
        n0 += 2 * LANES;
    }
    if n0 < n {
        tile::<8>(a, lda, b, ldb, ks, n0, c, ldc);
    }
}

/// Which query rows of one sequence are wanted: `first..len`. Keys past `len` are never read
/// and the output's other rows are 0; their upstream gradients are ignored. Packed sequences
/// use it to skip a batch's padding and a pair's shared prompt, whose outputs nobody reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryRows {
    pub first: usize,
    pub len: usize,
}

/// Padded sizes of one (sequence, head): positions `tp` and head width `dp`, both multiples
/// of [`LANES`] (and so of [`TILE_ROWS`]), so that every tile is whole; padding is zeros.
#[derive(Clone, Copy)]
struct Padded {
    t: usize,
    d: usize,
    tp: usize,
    dp: usize,
    /// First wanted query row, and the first tile holding it.
    first: usize,
    first_tile: usize,
}

impl Padded {
    fn new(dims: Dims, rows: QueryRows) -> Self {
        let (t, d) = (rows.len, dims.head_dim());
        Self {
            t,
            d,
            tp: round_up(t, LANES),
            dp: round_up(d, LANES),
            first: rows.first,
            first_tile: rows.first / TILE_ROWS * TILE_ROWS,
        }
    }
}

/// The wanted rows of sequence `b`: all of them without `spans`.
fn rows_of(spans: Option<&[QueryRows]>, dims: Dims, b: usize) -> QueryRows {
    spans.map_or(
        QueryRows {
            first: 0,
            len: dims.t,
        },
        |s| s[b],
    )
}

/// Copies head `h`'s columns (starting at `column`) of sequence `b` into `dst`, row-major
/// `[tp, dp]` or transposed `[dp, tp]`; the padding stays as it is (zero).
#[inline(always)]
fn gather(view: &View, b: usize, column: usize, p: Padded, transposed: bool, dst: &mut [f32]) {
    for i in 0..p.t {
        let row = view.row(b, i, column, p.d);
        if transposed {
            for (c, &x) in row.iter().enumerate() {
                dst[c * p.tp + i] = x;
            }
        } else {
            dst[i * p.dp..i * p.dp + p.d].copy_from_slice(row);
        }
    }
}

/// Turns rows `i0..i0 + TILE_ROWS` of `scores` (`[tp, tp]`, raw `q · k`) into causal softmax
/// probabilities in place: row `i` keeps `0..=i`, everything after is set to 0 (also rows
/// past the sequence, which are all 0).
#[inline(always)]
fn softmax_tile(scores: &mut [f32], p: Padded, i0: usize, scale: f32) {
    for i in i0..i0 + TILE_ROWS {
        let row = &mut scores[i * p.tp..(i + 1) * p.tp];
        if i >= p.t {
            row.fill(0.0);
            continue;
        }
        let (visible, masked) = row.split_at_mut(i + 1);
        masked.fill(0.0);
        // scale > 0, so max(x · scale) = max(x) · scale.
        let max = crate::fused::lane_max(visible) * scale;
        for x in visible.iter_mut() {
            *x = crate::fused::fast_exp(*x * scale - max);
        }
        let inv = 1.0 / crate::fused::lane_sum(visible, |e| e);
        for x in visible.iter_mut() {
            *x *= inv;
        }
    }
}

/// Causal softmax probabilities of queries `i0..i0 + TILE_ROWS` (rows of `probs` `[tp, tp]`)
/// from `q` `[tp, dp]` and the transposed keys `[dp, tp]`, over only the keys the tile can see;
/// returns how many keys that is (the rest of each row is 0).
#[inline(always)]
fn probability_tile(
    q: &[f32],
    keys_t: &[f32],
    p: Padded,
    scale: f32,
    i0: usize,
    probs: &mut [f32],
) -> usize {
    let seen = (i0 + TILE_ROWS).min(p.t);
    let rows = &mut probs[i0 * p.tp..(i0 + TILE_ROWS) * p.tp];
    let (q, n) = (&q[i0 * p.dp..], round_up(seen, LANES));
    tile_rows(q, p.dp, keys_t, p.tp, 0..p.dp, n, rows, p.tp);
    softmax_tile(probs, p, i0, scale);
    seen
}

/// `C = A · B` for `A` `[dp, tp]` (a head's values transposed) and the lower-triangular
/// `B` `[tp, tp]` (`B[i][j] = 0` for `j > i`): column block `n0..` of `C` only sums over
/// `i ≥ n0`. Gives `dKᵀ = Qᵀ · dS` and `dVᵀ = dOᵀ · P` without transposing `dS` or `P`.
#[inline(always)]
fn transposed_products(a: &[f32], b: &[f32], p: Padded, c: &mut [f32]) {
    let tp = p.tp;
    for r0 in (0..p.dp).step_by(TILE_ROWS) {
        let (a, c) = (&a[r0 * tp..], &mut c[r0 * tp..]);
        let mut n0 = 0;
        while n0 < tp {
            // Rows before `first` are not wanted: they send nothing back.
            let ks = n0.max(p.first).min(p.t)..p.t;
            if n0 + 2 * LANES <= tp {
                tile::<16>(a, tp, b, tp, ks, n0, c, tp);
                n0 += 2 * LANES;
            } else {
                tile::<8>(a, tp, b, tp, ks, n0, c, tp);
                n0 += LANES;
            }
        }
    }
}

/// Writes a transposed `[dp, tp]` block into head columns of `[t, ld]` output rows.
#[inline(always)]
fn scatter_transposed(block: &[f32], p: Padded, out: &mut [f32], ld: usize, column: usize) {
    for i in 0..p.t {
        for (c, o) in out[i * ld + column..i * ld + column + p.d]
            .iter_mut()
            .enumerate()
        {
            *o = block[c * p.tp + i];
        }
    }
}

/// Writes rows `0..t`, columns `0..d` of a `[tp, dp]` block into head columns of `[t, ld]`
/// output rows starting at `column`.
#[inline(always)]
fn scatter(block: &[f32], p: Padded, out: &mut [f32], ld: usize, column: usize) {
    for i in 0..p.t {
        out[i * ld + column..i * ld + column + p.d]
            .copy_from_slice(&block[i * p.dp..i * p.dp + p.d]);
    }
}

/// Attention output `[batch, t, width]`, contiguous.
fn forward(
    q: View,
    k: View,
    v: View,
    dims: Dims,
    scale: f32,
    spans: Option<&[QueryRows]>,
) -> Vec<f32> {
    let (t, w) = (dims.t, dims.width);
    let mut out = vec![0f32; dims.batch * t * w];
    out.par_chunks_mut(t * w).enumerate().for_each(|(b, out)| {
        let rows = rows_of(spans, dims, b);
        forward_sequence(&q, &k, &v, dims, scale, b, rows, out)
    });
    out
}

crate::fused::avx2_dispatch! {
    /// One sequence's attention output `[t, width]`.
    fn forward_sequence(q: &View, k: &View, v: &View, dims: Dims, scale: f32, b: usize, rows: QueryRows, out: &mut [f32])
        => forward_sequence_body
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_sequence_body(
    q: &View,
    k: &View,
    v: &View,
    dims: Dims,
    scale: f32,
    b: usize,
    rows: QueryRows,
    out: &mut [f32],
) {
    let p = Padded::new(dims, rows);
    if p.first >= p.t {
        return;
    }
    let (tp, dp) = (p.tp, p.dp);
    let mut q_h = vec![0f32; tp * dp];
    let mut keys_t = vec![0f32; dp * tp];
    let mut v_h = vec![0f32; tp * dp];
    let mut probs = vec![0f32; tp * tp];
    let mut o = vec![0f32; tp * dp];
    for h in 0..dims.heads {
        let column = h * p.d;
        gather(q, b, column, p, false, &mut q_h);
        gather(k, b, column, p, true, &mut keys_t);
        gather(v, b, column, p, false, &mut v_h);
        for i0 in (p.first_tile..tp).step_by(TILE_ROWS) {
            // Probabilities of this tile of queries, then their weighted values.
            let seen = probability_tile(&q_h, &keys_t, p, scale, i0, &mut probs);
            tile_rows(
                &probs[i0 * tp..],
                tp,
                &v_h,
                dp,
                0..seen,
                dp,
                &mut o[i0 * dp..],
                dp,
            );
        }
        o[..p.first * dp].fill(0.0);
        scatter(&o, p, out, dims.width, column);
    }
}

/// Gradients `[batch, t, 3·width]` (q, k, v side by side) from the upstream gradient `dout`.
fn backward(
    q: View,
    k: View,
    v: View,
    dout: View,
    dims: Dims,
    scale: f32,
    spans: Option<&[QueryRows]>,
) -> Vec<f32> {
    let (t, w) = (dims.t, dims.width);
    let mut grads = vec![0f32; dims.batch * t * 3 * w];
    grads
        .par_chunks_mut(t * 3 * w)
        .enumerate()
        .for_each(|(b, grads)| {
            let rows = rows_of(spans, dims, b);
            backward_sequence(&q, &k, &v, &dout, dims, scale, b, rows, grads)
        });
    grads
}

crate::fused::avx2_dispatch! {
    /// One sequence's gradients `[t, 3·width]`.
    fn backward_sequence(q: &View, k: &View, v: &View, dout: &View, dims: Dims, scale: f32, b: usize, rows: QueryRows, grads: &mut [f32])
        => backward_sequence_body
}

/// Backward of one sequence, head by head, as five small products on padded blocks:
/// `P` recomputed from `q`, `k` (as flash attention does, instead of storing it),
/// `dP = dO · Vᵀ`, `dS = scale · P ⊙ (dP − rowsum(P ⊙ dP))`, `dQ = dS · K`, `dK = dSᵀ · Q`,
/// `dV = Pᵀ · dO`, each over the causal triangle only (the last two as `dKᵀ = Qᵀ · dS` and
/// `dVᵀ = dOᵀ · P`, so that neither `[t, t]` matrix is transposed).
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
    rows: QueryRows,
    grads: &mut [f32],
) {
    let p = Padded::new(dims, rows);
    if p.first >= p.t {
        return;
    }
    let (t, w, tp, dp) = (p.t, dims.width, p.tp, p.dp);
    let mut q_h = vec![0f32; tp * dp];
    let mut queries_t = vec![0f32; dp * tp];
    let mut k_h = vec![0f32; tp * dp];
    let mut keys_t = vec![0f32; dp * tp];
    let mut values_t = vec![0f32; dp * tp];
    let mut dout_h = vec![0f32; tp * dp];
    let mut dout_t = vec![0f32; dp * tp];
    let mut probs = vec![0f32; tp * tp];
    let mut ds = vec![0f32; tp * tp];
    let mut grad = vec![0f32; tp * dp];
    for h in 0..dims.heads {
        let column = h * p.d;
        gather(q, b, column, p, false, &mut q_h);
        gather(q, b, column, p, true, &mut queries_t);
        gather(k, b, column, p, false, &mut k_h);
        gather(k, b, column, p, true, &mut keys_t);
        gather(v, b, column, p, true, &mut values_t);
        gather(dout, b, column, p, false, &mut dout_h);
        gather(dout, b, column, p, true, &mut dout_t);
        for i0 in (p.first_tile..tp).step_by(TILE_ROWS) {
            probability_tile(&q_h, &keys_t, p, scale, i0, &mut probs);
        }
        for i0 in (p.first_tile..tp).step_by(TILE_ROWS) {
            let seen = (i0 + TILE_ROWS).min(t);
            let rows = &mut ds[i0 * tp..(i0 + TILE_ROWS) * tp];
            tile_rows(
                &dout_h[i0 * dp..],
                dp,
                &values_t,
                tp,
                0..dp,
                round_up(seen, LANES),
                rows,
                tp,
            );
            for i in i0..(i0 + TILE_ROWS).min(t) {
                let row = &mut ds[i * tp..(i + 1) * tp];
                let pr = &probs[i * tp..i * tp + i + 1];
                let (visible, masked) = row.split_at_mut(i + 1);
                let centre = crate::fused::lane_dot(pr, visible);
                for (x, &pj) in visible.iter_mut().zip(pr) {
                    *x = scale * pj * (*x - centre);
                }
                masked.fill(0.0);
            }
            for i in (t.max(i0)..i0 + TILE_ROWS).chain(i0..p.first.min(i0 + TILE_ROWS)) {
                ds[i * tp..(i + 1) * tp].fill(0.0);
            }
            // dQ rows of this tile: Σ_j dS_ij k_j over the keys they saw.
            tile_rows(
                &ds[i0 * tp..],
                tp,
                &k_h,
                dp,
                0..seen,
                dp,
                &mut grad[i0 * dp..],
                dp,
            );
        }
        grad[..p.first * dp].fill(0.0);
        scatter(&grad, p, grads, 3 * w, column);
        // dK_j = Σ_{i ≥ j} dS_ij q_i and dV_j = Σ_{i ≥ j} P_ij dO_i, computed transposed.
        transposed_products(&queries_t, &ds, p, &mut grad);
        scatter_transposed(&grad, p, grads, 3 * w, w + column);
        transposed_products(&dout_t, &probs, p, &mut grad);
        scatter_transposed(&grad, p, grads, 3 * w, 2 * w + column);
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
    spans: Option<Vec<QueryRows>>,
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
        check_spans(self.spans.as_deref(), dims)?;
        let out = forward(q, k, v, dims, self.scale, self.spans.as_deref());
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
                spans: self.spans.clone(),
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
    spans: Option<Vec<QueryRows>>,
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
        check_spans(self.spans.as_deref(), dims)?;
        let grads = backward(view, k, v, dout, dims, self.scale, self.spans.as_deref());
        Ok((CpuStorage::F32(grads), l1.shape().clone()))
    }
}

/// Attention over separate q, k, v projections (OPT).
struct SplitAttention {
    heads: usize,
    scale: f32,
    spans: Option<Vec<QueryRows>>,
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
        check_spans(self.spans.as_deref(), dims)?;
        let out = forward(
            View::new(s1, l1, "q")?,
            View::new(s2, l2, "k")?,
            View::new(s3, l3, "v")?,
            dims,
            self.scale,
            self.spans.as_deref(),
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
                spans: self.spans.clone(),
            },
        )?;
        Ok((
            Some(grads.narrow(2, 0, width)?),
            Some(grads.narrow(2, width, width)?),
            Some(grads.narrow(2, 2 * width, width)?),
        ))
    }
}

fn check_spans(spans: Option<&[QueryRows]>, dims: Dims) -> candle_core::Result<()> {
    let Some(spans) = spans else { return Ok(()) };
    if spans.len() != dims.batch {
        candle_core::bail!(
            "fused attention: {} query spans for {} sequences",
            spans.len(),
            dims.batch
        );
    }
    if let Some(bad) = spans
        .iter()
        .find(|r| r.len == 0 || r.len > dims.t || r.first > r.len)
    {
        candle_core::bail!(
            "fused attention: query rows {}..{} outside 1..={} positions",
            bad.first,
            bad.len,
            dims.t
        );
    }
    Ok(())
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
/// differentiable: `[batch, t, width]` with the heads merged. `spans` (one per sequence)
/// restricts each sequence to its wanted query rows; `None` computes every row.
pub fn packed_causal_attention(
    qkv: &Tensor,
    heads: usize,
    scale: f64,
    spans: Option<&[QueryRows]>,
) -> Result<Tensor> {
    let scale = validated_scale(scale)?;
    Ok(qkv.apply_op1(PackedAttention {
        heads,
        scale,
        spans: spans.map(<[QueryRows]>::to_vec),
    })?)
}

/// Causal self-attention of separate `[batch, t, width]` q, k, v (f32, CPU), differentiable;
/// `spans` as in [`packed_causal_attention`].
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    spans: Option<&[QueryRows]>,
) -> Result<Tensor> {
    let scale = validated_scale(scale)?;
    Ok(q.apply_op3(
        k,
        v,
        SplitAttention {
            heads,
            scale,
            spans: spans.map(<[QueryRows]>::to_vec),
        },
    )?)
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
        for (batch, t, width, heads) in [
            (3, 11, 16, 2),
            (2, 70, 64, 4),
            (1, 1, 12, 4),
            (2, 9, 48, 4),
            (1, 20, 48, 2),
            (2, 33, 128, 2),
        ] {
            let qkv = random_var(&[batch, t, 3 * width], 0.0, 1.5);
            let scale = 1.0 / ((width / heads) as f64).sqrt();
            let fused = packed_causal_attention(qkv.as_tensor(), heads, scale, None).unwrap();
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

    /// With query spans the fused op gives the composed attention on the wanted rows, 0
    /// elsewhere, and ignores the upstream gradient of the other rows.
    #[test]
    fn query_spans_give_the_wanted_rows_and_ignore_the_rest() {
        let cases: [(usize, usize, usize, &[QueryRows]); 2] = [
            (
                11,
                16,
                2,
                &[
                    QueryRows { first: 0, len: 11 },
                    QueryRows { first: 5, len: 9 },
                    QueryRows { first: 9, len: 9 },
                ],
            ),
            (
                70,
                64,
                4,
                &[
                    QueryRows { first: 22, len: 51 },
                    QueryRows { first: 0, len: 40 },
                ],
            ),
        ];
        for (t, width, heads, spans) in cases {
            let batch = spans.len();
            let qkv = random_var(&[batch, t, 3 * width], 0.0, 1.5);
            let scale = 1.0 / ((width / heads) as f64).sqrt();
            let x = qkv.as_tensor();
            let mask: Vec<f32> = spans
                .iter()
                .flat_map(|r| (0..t).map(move |i| f32::from(u8::from(i >= r.first && i < r.len))))
                .collect();
            let mask = Tensor::from_vec(mask, (batch, t, 1), &Device::Cpu).unwrap();
            let reference = composed(
                &x.narrow(2, 0, width).unwrap(),
                &x.narrow(2, width, width).unwrap(),
                &x.narrow(2, 2 * width, width).unwrap(),
                heads,
                scale,
            )
            .broadcast_mul(&mask)
            .unwrap();
            let packed = packed_causal_attention(x, heads, scale, Some(spans)).unwrap();
            assert_same_values_and_gradients(packed, reference.clone(), &[&qkv], 1e-5, 1e-4);
            let split = causal_attention(
                &x.narrow(2, 0, width).unwrap(),
                &x.narrow(2, width, width).unwrap(),
                &x.narrow(2, 2 * width, width).unwrap(),
                heads,
                scale,
                Some(spans),
            )
            .unwrap();
            assert_same_values_and_gradients(split, reference, &[&qkv], 1e-5, 1e-4);
        }
        let qkv = Tensor::zeros((1, 4, 12), candle_core::DType::F32, &Device::Cpu).unwrap();
        let too_long = [QueryRows { first: 0, len: 5 }];
        assert!(packed_causal_attention(&qkv, 2, 0.5, Some(&too_long)).is_err());
        assert!(packed_causal_attention(&qkv, 2, 0.5, Some(&[])).is_err());
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
        let fused = causal_attention(q.as_tensor(), k.as_tensor(), &v, heads, 0.4, None).unwrap();
        let reference = composed(q.as_tensor(), k.as_tensor(), &v, heads, 0.4);
        assert_same_values_and_gradients(fused, reference, &[&q, &k, &wide], 1e-5, 1e-4);
    }

    #[test]
    fn a_query_ignores_later_positions() {
        let qkv = Tensor::randn(0f32, 1.0, (1, 8, 3 * 8), &Device::Cpu).unwrap();
        let out = packed_causal_attention(&qkv, 2, 0.5, None).unwrap();
        // Changing the last position's q/k/v leaves every earlier output unchanged.
        let tail = Tensor::randn(0f32, 1.0, (1, 1, 3 * 8), &Device::Cpu).unwrap();
        let changed = Tensor::cat(&[&qkv.narrow(1, 0, 7).unwrap(), &tail], 1).unwrap();
        let out2 = packed_causal_attention(&changed, 2, 0.5, None).unwrap();
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
        assert!(packed_causal_attention(&qkv, 3, 1.0, None).is_err());
        assert!(packed_causal_attention(&qkv, 2, 0.0, None).is_err());
        assert!(packed_causal_attention(&qkv, 2, f64::NAN, None).is_err());
    }
}
