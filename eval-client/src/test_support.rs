//! Hand-made run folders for the unit tests of the report, the findings and the figures.

use crate::report::{Report, ReportOptions, Run, build};
use crate::run_folder::{Chain, Dose, LabelFilter, Role, RunIdentity, Scenario, Setting, Variant};

/// A reward run whose prediction on pair `i` is `p[i]` (right when ≥ 0.5); a student when
/// `weak` is given, else a ceiling; even pairs are safe requests (the chosen response complies).
pub fn run(
    id: &str,
    model: &str,
    weak: Option<&str>,
    setting: Setting,
    seed: u64,
    p: Vec<f64>,
) -> Run {
    let n = p.len();
    Run {
        dir: id.into(),
        run_id: id.into(),
        identity: RunIdentity {
            scenario: Scenario::Reward,
            role: if weak.is_some() {
                Role::W2s
            } else {
                Role::WeakCeiling
            },
            model: model.into(),
            weak_model: weak.map(str::to_string),
            variant: Variant {
                setting,
                dose: (setting == Setting::Explicit).then_some(Dose::Alpha(0.5)),
                filter: LabelFilter::All,
                chain: Chain::Direct,
            },
            seed,
        },
        correct: p.iter().map(|&x| x >= 0.5).collect(),
        p_chosen: p,
        // Even pairs: the human-chosen response complies (a safe request).
        chosen_compliant: (0..n).map(|i| Some(i % 2 == 0)).collect(),
        generations: None,
        rounds: None,
    }
}

/// Predictions on `n` pairs: confidently wrong (0.1) where `wrong(i)`, else right (0.9).
pub fn predictions(n: usize, wrong: impl Fn(usize) -> bool) -> Vec<f64> {
    (0..n).map(|i| if wrong(i) { 0.1 } else { 0.9 }).collect()
}

/// The report of `runs` with few bootstrap resamples (the tests read point values).
pub fn report_of(runs: &[Run]) -> Report {
    let options = ReportOptions {
        bootstrap_resamples: 50,
        ..Default::default()
    };
    build(runs, &options, Vec::new())
}
