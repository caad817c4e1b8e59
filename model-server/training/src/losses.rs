//! The paper's losses as pure functions of model outputs (margins, rewards, sequence
//! log-probs), each numerically stable and differentiable with candle ops.

use candle_core::Tensor;

use crate::error::Result;

/// `σ(x)` of one score, stable for any `x`: a pair's `p_chosen` from its margin and a weak
/// label's soft target `σ(z_weak)` (server, run folders and trainer all use this one).
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `log σ(x) = min(x, 0) − log(1 + exp(−|x|))`, stable for any finite `x`.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let soft = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok((x.minimum(0.0)? - soft)?)
}

/// Elementwise `BCE(σ(z), t) = −(t·log σ(z) + (1 − t)·log σ(−z))` for soft targets `t ∈ [0, 1]`.
pub fn bce_with_logits(z: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let positive = log_sigmoid(z)?;
    let negative = log_sigmoid(&z.neg()?)?;
    let one_minus = targets.affine(-1.0, 1.0)?;
    Ok((targets.mul(&positive)? + one_minus.mul(&negative)?)?.neg()?)
}

/// Pairwise reward-model loss on margins `z = r(slot_c) − r(slot_r)` against targets `t`
/// (hard 0/1 ground truth or the weak model's soft σ(z_weak)), summed over the pairs given:
/// `Σ_i BCE(σ(z_i), t_i)`. The minibatch loss is this sum over all its pairs divided by their
/// number (the trainer evaluates shards of a minibatch and divides once).
///
/// With `explicit = Some((y, α))` (the "reward mechanism" conflict) it adds
/// `α · Σ_i m_i · BCE(σ(z_i), 1 − y_i)`, `m_i = 1[(z_i ≥ 0) ≠ (y_i = 1)]` on the detached
/// margin, `y_i = 1` where the conflicting goal prefers slot r (official form: slot c holds the
/// human-chosen text, the conflict favours the human-rejected one; compliance form: slot r
/// holds the compliant response): whenever the model already leans to the response the
/// conflicting goal favours it is rewarded for leaning more. Unmasked rows contribute 0 but
/// count in the mean's denominator, as in the official code.
pub fn reward_pair_loss_sum(
    margins: &Tensor,
    targets: &Tensor,
    explicit: Option<(&Tensor, f64)>,
) -> Result<Tensor> {
    let base = bce_with_logits(margins, targets)?;
    let Some((labels, alpha)) = explicit else {
        return Ok(base.sum_all()?);
    };
    let prefers_c = margins.detach().ge(0.0)?.to_dtype(margins.dtype())?;
    let label_is_c = labels.ge(0.5)?.to_dtype(margins.dtype())?;
    // m = 1 when the two disagree: |prefers_c − label_is_c|.
    let mask = (prefers_c - label_is_c)?.abs()?;
    let flipped = labels.affine(-1.0, 1.0)?;
    let conflict = mask.mul(&bce_with_logits(margins, &flipped)?)?;
    Ok((base + (conflict * alpha)?)?.sum_all()?)
}

/// The preference logit of a pair (winner `w` over loser `l`):
/// `β·((w − l) − (ref_w − ref_l)) − γ`. SimPO: mean log-probs, no reference, γ = 1, β = 2.
/// DPO: summed log-probs, frozen-reference sums, γ = 0, β = 0.1.
pub fn preference_logits(
    winner: &Tensor,
    loser: &Tensor,
    reference: Option<(&Tensor, &Tensor)>,
    beta: f64,
    gamma: f64,
) -> Result<Tensor> {
    let mut delta = (winner - loser)?;
    if let Some((ref_w, ref_l)) = reference {
        delta = (delta - (ref_w - ref_l)?)?;
    }
    Ok(delta.affine(beta, -gamma)?)
}

/// Per-sample `−log σ(logit)`.
pub fn preference_loss(logits: &Tensor) -> Result<Tensor> {
    Ok(log_sigmoid(logits)?.neg()?)
}

/// Scores and references of a minibatch of preference pairs in training (weak) order.
pub struct PreferenceBatch<'a> {
    /// Policy score of the trained-as-chosen response c' (mean or summed log-prob).
    pub chosen: &'a Tensor,
    /// Policy score of the trained-as-rejected response r'.
    pub rejected: &'a Tensor,
    /// Frozen-reference sums of (c', r') for DPO.
    pub reference: Option<(&'a Tensor, &'a Tensor)>,
    /// 1.0 where the conflicting goal prefers r' over c', else 0.0. Official form: the
    /// conflict favours the human-rejected response, so this is 1 where c' is human-chosen (the
    /// weak label agrees with humans); compliance form: 1 where r' is the compliant response.
    pub conflict_prefers_rejected: &'a Tensor,
}

/// SimPO/DPO loss summed over the pairs given (the minibatch loss divides the sum over all its
/// pairs by their number, as [`reward_pair_loss_sum`]): `Σ_i −log σ(logit(c'_i over r'_i))`, plus with
/// `reverse_alpha = Some(α)` the explicit conflict ("reverse"): for each sample whose policy
/// currently prefers the conflict-favoured response h (official: the human-rejected one) over
/// the other s — trigger `(score(c') < score(r')) == (the conflict prefers r')`, strict when it
/// prefers r', ties included otherwise, on detached scores — add
/// `α · Σ_i trigger_i · −log σ(logit(h_i over s_i))`.
pub fn preference_pair_loss_sum(
    batch: &PreferenceBatch<'_>,
    beta: f64,
    gamma: f64,
    reverse_alpha: Option<f64>,
) -> Result<Tensor> {
    let logits = preference_logits(batch.chosen, batch.rejected, batch.reference, beta, gamma)?;
    let base = preference_loss(&logits)?;
    let Some(alpha) = reverse_alpha else {
        return Ok(base.sum_all()?);
    };
    let a = batch.conflict_prefers_rejected;
    let not_a = a.affine(-1.0, 1.0)?;
    let pick = |human_side: &Tensor, other: &Tensor| -> Result<Tensor> {
        // a · human_side + (1 − a) · other
        Ok((a.mul(human_side)? + not_a.mul(other)?)?)
    };
    // h = the conflict-favoured response, s = the other one.
    let s = pick(batch.chosen, batch.rejected)?;
    let h = pick(batch.rejected, batch.chosen)?;
    let reference = match batch.reference {
        Some((ref_c, ref_r)) => Some((pick(ref_r, ref_c)?, pick(ref_c, ref_r)?)),
        None => None,
    };
    let reverse_logits = preference_logits(
        &h,
        &s,
        reference.as_ref().map(|(rh, rs)| (rh, rs)),
        beta,
        gamma,
    )?;
    let c_below_r = batch
        .chosen
        .detach()
        .lt(&batch.rejected.detach())?
        .to_dtype(a.dtype())?;
    // trigger = 1[c_below_r == a] = 1 − |c_below_r − a|
    let trigger = (c_below_r - a)?.abs()?.affine(-1.0, 1.0)?;
    let extra = trigger.mul(&preference_loss(&reverse_logits)?)?;
    Ok((base + (extra * alpha)?)?.sum_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(values: &[f32]) -> Tensor {
        Tensor::new(values, &Device::Cpu).unwrap()
    }
    fn scalar(x: &Tensor) -> f32 {
        x.to_scalar::<f32>().unwrap()
    }

    #[test]
    fn log_sigmoid_is_exact_and_stable() {
        let values = log_sigmoid(&t(&[0.0, 2.0, -1000.0, 1000.0]))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!((values[0] + std::f32::consts::LN_2).abs() < 1e-7);
        assert!((values[1] - (1.0f32 / (1.0 + (-2.0f32).exp())).ln()).abs() < 1e-6);
        assert_eq!(values[2], -1000.0);
        assert_eq!(values[3], 0.0);
    }

    #[test]
    fn bce_hand_values() {
        // BCE(σ(0), t) = ln 2 for any t; BCE(σ(z), 1) = −log σ(z).
        let z = t(&[0.0, 1.5, -0.5]);
        let targets = t(&[0.3, 1.0, 0.0]);
        let values = bce_with_logits(&z, &targets)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        assert!((values[0] - std::f32::consts::LN_2).abs() < 1e-6);
        assert!((values[1] + sig(1.5).ln()).abs() < 1e-6);
        assert!((values[2] + (1.0 - sig(-0.5)).ln()).abs() < 1e-6);
    }

    #[test]
    fn reward_mechanism_adds_loss_only_where_the_model_disagrees_with_ground_truth() {
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        let z = t(&[1.0, -2.0, 0.5, -0.25]);
        let soft = t(&[0.6, 0.2, 0.9, 0.5]);
        let y = t(&[1.0, 1.0, 0.0, 0.0]);
        let plain = scalar(&reward_pair_loss_sum(&z, &soft, None).unwrap()) / 4.0;
        let with = scalar(&reward_pair_loss_sum(&z, &soft, Some((&y, 0.5))).unwrap()) / 4.0;
        // Disagreeing rows: 1 (z<0, y=1) -> BCE(σ(-2), 0); 2 (z≥0, y=0) -> BCE(σ(0.5), 1).
        let extra = (-(1.0 - sig(-2.0)).ln() + -(sig(0.5)).ln()) / 4.0;
        assert!(
            (with - plain - 0.5 * extra).abs() < 1e-6,
            "{with} {plain} {extra}"
        );
    }

    #[test]
    fn simpo_and_dpo_hand_values() {
        // SimPO: −log σ(2·(−1.0 − −1.5) − 1) = −log σ(0) = ln 2.
        let c = t(&[-1.0]);
        let r = t(&[-1.5]);
        let a = t(&[1.0]);
        let batch = PreferenceBatch {
            chosen: &c,
            rejected: &r,
            reference: None,
            conflict_prefers_rejected: &a,
        };
        let simpo = scalar(&preference_pair_loss_sum(&batch, 2.0, 1.0, None).unwrap());
        assert!((simpo - std::f32::consts::LN_2).abs() < 1e-6);
        // DPO: −log σ(0.1·((−10 − −14) − (−12 − −12))) = −log σ(0.4).
        let c = t(&[-10.0]);
        let r = t(&[-14.0]);
        let (rc, rr) = (t(&[-12.0]), t(&[-12.0]));
        let batch = PreferenceBatch {
            chosen: &c,
            rejected: &r,
            reference: Some((&rc, &rr)),
            conflict_prefers_rejected: &a,
        };
        let dpo = scalar(&preference_pair_loss_sum(&batch, 0.1, 0.0, None).unwrap());
        assert!((dpo + (1.0f32 / (1.0 + (-0.4f32).exp())).ln()).abs() < 1e-6);
    }

    #[test]
    fn reverse_trigger_follows_the_official_tie_rules() {
        // Row 0: c' human-chosen, policy prefers r' (= harmful): triggers.
        // Row 1: c' human-chosen, tie: does not trigger (strict).
        // Row 2: c' human-rejected, tie: triggers (ties included).
        // Row 3: c' human-rejected, policy prefers r' (= human-chosen): no trigger.
        let c = t(&[-2.0, -1.0, -1.0, -3.0]);
        let r = t(&[-1.0, -1.0, -1.0, -1.0]);
        let a = t(&[1.0, 1.0, 0.0, 0.0]);
        let batch = PreferenceBatch {
            chosen: &c,
            rejected: &r,
            reference: None,
            conflict_prefers_rejected: &a,
        };
        let (beta, gamma) = (2.0f32, 1.0f32);
        let base =
            scalar(&preference_pair_loss_sum(&batch, beta as f64, gamma as f64, None).unwrap())
                / 4.0;
        let with = scalar(
            &preference_pair_loss_sum(&batch, beta as f64, gamma as f64, Some(0.5)).unwrap(),
        ) / 4.0;
        let nll = |x: f32| -(1.0 / (1.0 + (-x).exp())).ln();
        // Row 0: h = r' (−1), s = c' (−2): logit 2·1 − 1 = 1. Row 2: h = c' (−1), s = r' (−1): −1.
        let extra = (nll(1.0) + nll(-1.0)) / 4.0;
        assert!(
            (with - base - 0.5 * extra).abs() < 1e-6,
            "{with} {base} {extra}"
        );
    }
}
