//! The LM head and the next-token log-probs as one CPU op (f32), forward and backward:
//! `log_softmax(hidden · headᵀ)[b, i, ids[b, i + 1]]` for the wanted positions `i < t − 1`.
//!
//! Composed from candle ops this is a reshape, a matrix product, a reshape, a narrow to the
//! predicting positions, a contiguous copy of the logits and the fused log-softmax; backward
//! pads the narrowed gradient back with a full copy and, for every one of those nodes, candle
//! adds the gradient into a fresh zero tensor. Each is a pass over (and an allocation of) the
//! logits, which are the largest tensor of a step (`[b·t, vocab]`: 14 MB for the sandbox's
//! 64 × 70 tokens, 100 MB for GPT-2-small's 4 × 128). Here the forward gathers the hidden
//! states of the wanted positions, runs one matrix product into a buffer the op keeps and one
//! pass over it; the backward turns that buffer into the logits' gradient in place and runs
//! the two products of the head's backward. Positions nobody reads (the prompt under a
//! response-only loss, padding, the last position) cost nothing: in the sandbox's fine-tuning
//! they are over half of the rows.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::error::{ModelError, Result};
use crate::fused::{
    contiguous, rows_per_task, target_logprob_grad_rows_in_place, target_logprob_rows,
};
use crate::matmul::Product;

/// Shape of one call: hidden rows, hidden width, vocabulary.
#[derive(Clone, Copy)]
struct Dims {
    rows: usize,
    hidden: usize,
    vocab: usize,
}

/// The hidden states of the wanted positions, `[rows.len(), hidden]`.
fn gather_rows(hidden: &[f32], rows: &[Position], width: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * width);
    for p in rows {
        out.extend_from_slice(&hidden[p.hidden_row * width..(p.hidden_row + 1) * width]);
    }
    out
}

/// Logits `[rows, vocab]` of the gathered hidden states `[rows, hidden]`.
fn logits(
    gathered: &[f32],
    head: &[f32],
    rows: usize,
    dims: Dims,
) -> candle_core::Result<Vec<f32>> {
    Product {
        m: rows,
        n: dims.vocab,
        k: dims.hidden,
        lhs: gathered,
        lhs_strides: (dims.hidden, 1),
        rhs: head,
        // headᵀ: element (c, v) of the `[hidden, vocab]` operand is head[v, c].
        rhs_strides: (1, dims.hidden),
    }
    .run()
}

/// One wanted log-prob: the row of the flattened hidden states `[rows, h]` that predicts, the
/// token it is scored on, and its entry in the output. Rows may repeat (a shared prompt's last
/// row predicts the first token of both responses); their gradients add up.
#[derive(Clone, Copy)]
struct Position {
    hidden_row: usize,
    target: u32,
    out_index: usize,
}

/// The forward op. It keeps the logits it computed for its backward pass (as the composed
/// graph keeps its logits tensor); they are freed with the result's graph.
struct LmHeadLogprobs {
    /// The wanted positions, in order.
    rows: Vec<Position>,
    /// Shape of the result; entries no position writes are 0.
    out_shape: Shape,
    logits: Mutex<Option<Vec<f32>>>,
}

fn dims_of(l_hidden: &Layout, l_head: &Layout) -> candle_core::Result<Dims> {
    let (vocab, head_width) = l_head.shape().dims2()?;
    let hidden = l_hidden.dims().last().copied().unwrap_or(0);
    if head_width != hidden || hidden == 0 {
        candle_core::bail!(
            "lm-head log-probs: hidden {:?} and head {:?} do not fit (need [.., h], [vocab, h])",
            l_hidden.dims(),
            l_head.dims(),
        );
    }
    Ok(Dims {
        rows: l_hidden.shape().elem_count() / hidden,
        hidden,
        vocab,
    })
}

impl LmHeadLogprobs {
    fn new(rows: Vec<Position>, out_shape: Shape, dims: Dims) -> Result<Self> {
        if let Some(p) = rows
            .iter()
            .find(|p| p.hidden_row >= dims.rows || p.target as usize >= dims.vocab)
        {
            return Err(ModelError::InvalidInput(format!(
                "log-prob of token {} at hidden row {}: outside the vocabulary of {} or the {} rows",
                p.target, p.hidden_row, dims.vocab, dims.rows
            )));
        }
        Ok(Self {
            rows,
            out_shape,
            logits: Mutex::new(None),
        })
    }

    fn targets(&self) -> Vec<u32> {
        self.rows.iter().map(|p| p.target).collect()
    }
}

impl CustomOp2 for LmHeadLogprobs {
    fn name(&self) -> &'static str {
        "lm-head-logprobs"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = dims_of(l1, l2)?;
        let hidden = contiguous::<f32>(s1, l1, "hidden states")?;
        let head = contiguous::<f32>(s2, l2, "head")?;
        let gathered = gather_rows(hidden, &self.rows, dims.hidden);
        let logits = logits(&gathered, head, self.rows.len(), dims)?;
        let targets = self.targets();
        let vocab = dims.vocab;
        let mut wanted = vec![0f32; self.rows.len()];
        let chunk = rows_per_task(vocab);
        wanted
            .par_chunks_mut(chunk)
            .zip(logits.par_chunks(chunk * vocab))
            .zip(targets.par_chunks(chunk))
            .for_each(|((out, logits), targets)| target_logprob_rows(logits, targets, out));
        let mut out = vec![0f32; self.out_shape.elem_count()];
        for (p, value) in self.rows.iter().zip(wanted) {
            out[p.out_index] = value;
        }
        if let Ok(mut kept) = self.logits.lock() {
            *kept = Some(logits);
        }
        Ok((CpuStorage::F32(out), self.out_shape.clone()))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        head: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (hidden_storage, l1) = hidden.storage_and_layout();
        let (head_storage, l2) = head.storage_and_layout();
        let (Storage::Cpu(s1), Storage::Cpu(s2)) = (&*hidden_storage, &*head_storage) else {
            candle_core::bail!("lm-head log-probs: backward on a non-CPU device");
        };
        let dims = dims_of(l1, l2)?;
        let hidden_values = contiguous::<f32>(s1, l1, "hidden states")?;
        let head_values = contiguous::<f32>(s2, l2, "head")?;
        let gathered = gather_rows(hidden_values, &self.rows, dims.hidden);
        let targets = self.targets();
        let upstream_all = grad_res.flatten_all()?.to_vec1::<f32>()?;
        let results_all = res.flatten_all()?.to_vec1::<f32>()?;
        let upstream: Vec<f32> = self
            .rows
            .iter()
            .map(|p| upstream_all[p.out_index])
            .collect();
        let results: Vec<f32> = self.rows.iter().map(|p| results_all[p.out_index]).collect();
        // The kept logits become their gradient in place; a second backward recomputes them.
        let kept = self.logits.lock().ok().and_then(|mut kept| kept.take());
        let mut grad_logits = match kept {
            Some(logits) => logits,
            None => logits(&gathered, head_values, self.rows.len(), dims)?,
        };
        let vocab = dims.vocab;
        let chunk = rows_per_task(vocab);
        grad_logits
            .par_chunks_mut(chunk * vocab)
            .zip(targets.par_chunks(chunk))
            .zip(upstream.par_chunks(chunk).zip(results.par_chunks(chunk)))
            .for_each(|((rows, targets), (upstream, results))| {
                target_logprob_grad_rows_in_place(rows, targets, upstream, results);
            });
        let n = self.rows.len();
        let grad_gathered = Product {
            m: n,
            n: dims.hidden,
            k: vocab,
            lhs: &grad_logits,
            lhs_strides: (vocab, 1),
            rhs: head_values,
            rhs_strides: (dims.hidden, 1),
        }
        .run()?;
        let mut grad_hidden = vec![0f32; dims.rows * dims.hidden];
        for (p, grad) in self
            .rows
            .iter()
            .zip(grad_gathered.chunks_exact(dims.hidden))
        {
            let row =
                &mut grad_hidden[p.hidden_row * dims.hidden..(p.hidden_row + 1) * dims.hidden];
            for (g, d) in row.iter_mut().zip(grad) {
                *g += d;
            }
        }
        let grad_head = Product {
            m: vocab,
            n: dims.hidden,
            k: n,
            lhs: &grad_logits,
            // (grad_logits)ᵀ: element (v, r) is grad_logits[r, v].
            lhs_strides: (1, vocab),
            rhs: &gathered,
            rhs_strides: (dims.hidden, 1),
        }
        .run()?;
        let device = candle_core::Device::Cpu;
        Ok((
            Some(Tensor::from_vec(grad_hidden, hidden.shape(), &device)?),
            Some(Tensor::from_vec(grad_head, (vocab, dims.hidden), &device)?),
        ))
    }
}

fn apply(hidden: &Tensor, head: &Tensor, rows: Vec<Position>, out_shape: Shape) -> Result<Tensor> {
    let hidden = hidden.contiguous()?;
    let head = head.contiguous()?;
    let dims = dims_of(hidden.layout(), head.layout())?;
    let op = LmHeadLogprobs::new(rows, out_shape, dims)?;
    Ok(hidden.apply_op2(&head, op)?)
}

/// `log p(ids[b, i + 1] | ids[b, ..=i])` `[b, t − 1]` from the final hidden states `[b, t, h]`
/// and the LM head `[vocab, h]` (f32, CPU; `t ≥ 2`), differentiable in both, at the positions
/// `wanted` marks (`[b·(t − 1)]`, row-major; `None`: all of them). Other entries are 0 and pass
/// no gradient, and their logits are never computed.
pub fn lm_head_target_logprobs(
    hidden: &Tensor,
    head: &Tensor,
    ids: &Tensor,
    wanted: Option<&[bool]>,
) -> Result<Tensor> {
    let (batch, t, _) = hidden.dims3()?;
    if ids.dims2()? != (batch, t) || t < 2 {
        return Err(ModelError::InvalidInput(format!(
            "lm-head log-probs: hidden {:?} and ids {:?} do not fit (need [b, t ≥ 2, h], [b, t])",
            hidden.dims(),
            ids.dims()
        )));
    }
    let predicting = t - 1;
    if let Some(wanted) = wanted
        && wanted.len() != batch * predicting
    {
        return Err(ModelError::InvalidInput(format!(
            "a mask of {} positions for log-probs of {batch} × {predicting}",
            wanted.len()
        )));
    }
    let ids = ids.flatten_all()?.to_vec1::<u32>()?;
    let rows = (0..batch * predicting)
        .filter(|&j| wanted.is_none_or(|w| w[j]))
        .map(|j| {
            let hidden_row = (j / predicting) * t + j % predicting;
            Position {
                hidden_row,
                target: ids[hidden_row + 1],
                out_index: j,
            }
        })
        .collect();
    apply(hidden, head, rows, Shape::from((batch, predicting)))
}

/// `log p(target | hidden row)` `[predictions.len()]` for explicit `(row, target)` pairs over
/// hidden states `[.., h]` read as `[rows, h]` (f32, CPU), differentiable in both; a row may
/// appear more than once. Only these rows' logits are computed.
pub fn lm_head_row_logprobs(
    hidden: &Tensor,
    head: &Tensor,
    predictions: &[(usize, u32)],
) -> Result<Tensor> {
    let rows = predictions
        .iter()
        .enumerate()
        .map(|(out_index, &(hidden_row, target))| Position {
            hidden_row,
            target,
            out_index,
        })
        .collect();
    apply(hidden, head, rows, Shape::from(predictions.len()))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::*;
    use crate::fused::tests::{assert_same_values_and_gradients, random_var};
    use crate::model::token_logprobs_from_logits;

    fn composed(hidden: &Tensor, head: &Tensor, ids: &Tensor) -> Tensor {
        let (b, t, h) = hidden.dims3().unwrap();
        let logits = hidden
            .reshape((b * t, h))
            .unwrap()
            .matmul(&head.t().unwrap())
            .unwrap()
            .reshape((b, t, head.dim(0).unwrap()))
            .unwrap();
        token_logprobs_from_logits(&logits, ids).unwrap()
    }

    #[test]
    fn matches_the_composed_head_in_values_and_gradients() {
        for (batch, t, hidden, vocab) in [(3, 7, 16, 50), (1, 2, 8, 9), (2, 70, 64, 768)] {
            let h = random_var(&[batch, t, hidden], 0.0, 1.0);
            let head = random_var(&[vocab, hidden], 0.0, 0.5);
            let ids: Vec<u32> = (0..batch * t).map(|i| (i * 7 % vocab) as u32).collect();
            let ids = Tensor::from_vec(ids, (batch, t), &Device::Cpu).unwrap();
            let fused =
                lm_head_target_logprobs(h.as_tensor(), head.as_tensor(), &ids, None).unwrap();
            let reference = composed(h.as_tensor(), head.as_tensor(), &ids);
            assert_same_values_and_gradients(fused, reference, &[&h, &head], 1e-5, 1e-4);
        }
    }

    #[test]
    fn masked_positions_match_the_full_head_where_wanted_and_pass_nothing_elsewhere() {
        let (batch, t, hidden, vocab) = (3, 9, 16, 40);
        let h = random_var(&[batch, t, hidden], 0.0, 1.0);
        let head = random_var(&[vocab, hidden], 0.0, 0.5);
        let ids: Vec<u32> = (0..batch * t).map(|i| (i * 5 % vocab) as u32).collect();
        let ids = Tensor::from_vec(ids, (batch, t), &Device::Cpu).unwrap();
        // A response-only mask per row, one row with nothing wanted.
        let wanted: Vec<bool> = (0..batch * (t - 1))
            .map(|j| {
                let (row, i) = (j / (t - 1), j % (t - 1));
                row != 1 && i >= 3 + row
            })
            .collect();
        let mask = Tensor::from_vec(
            wanted
                .iter()
                .map(|&w| if w { 1f32 } else { 0.0 })
                .collect::<Vec<_>>(),
            (batch, t - 1),
            &Device::Cpu,
        )
        .unwrap();
        let masked =
            lm_head_target_logprobs(h.as_tensor(), head.as_tensor(), &ids, Some(&wanted)).unwrap();
        let reference = composed(h.as_tensor(), head.as_tensor(), &ids)
            .mul(&mask)
            .unwrap();
        assert_same_values_and_gradients(masked, reference, &[&h, &head], 1e-5, 1e-4);
        let wrong_length =
            lm_head_target_logprobs(h.as_tensor(), head.as_tensor(), &ids, Some(&wanted[1..]));
        assert!(wrong_length.is_err());
    }

    #[test]
    fn explicit_rows_may_repeat_and_their_gradients_add_up() {
        let (rows, hidden, vocab) = (6, 16, 40);
        let h = random_var(&[1, rows, hidden], 0.0, 1.0);
        let head = random_var(&[vocab, hidden], 0.0, 0.5);
        // Row 2 predicts two different tokens (a shared prompt's last row).
        let predictions = [(0usize, 3u32), (2, 7), (2, 11), (5, 39), (1, 0)];
        let fused = lm_head_row_logprobs(h.as_tensor(), head.as_tensor(), &predictions).unwrap();
        let index = Tensor::new(&predictions.map(|(r, _)| r as u32)[..], &Device::Cpu).unwrap();
        let targets = Tensor::new(&predictions.map(|(_, t)| t)[..], &Device::Cpu)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        let logits = h
            .as_tensor()
            .reshape((rows, hidden))
            .unwrap()
            .index_select(&index, 0)
            .unwrap()
            .matmul(&head.as_tensor().t().unwrap())
            .unwrap();
        let reference = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)
            .unwrap()
            .gather(&targets, 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        assert_same_values_and_gradients(fused, reference, &[&h, &head], 1e-5, 1e-4);
        let outside = lm_head_row_logprobs(h.as_tensor(), head.as_tensor(), &[(6, 0)]);
        assert!(outside.is_err());
    }

    #[test]
    fn a_second_backward_recomputes_the_logits() {
        let h = random_var(&[2, 5, 8], 0.0, 1.0);
        let head = random_var(&[11, 8], 0.0, 0.5);
        let ids = Tensor::from_vec((0..10u32).collect(), (2, 5), &Device::Cpu).unwrap();
        let out = lm_head_target_logprobs(h.as_tensor(), head.as_tensor(), &ids, None)
            .unwrap()
            .sum_all()
            .unwrap();
        let first = out.backward().unwrap();
        let second = out.backward().unwrap();
        for var in [&h, &head] {
            let (a, b) = (
                first.get(var.as_tensor()).unwrap(),
                second.get(var.as_tensor()).unwrap(),
            );
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(
                diff.to_dtype(DType::F32)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
                0.0
            );
        }
    }

    #[test]
    fn bad_shapes_and_tokens_are_errors() {
        let h = Tensor::zeros((1, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let head = Tensor::zeros((5, 4), DType::F32, &Device::Cpu).unwrap();
        let ids = Tensor::from_vec(vec![0u32, 1, 9], (1, 3), &Device::Cpu).unwrap();
        let err = lm_head_target_logprobs(&h, &head, &ids, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("token 9"), "{err}");
        let short = Tensor::from_vec(vec![0u32, 1], (1, 2), &Device::Cpu).unwrap();
        assert!(lm_head_target_logprobs(&h, &head, &short, None).is_err());
        let narrow_head = Tensor::zeros((5, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(lm_head_target_logprobs(&h, &narrow_head, &ids, None).is_err());
    }
}
