//! The study's answer across seeds: every headline quantity of the report (conflict tax,
//! DS_new − chance, ΔDS, PGR) as a mean with a 95% t-interval over seeds, and the paper's three
//! findings (paper spec §1.1) stated as questions this run answers with numbers, "not
//! reproduced" included. Pure functions of a built [`Report`].

use std::collections::BTreeMap;

use serde::Serialize;

use crate::report::{Comparison, Report};

/// Two-sided 95% Student-t critical value for `df` degrees of freedom.
pub fn t95(df: usize) -> f64 {
    const TABLE: [f64; 10] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    ];
    match df {
        0 => f64::NAN,
        1..=10 => TABLE[df - 1],
        11..=20 => 2.12,
        21..=30 => 2.06,
        _ => 1.96,
    }
}

/// A mean over seeds with its 95% t-interval half-width (`None` below two seeds).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SeedInterval {
    pub mean: f64,
    pub half_width: Option<f64>,
    pub seeds: usize,
}

impl SeedInterval {
    /// `None` for no values.
    pub fn of(values: &[f64]) -> Option<Self> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let half_width = (n >= 2).then(|| {
            let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            t95(n - 1) * (var / n as f64).sqrt()
        });
        Some(Self {
            mean,
            half_width,
            seeds: n,
        })
    }

    /// +1 when the interval lies above 0, −1 below, 0 when it includes 0, `None` without one.
    pub fn sign(&self) -> Option<i8> {
        let h = self.half_width?;
        Some(if self.mean - h > 0.0 {
            1
        } else if self.mean + h < 0.0 {
            -1
        } else {
            0
        })
    }

    /// `+0.123 ± 0.045 (3 seeds)`.
    pub fn show(&self, scale: f64) -> String {
        match self.half_width {
            Some(h) => format!(
                "{:+.3} ± {:.3} ({} seeds)",
                self.mean * scale,
                h * scale,
                self.seeds
            ),
            None => format!("{:+.3} (1 seed)", self.mean * scale),
        }
    }
}

/// One (scenario, weak, strong, variant) across seeds.
#[derive(Debug, Clone, Serialize)]
pub struct AcrossSeeds {
    pub scenario: String,
    pub weak: String,
    pub strong: String,
    pub variant: String,
    pub tax: Option<SeedInterval>,
    pub ds_new_excess: Option<SeedInterval>,
    pub ds_delta: Option<SeedInterval>,
    pub pgr: Option<SeedInterval>,
    /// The no-conflict DS (imitation of weak errors), for `none` rows.
    pub imitation_ds: Option<SeedInterval>,
}

type Key = (String, String, String, String);

fn group(report: &Report) -> BTreeMap<Key, Vec<&Comparison>> {
    let mut groups: BTreeMap<Key, Vec<&Comparison>> = BTreeMap::new();
    for c in &report.comparisons {
        groups
            .entry((
                c.scenario.clone(),
                c.weak.clone(),
                c.strong.clone(),
                c.variant.clone(),
            ))
            .or_default()
            .push(c);
    }
    groups
}

/// Every comparison's headline quantities across seeds.
pub fn across_seeds(report: &Report) -> Vec<AcrossSeeds> {
    group(report)
        .into_iter()
        .map(|((scenario, weak, strong, variant), cs)| {
            let of = |f: fn(&Comparison) -> Option<f64>| {
                SeedInterval::of(&cs.iter().filter_map(|c| f(c)).collect::<Vec<_>>())
            };
            let is_conflict = cs.iter().any(|c| c.baseline_run_id.is_some());
            AcrossSeeds {
                scenario,
                weak,
                strong,
                variant,
                tax: of(|c| c.conflict_tax),
                ds_new_excess: of(|c| c.ds_new_excess),
                ds_delta: of(|c| c.ds_delta),
                pgr: of(|c| c.pgr),
                imitation_ds: if is_conflict { None } else { of(|c| c.ds) },
            }
        })
        .collect()
}

/// Models in increasing capability as the grid implies: a model's rank is the number of
/// distinct models that supervise it (in a full weak < strong grid: its position).
pub fn model_order(report: &Report) -> Vec<String> {
    let mut teachers: BTreeMap<&str, std::collections::BTreeSet<&str>> = BTreeMap::new();
    for c in &report.comparisons {
        teachers.entry(c.weak.as_str()).or_default();
        teachers
            .entry(c.strong.as_str())
            .or_default()
            .insert(c.weak.as_str());
    }
    let mut order: Vec<(&str, usize)> = teachers.iter().map(|(m, t)| (*m, t.len())).collect();
    order.sort_by_key(|(m, rank)| (*rank, *m));
    order.into_iter().map(|(m, _)| m.to_string()).collect()
}

/// Whether a variant is a bootstrapped (via an intermediate) or intermediate student.
pub fn is_bootstrap(variant: &str) -> bool {
    variant.contains("+via-") || variant.contains("+intermediate")
}

/// Conflict variants (no `none`, no bootstrap, no high-confidence filter) per scenario.
fn conflict_variants(report: &Report) -> BTreeMap<(String, String), Vec<&Comparison>> {
    let mut out: BTreeMap<(String, String), Vec<&Comparison>> = BTreeMap::new();
    for c in report.comparisons.iter().filter(|c| {
        c.baseline_run_id.is_some() && !is_bootstrap(&c.variant) && !c.variant.contains("+hc")
    }) {
        out.entry((c.scenario.clone(), c.variant.clone()))
            .or_default()
            .push(c);
    }
    out
}

/// Per seed, the pooled DS_new − chance over every weak < strong pair:
/// Σ|N ∩ R| / Σ|N| − Σ|C ∩ R| / Σ|C|.
fn pooled_excess_by_seed(comparisons: &[&Comparison]) -> Vec<(u64, f64)> {
    let mut by_seed: BTreeMap<u64, [usize; 4]> = BTreeMap::new();
    for c in comparisons {
        if let Some(e) = &c.conflict {
            let sums = by_seed.entry(c.seed).or_default();
            sums[0] += e.ds_new.numerator;
            sums[1] += e.ds_new.denominator;
            sums[2] += e.ds_new_chance.numerator;
            sums[3] += e.ds_new_chance.denominator;
        }
    }
    by_seed
        .into_iter()
        .filter(|(_, s)| s[1] > 0 && s[3] > 0)
        .map(|(seed, s)| (seed, s[0] as f64 / s[1] as f64 - s[2] as f64 / s[3] as f64))
        .collect()
}

/// Per seed, the least-squares slope of `y` against the capability gap over the pairs.
fn slope_by_seed(
    comparisons: &[&Comparison],
    y: fn(&Comparison) -> Option<f64>,
) -> Vec<(u64, f64)> {
    let mut by_seed: BTreeMap<u64, Vec<(f64, f64)>> = BTreeMap::new();
    for c in comparisons {
        if let Some(v) = y(c) {
            by_seed
                .entry(c.seed)
                .or_default()
                .push((c.capability_gap, v));
        }
    }
    by_seed
        .into_iter()
        .filter_map(|(seed, points)| Some((seed, slope(&points)?)))
        .collect()
}

/// Least-squares slope; `None` for fewer than two distinct x.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    (sxx > 1e-12).then(|| sxy / sxx)
}

/// One finding's answer for one (scenario, conflict variant).
#[derive(Debug, Clone, Serialize)]
pub struct FindingRow {
    pub scenario: String,
    pub variant: String,
    pub value: Option<SeedInterval>,
    /// The values `value` summarises, by seed (seeds where it is undefined left out): the
    /// interval says whether they exclude 0, these show how consistent their sign is.
    pub per_seed: Vec<(u64, f64)>,
    pub verdict: &'static str,
}

impl FindingRow {
    fn new(
        scenario: &str,
        variant: &str,
        per_seed: Vec<(u64, f64)>,
        yes: &'static str,
        no: &'static str,
    ) -> Self {
        let values: Vec<f64> = per_seed.iter().map(|(_, v)| *v).collect();
        let value = SeedInterval::of(&values);
        Self {
            scenario: scenario.to_string(),
            variant: variant.to_string(),
            value,
            per_seed,
            verdict: verdict(value, yes, no),
        }
    }
}

/// The paper's three findings, answered by this run.
#[derive(Debug, Clone, Serialize)]
pub struct Findings {
    /// (i) DS_new − chance, pooled over pairs per seed.
    pub tax_in_blind_spot: Vec<FindingRow>,
    /// (ii) slope of DS_new − chance against the capability gap, per seed.
    pub grows_with_gap: Vec<FindingRow>,
    /// (iii) DS_new − chance of the bootstrapped student minus the direct student's.
    pub bootstrap_reduces: Vec<FindingRow>,
}

fn verdict(value: Option<SeedInterval>, yes: &'static str, no: &'static str) -> &'static str {
    if value.is_some_and(|v| v.seeds < 2) {
        return "one seed: no interval across seeds (run with more seeds)";
    }
    match value.and_then(|v| v.sign()) {
        Some(1) => yes,
        Some(-1) => no,
        Some(_) => "not reproduced (interval includes 0)",
        None => "undefined (no seed with a defined value)",
    }
}

/// Answers the three findings from the conflict comparisons.
pub fn findings(report: &Report) -> Findings {
    let mut out = Findings {
        tax_in_blind_spot: Vec::new(),
        grows_with_gap: Vec::new(),
        bootstrap_reduces: Vec::new(),
    };
    for ((scenario, variant), cs) in conflict_variants(report) {
        out.tax_in_blind_spot.push(FindingRow::new(
            &scenario,
            &variant,
            pooled_excess_by_seed(&cs),
            "reproduced: paid disproportionately in S_k ∩ W_uk",
            "reversed: paid less than chance in S_k ∩ W_uk",
        ));
        out.grows_with_gap.push(FindingRow::new(
            &scenario,
            &variant,
            slope_by_seed(&cs, |c| c.ds_new_excess),
            "reproduced: grows with the gap",
            "reversed: shrinks with the gap",
        ));
        let (chains, diffs) = bootstrap_differences(report, &scenario, &variant);
        if chains > 0 && diffs.is_empty() {
            out.bootstrap_reduces.push(FindingRow {
                scenario,
                variant,
                value: None,
                per_seed: Vec::new(),
                verdict: "undefined: no seed where both the bootstrapped and the direct student make new mistakes under the conflict",
            });
        } else if !diffs.is_empty() {
            out.bootstrap_reduces.push(FindingRow::new(
                &scenario,
                &variant,
                diffs,
                "reversed: bootstrapping increases it",
                "reproduced: bootstrapping reduces it",
            ));
        }
    }
    out
}

/// Per (chain, seed): the bootstrapped student's DS_new − chance minus the direct student's
/// for the same weak and strong model and conflict, with its seed; also how many bootstrapped
/// comparisons there were (defined or not).
fn bootstrap_differences(
    report: &Report,
    scenario: &str,
    variant: &str,
) -> (usize, Vec<(u64, f64)>) {
    let mut out = Vec::new();
    let mut chains = 0;
    for b in report.comparisons.iter().filter(|c| {
        c.scenario == scenario
            && c.variant.starts_with(&format!("{variant}+via-"))
            && c.baseline_run_id.is_some()
    }) {
        chains += 1;
        let direct = report.comparisons.iter().find(|c| {
            c.scenario == scenario
                && c.variant == variant
                && c.weak == b.weak
                && c.strong == b.strong
                && c.seed == b.seed
        });
        if let (Some(x), Some(Some(y))) = (b.ds_new_excess, direct.map(|d| d.ds_new_excess)) {
            out.push((b.seed, x - y));
        }
    }
    (chains, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_interval_by_hand() {
        let v = SeedInterval::of(&[1.0, 2.0, 3.0]).unwrap();
        assert_eq!(v.mean, 2.0);
        // s = 1, se = 1/√3, t(2) = 4.303.
        assert!((v.half_width.unwrap() - 4.303 / 3f64.sqrt()).abs() < 1e-9);
        assert_eq!(v.sign(), Some(0));
        assert_eq!(SeedInterval::of(&[0.5]).unwrap().half_width, None);
        assert_eq!(SeedInterval::of(&[0.5]).unwrap().sign(), None);
        assert!(SeedInterval::of(&[]).is_none());
        assert_eq!(SeedInterval::of(&[1.0, 1.1, 0.9]).unwrap().sign(), Some(1));
    }

    #[test]
    fn a_finding_keeps_its_per_seed_values_and_needs_its_interval_to_exclude_zero() {
        let consistent_but_wide = FindingRow::new(
            "simpo",
            "explicit α=2",
            vec![(0, 0.31), (1, 0.52), (2, 0.13)],
            "yes",
            "reversed",
        );
        assert_eq!(consistent_but_wide.per_seed.len(), 3);
        assert!((consistent_but_wide.value.unwrap().mean - 0.32).abs() < 1e-12);
        assert_eq!(
            consistent_but_wide.verdict,
            "not reproduced (interval includes 0)"
        );
        let tight = FindingRow::new("r", "v", vec![(0, 1.0), (3, 1.1), (4, 0.9)], "yes", "no");
        assert_eq!(tight.verdict, "yes");
        assert_eq!(tight.per_seed[1], (3, 1.1));
        let one = FindingRow::new("r", "v", vec![(2, -0.5)], "yes", "no");
        assert!(one.verdict.starts_with("one seed"));
    }

    #[test]
    fn slope_by_hand() {
        assert_eq!(slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]), Some(2.0));
        assert_eq!(slope(&[(1.0, 1.0), (1.0, 3.0)]), None);
        assert_eq!(slope(&[(1.0, 1.0)]), None);
    }
}
