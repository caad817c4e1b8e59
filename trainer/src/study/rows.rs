//! The rows a study uploads: human-ordered pairs for ceilings, and a student's pairs built from
//! a teacher's labels (soft labels for reward models, the teacher-preferred order for SimPO and
//! DPO, the side the explicit conflict favours, the high-confidence filters); and the content key
//! that deduplicates uploads.

use sha2::{Digest, Sha256};
use w2s_proto::v1 as pb;
use w2s_proto::v1::upload_dataset_request::Item;

use super::{LabelFilter, Scenario, WeakLabel, sigmoid};
use crate::data::{HhPair, Side};
use crate::spec::ConflictTarget;

pub(super) fn pair_row(prompt_less_chosen: &str, rejected: &str, label: f32, human: bool) -> Item {
    Item::Pair(pb::PairRow {
        prompt: String::new(),
        chosen: prompt_less_chosen.to_string(),
        rejected: rejected.to_string(),
        label: Some(label),
        chosen_is_human_choice: Some(human),
        conflict_prefers_chosen: None,
    })
}

/// A student's row from a human-ordered pair, in human order (`swap` false) or reversed, with
/// the side the explicit conflict favours under `target` (unset for the official form, whose
/// server default is the human-rejected response).
fn student_row(pair: &HhPair, label: f32, swap: bool, target: ConflictTarget) -> Item {
    let (chosen, rejected, chosen_side) = if swap {
        (&pair.rejected, &pair.chosen, Side::Rejected)
    } else {
        (&pair.chosen, &pair.rejected, Side::Chosen)
    };
    let mut row = pair_row(chosen, rejected, label, !swap);
    if let (Item::Pair(p), ConflictTarget::Compliant) = (&mut row, target) {
        p.conflict_prefers_chosen = pair.compliant.map(|side| side == chosen_side);
    }
    row
}

/// A content key of dataset rows: equal rows, equal key; any difference (text, label, order,
/// conflict side) gives another key.
pub(super) fn rows_key(rows: &[Item]) -> String {
    let mut hash = Sha256::new();
    for row in rows {
        let fields: Vec<String> = match row {
            Item::Pair(p) => vec![
                "pair".into(),
                p.prompt.clone(),
                p.chosen.clone(),
                p.rejected.clone(),
                format!("{:?}", p.label.map(f32::to_bits)),
                format!("{:?}", p.chosen_is_human_choice),
                format!("{:?}", p.conflict_prefers_chosen),
            ],
            Item::Text(t) => vec!["text".into(), t.text.clone()],
            Item::Prompt(p) => vec!["prompt".into(), p.prompt.clone()],
            Item::Header(h) => vec!["header".into(), h.name.clone()],
        };
        for field in fields {
            hash.update((field.len() as u64).to_le_bytes());
            hash.update(field.as_bytes());
        }
    }
    format!("{:x}", hash.finalize())
}

/// A student's rows from a teacher's labels of `pairs` (same order): soft labels in human order
/// for reward models, the teacher-preferred order for SimPO/DPO, kept by `filter` with the
/// confidence threshold τ.
pub(super) fn student_rows(
    scenario: Scenario,
    pairs: &[HhPair],
    labels: &[WeakLabel],
    filter: LabelFilter,
    tau: f64,
    target: ConflictTarget,
) -> Vec<Item> {
    pairs
        .iter()
        .zip(labels)
        .filter(|(_, l)| {
            let p = confidence(scenario, l.margin);
            match filter {
                LabelFilter::HighConfidence => l.correct && p >= tau,
                LabelFilter::HighConfidenceNoPeek => p.max(1.0 - p) >= tau,
                LabelFilter::All => true,
            }
        })
        .map(|(pair, l)| match scenario {
            Scenario::Reward => student_row(pair, l.p_chosen as f32, false, target),
            _ => student_row(pair, 1.0, l.margin < 0.0, target),
        })
        .collect()
}

/// The weak model's confidence in the human-chosen response as the official high-confidence
/// filter computes it: σ(margin), with DPO's summed log-prob margin scaled by 1/50 (IPO scores
/// pairs the same way).
pub(super) fn confidence(scenario: Scenario, margin: f64) -> f64 {
    if matches!(scenario, Scenario::Dpo | Scenario::Ipo) {
        sigmoid(margin / 50.0)
    } else {
        sigmoid(margin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(compliant: Side) -> HhPair {
        HhPair {
            row: 0,
            chosen: "\n\nHuman: q\n\nAssistant: refuse".into(),
            rejected: "\n\nHuman: q\n\nAssistant: comply".into(),
            compliant: Some(compliant),
        }
    }

    fn label(margin: f64) -> WeakLabel {
        WeakLabel {
            id: 0,
            margin,
            p_chosen: sigmoid(margin),
            correct: margin >= 0.0,
        }
    }

    fn row(item: &Item) -> &pb::PairRow {
        match item {
            Item::Pair(p) => p,
            _ => panic!("not a pair"),
        }
    }

    #[test]
    fn preference_rows_follow_the_teacher_and_mark_the_compliant_side() {
        let pairs = [pair(Side::Rejected)];
        // The teacher prefers the human-rejected (compliant) response: it goes first.
        let rows = student_rows(
            Scenario::Simpo,
            &pairs,
            &[label(-1.0)],
            LabelFilter::All,
            0.75,
            ConflictTarget::Compliant,
        );
        let r = row(&rows[0]);
        assert!(r.chosen.ends_with("comply"));
        assert_eq!(r.chosen_is_human_choice, Some(false));
        assert_eq!(r.conflict_prefers_chosen, Some(true));
        // The official form leaves the side to the server's default (the human-rejected one).
        let rows = student_rows(
            Scenario::Simpo,
            &pairs,
            &[label(1.0)],
            LabelFilter::All,
            0.75,
            ConflictTarget::HumanRejected,
        );
        let r = row(&rows[0]);
        assert!(r.chosen.ends_with("refuse"));
        assert_eq!(r.conflict_prefers_chosen, None);
    }

    #[test]
    fn reward_rows_stay_in_human_order_with_soft_labels() {
        let pairs = [pair(Side::Chosen)];
        let rows = student_rows(
            Scenario::Reward,
            &pairs,
            &[label(-2.0)],
            LabelFilter::All,
            0.75,
            ConflictTarget::Compliant,
        );
        let r = row(&rows[0]);
        assert!(r.chosen.ends_with("refuse"));
        assert!((r.label.unwrap() as f64 - sigmoid(-2.0)).abs() < 1e-6);
        assert_eq!(r.conflict_prefers_chosen, Some(true));
    }

    #[test]
    fn high_confidence_filters() {
        let pairs = [pair(Side::Chosen), pair(Side::Chosen), pair(Side::Chosen)];
        let labels = [label(2.0), label(-2.0), label(0.1)];
        let keep = |hc| {
            student_rows(
                Scenario::Simpo,
                &pairs,
                &labels,
                hc,
                0.75,
                ConflictTarget::HumanRejected,
            )
            .len()
        };
        assert_eq!(keep(LabelFilter::All), 3);
        // σ(2) = 0.88 ≥ 0.75 and right; σ(−2): confident but wrong; σ(0.1): unsure.
        assert_eq!(keep(LabelFilter::HighConfidence), 1);
        assert_eq!(keep(LabelFilter::HighConfidenceNoPeek), 2);
    }

    #[test]
    fn content_keys_differ_when_rows_do() {
        let a = vec![pair_row(
            "\n\nHuman: q\n\nAssistant: a",
            "\n\nHuman: q\n\nAssistant: b",
            1.0,
            true,
        )];
        let b = vec![pair_row(
            "\n\nHuman: q\n\nAssistant: b",
            "\n\nHuman: q\n\nAssistant: a",
            1.0,
            false,
        )];
        assert_eq!(rows_key(&a), rows_key(&a.clone()));
        assert_ne!(rows_key(&a), rows_key(&b));
    }
}
