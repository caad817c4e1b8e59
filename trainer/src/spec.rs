//! The study specification: a TOML file (see `examples/`) naming data files, models, scenarios,
//! settings, sizes, hyperparameters and seeds. Defaults equal the official scripts.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use superficial_models::RewardReadout;

/// A study or sandbox configuration that cannot be used (a file that does not parse, a field
/// out of range, an override that names nothing); the message says which and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(pub String);

impl From<String> for SpecError {
    fn from(message: String) -> Self {
        Self(message)
    }
}

impl From<&str> for SpecError {
    fn from(message: &str) -> Self {
        Self(message.to_string())
    }
}

fn default_seeds() -> Vec<u64> {
    vec![0]
}
fn default_scenarios() -> Vec<Scenario> {
    vec![Scenario::Reward, Scenario::Simpo]
}
fn default_settings() -> Vec<Setting> {
    vec![Setting::None, Setting::Explicit]
}

/// Scenarios and settings are part of the run-folder contract, owned by `eval-client`.
pub use superficial_run_folder::{Role, Scenario, Setting};

/// Which response the explicit conflict's second goal favours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ConflictTarget {
    /// The human-rejected response of every pair (the official code's all-pairs form: on
    /// HH-harmless the rejected response is the harmful-but-helpful one).
    #[default]
    HumanRejected,
    /// The response that complies with the request (helpfulness against harmlessness): needs
    /// the data's `compliant` field. Its pull agrees with the ground truth on safe requests
    /// and opposes it only on harmful ones.
    Compliant,
}

/// How hard, and towards what, the conflicting goals pull: every dose is a separate student,
/// compared with the same pair's no-conflict student.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConflictSpec {
    pub explicit_target: ConflictTarget,
    /// Doses α of the explicit conflict; empty: the stage's `alpha` (0.5, the paper's).
    pub explicit_alphas: Vec<f64>,
    /// Doses of the implicit conflict: helpfulness pairs mixed into the weak labels; empty:
    /// `sizes.n_extra_docs` (the paper mixes 4000 into 4000).
    pub implicit_helpful_pairs: Vec<usize>,
}

impl Default for ConflictSpec {
    fn default() -> Self {
        Self {
            explicit_target: ConflictTarget::HumanRejected,
            explicit_alphas: Vec::new(),
            implicit_helpful_pairs: Vec::new(),
        }
    }
}

/// The on-policy scenario's loop: each round the policy samples `samples_per_prompt` answers
/// to each of the first `prompts` W2S prompts, the judge ranks them (best against each
/// other), and one DPO job on those pairs makes the next policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OnPolicySpec {
    pub rounds: u32,
    pub prompts: usize,
    pub samples_per_prompt: u32,
    pub max_new_tokens: u32,
    /// Sampling temperature of the rounds (the test answers are greedy).
    pub temperature: f64,
    /// DPO epochs over each round's pairs.
    pub epochs: u32,
}

impl Default for OnPolicySpec {
    fn default() -> Self {
        Self {
            rounds: 2,
            prompts: 64,
            samples_per_prompt: 4,
            max_new_tokens: 24,
            temperature: 1.0,
            epochs: 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StudySpec {
    pub data: DataFiles,
    #[serde(default)]
    pub sizes: Sizes,
    /// Models in increasing capability; every (earlier, later) pair is a (weak, strong) pair.
    pub models: Vec<ModelSpec>,
    #[serde(default = "default_scenarios")]
    pub scenarios: Vec<Scenario>,
    #[serde(default = "default_settings")]
    pub settings: Vec<Setting>,
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// Also train preference students on the high-confidence weak labels (τ = conf_threshold),
    /// both the official filter (agrees with ground truth) and the one that does not peek.
    #[serde(default)]
    pub high_conf: bool,
    /// Bootstrapping chains `[weak, intermediate, strong]` (model names), run for SimPO/DPO.
    #[serde(default)]
    pub bootstrap: Vec<[String; 3]>,
    #[serde(default)]
    pub reward: StageHyper,
    #[serde(default = "StageHyper::preference_default")]
    pub preference: StageHyper,
    #[serde(default)]
    pub conflict: ConflictSpec,
    #[serde(default)]
    pub on_policy: OnPolicySpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataFiles {
    pub gt: PathBuf,
    pub w2s: PathBuf,
    pub test: PathBuf,
    /// Human-labelled helpfulness pairs for the implicit conflict.
    #[serde(default)]
    pub helpful: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sizes {
    pub n_docs: usize,
    pub n_w2s_docs: usize,
    pub n_test_docs: usize,
    pub n_extra_docs: usize,
}

impl Default for Sizes {
    fn default() -> Self {
        Self {
            n_docs: 4000,
            n_w2s_docs: 4000,
            n_test_docs: 4000,
            n_extra_docs: 4000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    /// An HF checkpoint folder...
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// ...or a built-in preset (random init).
    #[serde(default)]
    pub preset: Option<String>,
    #[serde(default)]
    pub seed: u64,
    /// A stable identity of the weights (e.g. a content hash). When given, run ids depend on it
    /// instead of `path`, so the same model in another folder keeps its finished runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
}

/// Hyperparameters of one scenario family.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StageHyper {
    pub lr: f64,
    pub batch_size: u32,
    pub minibatch_size: u32,
    pub epochs: u32,
    /// SFT epochs before SimPO/DPO.
    pub sft_epochs: u32,
    /// DPO epochs (the official DPO script trains 3; SimPO uses `epochs`).
    pub dpo_epochs: u32,
    pub max_ctx: u32,
    /// Explicit-conflict weight α.
    pub alpha: f64,
    /// High-confidence threshold τ.
    pub conf_threshold: f64,
    /// Pairs per evaluation request.
    pub eval_batch: usize,
    /// Shards each training minibatch is split into (run concurrently on a CPU server; part
    /// of the arithmetic, so part of every run's identity).
    pub shards: u32,
    /// What a reward model's fresh head reads (reward scenario only): the reference
    /// `last_token`, or `last_token_and_mean_logprob` (the model's own sequence log-likelihood
    /// added, so fine-tuning starts from what the model knows zero-shot). Left out of the
    /// serialised spec at its default, so existing run ids stay valid.
    #[serde(skip_serializing_if = "is_last_token")]
    pub readout: RewardReadout,
}

fn is_last_token(readout: &RewardReadout) -> bool {
    *readout == RewardReadout::LastToken
}

impl Default for StageHyper {
    /// Reward modeling as the official scripts run it.
    fn default() -> Self {
        Self {
            lr: 1e-5,
            batch_size: 32,
            minibatch_size: 1,
            epochs: 1,
            sft_epochs: 1,
            dpo_epochs: 3,
            max_ctx: 512,
            alpha: 0.5,
            conf_threshold: 0.75,
            eval_batch: 32,
            shards: 2,
            readout: RewardReadout::LastToken,
        }
    }
}

impl StageHyper {
    /// SimPO/DPO as the official scripts run them.
    pub fn preference_default() -> Self {
        Self {
            lr: 1e-6,
            ..Self::default()
        }
    }
}

/// One training job of a scenario's run, in order.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainingStage {
    /// The stage's key in a run's `jobs.json` (read back when a run resumes).
    pub key: &'static str,
    pub objective: w2s_proto::v1::ObjectiveKind,
    pub epochs: u32,
    pub schedule: w2s_proto::v1::LrSchedule,
    /// Whether the explicit conflict's α reaches this stage (the final objective only).
    pub takes_conflict: bool,
    /// Random slot orientation of reward pairs, as the reference code does.
    pub orient_slots: bool,
    /// Suffix of the stage's output model name (`<run id>:<suffix>`).
    pub output_suffix: &'static str,
}

/// What a scenario means for a study, in one place: which hyper-parameters it reads, whether
/// its base model gets a reward head, how its models score a pair, its training stages, and
/// whether the preference-only variants (bootstrapping chains, the high-confidence filter)
/// apply. A new scenario is a new arm here.
#[derive(Debug, Clone)]
pub struct ScenarioPlan<'a> {
    /// Whose plan trains and scores the scenario's ceilings: its own, or (on-policy, whose
    /// ceilings are the judges) the reward scenario's.
    pub ceilings: Scenario,
    /// After its stages a student runs the on-policy loop (`study/on_policy.rs`).
    pub on_policy: bool,
    pub hyper: &'a StageHyper,
    pub reward_head: bool,
    pub scoring: w2s_proto::v1::PairScoring,
    pub stages: Vec<TrainingStage>,
    pub preference_variants: bool,
}

impl StudySpec {
    /// How `scenario` trains and scores.
    pub fn plan(&self, scenario: Scenario) -> ScenarioPlan<'_> {
        use w2s_proto::v1::{LrSchedule, ObjectiveKind, PairScoring};
        match scenario {
            Scenario::Reward => ScenarioPlan {
                ceilings: Scenario::Reward,
                on_policy: false,
                hyper: &self.reward,
                reward_head: true,
                scoring: PairScoring::Reward,
                stages: vec![TrainingStage {
                    key: "reward",
                    objective: ObjectiveKind::Reward,
                    epochs: self.reward.epochs,
                    schedule: LrSchedule::CosineToZero,
                    takes_conflict: true,
                    orient_slots: true,
                    output_suffix: "rm",
                }],
                preference_variants: false,
            },
            Scenario::Simpo | Scenario::Dpo | Scenario::Ipo => {
                let h = &self.preference;
                let (objective, scoring, epochs) = match scenario {
                    Scenario::Simpo => (ObjectiveKind::Simpo, PairScoring::MeanLogprob, h.epochs),
                    Scenario::Ipo => (ObjectiveKind::Ipo, PairScoring::SumLogprob, h.dpo_epochs),
                    _ => (ObjectiveKind::Dpo, PairScoring::SumLogprob, h.dpo_epochs),
                };
                ScenarioPlan {
                    ceilings: scenario,
                    on_policy: false,
                    hyper: h,
                    reward_head: false,
                    scoring,
                    stages: vec![
                        TrainingStage {
                            key: "sft",
                            objective: ObjectiveKind::Sft,
                            epochs: h.sft_epochs,
                            schedule: LrSchedule::WarmupConstant,
                            takes_conflict: false,
                            orient_slots: false,
                            output_suffix: "sft",
                        },
                        TrainingStage {
                            key: "preference",
                            objective,
                            epochs,
                            schedule: LrSchedule::WarmupConstant,
                            takes_conflict: true,
                            orient_slots: false,
                            output_suffix: "pref",
                        },
                    ],
                    preference_variants: true,
                }
            }
            // Students: SFT on the weak teacher's preferred responses, then the loop; scored
            // like SimPO policies (mean response log-prob).
            Scenario::OnPolicy => ScenarioPlan {
                ceilings: Scenario::Reward,
                on_policy: true,
                hyper: &self.preference,
                reward_head: false,
                scoring: PairScoring::MeanLogprob,
                stages: vec![TrainingStage {
                    key: "sft",
                    objective: ObjectiveKind::Sft,
                    epochs: self.preference.sft_epochs,
                    schedule: LrSchedule::WarmupConstant,
                    takes_conflict: false,
                    orient_slots: false,
                    output_suffix: "sft",
                }],
                preference_variants: false,
            },
        }
    }

    /// The plan that trains `role`'s model in `scenario` (a ceiling: the scenario's ceiling
    /// plan).
    pub fn plan_for(&self, scenario: Scenario, role: Role) -> ScenarioPlan<'_> {
        if role.is_ceiling() {
            self.plan(self.plan(scenario).ceilings)
        } else {
            self.plan(scenario)
        }
    }

    /// The explicit conflict's doses α of a scenario.
    pub fn explicit_alphas(&self, scenario: Scenario) -> Vec<f64> {
        if self.conflict.explicit_alphas.is_empty() {
            vec![self.plan(scenario).hyper.alpha]
        } else {
            self.conflict.explicit_alphas.clone()
        }
    }

    /// The implicit conflict's doses (helpfulness pairs mixed in).
    pub fn implicit_helpful_pairs(&self) -> Vec<usize> {
        if self.conflict.implicit_helpful_pairs.is_empty() {
            vec![self.sizes.n_extra_docs]
        } else {
            self.conflict.implicit_helpful_pairs.clone()
        }
    }

    /// Reads and validates a spec; relative data paths resolve against the spec's folder.
    pub fn from_file(path: &Path) -> Result<Self, SpecError> {
        Self::from_file_with_overrides(path, &[])
    }

    /// As [`StudySpec::from_file`], with `key.path=value` overrides applied first (values in
    /// TOML syntax; a bare word is taken as a string), e.g. `sizes.n_docs=256`,
    /// `seeds=[0,1,2]`, `preference.lr=1e-5`.
    pub fn from_file_with_overrides(path: &Path, overrides: &[String]) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut table: toml::Table =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        for item in overrides {
            apply_override(&mut table, item)?;
        }
        let mut spec: StudySpec = toml::Value::Table(table)
            .try_into()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for file in [&mut spec.data.gt, &mut spec.data.w2s, &mut spec.data.test] {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        }
        if let Some(helpful) = spec.data.helpful.as_mut()
            && helpful.is_relative()
        {
            *helpful = base.join(&*helpful);
        }
        for model in &mut spec.models {
            if let Some(p) = model.path.as_mut()
                && p.is_relative()
            {
                *p = base.join(&*p);
            }
        }
        spec.validate()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(spec)
    }

    pub fn validate(&self) -> Result<(), SpecError> {
        if self.models.len() < 2 {
            return Err("give at least two models (weak and strong)".into());
        }
        for model in &self.models {
            if model.path.is_some() == model.preset.is_some() {
                return Err(format!(
                    "model `{}`: give exactly one of `path` and `preset`",
                    model.name
                )
                .into());
            }
        }
        let mut names: Vec<&str> = self.models.iter().map(|m| m.name.as_str()).collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err("model names must be unique".into());
        }
        if self.settings.contains(&Setting::Explicit) && self.scenarios.contains(&Scenario::Ipo) {
            return Err(
                "the ipo scenario has no explicit-conflict term: leave `explicit` out of `settings` \
                 (or run ipo in a spec of its own)"
                    .into(),
            );
        }
        let o = &self.on_policy;
        if self.scenarios.contains(&Scenario::OnPolicy)
            && (o.rounds == 0
                || o.prompts == 0
                || o.samples_per_prompt < 2
                || o.max_new_tokens == 0
                || o.epochs == 0
                || !(o.temperature.is_finite() && o.temperature > 0.0))
        {
            return Err(
                "on_policy: rounds, prompts, max_new_tokens and epochs must be ≥ 1, \
                 samples_per_prompt ≥ 2 and temperature a positive number"
                    .into(),
            );
        }
        let pairs_per_round = o.prompts * o.samples_per_prompt.saturating_sub(1) as usize;
        if self.scenarios.contains(&Scenario::OnPolicy)
            && pairs_per_round < self.preference.batch_size as usize
        {
            return Err(format!(
                "on_policy: {} prompts × ({} samples − 1) make {pairs_per_round} pairs a round, \
                 fewer than one preference batch of {}",
                o.prompts, o.samples_per_prompt, self.preference.batch_size
            )
            .into());
        }
        if self.settings.contains(&Setting::Implicit) && self.data.helpful.is_none() {
            return Err(
                "the implicit setting needs `data.helpful` (human-labelled helpfulness pairs)"
                    .into(),
            );
        }
        for chain in &self.bootstrap {
            let position = |name: &String| self.models.iter().position(|m| &m.name == name);
            match (
                position(&chain[0]),
                position(&chain[1]),
                position(&chain[2]),
            ) {
                (Some(w), Some(i), Some(s)) if w < i && i < s => {}
                _ => {
                    return Err(format!(
                        "bootstrap chain {chain:?}: give three listed models in increasing order"
                    )
                    .into());
                }
            }
        }
        if let Some(bad) = self
            .conflict
            .explicit_alphas
            .iter()
            .find(|a| !a.is_finite() || **a <= 0.0)
        {
            return Err(
                format!("conflict.explicit_alphas: {bad} is not a positive finite dose").into(),
            );
        }
        if self.conflict.implicit_helpful_pairs.contains(&0) {
            return Err(
                "conflict.implicit_helpful_pairs: 0 pairs is the no-conflict student".into(),
            );
        }
        if self.seeds.is_empty() || self.scenarios.is_empty() || self.settings.is_empty() {
            return Err("seeds, scenarios and settings must not be empty".into());
        }
        for (name, h) in [("reward", &self.reward), ("preference", &self.preference)] {
            if h.batch_size == 0
                || h.minibatch_size == 0
                || h.batch_size % h.minibatch_size != 0
                || h.eval_batch == 0
                || h.shards == 0
            {
                return Err(format!(
                    "[{name}]: batch sizes and shards must be positive and minibatch_size must divide batch_size"
                ).into());
            }
        }
        Ok(())
    }
}

/// Sets `a.b.c=value` in a TOML table, creating tables on the way.
pub(crate) fn apply_override(table: &mut toml::Table, item: &str) -> Result<(), SpecError> {
    let (key, raw) = item
        .split_once('=')
        .ok_or_else(|| format!("override `{item}`: expected KEY=VALUE"))?;
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or(toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let parts: Vec<&str> = key.trim().split('.').collect();
    let mut current = table;
    for part in &parts[..parts.len() - 1] {
        current = current
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| format!("override `{item}`: `{part}` is not a table"))?;
    }
    current.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_example_spec_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                StudySpec::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
                seen += 1;
            }
        }
        assert!(seen >= 3);
    }

    #[test]
    fn overrides_replace_fields() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-cpu.toml");
        let spec = StudySpec::from_file_with_overrides(
            &path,
            &[
                "sizes.n_docs=64".into(),
                "seeds=[0, 1]".into(),
                "preference.lr=0.5".into(),
                "scenarios=[\"dpo\"]".into(),
            ],
        )
        .unwrap();
        assert_eq!(spec.sizes.n_docs, 64);
        assert_eq!(spec.seeds, vec![0, 1]);
        assert_eq!(spec.preference.lr, 0.5);
        assert_eq!(spec.scenarios, vec![Scenario::Dpo]);
        let err =
            StudySpec::from_file_with_overrides(&path, &["sizes.n_docs=lots".into()]).unwrap_err();
        assert!(
            err.0.contains("n_docs") || err.0.contains("invalid type"),
            "{err}"
        );
    }

    #[test]
    fn the_on_policy_scenario_judges_with_reward_ceilings_and_checks_its_loop() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-cpu.toml");
        let with = |extra: &[&str]| {
            let mut overrides = vec!["scenarios=[\"on_policy\"]".to_string()];
            overrides.extend(extra.iter().map(|s| s.to_string()));
            StudySpec::from_file_with_overrides(&path, &overrides)
        };
        let spec = with(&["preference.batch_size=4", "preference.minibatch_size=4"]).unwrap();
        let plan = spec.plan(Scenario::OnPolicy);
        assert!(plan.on_policy);
        assert_eq!(plan.ceilings, Scenario::Reward);
        let stages: Vec<_> = plan.stages.iter().map(|s| s.objective).collect();
        assert_eq!(stages, [w2s_proto::v1::ObjectiveKind::Sft]);
        // Its ceilings train as reward models; its students as policies.
        assert!(
            spec.plan_for(Scenario::OnPolicy, Role::WeakCeiling)
                .reward_head
        );
        assert!(!spec.plan_for(Scenario::OnPolicy, Role::W2s).reward_head);
        for bad in [
            "on_policy.samples_per_prompt=1",
            "on_policy.rounds=0",
            "on_policy.temperature=0.0",
        ] {
            let err = with(&[
                "preference.batch_size=4",
                "preference.minibatch_size=4",
                bad,
            ])
            .unwrap_err();
            assert!(err.0.contains("on_policy"), "{bad}: {err}");
        }
        // 2 prompts × (2 − 1) pairs cannot fill a batch of 4.
        let err = with(&[
            "preference.batch_size=4",
            "preference.minibatch_size=4",
            "on_policy.prompts=2",
            "on_policy.samples_per_prompt=2",
        ])
        .unwrap_err();
        assert!(err.0.contains("fewer than one preference batch"), "{err}");
    }

    #[test]
    fn the_ipo_scenario_trains_sft_then_ipo_and_refuses_the_explicit_conflict() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-cpu.toml");
        let spec = StudySpec::from_file_with_overrides(
            &path,
            &["scenarios=[\"ipo\"]".into(), "settings=[\"none\"]".into()],
        )
        .unwrap();
        let plan = spec.plan(Scenario::Ipo);
        let objectives: Vec<_> = plan.stages.iter().map(|s| s.objective).collect();
        assert_eq!(
            objectives,
            [
                w2s_proto::v1::ObjectiveKind::Sft,
                w2s_proto::v1::ObjectiveKind::Ipo
            ]
        );
        assert_eq!(plan.scoring, w2s_proto::v1::PairScoring::SumLogprob);
        let err = StudySpec::from_file_with_overrides(&path, &["scenarios=[\"ipo\"]".into()])
            .unwrap_err();
        assert!(err.0.contains("explicit"), "{err}");
    }
}
