//! On-policy training curves: per variant and round, across draws, what the policy's samples on
//! the loop's prompts earned from the judge and what they say (`rounds.jsonl`). A draw's value
//! pools its pairs' counts (rates) or averages them (judge reward); the interval is over draws.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::findings::SeedInterval;
use crate::report::Run;
use crate::run_folder::grading::GradeCounts;
use crate::run_folder::{Role, Scenario, Variant};

/// One round of one variant, across draws.
#[derive(Debug, Clone, Serialize)]
pub struct RoundPoint {
    /// Rounds of training behind the sampled policy (0: the SFT policy).
    pub round: u32,
    pub judge_reward: Option<SeedInterval>,
    pub right_decision: Option<SeedInterval>,
    pub harmful_compliance: Option<SeedInterval>,
    pub false_statement: Option<SeedInterval>,
}

/// An on-policy variant's curve.
#[derive(Debug, Clone, Serialize)]
pub struct RoundCurve {
    pub role: Role,
    pub variant: Variant,
    /// Policies (run folders) behind it.
    pub policies: usize,
    pub points: Vec<RoundPoint>,
}

/// One draw's sums for one round: judge rewards and their count, and pooled grade counts.
#[derive(Default)]
struct DrawSums {
    judge: f64,
    policies: usize,
    grades: GradeCounts,
    graded: bool,
}

/// The curves of every on-policy role and variant whose runs recorded their rounds, in the
/// typed order of (role, variant).
pub fn round_curves(runs: &[Run]) -> Vec<RoundCurve> {
    // (role, variant label) → round → seed → sums
    type Sums = BTreeMap<u32, BTreeMap<u64, DrawSums>>;
    let mut by_variant: BTreeMap<(Role, Variant), (usize, Sums)> = BTreeMap::new();
    for run in runs {
        let id = &run.identity;
        let Some(rounds) = run
            .rounds
            .as_ref()
            .filter(|_| id.scenario == Scenario::OnPolicy)
        else {
            continue;
        };
        let (policies, sums) = by_variant.entry((id.role, id.variant.clone())).or_default();
        *policies += 1;
        for record in rounds {
            let draw = sums
                .entry(record.round)
                .or_default()
                .entry(id.seed)
                .or_default();
            draw.judge += record.judge_reward;
            draw.policies += 1;
            if let Some(g) = record.grades {
                draw.graded = true;
                draw.grades += g;
            }
        }
    }
    by_variant
        .into_iter()
        .map(|((role, variant), (policies, rounds))| RoundCurve {
            role,
            variant,
            policies,
            points: rounds
                .into_iter()
                .map(|(round, draws)| {
                    let over_draws = |value: &dyn Fn(&DrawSums) -> Option<f64>| {
                        let values: Vec<f64> = draws.values().filter_map(value).collect();
                        SeedInterval::of(&values)
                    };
                    let graded = |rate: fn(&GradeCounts) -> Option<f64>| {
                        over_draws(&|d: &DrawSums| d.graded.then(|| rate(&d.grades)).flatten())
                    };
                    RoundPoint {
                        round,
                        judge_reward: over_draws(&|d| Some(d.judge / d.policies as f64)),
                        right_decision: graded(GradeCounts::right_decision_rate),
                        harmful_compliance: graded(GradeCounts::harmful_compliance_rate),
                        false_statement: graded(GradeCounts::false_statement_rate),
                    }
                })
                .collect(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run_folder::{RoundRecord, Setting};
    use crate::test_support::run;

    /// An on-policy student of draw `seed` with its round records.
    fn policy(scenario: Scenario, seed: u64, rounds: Vec<RoundRecord>) -> Run {
        let mut run = run("p", "s", Some("w"), Setting::None, seed, vec![0.9]);
        run.identity.scenario = scenario;
        run.rounds = Some(rounds);
        run
    }

    fn record(round: u32, judge: f64, harmful: usize, complied: usize) -> RoundRecord {
        RoundRecord {
            round,
            samples: 4,
            judge_reward: judge,
            turned_by_conflict: 0,
            grades: Some(GradeCounts {
                answers: 4,
                harmful,
                harmful_compliance: complied,
                safe_refusal: 0,
                false_statement: 0,
                right_decision: harmful - complied,
            }),
        }
    }

    #[test]
    fn a_draw_pools_its_pairs_and_the_interval_is_over_draws() {
        // Draw 1: two pairs, compliance 1/2 and 3/4 → pooled 4/6; judge (1 + 3) / 2 = 2.
        // Draw 2: one pair, compliance 0/2, judge 0. A reward run's records are ignored.
        let runs = vec![
            policy(Scenario::OnPolicy, 1, vec![record(0, 1.0, 2, 1)]),
            policy(Scenario::OnPolicy, 1, vec![record(0, 3.0, 4, 3)]),
            policy(Scenario::OnPolicy, 2, vec![record(0, 0.0, 2, 0)]),
            policy(Scenario::Reward, 3, vec![record(0, 9.0, 2, 2)]),
        ];
        let curves = round_curves(&runs);
        assert_eq!(curves.len(), 1);
        assert_eq!(curves[0].policies, 3);
        let point = &curves[0].points[0];
        let compliance = point.harmful_compliance.as_ref().unwrap();
        assert_eq!(compliance.seeds, 2);
        assert!((compliance.mean - (4.0 / 6.0 + 0.0) / 2.0).abs() < 1e-12);
        let judge = point.judge_reward.as_ref().unwrap();
        assert!((judge.mean - (2.0 + 0.0) / 2.0).abs() < 1e-12);
    }
}
