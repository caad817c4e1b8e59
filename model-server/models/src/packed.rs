//! Sequences laid out without padding ("packed") for training and scoring passes.
//!
//! A right-padded batch runs every position-wise layer (embeddings, LayerNorm, projections,
//! MLP) on every padded slot, and the two sequences of a preference pair run their common
//! prompt twice. Here each real token is one row of a `[1, n, h]` tensor, and with
//! [`PrefixSharing::Pairs`] the two sequences of a pair own their common prefix's rows once
//! (causal attention makes those hidden states identical in both). Only attention needs
//! sequences: each layer gathers the rows of every input sequence into a right-padded
//! `[sequences, t, ·]` block, runs causal attention there and gathers each row's output back
//! from the one sequence that owns it. Gradients follow the gathers (candle's `index_select`
//! backward adds them up), so a shared row collects what both sequences send it.
//!
//! The result equals the padded pass on every real token up to floating-point summation order
//! (tests in `model.rs`); the sandbox's pairs have 22-token prompts and 17-token responses, so
//! the position-wise layers see 56 rows per pair instead of 96 padded slots.

use std::ops::Range;

use candle_core::{Device, Tensor};

use crate::error::{ModelError, Result};
use crate::fused_attention::QueryRows;

/// A batch must hold at least one sequence and every sequence at least one token.
pub(crate) fn check_batch(sequences: &[Vec<u32>]) -> Result<()> {
    if sequences.is_empty() {
        return Err(ModelError::InvalidInput("empty batch".into()));
    }
    if let Some(i) = sequences.iter().position(|s| s.is_empty()) {
        return Err(ModelError::InvalidInput(format!(
            "sequence {i} has no tokens"
        )));
    }
    Ok(())
}

/// Which sequences may share rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefixSharing {
    /// Every sequence owns all its rows.
    None,
    /// Sequences `2k` and `2k + 1` form a pair and share their common prefix.
    Pairs,
}

/// Where one input sequence's tokens live: token `i` is row `shared_start + i` for
/// `i < shared`, else row `own_start + i − shared`.
#[derive(Debug, Clone, Copy)]
struct SequenceRows {
    shared_start: usize,
    shared: usize,
    own_start: usize,
    len: usize,
}

impl SequenceRows {
    fn row(&self, i: usize) -> usize {
        if i < self.shared {
            self.shared_start + i
        } else {
            self.own_start + i - self.shared
        }
    }
}

/// One log-prob a loss reads: the packed row whose hidden state predicts, and the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prediction {
    pub row: usize,
    pub target: u32,
}

/// Token sequences as packed rows plus the index tables attention needs.
#[derive(Debug, Clone)]
pub struct PackedSequences {
    /// `[1, n]` u32 token of each row.
    ids: Tensor,
    tokens: Vec<u32>,
    /// Position of each row inside its sequence.
    positions: Vec<u32>,
    layout: Vec<SequenceRows>,
    /// `[sequences · t]` u32: the row at each slot of the padded attention block (padding
    /// slots repeat their sequence's last row; causal attention never lets a real slot see
    /// them, and their outputs are never read).
    gather: Tensor,
    /// `[n]` u32: each row's slot in the attention block of the sequence that owns it.
    scatter: Tensor,
    block_len: usize,
    /// Per sequence, the attention block's rows whose output is read: from its first owned
    /// row to its length (a pair's second sequence skips the prompt its partner owns).
    query_rows: Vec<QueryRows>,
    /// Whether the rows already are the block (equal lengths, nothing shared): the gathers
    /// are then reshapes.
    identity: bool,
}

impl PackedSequences {
    /// Packs `sequences` (each non-empty; an even number of them for
    /// [`PrefixSharing::Pairs`]).
    pub fn new(sequences: &[Vec<u32>], sharing: PrefixSharing, device: &Device) -> Result<Self> {
        check_batch(sequences)?;
        if sharing == PrefixSharing::Pairs && !sequences.len().is_multiple_of(2) {
            return Err(ModelError::InvalidInput(format!(
                "{} sequences cannot form pairs",
                sequences.len()
            )));
        }
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut layout: Vec<SequenceRows> = Vec::with_capacity(sequences.len());
        // (owning sequence, position) of every row.
        let mut owner = Vec::new();
        for (k, seq) in sequences.iter().enumerate() {
            let (shared_start, shared) = match sharing {
                PrefixSharing::Pairs if k % 2 == 1 => {
                    let first = &sequences[k - 1];
                    let common = first.iter().zip(seq).take_while(|(a, b)| a == b).count();
                    (layout[k - 1].own_start, common)
                }
                _ => (0, 0),
            };
            let own_start = tokens.len();
            for (i, &token) in seq.iter().enumerate().skip(shared) {
                tokens.push(token);
                positions.push(i as u32);
                owner.push((k, i));
            }
            layout.push(SequenceRows {
                shared_start,
                shared,
                own_start,
                len: seq.len(),
            });
        }
        let block_len = sequences.iter().map(Vec::len).max().unwrap_or(0);
        let mut gather = Vec::with_capacity(sequences.len() * block_len);
        for rows in &layout {
            gather.extend((0..block_len).map(|i| rows.row(i.min(rows.len - 1)) as u32));
        }
        let scatter: Vec<u32> = owner
            .iter()
            .map(|&(k, i)| (k * block_len + i) as u32)
            .collect();
        let query_rows = layout
            .iter()
            .map(|rows| QueryRows {
                first: rows.shared,
                len: rows.len,
            })
            .collect();
        let n = tokens.len();
        let identity = n == sequences.len() * block_len;
        Ok(Self {
            ids: Tensor::from_vec(tokens.clone(), (1, n), device)?,
            tokens,
            positions,
            layout,
            gather: Tensor::from_vec(gather, sequences.len() * block_len, device)?,
            scatter: Tensor::from_vec(scatter, n, device)?,
            block_len,
            query_rows,
            identity,
        })
    }

    /// Per sequence, the attention rows whose output [`Self::from_sequences`] reads.
    pub fn query_rows(&self) -> &[QueryRows] {
        &self.query_rows
    }

    /// Number of packed rows.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Number of input sequences.
    pub fn sequences(&self) -> usize {
        self.layout.len()
    }

    /// Length of input sequence `seq`.
    pub fn sequence_len(&self, seq: usize) -> usize {
        self.layout[seq].len
    }

    /// Length of the longest input sequence.
    pub fn max_len(&self) -> usize {
        self.block_len
    }

    /// `[1, n]` u32 token ids of the rows.
    pub fn ids(&self) -> &Tensor {
        &self.ids
    }

    /// `[1, n]` u32 position ids of the rows, plus `offset` (OPT's learned positions start at 2).
    pub fn position_ids(&self, offset: u32) -> Result<Tensor> {
        let values: Vec<u32> = self.positions.iter().map(|p| p + offset).collect();
        Ok(Tensor::from_vec(
            values,
            (1, self.len()),
            self.ids.device(),
        )?)
    }

    /// The row holding token `i` of sequence `seq`.
    pub fn row(&self, seq: usize, i: usize) -> usize {
        self.layout[seq].row(i)
    }

    /// The prediction of token `j ≥ 1` of sequence `seq`: the row of token `j − 1` scored on
    /// token `j`.
    pub fn prediction(&self, seq: usize, j: usize) -> Prediction {
        let rows = self.layout[seq];
        Prediction {
            row: rows.row(j - 1),
            target: self.tokens[rows.row(j)],
        }
    }

    /// The predictions of tokens `tokens` of sequence `seq` (token 0 has no predictor and is
    /// skipped, as are tokens past the end).
    pub fn predictions(
        &self,
        seq: usize,
        tokens: Range<usize>,
    ) -> impl Iterator<Item = Prediction> + '_ {
        let end = tokens.end.min(self.layout[seq].len);
        (tokens.start.max(1)..end).map(move |j| self.prediction(seq, j))
    }

    /// Rows `[1, n, c]` (or `[n, c]`) as the right-padded attention block `[sequences, t, c]`.
    pub fn to_sequences(&self, x: &Tensor) -> Result<Tensor> {
        let c = x.dims().last().copied().unwrap_or(0);
        if self.identity {
            return Ok(x.reshape((self.sequences(), self.block_len, c))?);
        }
        Ok(x.reshape((self.len(), c))?
            .index_select(&self.gather, 0)?
            .reshape((self.sequences(), self.block_len, c))?)
    }

    /// The attention block's output `[sequences, t, c]` back as rows `[1, n, c]`, each row from
    /// the sequence that owns it.
    pub fn from_sequences(&self, y: &Tensor) -> Result<Tensor> {
        let c = y.dims().last().copied().unwrap_or(0);
        if self.identity {
            return Ok(y.reshape((1, self.len(), c))?);
        }
        Ok(y.reshape((self.sequences() * self.block_len, c))?
            .index_select(&self.scatter, 0)?
            .reshape((1, self.len(), c))?)
    }
}

/// The log-probs several sequences read, each with its weight in its sequence's pooled score
/// (1 for a sum, 1 / count for a mean).
#[derive(Debug, Default)]
pub struct PooledPredictions {
    pub predictions: Vec<Prediction>,
    owners: Vec<usize>,
    weights: Vec<f32>,
}

impl PooledPredictions {
    /// Adds sequence `seq`'s predictions, pooled as a mean (`mean`) or a sum.
    pub fn push(
        &mut self,
        seq: usize,
        predictions: impl IntoIterator<Item = Prediction>,
        mean: bool,
    ) {
        let before = self.predictions.len();
        self.predictions.extend(predictions);
        let added = self.predictions.len() - before;
        let weight = if mean { 1.0 / added.max(1) as f32 } else { 1.0 };
        self.owners.extend(std::iter::repeat_n(seq, added));
        self.weights.extend(std::iter::repeat_n(weight, added));
    }

    /// The pooled score `[count]` of each sequence from the log-probs `[predictions.len()]`
    /// (0 for a sequence without predictions).
    pub fn pool(&self, logprobs: &Tensor, count: usize) -> Result<Tensor> {
        weighted_sums(logprobs, &self.owners, &self.weights, count)
    }
}

/// `out[k] = Σ_i weights[i] · values[i]` over the `i` with `owners[i] = k`, `k < count`:
/// per-sequence pooling of packed log-probs `[m]` into `[count]`, differentiable in `values`.
pub fn weighted_sums(
    values: &Tensor,
    owners: &[usize],
    weights: &[f32],
    count: usize,
) -> Result<Tensor> {
    let m = values.elem_count();
    if owners.len() != m || weights.len() != m {
        return Err(ModelError::InvalidInput(format!(
            "{} owners and {} weights for {m} values",
            owners.len(),
            weights.len()
        )));
    }
    if let Some(bad) = owners.iter().find(|&&k| k >= count) {
        return Err(ModelError::InvalidInput(format!(
            "value owned by sequence {bad} of {count}"
        )));
    }
    if m == 0 {
        return Ok(Tensor::zeros(count, values.dtype(), values.device())?);
    }
    // A dense [count, m] matrix: m is a minibatch's response tokens, a few thousand at most.
    let mut matrix = vec![0f32; count * m];
    for (i, (&k, &w)) in owners.iter().zip(weights).enumerate() {
        matrix[k * m + i] = w;
    }
    let matrix = Tensor::from_vec(matrix, (count, m), values.device())?.to_dtype(values.dtype())?;
    Ok(matrix.matmul(&values.reshape((m, 1))?)?.squeeze(1)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_share_their_common_prefix_and_nothing_else() {
        let seqs = vec![vec![1, 2, 3, 4], vec![1, 2, 5], vec![7], vec![8, 9]];
        let packed = PackedSequences::new(&seqs, PrefixSharing::Pairs, &Device::Cpu).unwrap();
        // 4 + 1 (the "5") + 1 + 2.
        assert_eq!(packed.len(), 8);
        assert_eq!(packed.row(1, 0), packed.row(0, 0));
        assert_eq!(packed.row(1, 1), packed.row(0, 1));
        assert_ne!(packed.row(1, 2), packed.row(0, 2));
        for (k, seq) in seqs.iter().enumerate() {
            for (i, &token) in seq.iter().enumerate() {
                assert_eq!(packed.tokens[packed.row(k, i)], token);
                assert_eq!(packed.positions[packed.row(k, i)], i as u32);
            }
        }
        // The shared prompt's last row predicts both continuations.
        let a: Vec<_> = packed.predictions(0, 2..4).collect();
        let b: Vec<_> = packed.predictions(1, 2..3).collect();
        assert_eq!(a[0].row, b[0].row);
        assert_eq!((a[0].target, b[0].target), (3, 5));
        assert_eq!(packed.predictions(2, 0..1).count(), 0);
    }

    #[test]
    fn a_sequence_that_is_a_prefix_of_its_partner_owns_no_rows() {
        let seqs = vec![vec![1, 2, 3], vec![1, 2]];
        let packed = PackedSequences::new(&seqs, PrefixSharing::Pairs, &Device::Cpu).unwrap();
        assert_eq!(packed.len(), 3);
        assert_eq!(packed.row(1, 1), packed.row(0, 1));
    }

    #[test]
    fn gathers_round_trip_every_row() {
        let ragged = vec![vec![1, 2, 3], vec![1, 4], vec![5, 6, 7, 8], vec![9, 6]];
        let even = vec![
            vec![1, 2, 3, 4],
            vec![1, 4, 5, 6],
            vec![7, 6, 7, 8],
            vec![9, 6, 1, 1],
        ];
        for (seqs, sharing) in [
            (&ragged, PrefixSharing::None),
            (&ragged, PrefixSharing::Pairs),
            (&even, PrefixSharing::None),
        ] {
            let packed = PackedSequences::new(seqs, sharing, &Device::Cpu).unwrap();
            assert_eq!(packed.identity, seqs == &even);
            let n = packed.len();
            let x = Tensor::arange(0f32, (n * 2) as f32, &Device::Cpu)
                .unwrap()
                .reshape((1, n, 2))
                .unwrap();
            let block = packed.to_sequences(&x).unwrap();
            assert_eq!(block.dims(), &[4, 4, 2]);
            let back = packed.from_sequences(&block).unwrap();
            let diff = (back - &x).unwrap().abs().unwrap().sum_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        }
    }

    #[test]
    fn bad_batches_are_errors() {
        let cpu = Device::Cpu;
        assert!(PackedSequences::new(&[], PrefixSharing::None, &cpu).is_err());
        assert!(PackedSequences::new(&[vec![1], vec![]], PrefixSharing::None, &cpu).is_err());
        assert!(PackedSequences::new(&[vec![1]], PrefixSharing::Pairs, &cpu).is_err());
    }
}
