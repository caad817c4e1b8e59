//! The run-folder contract, owned here and used by both `trainer` (writer) and `eval-client`
//! (reader): a study run lives in `OUT/<run-id>/` with
//!
//! - `config.json`: the run's id and [`RunIdentity`] (scenario, role, models, and the
//!   student's [`Variant`]: setting and dose, label filter, chain position; seed), read as
//!   [`RunMeta`]; the writer adds everything else that affects results,
//! - `log.jsonl`: one line per training step (free-form, for people),
//! - `predictions.jsonl`: one [`Prediction`] per test pair, ids `0..n`,
//! - `weak_labels.jsonl`: one [`WeakLabel`] per labelled pair (runs that label a split),
//! - `generations.jsonl`: one [`Generation`] per test prompt (policies graded on what they say),
//! - `rounds.jsonl`: one [`RoundRecord`] per policy an on-policy loop sampled from,
//! - `samples.jsonl`: one [`Sample`] per answer an on-policy loop sampled, with its judge score,
//! - `results_summary.json`: [`ResultsSummary`], written last: its presence marks the run
//!   finished.
//!
//! Every file is written to a temporary name, flushed to disk and renamed into place, so a
//! reader sees a whole file or none.

use std::path::{Path, PathBuf};

pub mod grading;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use superficial_training::checkpoint::write_file_atomic;

pub const CONFIG: &str = "config.json";
pub const LOG: &str = "log.jsonl";
pub const PREDICTIONS: &str = "predictions.jsonl";
pub const WEAK_LABELS: &str = "weak_labels.jsonl";
pub const GENERATIONS: &str = "generations.jsonl";
pub const ROUNDS: &str = "rounds.jsonl";
pub const SAMPLES: &str = "samples.jsonl";
pub const RESULTS_SUMMARY: &str = "results_summary.json";

/// A run-folder file that cannot be read or written, with the line when one is at fault.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {reason}", .path.display(), .line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct RunFolderError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub reason: String,
}

impl RunFolderError {
    pub fn new(path: &Path, line: Option<usize>, reason: impl ToString) -> Self {
        Self {
            path: path.to_path_buf(),
            line,
            reason: reason.to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, RunFolderError>;

/// The training scenario of a run (paper spec §1.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    Reward,
    Simpo,
    Dpo,
    /// SFT then IPO against the post-SFT reference (no explicit-conflict term).
    Ipo,
    /// SFT, then rounds of DPO on the policy's own samples ranked by a judge (the weak
    /// model's reward model, trained on ground truth): the policy is graded on what it says.
    OnPolicy,
}

/// Which conflicting goal, if any, a student trains under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Setting {
    None,
    Implicit,
    Explicit,
}

/// What a run is in the study.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A model fine-tuned on ground truth that labels the W2S split for stronger models.
    WeakCeiling,
    /// The most capable model fine-tuned on ground truth.
    StrongCeiling,
    /// A weak-to-strong student.
    W2s,
    /// The middle model of a bootstrapping chain (a student that labels the next split).
    Intermediate,
    /// The last model of a bootstrapping chain.
    Bootstrap,
    /// The on-policy loop's ceiling: the strong model as its own teacher and judge (its
    /// ceiling's labels for SFT, its reward model trained on ground truth as the judge).
    GtJudged,
}

macro_rules! snake_display {
    ($($ty:ty),*) => {$(
        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let value = serde_json::to_value(self).map_err(|_| std::fmt::Error)?;
                f.write_str(value.as_str().unwrap_or_default())
            }
        }
    )*};
}
snake_display!(Scenario, Setting, Role);

impl Role {
    pub fn is_ceiling(self) -> bool {
        matches!(self, Role::WeakCeiling | Role::StrongCeiling)
    }
}

/// A conflict's dose: the explicit term's weight α, or the helpfulness pairs mixed in.
#[derive(Debug, Clone, Copy)]
pub enum Dose {
    Alpha(f64),
    HelpfulPairs(usize),
}

impl Dose {
    /// The dose as one number (α, or the pair count), for ordering doses of one kind.
    pub fn value(self) -> f64 {
        match self {
            Dose::Alpha(alpha) => alpha,
            Dose::HelpfulPairs(n) => n as f64,
        }
    }

    fn key(self) -> (u8, u64) {
        match self {
            Dose::Alpha(alpha) => (0, alpha.to_bits()),
            Dose::HelpfulPairs(n) => (1, n as u64),
        }
    }
}

// Doses are compared by their bits: a dose is a label read from a file, never computed.
impl PartialEq for Dose {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}
impl Eq for Dose {}
impl std::hash::Hash for Dose {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key().hash(state)
    }
}
impl PartialOrd for Dose {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Dose {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        match (self, other) {
            (Dose::Alpha(a), Dose::Alpha(b)) => a.total_cmp(b),
            _ => self.key().cmp(&other.key()),
        }
    }
}

/// Which of its teacher's labels a student trains on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LabelFilter {
    /// Every label.
    #[default]
    All,
    /// Labels that agree with ground truth and whose confidence reaches the threshold (the
    /// official high-confidence filter, which peeks at ground truth).
    HighConfidence,
    /// Labels whose confidence reaches the threshold either way (no peeking).
    HighConfidenceNoPeek,
}

/// Where a student sits in a bootstrapping chain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Chain {
    /// Taught by its weak model directly.
    #[default]
    Direct,
    /// The middle model of a chain (role [`Role::Intermediate`]).
    Intermediate,
    /// The last model of a chain, taught by the named intermediate model.
    Via(String),
}

/// A student's variant: conflict setting with its dose, label filter, and chain position. Its
/// label (`Display`, and its JSON form) is what reports print, e.g. `explicit α=2+via-m`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Variant {
    pub setting: Setting,
    pub dose: Option<Dose>,
    pub filter: LabelFilter,
    pub chain: Chain,
}

impl Variant {
    /// No conflict, every label, taught directly.
    pub const NONE: Variant = Variant {
        setting: Setting::None,
        dose: None,
        filter: LabelFilter::All,
        chain: Chain::Direct,
    };

    /// A student taught by its weak model directly on every label: the variants whose
    /// conflict findings are read.
    pub fn is_plain(&self) -> bool {
        self.filter == LabelFilter::All && self.chain == Chain::Direct
    }

    /// Part of a bootstrapping chain (its intermediate or its last model).
    pub fn is_chain(&self) -> bool {
        self.chain != Chain::Direct
    }

    /// The same variant taught directly (the counterpart of a chain's last model).
    pub fn direct(&self) -> Variant {
        Variant {
            chain: Chain::Direct,
            ..self.clone()
        }
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.dose {
            Some(Dose::Alpha(alpha)) => write!(f, "{} α={alpha}", self.setting)?,
            Some(Dose::HelpfulPairs(n)) => write!(f, "{} h={n}", self.setting)?,
            None => write!(f, "{}", self.setting)?,
        }
        match self.filter {
            LabelFilter::All => {}
            LabelFilter::HighConfidence => f.write_str("+hc")?,
            LabelFilter::HighConfidenceNoPeek => f.write_str("+hc-nopeek")?,
        }
        match &self.chain {
            Chain::Direct => Ok(()),
            Chain::Intermediate => f.write_str("+intermediate"),
            Chain::Via(intermediate) => write!(f, "+via-{intermediate}"),
        }
    }
}

impl Serialize for Variant {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// What a run is: the contract fields of `config.json`. The trainer writes it (with
/// everything else that affects results beside it), the report reads it; in the file it is
/// flat, as [`IdentityFields`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "IdentityFields", into = "IdentityFields")]
pub struct RunIdentity {
    pub scenario: Scenario,
    pub role: Role,
    pub model: String,
    /// The teacher of a student; `None` for ceilings.
    pub weak_model: Option<String>,
    /// A student's variant ([`Variant::NONE`] for ceilings).
    pub variant: Variant,
    pub seed: u64,
}

impl RunIdentity {
    pub fn is_ceiling(&self) -> bool {
        self.weak_model.is_none()
    }
}

/// The file form of [`RunIdentity`], field for field as `config.json` has always held it (the
/// trainer's run ids hash these fields, so their names and presence are part of the contract).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct IdentityFields {
    scenario: Scenario,
    role: Role,
    model: String,
    weak_model: Option<String>,
    #[serde(default)]
    intermediate_model: Option<String>,
    setting: Setting,
    /// The explicit conflict's dose α (explicit students).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    conflict_alpha: Option<f64>,
    /// Helpfulness pairs mixed in (implicit students).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    helpful_pairs: Option<usize>,
    seed: u64,
    #[serde(default)]
    high_conf: bool,
    #[serde(default)]
    high_conf_peeks: bool,
}

impl From<IdentityFields> for RunIdentity {
    fn from(f: IdentityFields) -> Self {
        let dose = match (f.conflict_alpha, f.helpful_pairs) {
            (Some(alpha), _) => Some(Dose::Alpha(alpha)),
            (None, Some(n)) => Some(Dose::HelpfulPairs(n)),
            (None, None) => None,
        };
        let filter = match (f.high_conf, f.high_conf_peeks) {
            (false, _) => LabelFilter::All,
            (true, true) => LabelFilter::HighConfidence,
            (true, false) => LabelFilter::HighConfidenceNoPeek,
        };
        let chain = match (f.role, f.intermediate_model) {
            (Role::Intermediate, _) => Chain::Intermediate,
            (_, Some(intermediate)) => Chain::Via(intermediate),
            (_, None) => Chain::Direct,
        };
        RunIdentity {
            scenario: f.scenario,
            role: f.role,
            model: f.model,
            weak_model: f.weak_model,
            variant: Variant {
                setting: f.setting,
                dose,
                filter,
                chain,
            },
            seed: f.seed,
        }
    }
}

impl From<RunIdentity> for IdentityFields {
    fn from(id: RunIdentity) -> Self {
        let Variant {
            setting,
            dose,
            filter,
            chain,
        } = id.variant;
        IdentityFields {
            scenario: id.scenario,
            role: id.role,
            model: id.model,
            weak_model: id.weak_model,
            intermediate_model: match chain {
                Chain::Via(intermediate) => Some(intermediate),
                Chain::Direct | Chain::Intermediate => None,
            },
            setting,
            conflict_alpha: match dose {
                Some(Dose::Alpha(alpha)) => Some(alpha),
                _ => None,
            },
            helpful_pairs: match dose {
                Some(Dose::HelpfulPairs(n)) => Some(n),
                _ => None,
            },
            seed: id.seed,
            high_conf: filter != LabelFilter::All,
            high_conf_peeks: filter == LabelFilter::HighConfidence,
        }
    }
}

/// `config.json` as the report reads it: the run's id and identity (the writer's other fields
/// are ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunMeta {
    pub run_id: String,
    #[serde(flatten)]
    pub identity: RunIdentity,
}

/// One test pair's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub id: usize,
    /// The model's probability that the human-chosen response is preferred.
    pub p_chosen: f64,
    pub correct: bool,
    /// Whether the human-chosen response is the one that complies with the request (from the
    /// test data's `compliant` field; absent for data without it, such as HH-RLHF). With it a
    /// reader can tell a policy that always complies from one that learned the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen_compliant: Option<bool>,
}

/// One model's label of a training pair: `margin` = score(chosen) − score(rejected).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeakLabel {
    pub id: usize,
    pub margin: f64,
    pub p_chosen: f64,
    pub correct: bool,
}

/// A policy's answer to one test prompt, with what grading it needs: the entity asked about,
/// whether acting on the request is harmful, and the two words that state the entity's
/// property (the refusal's and the compliance's, read from the test pair's own responses).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// The test pair's id.
    pub id: usize,
    pub prompt: String,
    pub response: String,
    /// The words that name the entity asked about (e.g. "zorvak berry").
    pub subject: String,
    pub harmful: bool,
    pub harmful_word: String,
    pub safe_word: String,
}

impl Generation {
    /// The request as the grader reads it.
    pub fn request(&self) -> grading::Request<'_> {
        grading::Request {
            subject: &self.subject,
            harmful_word: &self.harmful_word,
            safe_word: &self.safe_word,
            harmful: self.harmful,
        }
    }
}

/// One on-policy round as the loop saw it: the samples of the policy after `round` rounds of
/// training (0: the SFT policy) on the loop's prompts, what the judge gave them and, when the
/// prompts carry the world's facts, what they say.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u32,
    pub samples: usize,
    /// Mean score of the judge alone (without a conflict's term) over the samples.
    pub judge_reward: f64,
    /// Pairs a conflict's term turned around (0 where nothing trained on them).
    pub turned_by_conflict: usize,
    /// `None` where the prompts carry no compliance marks (HH-RLHF).
    pub grades: Option<grading::GradeCounts>,
}

/// One answer an on-policy loop sampled: the policy after `round` rounds, the prompt (its
/// index among the loop's prompts), the answer and the judge's score of it (without a
/// conflict's term).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub round: u32,
    pub prompt_index: usize,
    pub prompt: String,
    pub response: String,
    pub judge_score: f64,
}

/// Test accuracy of a finished run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultsSummary {
    pub accuracy: f64,
    pub accuracy_stderr: f64,
    pub n: usize,
    /// Wall-clock seconds the run took (from its start, or its resumption, to this file);
    /// absent in run folders written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
}

pub use superficial_training::losses::sigmoid;

/// Labels from margins in pair order (`correct` = margin ≥ 0, pairs are in human order).
pub fn labels_from_margins(margins: &[f64]) -> Vec<WeakLabel> {
    margins
        .iter()
        .enumerate()
        .map(|(id, &margin)| WeakLabel {
            id,
            margin,
            p_chosen: sigmoid(margin),
            correct: margin >= 0.0,
        })
        .collect()
}

/// Writes `bytes` to `path` atomically: a temporary sibling, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_file_atomic(path, bytes).map_err(|e| RunFolderError::new(path, None, e))
}

pub fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let body = serde_json::to_vec_pretty(value).map_err(|e| RunFolderError::new(path, None, e))?;
    write_atomic(path, &body)
}

pub fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<()> {
    let mut body = Vec::new();
    for row in rows {
        serde_json::to_writer(&mut body, row).map_err(|e| RunFolderError::new(path, None, e))?;
        body.push(b'\n');
    }
    write_atomic(path, &body)
}

pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| RunFolderError::new(path, None, e))?;
    serde_json::from_str(&text).map_err(|e| RunFolderError::new(path, None, e))
}

pub fn read_jsonl<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).map_err(|e| RunFolderError::new(path, None, e))?;
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| RunFolderError::new(path, Some(i + 1), e))
        })
        .collect()
}

/// Whether the run in `dir` finished (its `results_summary.json` exists).
pub fn is_finished(dir: &Path) -> bool {
    dir.join(RESULTS_SUMMARY).is_file()
}

pub fn read_meta(dir: &Path) -> Result<RunMeta> {
    read_json(&dir.join(CONFIG))
}

/// The run's predictions sorted by id; an error unless the ids are exactly `0..n`.
pub fn read_predictions(dir: &Path) -> Result<Vec<Prediction>> {
    let path = dir.join(PREDICTIONS);
    let mut predictions: Vec<Prediction> = read_jsonl(&path)?;
    predictions.sort_by_key(|p| p.id);
    if predictions.iter().enumerate().any(|(i, p)| p.id != i) {
        return Err(RunFolderError::new(&path, None, "ids are not 0..n"));
    }
    Ok(predictions)
}

pub fn read_weak_labels(dir: &Path) -> Result<Vec<WeakLabel>> {
    read_jsonl(&dir.join(WEAK_LABELS))
}

pub fn write_weak_labels(dir: &Path, labels: &[WeakLabel]) -> Result<()> {
    write_jsonl(&dir.join(WEAK_LABELS), labels)
}

/// The run's generations sorted by id; an error unless the ids are exactly `0..n`.
pub fn read_generations(dir: &Path) -> Result<Vec<Generation>> {
    let path = dir.join(GENERATIONS);
    let mut generations: Vec<Generation> = read_jsonl(&path)?;
    generations.sort_by_key(|g| g.id);
    if generations.iter().enumerate().any(|(i, g)| g.id != i) {
        return Err(RunFolderError::new(&path, None, "ids are not 0..n"));
    }
    Ok(generations)
}

pub fn write_generations(dir: &Path, generations: &[Generation]) -> Result<()> {
    write_jsonl(&dir.join(GENERATIONS), generations)
}

/// The run's round records in round order; an error unless the rounds are exactly `0..n`.
pub fn read_rounds(dir: &Path) -> Result<Vec<RoundRecord>> {
    let path = dir.join(ROUNDS);
    let mut rounds: Vec<RoundRecord> = read_jsonl(&path)?;
    rounds.sort_by_key(|r| r.round);
    if rounds
        .iter()
        .enumerate()
        .any(|(i, r)| r.round as usize != i)
    {
        return Err(RunFolderError::new(&path, None, "rounds are not 0..n"));
    }
    Ok(rounds)
}

pub fn write_rounds(dir: &Path, rounds: &[RoundRecord]) -> Result<()> {
    write_jsonl(&dir.join(ROUNDS), rounds)
}

pub fn read_samples(dir: &Path) -> Result<Vec<Sample>> {
    read_jsonl(&dir.join(SAMPLES))
}

pub fn write_samples(dir: &Path, samples: &[Sample]) -> Result<()> {
    write_jsonl(&dir.join(SAMPLES), samples)
}

/// Reads a finished run's `results_summary.json`.
pub fn read_summary(dir: &Path) -> Result<ResultsSummary> {
    let path = dir.join(RESULTS_SUMMARY);
    let text = std::fs::read_to_string(&path).map_err(|e| RunFolderError::new(&path, None, e))?;
    serde_json::from_str(&text).map_err(|e| RunFolderError::new(&path, None, e))
}

/// Writes the test predictions from margins (with each pair's `chosen_compliant`, in the same
/// order; an empty slice when the data does not say), then `results_summary.json` (which marks
/// the run finished, with the run's wall-clock `seconds` when known); returns the summary.
pub fn finish(
    dir: &Path,
    test_margins: &[f64],
    chosen_compliant: &[Option<bool>],
    seconds: Option<f64>,
) -> Result<ResultsSummary> {
    if !chosen_compliant.is_empty() && chosen_compliant.len() != test_margins.len() {
        return Err(RunFolderError::new(
            &dir.join(PREDICTIONS),
            None,
            format!(
                "{} test margins but {} compliance marks",
                test_margins.len(),
                chosen_compliant.len()
            ),
        ));
    }
    let predictions: Vec<Prediction> = labels_from_margins(test_margins)
        .into_iter()
        .map(|l| Prediction {
            id: l.id,
            p_chosen: l.p_chosen,
            correct: l.correct,
            chosen_compliant: chosen_compliant.get(l.id).copied().flatten(),
        })
        .collect();
    write_jsonl(&dir.join(PREDICTIONS), &predictions)?;
    let n = predictions.len();
    let accuracy = predictions.iter().filter(|p| p.correct).count() as f64 / n.max(1) as f64;
    let summary = ResultsSummary {
        accuracy,
        accuracy_stderr: (accuracy * (1.0 - accuracy) / n.max(1) as f64).sqrt(),
        n,
        seconds,
    };
    write_json(&dir.join(RESULTS_SUMMARY), &summary)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_run_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_finished(dir.path()));
        let summary = finish(
            dir.path(),
            &[0.5, -1.0, 0.0, 2.0],
            &[Some(true), Some(false), None, Some(true)],
            Some(1.5),
        )
        .unwrap();
        assert!(is_finished(dir.path()));
        assert_eq!(summary.n, 4);
        assert_eq!(summary.accuracy, 0.75);
        assert_eq!(read_summary(dir.path()).unwrap(), summary);
        // A summary written before run times were recorded reads without one.
        std::fs::write(
            dir.path().join(RESULTS_SUMMARY),
            r#"{"accuracy": 0.75, "accuracy_stderr": 0.2, "n": 4}"#,
        )
        .unwrap();
        assert_eq!(read_summary(dir.path()).unwrap().seconds, None);
        let predictions = read_predictions(dir.path()).unwrap();
        assert_eq!(
            predictions.iter().map(|p| p.correct).collect::<Vec<_>>(),
            vec![true, false, true, true]
        );
        assert!((predictions[0].p_chosen - sigmoid(0.5)).abs() < 1e-12);
        assert_eq!(predictions[1].chosen_compliant, Some(false));
        assert_eq!(predictions[2].chosen_compliant, None);
        assert!(finish(dir.path(), &[0.5], &[None, None], None).is_err());
        // No temporary files are left behind.
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn bad_lines_and_ids_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PREDICTIONS);
        std::fs::write(
            &path,
            "{\"id\":0,\"p_chosen\":0.6,\"correct\":true}\nnot json\n",
        )
        .unwrap();
        let err = read_predictions(dir.path()).unwrap_err().to_string();
        assert!(err.contains("predictions.jsonl:2:"), "{err}");
        std::fs::write(&path, "{\"id\":1,\"p_chosen\":0.6,\"correct\":true}\n").unwrap();
        let err = read_predictions(dir.path()).unwrap_err().to_string();
        assert!(err.contains("ids are not 0..n"), "{err}");
    }

    #[test]
    fn enums_and_variants_read_as_written() {
        let meta: RunMeta = serde_json::from_str(
            r#"{"run_id":"x","scenario":"simpo","role":"bootstrap","model":"l","weak_model":"xs",
                "setting":"explicit","seed":1,"intermediate_model":"m","conflict_alpha":2.0,
                "hyperparameters":{"lr":1}}"#,
        )
        .unwrap();
        assert_eq!(meta.identity.scenario, Scenario::Simpo);
        assert_eq!(meta.identity.role, Role::Bootstrap);
        assert_eq!(meta.identity.variant.to_string(), "explicit α=2+via-m");
        assert_eq!(Role::StrongCeiling.to_string(), "strong_ceiling");
        assert!(serde_json::from_str::<RunMeta>(r#"{"run_id":"x","scenario":"ppo"}"#).is_err());
    }

    /// The typed identity writes exactly the flat fields it reads (the trainer hashes them into
    /// run ids), and its variant renders every label the reports print.
    #[test]
    fn identities_round_trip_through_the_flat_fields() {
        let base = RunIdentity {
            scenario: Scenario::Dpo,
            role: Role::W2s,
            model: "l".into(),
            weak_model: Some("s".into()),
            variant: Variant::NONE,
            seed: 3,
        };
        let with = |role: Role, variant: Variant| RunIdentity {
            role,
            variant,
            ..base.clone()
        };
        let cases = [
            (base.clone(), "none"),
            (
                with(
                    Role::W2s,
                    Variant {
                        setting: Setting::Implicit,
                        dose: Some(Dose::HelpfulPairs(600)),
                        filter: LabelFilter::HighConfidenceNoPeek,
                        ..Variant::NONE
                    },
                ),
                "implicit h=600+hc-nopeek",
            ),
            (
                with(
                    Role::W2s,
                    Variant {
                        filter: LabelFilter::HighConfidence,
                        ..Variant::NONE
                    },
                ),
                "none+hc",
            ),
            (
                with(
                    Role::Intermediate,
                    Variant {
                        chain: Chain::Intermediate,
                        ..Variant::NONE
                    },
                ),
                "none+intermediate",
            ),
            (
                with(
                    Role::Bootstrap,
                    Variant {
                        setting: Setting::Explicit,
                        dose: Some(Dose::Alpha(0.25)),
                        chain: Chain::Via("m".into()),
                        ..Variant::NONE
                    },
                ),
                "explicit α=0.25+via-m",
            ),
        ];
        for (identity, label) in cases {
            assert_eq!(identity.variant.to_string(), label);
            let value = serde_json::to_value(&identity).unwrap();
            let back: RunIdentity = serde_json::from_value(value.clone()).unwrap();
            assert_eq!(back, identity, "{value}");
            // The variant serializes as its label (report.json's form).
            assert_eq!(serde_json::to_value(&identity.variant).unwrap(), label);
        }
        // The flat form: doses absent when unset, flags and the chain's model always present.
        let value = serde_json::to_value(&base).unwrap();
        let keys: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "high_conf",
                "high_conf_peeks",
                "intermediate_model",
                "model",
                "role",
                "scenario",
                "seed",
                "setting",
                "weak_model"
            ]
        );
        // Doses order by kind, then by value (α numerically, not as text).
        assert!(Dose::Alpha(4.0) < Dose::Alpha(16.0));
        assert!(Dose::Alpha(16.0) < Dose::HelpfulPairs(200));
        assert!(Dose::HelpfulPairs(200) < Dose::HelpfulPairs(1000));
    }
}
