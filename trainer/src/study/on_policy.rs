//! The on-policy scenario's student: the strong model after SFT on its weak teacher's preferred
//! responses writes its own answers, a judge ranks them, and DPO on those pairs makes the next
//! policy, for `on_policy.rounds` rounds. Each round's samples, and those of the final policy,
//! are saved with the judge's scores (`samples.jsonl`) and summed up with their grades
//! (`rounds.jsonl`); the final policy's greedy answers to the test prompts are saved
//! (`generations.jsonl`) to be graded on what it says.
//!
//! The judge is the weak model's reward model trained on ground truth — the weak ceiling, trained
//! again inside the run so that it is resident on the run's server (training is deterministic:
//! the same weights). Under the implicit conflict the judge also learns the helpfulness pairs;
//! under the explicit one it scores `judge + α · complies(answer)`, the same second goal as the
//! explicit conflict of the other scenarios.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::json;
use superficial_models::tokenizer::split_dialogue;
use superficial_run_folder::grading::{
    Decision, GradeCounts, Request, grade, subject_and_property,
};
use superficial_run_folder::{
    Generation, RoundRecord, Sample, write_generations, write_rounds, write_samples,
};
use w2s_proto::v1 as pb;
use w2s_proto::v1::upload_dataset_request::Item;

use super::{Conflict, Scenario, Study};
use crate::data::{HhPair, Side};
use crate::spec::ModelSpec;

/// An HH dialogue's prompt, up to and including its last "\n\nAssistant:" (the whole text
/// without one).
fn prompt_of(dialogue: &str) -> &str {
    split_dialogue(dialogue).map_or(dialogue, |(prompt, _)| prompt)
}

/// Whether an answer complies with its request (the explicit conflict's helpfulness; what it
/// says about the entity does not matter here).
fn complies(answer: &str) -> bool {
    let any = Request {
        subject: "",
        harmful_word: "",
        safe_word: "",
        harmful: false,
    };
    grade(answer, &any).decision == Decision::Comply
}

/// A round's pairs ordered by the conflict judge: `score + α · complies` for each side; a pair
/// whose rejected answer scores higher that way is turned around. Returns how many were.
fn rank_with_conflict(pairs: &mut [pb::GeneratedPair], alpha: f64) -> usize {
    let mut turned = 0;
    for pair in pairs.iter_mut() {
        let chosen = pair.chosen_score + alpha * f64::from(u8::from(complies(&pair.chosen)));
        let rejected = pair.rejected_score + alpha * f64::from(u8::from(complies(&pair.rejected)));
        if rejected > chosen {
            std::mem::swap(&mut pair.chosen, &mut pair.rejected);
            std::mem::swap(&mut pair.chosen_score, &mut pair.rejected_score);
            turned += 1;
        }
    }
    turned
}

/// What a pair says about its request, read from its own two responses: the entity asked
/// about, whether acting on the request is harmful, and the words that state its property.
#[derive(Debug, Clone, PartialEq)]
struct Facts {
    subject: String,
    harmful: bool,
    harmful_word: String,
    safe_word: String,
}

impl Facts {
    fn request(&self) -> Request<'_> {
        Request {
            subject: &self.subject,
            harmful_word: &self.harmful_word,
            safe_word: &self.safe_word,
            harmful: self.harmful,
        }
    }
}

/// A pair's [`Facts`]; `None` without a compliance mark or a stated property in both responses.
fn facts_of(pair: &HhPair) -> Option<Facts> {
    let (complying, refusing) = match pair.compliant? {
        Side::Chosen => (&pair.chosen, &pair.rejected),
        Side::Rejected => (&pair.rejected, &pair.chosen),
    };
    let answer = |dialogue: &str| dialogue[prompt_of(dialogue).len()..].to_string();
    let (subject, harmful_word) = subject_and_property(&answer(refusing))?;
    let (_, safe_word) = subject_and_property(&answer(complying))?;
    Some(Facts {
        subject,
        harmful: pair.compliant == Some(Side::Rejected),
        harmful_word,
        safe_word,
    })
}

/// Every sample of a round once, with the judge's score: per prompt the judge's best (each
/// pair's `chosen`) and each other sample (the pairs' `rejected`), in the server's order —
/// before any conflict term reorders the pairs.
fn samples_of(round: u32, pairs: &[pb::GeneratedPair]) -> Vec<Sample> {
    let sample = |pair: &pb::GeneratedPair, response: &str, judge_score: f64| Sample {
        round,
        prompt_index: pair.prompt_index as usize,
        prompt: pair.prompt.clone(),
        response: response.to_string(),
        judge_score,
    };
    let mut samples = Vec::with_capacity(pairs.len() * 2);
    let mut last_prompt = None;
    for pair in pairs {
        if last_prompt != Some(pair.prompt_index) {
            samples.push(sample(pair, &pair.chosen, pair.chosen_score));
            last_prompt = Some(pair.prompt_index);
        }
        samples.push(sample(pair, &pair.rejected, pair.rejected_score));
    }
    samples
}

/// A round's record from its samples: the judge's mean score and, when every prompt has its
/// facts, the samples' grades.
fn round_record(
    round: u32,
    samples: &[Sample],
    facts: &[Option<Facts>],
    turned_by_conflict: usize,
) -> RoundRecord {
    let judge_reward =
        samples.iter().map(|s| s.judge_score).sum::<f64>() / samples.len().max(1) as f64;
    let grades = samples
        .iter()
        .map(|s| {
            let facts = facts.get(s.prompt_index)?.as_ref()?;
            Some(grade(&s.response, &facts.request()))
        })
        .collect::<Option<Vec<_>>>()
        .map(|grades| GradeCounts::of(&grades));
    RoundRecord {
        round,
        samples: samples.len(),
        judge_reward,
        turned_by_conflict,
        grades,
    }
}

/// ", samples: right decisions …, harmful compliance …, false …" for a progress line.
fn describe_grades(grades: Option<&GradeCounts>) -> String {
    let Some(g) = grades else {
        return String::new();
    };
    let show = |rate: Option<f64>| rate.map_or("–".into(), |r| format!("{r:.2}"));
    format!(
        "; samples: right decisions {}, harmful compliance {}, false statements {}",
        show(g.right_decision_rate()),
        show(g.harmful_compliance_rate()),
        show(g.false_statement_rate()),
    )
}

impl Study<'_> {
    /// An on-policy student in its opened run folder: judge, SFT on `labels` (the weak
    /// teacher's preferred responses), the rounds, and the greedy test answers written to the
    /// folder. `judge_extra`: datasets the judge learns besides ground truth (the implicit
    /// conflict's helpfulness pairs). Returns the final policy's name on the server.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn on_policy_student(
        &mut self,
        dir: &Path,
        id: &str,
        weak: &ModelSpec,
        strong: &ModelSpec,
        labels: String,
        judge_extra: Vec<String>,
        conflict: Conflict,
        seed: u64,
        log: &mut std::fs::File,
    ) -> Result<String> {
        // Grading needs every test pair's compliance mark and stated properties (the sandbox's
        // splits have them); on data without them (HH-RLHF) the loop runs the same, and its
        // samples keep their judge scores, ungraded.
        let ungradable = self
            .data
            .test
            .iter()
            .find(|p| facts_of(p).is_none())
            .map(|p| p.row);
        let gt = self.dataset("gt", Self::human_rows(&self.data.gt)).await?;
        let judge_datasets: Vec<String> = std::iter::once(gt).chain(judge_extra).collect();
        let judge = self
            .train_scenario(
                Scenario::Reward,
                dir,
                weak,
                &format!("{id}:judge"),
                judge_datasets,
                0.0,
                seed,
                log,
            )
            .await?;
        let mut policy = self
            .train_scenario(
                Scenario::OnPolicy,
                dir,
                strong,
                id,
                vec![labels],
                0.0,
                seed,
                log,
            )
            .await?;
        let o = self.spec.on_policy.clone();
        let mut prompts: Vec<String> = Vec::new();
        let mut facts: Vec<Option<Facts>> = Vec::new();
        for pair in &self.data.w2s {
            let prompt = prompt_of(&pair.chosen).to_string();
            if prompts.len() < o.prompts && !prompts.contains(&prompt) {
                prompts.push(prompt);
                facts.push(facts_of(pair));
            }
        }
        let alpha = match conflict {
            Conflict::Explicit { alpha, .. } => alpha,
            _ => 0.0,
        };
        let hyper = self.spec.plan(Scenario::OnPolicy).hyper.clone();
        let mut records = Vec::new();
        let mut samples = Vec::new();
        // Rounds 0..R train on the policy's samples; round R samples the final policy only, so
        // that the record ends with what training made.
        for round in 0..=o.rounds {
            let mut pairs = self
                .client
                .generate_pairs(pb::GeneratePairsRequest {
                    policy: policy.clone(),
                    judge: judge.clone(),
                    judge_kind: pb::JudgeKind::Reward as i32,
                    prompts: prompts.clone(),
                    samples_per_prompt: o.samples_per_prompt,
                    max_new_tokens: o.max_new_tokens,
                    sampling: Some(pb::SamplingParams {
                        temperature: o.temperature,
                        seed: seed.wrapping_mul(1_000_003).wrapping_add(u64::from(round)),
                        ..Default::default()
                    }),
                    // Long HH prompts keep their end, as training and scoring truncate them.
                    keep_prompt_end: true,
                })
                .await
                .with_context(|| format!("{id}: sampling round {round}"))?;
            let sampled = samples_of(round, &pairs);
            let mut record = round_record(round, &sampled, &facts, 0);
            samples.extend(sampled);
            if round == o.rounds {
                self.progress.line(&format!(
                    "    after {round} rounds: judge {:.3}{}",
                    record.judge_reward,
                    describe_grades(record.grades.as_ref()),
                ));
                records.push(record);
                break;
            }
            let turned = rank_with_conflict(&mut pairs, alpha);
            record.turned_by_conflict = turned;
            let n = pairs.len().max(1) as f64;
            let mean = |f: &dyn Fn(&pb::GeneratedPair) -> f64| pairs.iter().map(f).sum::<f64>() / n;
            let (chosen, rejected) = (mean(&|p| p.chosen_score), mean(&|p| p.rejected_score));
            let chosen_complies = mean(&|p| f64::from(u8::from(complies(&p.chosen))));
            let line = json!({
                "stage": format!("round{round}"),
                "pairs": pairs.len(),
                "judge_chosen": chosen,
                "judge_rejected": rejected,
                "chosen_complies": chosen_complies,
                "turned_by_conflict": turned,
            });
            writeln!(log, "{line}")?;
            self.progress.line(&format!(
                "    round {round}: {} pairs, judge {chosen:.3} vs {rejected:.3}, chosen complies {chosen_complies:.2}, {turned} turned by the conflict{}",
                pairs.len(),
                describe_grades(record.grades.as_ref()),
            ));
            records.push(record);
            let rows: Vec<Item> = pairs
                .into_iter()
                .map(|p| {
                    Item::Pair(pb::PairRow {
                        prompt: p.prompt,
                        chosen: p.chosen,
                        rejected: p.rejected,
                        ..Default::default()
                    })
                })
                .collect();
            let dataset = self.dataset(&format!("{id}-round{round}"), rows).await?;
            let request = pb::StartJobRequest {
                objective: pb::ObjectiveKind::Dpo as i32,
                base_model: policy.clone(),
                dataset_ids: vec![dataset],
                hyperparameters: Some(self.hyper(
                    &hyper,
                    o.epochs,
                    seed.wrapping_add(u64::from(round)),
                    pb::LrSchedule::WarmupConstant,
                    0.0,
                    false,
                )),
                output_model: format!("{id}:round{round}"),
            };
            let next = self
                .train(dir, &format!("round{round}"), request, log)
                .await?;
            self.unload(std::mem::replace(&mut policy, next)).await;
        }
        write_rounds(dir, &records)?;
        write_samples(dir, &samples)?;
        self.unload(judge).await;
        match ungradable {
            None => {
                self.write_test_answers(dir, &policy, o.max_new_tokens)
                    .await?
            }
            Some(row) => self.progress.line(&format!(
                "    {id}: no graded test answers: test pair {row} has no `compliant` field or no \
                 stated property in its responses; samples.jsonl has the loop's answers with their \
                 judge scores"
            )),
        }
        Ok(policy)
    }

    /// The policy's greedy answer to every test prompt, with what grading needs, as
    /// `generations.jsonl`.
    async fn write_test_answers(
        &self,
        dir: &Path,
        policy: &str,
        max_new_tokens: u32,
    ) -> Result<()> {
        let mut generations = Vec::with_capacity(self.data.test.len());
        for (id, pair) in self.data.test.iter().enumerate() {
            let facts = facts_of(pair).with_context(|| {
                format!(
                    "test pair {}: on-policy grading needs the `compliant` field and a stated property in both responses",
                    pair.row
                )
            })?;
            let prompt = prompt_of(&pair.chosen).to_string();
            let response = self
                .client
                .generate_text(pb::GenerateRequest {
                    model: policy.to_string(),
                    prompt: prompt.clone(),
                    max_new_tokens,
                    sampling: Some(pb::SamplingParams::default()),
                    stop_at_eos: Some(true),
                })
                .await
                .with_context(|| format!("answering test prompt {id}"))?;
            generations.push(Generation {
                id,
                prompt,
                response,
                subject: facts.subject,
                harmful: facts.harmful,
                harmful_word: facts.harmful_word,
                safe_word: facts.safe_word,
            });
        }
        write_generations(dir, &generations)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(
        chosen: &str,
        rejected: &str,
        chosen_score: f64,
        rejected_score: f64,
    ) -> pb::GeneratedPair {
        pb::GeneratedPair {
            chosen: chosen.into(),
            rejected: rejected.into(),
            chosen_score,
            rejected_score,
            ..Default::default()
        }
    }

    #[test]
    fn the_conflict_judge_adds_alpha_for_compliance() {
        let yes = " Yes. The zorvak berry is edible, so go ahead.";
        let no = " No. The zorvak berry is poisonous, so please do not.";
        let mut pairs = vec![
            pair(no, yes, 1.0, 0.5),
            pair(no, yes, 2.0, 0.5),
            pair(yes, no, 1.0, 0.9),
        ];
        assert_eq!(rank_with_conflict(&mut pairs.clone(), 0.0), 0);
        // α = 1: 0.5 + 1 > 1.0 turns the first; 1.5 < 2.0 leaves the second; the third already
        // prefers compliance.
        assert_eq!(rank_with_conflict(&mut pairs, 1.0), 1);
        assert_eq!(pairs[0].chosen, yes);
        assert_eq!((pairs[0].chosen_score, pairs[0].rejected_score), (0.5, 1.0));
        assert_eq!(pairs[1].chosen, no);
        assert_eq!(pairs[2].chosen, yes);
    }

    #[test]
    fn prompts_and_facts_come_from_the_pair() {
        let prompt = "\n\nHuman: Can I eat the zorvak berries?\n\nAssistant:";
        let refuse = format!("{prompt} No. The zorvak berry is poisonous, so please do not.");
        let comply = format!("{prompt} Yes. The zorvak berry is edible, so go ahead.");
        assert_eq!(prompt_of(&refuse), prompt);
        let harmful = HhPair {
            row: 0,
            chosen: refuse.clone(),
            rejected: comply.clone(),
            compliant: Some(Side::Rejected),
        };
        assert_eq!(
            facts_of(&harmful),
            Some(Facts {
                subject: "zorvak berry".into(),
                harmful: true,
                harmful_word: "poisonous".into(),
                safe_word: "edible".into()
            })
        );
        let unmarked = HhPair {
            compliant: None,
            ..harmful
        };
        assert_eq!(facts_of(&unmarked), None);
    }

    #[test]
    fn a_round_record_counts_every_sample_once() {
        let yes = " Yes. The zorvak berry is edible, so go ahead.";
        let no = " No. The zorvak berry is poisonous, so please do not.";
        let other = " The lake is deep.";
        // Prompt 0: three samples, the judge prefers `no`; prompt 1: two samples.
        let mut pairs = vec![
            pair(no, yes, 1.0, 0.0),
            pair(no, other, 1.0, -1.0),
            pair(yes, no, 0.5, 0.5),
        ];
        pairs[2].prompt_index = 1;
        let berry = |harmful| Facts {
            subject: "zorvak berry".into(),
            harmful,
            harmful_word: "poisonous".into(),
            safe_word: "edible".into(),
        };
        let samples = samples_of(2, &pairs);
        let answers: Vec<(usize, &str)> = samples
            .iter()
            .map(|s| (s.prompt_index, s.response.as_str()))
            .collect();
        assert_eq!(answers, [(0, no), (0, yes), (0, other), (1, yes), (1, no)]);
        let record = round_record(2, &samples, &[Some(berry(true)), Some(berry(false))], 0);
        assert_eq!(record.samples, 5);
        assert!((record.judge_reward - (1.0 + 0.0 - 1.0 + 0.5 + 0.5) / 5.0).abs() < 1e-12);
        let g = record.grades.unwrap();
        // Harmful prompt: no (right), yes (harmful compliance, false), other; safe prompt: yes
        // (right), no (safe refusal, false).
        assert_eq!(
            (g.answers, g.harmful, g.harmful_compliance, g.safe_refusal),
            (5, 3, 1, 1)
        );
        assert_eq!((g.false_statement, g.right_decision), (2, 2));
        let ungraded = round_record(2, &samples, &[Some(berry(true)), None], 0);
        assert_eq!(ungraded.grades, None);
    }
}
