//! Running the study on a model server: ceilings, weak labels, weak-to-strong students under
//! each setting, for reward modeling and SimPO/DPO (paper spec §2). Each run writes
//! `OUT/<run-id>/` with `config.json`, `log.jsonl`, `predictions.jsonl`, `weak_labels.jsonl`
//! (runs that label data) and, last, `results_summary.json`, which marks the run finished: a
//! rerun skips finished runs, and an interrupted run follows (or restarts) its server job.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use model_server::W2sClient;
use serde::Serialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use w2s_proto::v1::upload_dataset_request::Item;

pub use superficial_run_folder::WeakLabel;
use superficial_run_folder::{
    self as contract, Chain, Dose, LabelFilter, Role, RunIdentity, Variant, labels_from_margins,
    sigmoid,
};

use crate::data::{HhPair, read_hh_jsonl};
use crate::spec::{
    ConflictTarget, ModelSpec, OnPolicySpec, Scenario, Setting, StageHyper, StudySpec,
};

mod jobs;
mod on_policy;
pub(crate) mod pool;
mod rows;

use rows::{pair_row, rows_key, student_rows};

/// One student's conflicting goal and its dose (paper spec §1.7.2, §1.7.6, §1.7.7).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Conflict {
    None,
    /// Human-labelled helpfulness pairs mixed into the weak labels.
    Implicit {
        helpful_pairs: usize,
    },
    /// The reward-mechanism / "reverse" term with weight α, pulling towards `target`.
    Explicit {
        alpha: f64,
        target: ConflictTarget,
    },
}

impl Conflict {
    pub fn setting(&self) -> Setting {
        match self {
            Conflict::None => Setting::None,
            Conflict::Implicit { .. } => Setting::Implicit,
            Conflict::Explicit { .. } => Setting::Explicit,
        }
    }

    /// The explicit term's weight (0 without one).
    fn alpha(&self) -> f64 {
        match self {
            Conflict::Explicit { alpha, .. } => *alpha,
            _ => 0.0,
        }
    }

    /// The dose as the run folder records it.
    pub fn dose(&self) -> Option<Dose> {
        match *self {
            Conflict::None => None,
            Conflict::Implicit { helpful_pairs } => Some(Dose::HelpfulPairs(helpful_pairs)),
            Conflict::Explicit { alpha, .. } => Some(Dose::Alpha(alpha)),
        }
    }
}

/// Everything a run needs from the data files, read and validated once.
pub struct StudyData {
    pub gt: Vec<HhPair>,
    pub w2s: Vec<HhPair>,
    pub test: Vec<HhPair>,
    pub helpful: Vec<HhPair>,
    pub hashes: BTreeMap<String, String>,
}

impl StudyData {
    pub fn load(spec: &StudySpec) -> Result<Self> {
        let s = &spec.sizes;
        let mut hashes = BTreeMap::new();
        let mut read = |name: &str, path: &Path, n: usize| -> Result<Vec<HhPair>> {
            let bytes =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            hashes.insert(name.to_string(), format!("{:x}", Sha256::digest(&bytes)));
            Ok(read_hh_jsonl(path, Some(n))?)
        };
        let gt = read("gt", &spec.data.gt, s.n_docs)?;
        let w2s = read("w2s", &spec.data.w2s, s.n_w2s_docs)?;
        let test = read("test", &spec.data.test, s.n_test_docs)?;
        let helpful = match &spec.data.helpful {
            Some(path) if spec.settings.contains(&Setting::Implicit) => {
                let most = spec.implicit_helpful_pairs().into_iter().max().unwrap_or(0);
                read("helpful", path, most)?
            }
            _ => Vec::new(),
        };
        if spec.settings.contains(&Setting::Explicit)
            && spec.conflict.explicit_target == ConflictTarget::Compliant
        {
            // Students train on the W2S split, bootstrapped ones on the ground-truth split.
            for (path, pairs) in [(&spec.data.w2s, &w2s), (&spec.data.gt, &gt)] {
                if let Some(pair) = pairs.iter().find(|p| p.compliant.is_none()) {
                    bail!(
                        "{}:{}: the explicit conflict's target is `compliant`, but this pair has no `compliant` field",
                        path.display(),
                        pair.row + 1
                    );
                }
            }
        }
        Ok(Self {
            gt,
            w2s,
            test,
            helpful,
            hashes,
        })
    }
}

/// Where progress goes.
pub trait Progress {
    /// A log line.
    fn line(&mut self, text: &str);
    /// The number of runs the study will go through (finished ones included).
    fn set_total(&mut self, _runs: usize) {}
    /// A run starts (or is found finished, then `run_done` follows at once).
    fn run_started(&mut self, _run_id: &str) {}
    /// A training step of the current run's stage.
    fn step(&mut self, _stage: &str, _step: u64, _total: u64) {}
    /// The current run is finished or skipped.
    fn run_done(&mut self) {}
}

/// Prints plain progress lines to stderr.
pub struct PlainProgress;

impl Progress for PlainProgress {
    fn line(&mut self, text: &str) {
        eprintln!("{text}");
    }
}

/// The study runner.
pub struct Study<'a> {
    pub spec: &'a StudySpec,
    pub data: &'a StudyData,
    /// The server this runner's runs go to.
    pub client: W2sClient,
    /// Every server of the study (`client` first); runs are spread over them.
    servers: Vec<W2sClient>,
    pub out: PathBuf,
    pub force: bool,
    /// Keep each finished run's training jobs (their trained models) on the server; by
    /// default they are deleted once the run's results are written, since no later run
    /// reads them (a finished run is skipped, its weak labels read from its folder).
    pub keep_models: bool,
    pub progress: &'a mut dyn Progress,
    /// When the run in progress started (or resumed), for its `results_summary.json`.
    run_started: Option<std::time::Instant>,
    /// Datasets uploaded to `client`, by content.
    datasets: BTreeMap<String, String>,
}

/// Writes a file atomically (the run-folder contract's temporary name, fsync, rename).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(contract::write_atomic(path, bytes)?)
}

/// A run's configuration: its identity (the run-folder contract) plus everything else that
/// affects results. Its id hashes all of it but `code_version`.
#[derive(Debug, Clone, Serialize)]
struct RunConfig {
    #[serde(flatten)]
    identity: RunIdentity,
    /// The explicit conflict's target (explicit students only).
    #[serde(skip_serializing_if = "Option::is_none")]
    conflict_target: Option<ConflictTarget>,
    /// The on-policy loop (on-policy students only).
    #[serde(skip_serializing_if = "Option::is_none")]
    on_policy: Option<OnPolicySpec>,
    hyperparameters: StageHyper,
    sizes: crate::spec::Sizes,
    models: Vec<ModelSpec>,
    data_hashes: BTreeMap<String, String>,
    code_version: &'static str,
}

impl RunConfig {
    fn id(&self) -> String {
        let mut effective = serde_json::to_value(self).unwrap_or_default();
        if let Some(o) = effective.as_object_mut() {
            o.remove("code_version");
            if let Some(serde_json::Value::Array(models)) = o.get_mut("models") {
                for model in models.iter_mut().filter_map(|m| m.as_object_mut()) {
                    if model.contains_key("identity") {
                        model.remove("path");
                    }
                }
            }
        }
        let hash = format!("{:x}", Sha256::digest(effective.to_string().as_bytes()));
        let RunIdentity {
            scenario,
            role,
            model,
            weak_model,
            variant,
            seed,
        } = &self.identity;
        let who = match weak_model {
            Some(weak) => format!("{weak}-to-{model}"),
            None => model.clone(),
        };
        let conf = match variant.filter {
            LabelFilter::All => "",
            LabelFilter::HighConfidence => "-hc",
            LabelFilter::HighConfidenceNoPeek => "-hcnp",
        };
        let setting = variant.setting;
        let dose = match variant.dose {
            Some(Dose::Alpha(alpha)) => format!("-a{alpha}"),
            Some(Dose::HelpfulPairs(n)) => format!("-h{n}"),
            None => String::new(),
        };
        format!(
            "{scenario}-{role}-{who}-{setting}{dose}{conf}-s{seed}-{}",
            &hash[..8]
        )
    }
}

impl<'a> Study<'a> {
    pub fn new(
        spec: &'a StudySpec,
        data: &'a StudyData,
        client: W2sClient,
        out: PathBuf,
        force: bool,
        progress: &'a mut dyn Progress,
    ) -> Self {
        Self {
            spec,
            data,
            servers: vec![client.clone()],
            client,
            out,
            force,
            keep_models: false,
            progress,
            run_started: None,
            datasets: BTreeMap::new(),
        }
    }

    /// The servers that can train the study's largest model, after asking each for its device
    /// and memory; a clear error when none can.
    async fn servers_that_fit(&mut self) -> Result<Vec<W2sClient>> {
        // Weights, gradients, Adam's two moments and a frozen copy (DPO's reference), in f32.
        const TRAINING_BYTES_PER_PARAMETER: u64 = 20;
        let mut largest = 0u64;
        for model in &self.spec.models {
            let config = match (&model.path, &model.preset) {
                (Some(dir), _) => {
                    superficial_models::ModelConfig::from_file(&dir.join("config.json"))
                        .with_context(|| format!("model {}", model.name))?
                }
                (None, Some(preset)) => superficial_models::ModelConfig::preset(preset)
                    .with_context(|| format!("model {}: unknown preset {preset}", model.name))?,
                _ => bail!("model `{}` has no source", model.name),
            };
            largest = largest.max(superficial_models::model::parameter_count(&config) as u64);
        }
        let needed = largest * TRAINING_BYTES_PER_PARAMETER;
        let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
        let mut fit = Vec::new();
        let mut refused = Vec::new();
        for (i, client) in self.servers.iter().enumerate() {
            let info = client
                .server_info()
                .await
                .with_context(|| format!("asking server {i} for its device and memory"))?;
            let known = info.memory_available_bytes > 0;
            if self.servers.len() > 1 {
                self.progress.line(&format!(
                    "server {i}: {} ({}), version {}",
                    info.device,
                    if known {
                        format!("{:.1} GiB available", gib(info.memory_available_bytes))
                    } else {
                        "memory not reported".into()
                    },
                    info.version
                ));
            }
            if known && info.memory_available_bytes < needed {
                refused.push(format!(
                    "server {i} ({}) has {:.2} GiB available",
                    info.device,
                    gib(info.memory_available_bytes)
                ));
            } else {
                fit.push(client.clone());
            }
        }
        for line in &refused {
            self.progress.line(&format!(
                "{line}, less than the ~{:.2} GiB training the largest model needs: not used",
                gib(needed)
            ));
        }
        if fit.is_empty() {
            bail!(
                "no model server can train the study's largest model (~{:.2} GiB): {}",
                gib(needed),
                refused.join("; ")
            );
        }
        Ok(fit)
    }

    /// Spreads the runs over these servers too (the first stays `client`).
    /// Whether finished runs keep their training jobs on the server.
    pub fn keeping_models(mut self, keep: bool) -> Self {
        self.keep_models = keep;
        self
    }

    pub fn with_more_servers(mut self, more: impl IntoIterator<Item = W2sClient>) -> Self {
        self.servers.extend(more);
        self
    }

    fn model(&self, name: &str) -> Result<&ModelSpec> {
        self.spec
            .models
            .iter()
            .find(|m| m.name == name)
            .with_context(|| format!("unknown model {name}"))
    }

    fn config(
        &self,
        scenario: Scenario,
        role: Role,
        model: &str,
        weak: Option<&str>,
        conflict: Conflict,
        seed: u64,
    ) -> RunConfig {
        RunConfig {
            identity: RunIdentity {
                scenario,
                role,
                model: model.to_string(),
                weak_model: weak.map(str::to_string),
                variant: Variant {
                    setting: conflict.setting(),
                    dose: conflict.dose(),
                    filter: LabelFilter::All,
                    chain: Chain::Direct,
                },
                seed,
            },
            conflict_target: match conflict {
                Conflict::Explicit { target, .. } => Some(target),
                _ => None,
            },
            on_policy: (self.spec.plan(scenario).on_policy && !role.is_ceiling())
                .then(|| self.spec.on_policy.clone()),
            hyperparameters: self.spec.plan_for(scenario, role).hyper.clone(),
            sizes: self.spec.sizes.clone(),
            // Only the models this run involves, so adding a model to the spec keeps the ids
            // (and finished results) of existing runs.
            models: self
                .spec
                .models
                .iter()
                .filter(|m| m.name == model || Some(m.name.as_str()) == weak)
                .cloned()
                .collect(),
            data_hashes: self.data.hashes.clone(),
            code_version: env!("CARGO_PKG_VERSION"),
        }
    }

    /// Runs every scenario, seed, model and (weak, strong, setting) of the spec over the
    /// servers (`pool.rs`); returns the run folders in the order one server would produce them.
    pub async fn run_all(&mut self) -> Result<Vec<PathBuf>> {
        std::fs::create_dir_all(&self.out)?;
        let total = self.planned_runs();
        self.progress.set_total(total);
        let names: Vec<String> = self.spec.models.iter().map(|m| m.name.clone()).collect();
        let (spec, data, out, force, keep_models) = (
            self.spec,
            self.data,
            self.out.clone(),
            self.force,
            self.keep_models,
        );
        let servers = self.servers_that_fit().await?;
        let several = servers.len() > 1;
        // Plan every phase first (it needs `&self`), then hand out the progress display.
        let mut phases = Vec::new();
        for &seed in &spec.seeds {
            for &scenario in &spec.scenarios {
                let ceilings: Vec<pool::Task> = names
                    .iter()
                    .map(|model| pool::Task::Ceiling {
                        scenario,
                        model: model.clone(),
                        seed,
                    })
                    .collect();
                let mut students = Vec::new();
                if spec.plan(scenario).preference_variants {
                    students.extend(spec.bootstrap.iter().map(|chain| pool::Task::Bootstrap {
                        scenario,
                        chain: chain.clone(),
                        seed,
                    }));
                }
                if spec.plan(scenario).on_policy {
                    // The loop's ceiling for every model that is some pair's strong one.
                    students.extend(names.iter().skip(1).map(|model| pool::Task::GtJudged {
                        scenario,
                        model: model.clone(),
                        seed,
                    }));
                }
                for (i, weak) in names.iter().enumerate() {
                    for strong in &names[i + 1..] {
                        for conflict in self.conflicts(scenario) {
                            for filter in self.label_filters(scenario, conflict) {
                                students.push(pool::Task::Student {
                                    scenario,
                                    weak: weak.clone(),
                                    strong: strong.clone(),
                                    conflict,
                                    seed,
                                    filter,
                                });
                            }
                        }
                    }
                }
                phases.push((ceilings, students));
            }
        }
        let shared: RefCell<&mut dyn Progress> = RefCell::new(&mut *self.progress);
        let mut progresses: Vec<pool::ServerProgress> = (0..servers.len())
            .map(|i| pool::ServerProgress {
                shared: &shared,
                prefix: if several {
                    format!("[server {i}] ")
                } else {
                    String::new()
                },
            })
            .collect();
        let mut workers: Vec<Study> = servers
            .iter()
            .zip(progresses.iter_mut())
            .map(|(client, progress)| Study {
                spec,
                data,
                client: client.clone(),
                servers: Vec::new(),
                out: out.clone(),
                force,
                keep_models,
                progress,
                run_started: None,
                datasets: BTreeMap::new(),
            })
            .collect();
        let alive: Vec<Cell<bool>> = servers.iter().map(|_| Cell::new(true)).collect();
        let mut finished = Vec::new();
        for (ceilings, students) in phases {
            let mut labels = BTreeMap::new();
            // Outputs come in task order: one ceiling per model, in `names` order.
            let outputs = pool::run_phase(&mut workers, &alive, ceilings, &labels).await?;
            for (model, output) in names.iter().zip(outputs) {
                finished.extend(output.dirs);
                if let Some(made) = output.labels {
                    labels.insert(model.clone(), made);
                }
            }
            for output in pool::run_phase(&mut workers, &alive, students, &labels).await? {
                finished.extend(output.dirs);
            }
        }
        Ok(finished)
    }

    /// Every student variant of a scenario (see [`conflicts`]).
    pub fn conflicts(&self, scenario: Scenario) -> Vec<Conflict> {
        conflicts(self.spec, scenario)
    }

    fn label_filters(&self, scenario: Scenario, conflict: Conflict) -> Vec<LabelFilter> {
        label_filters(self.spec, scenario, conflict)
    }

    /// How many run folders `run_all` goes through (see [`planned_runs`]).
    pub fn planned_runs(&self) -> usize {
        planned_runs(self.spec)
    }

    /// Uploads rows once per content: the cache is keyed by the rows themselves, never by a
    /// name (a name-keyed cache once handed a bootstrapped student its weak teacher's labels
    /// whenever the two label sets had the same size). `name` is for the server's listings.
    async fn dataset(&mut self, name: &str, rows: Vec<Item>) -> Result<String> {
        let key = rows_key(&rows);
        if let Some(id) = self.datasets.get(&key) {
            return Ok(id.clone());
        }
        let info = self
            .client
            .upload_dataset(name, rows)
            .await
            .with_context(|| format!("uploading {name}"))?;
        self.datasets.insert(key, info.id.clone());
        Ok(info.id)
    }

    fn human_rows(pairs: &[HhPair]) -> Vec<Item> {
        pairs
            .iter()
            .map(|p| pair_row(&p.chosen, &p.rejected, 1.0, true))
            .collect()
    }

    /// Prepares a run folder; `None` when the run is already finished (and not forced).
    fn open_run(&mut self, config: &RunConfig) -> Result<Option<(PathBuf, std::fs::File)>> {
        let id = config.id();
        let dir = self.out.join(&id);
        self.progress.run_started(&id);
        if contract::is_finished(&dir) && !self.force {
            self.progress.line(&format!("skip {id} (finished)"));
            self.progress.run_done();
            return Ok(None);
        }
        if self.force {
            let _ = std::fs::remove_file(dir.join(contract::RESULTS_SUMMARY));
            let _ = std::fs::remove_file(dir.join("jobs.json"));
        }
        std::fs::create_dir_all(&dir)?;
        /// `config.json`: the contract's `run_id` and identity, then the rest of the config.
        #[derive(Serialize)]
        struct ConfigFile<'a> {
            run_id: &'a str,
            #[serde(flatten)]
            config: &'a RunConfig,
        }
        let file = ConfigFile {
            run_id: &id,
            config,
        };
        write_atomic(
            &dir.join(contract::CONFIG),
            serde_json::to_string_pretty(&file)?.as_bytes(),
        )?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(contract::LOG))?;
        self.progress.line(&format!("run {id}"));
        self.run_started = Some(std::time::Instant::now());
        Ok(Some((dir, log)))
    }

    fn finish_run(&mut self, dir: &Path, test_margins: &[f64]) -> Result<f64> {
        let chosen_compliant: Vec<Option<bool>> = self
            .data
            .test
            .iter()
            .map(|pair| pair.compliant.map(|side| side == crate::data::Side::Chosen))
            .collect();
        let chosen_compliant = if chosen_compliant.iter().any(Option::is_some) {
            chosen_compliant
        } else {
            Vec::new()
        };
        let seconds = self
            .run_started
            .take()
            .map(|started| started.elapsed().as_secs_f64());
        let summary = contract::finish(dir, test_margins, &chosen_compliant, seconds)?;
        self.progress.run_done();
        self.progress.line(&format!(
            "  accuracy {:.4} on {} test pairs",
            summary.accuracy, summary.n
        ));
        Ok(summary.accuracy)
    }

    fn read_labels(dir: &Path) -> Result<Vec<WeakLabel>> {
        Ok(contract::read_weak_labels(dir)?)
    }

    /// Trains a model on ground truth, evaluates it, and labels the W2S split.
    async fn ceiling(
        &mut self,
        scenario: Scenario,
        name: &str,
        seed: u64,
    ) -> Result<(PathBuf, Vec<WeakLabel>)> {
        // One ceiling run per model serves every pair it is part of; it is labelled
        // `strong_ceiling` for the most capable model and `weak_ceiling` otherwise.
        let is_last = self.spec.models.last().is_some_and(|m| m.name == name);
        let role = if is_last {
            Role::StrongCeiling
        } else {
            Role::WeakCeiling
        };
        let config = self.config(scenario, role, name, None, Conflict::None, seed);
        let id = config.id();
        let dir = self.out.join(&id);
        let Some((dir, mut log)) = self.open_run(&config)? else {
            return Ok((dir.clone(), Self::read_labels(&dir)?));
        };
        let model = self.model(name)?.clone();
        let gt_rows = Self::human_rows(&self.data.gt);
        let gt = self.dataset("gt", gt_rows).await?;
        // On-policy ceilings are the judges: reward models, trained and scored as such.
        let training = self.spec.plan(scenario).ceilings;
        let trained = self
            .train_scenario(training, &dir, &model, &id, vec![gt], 0.0, seed, &mut log)
            .await?;
        let (scoring, h) = self.scoring(training);
        let test = self.margins(&trained, &self.data.test, scoring, &h).await?;
        let w2s = self.margins(&trained, &self.data.w2s, scoring, &h).await?;
        let labels = labels_from_margins(&w2s);
        contract::write_weak_labels(&dir, &labels)?;
        self.finish_run(&dir, &test)?;
        self.unload(trained).await;
        self.release_jobs(&dir).await;
        Ok((dir, labels))
    }

    /// A weak-to-strong student: trained on the weak ceiling's labels of the W2S split.
    #[allow(clippy::too_many_arguments)]
    async fn student(
        &mut self,
        scenario: Scenario,
        weak: &str,
        strong: &str,
        conflict: Conflict,
        seed: u64,
        labels: &[WeakLabel],
        filter: LabelFilter,
    ) -> Result<PathBuf> {
        let plan = StudentPlan {
            role: Role::W2s,
            teacher_split: Split::W2s,
            label_split: None,
            chain: Chain::Direct,
        };
        Ok(self
            .train_student(scenario, weak, strong, conflict, seed, labels, filter, plan)
            .await?
            .0)
    }

    /// The on-policy loop's ceiling: `model` as its own teacher (its ceiling's labels of the
    /// W2S split) and judge (its reward model trained on ground truth), with no conflict.
    async fn gt_judged(
        &mut self,
        scenario: Scenario,
        model: &str,
        seed: u64,
        labels: &[WeakLabel],
    ) -> Result<PathBuf> {
        let plan = StudentPlan {
            role: Role::GtJudged,
            teacher_split: Split::W2s,
            label_split: None,
            chain: Chain::Direct,
        };
        Ok(self
            .train_student(
                scenario,
                model,
                model,
                Conflict::None,
                seed,
                labels,
                LabelFilter::All,
                plan,
            )
            .await?
            .0)
    }

    /// A student trained on a teacher's labels of `plan.teacher_split`; with `plan.label_split`
    /// it also labels that split afterwards (the intermediate of a bootstrapping chain).
    #[allow(clippy::too_many_arguments)]
    async fn train_student(
        &mut self,
        scenario: Scenario,
        weak: &str,
        strong: &str,
        conflict: Conflict,
        seed: u64,
        labels: &[WeakLabel],
        filter: LabelFilter,
        plan: StudentPlan,
    ) -> Result<(PathBuf, Vec<WeakLabel>)> {
        let mut config = self.config(scenario, plan.role, strong, Some(weak), conflict, seed);
        if let Chain::Via(intermediate) = &plan.chain {
            config.models.extend(
                self.spec
                    .models
                    .iter()
                    .filter(|m| &m.name == intermediate)
                    .cloned(),
            );
        }
        config.identity.variant.filter = filter;
        config.identity.variant.chain = plan.chain;
        let id = config.id();
        let dir = self.out.join(&id);
        let Some((dir, mut log)) = self.open_run(&config)? else {
            let labels = if plan.label_split.is_some() {
                Self::read_labels(&dir)?
            } else {
                Vec::new()
            };
            return Ok((dir, labels));
        };
        let Some(datasets) = self
            .student_datasets(&id, scenario, plan.teacher_split, labels, filter, conflict)
            .await?
        else {
            return Ok((dir, Vec::new()));
        };
        let model = self.model(strong)?.clone();
        let trained = if self.spec.plan(scenario).on_policy {
            let mut datasets = datasets.into_iter();
            let labels = datasets.next().context("no weak-label dataset")?;
            let weak_model = self.model(weak)?.clone();
            self.on_policy_student(
                &dir,
                &id,
                &weak_model,
                &model,
                labels,
                datasets.collect(),
                conflict,
                seed,
                &mut log,
            )
            .await?
        } else {
            self.train_scenario(
                scenario,
                &dir,
                &model,
                &id,
                datasets,
                conflict.alpha(),
                seed,
                &mut log,
            )
            .await?
        };
        let (scoring, h) = self.scoring(scenario);
        let test = self.margins(&trained, &self.data.test, scoring, &h).await?;
        let mut new_labels = Vec::new();
        if let Some(split) = plan.label_split {
            let pairs: &[HhPair] = match split {
                Split::W2s => &self.data.w2s,
                Split::Gt => &self.data.gt,
            };
            new_labels = labels_from_margins(&self.margins(&trained, pairs, scoring, &h).await?);
            contract::write_weak_labels(&dir, &new_labels)?;
        }
        self.finish_run(&dir, &test)?;
        self.unload(trained).await;
        self.release_jobs(&dir).await;
        Ok((dir, new_labels))
    }

    /// The datasets a student trains on: its teacher's labels of `split` as rows (kept by
    /// `filter`), plus the implicit conflict's helpfulness pairs. `None` when the filter leaves
    /// less than one batch: not an error of the study, the run stays unfinished and the report
    /// lists it as such.
    async fn student_datasets(
        &mut self,
        id: &str,
        scenario: Scenario,
        split: Split,
        labels: &[WeakLabel],
        filter: LabelFilter,
        conflict: Conflict,
    ) -> Result<Option<Vec<String>>> {
        let teacher_pairs: &[HhPair] = match split {
            Split::W2s => &self.data.w2s,
            Split::Gt => &self.data.gt,
        };
        if labels.len() > teacher_pairs.len() {
            bail!(
                "{id}: {} labels for {} pairs",
                labels.len(),
                teacher_pairs.len()
            );
        }
        let rows = student_rows(
            scenario,
            &teacher_pairs[..labels.len()],
            labels,
            filter,
            self.spec.preference.conf_threshold,
            self.spec.conflict.explicit_target,
        );
        let batch = self.spec.plan(scenario).hyper.batch_size;
        if rows.len() < batch as usize {
            self.progress.line(&format!(
                "skip {id}: only {} weak labels pass the high-confidence filter, fewer than one batch of {batch}",
                rows.len()
            ));
            self.progress.run_done();
            return Ok(None);
        }
        let kept = rows.len();
        let mut datasets = vec![self.dataset(&format!("labels-for-{id}"), rows).await?];
        if let Conflict::Implicit { helpful_pairs } = conflict {
            let n = if filter != LabelFilter::All {
                kept.min(helpful_pairs)
            } else {
                helpful_pairs
            };
            if n > self.data.helpful.len() {
                bail!(
                    "{id}: {n} helpfulness pairs asked for, the helpful split has {}",
                    self.data.helpful.len()
                );
            }
            let helpful = Self::human_rows(&self.data.helpful[..n]);
            datasets.push(self.dataset(&format!("helpful-{n}"), helpful).await?);
        }
        Ok(Some(datasets))
    }

    /// Bootstrapping weak → intermediate → strong (paper spec §2.4): the intermediate learns
    /// from the weak ceiling's labels of the W2S split and labels the ground-truth split (its
    /// first `n_w2s_docs` rows); the strong student learns from those labels. Deception is
    /// measured against the original weak model.
    pub async fn bootstrap(
        &mut self,
        scenario: Scenario,
        chain: &[String; 3],
        seed: u64,
        weak_labels: &[WeakLabel],
    ) -> Result<Vec<PathBuf>> {
        let [weak, intermediate, strong] = chain;
        let mut dirs = Vec::new();
        let intermediate_plan = StudentPlan {
            role: Role::Intermediate,
            teacher_split: Split::W2s,
            label_split: Some(Split::Gt),
            chain: Chain::Intermediate,
        };
        let (dir, gt_labels) = self
            .train_student(
                scenario,
                weak,
                intermediate,
                Conflict::None,
                seed,
                weak_labels,
                LabelFilter::All,
                intermediate_plan,
            )
            .await?;
        dirs.push(dir);
        let gt_labels: Vec<WeakLabel> = gt_labels
            .into_iter()
            .take(self.spec.sizes.n_w2s_docs.min(self.data.gt.len()))
            .collect();
        for conflict in self.conflicts(scenario) {
            let plan = StudentPlan {
                role: Role::Bootstrap,
                teacher_split: Split::Gt,
                label_split: None,
                chain: Chain::Via(intermediate.clone()),
            };
            dirs.push(
                self.train_student(
                    scenario,
                    weak,
                    strong,
                    conflict,
                    seed,
                    &gt_labels,
                    LabelFilter::All,
                    plan,
                )
                .await?
                .0,
            );
        }
        Ok(dirs)
    }
}

/// Adds a field to a run's `config.json` (e.g. the content hash of the loaded model).
fn annotate_config(dir: &Path, key: &str, value: &str) -> Result<()> {
    let path = dir.join(contract::CONFIG);
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    if let Some(o) = config.as_object_mut() {
        o.insert(key.to_string(), json!(value));
    }
    write_atomic(&path, serde_json::to_string_pretty(&config)?.as_bytes())
}

/// Which data split a step uses.
#[derive(Debug, Clone, Copy)]
enum Split {
    W2s,
    Gt,
}

/// How a student is trained and what it produces.
struct StudentPlan {
    role: Role,
    teacher_split: Split,
    label_split: Option<Split>,
    /// The run's place in a bootstrapping chain (agrees with `role`).
    chain: Chain,
}

/// Every student variant of a scenario: each setting at each of its doses.
pub fn conflicts(spec: &StudySpec, scenario: Scenario) -> Vec<Conflict> {
    let mut out = Vec::new();
    for &setting in &spec.settings {
        match setting {
            Setting::None => out.push(Conflict::None),
            Setting::Implicit => out.extend(
                spec.implicit_helpful_pairs()
                    .into_iter()
                    .map(|helpful_pairs| Conflict::Implicit { helpful_pairs }),
            ),
            Setting::Explicit => {
                out.extend(spec.explicit_alphas(scenario).into_iter().map(|alpha| {
                    Conflict::Explicit {
                        alpha,
                        target: spec.conflict.explicit_target,
                    }
                }))
            }
        }
    }
    out
}

/// A student's label filters: all weak labels, plus with `high_conf` for SimPO/DPO without
/// the explicit conflict the official high-confidence filter and the one that does not peek at
/// ground truth.
fn label_filters(spec: &StudySpec, scenario: Scenario, conflict: Conflict) -> Vec<LabelFilter> {
    if spec.high_conf
        && spec.plan(scenario).preference_variants
        && conflict.setting() != Setting::Explicit
    {
        vec![
            LabelFilter::All,
            LabelFilter::HighConfidence,
            LabelFilter::HighConfidenceNoPeek,
        ]
    } else {
        vec![LabelFilter::All]
    }
}

/// How many run folders a study of `spec` goes through (finished ones included), known before
/// anything runs: ceilings, every pair's students at every variant, bootstrap chains.
pub fn planned_runs(spec: &StudySpec) -> usize {
    let models = spec.models.len();
    let pairs = models * models.saturating_sub(1) / 2;
    let per_scenario = |scenario: Scenario| {
        let conflicts = conflicts(spec, scenario);
        let variants: usize = conflicts
            .iter()
            .map(|&conflict| label_filters(spec, scenario, conflict).len())
            .sum();
        let bootstrap = if spec.plan(scenario).preference_variants {
            spec.bootstrap.len() * (1 + conflicts.len())
        } else {
            0
        };
        // The on-policy loop's ceiling: one per model that is some pair's strong one.
        let gt_judged = if spec.plan(scenario).on_policy {
            models.saturating_sub(1)
        } else {
            0
        };
        models + pairs * variants + bootstrap + gt_judged
    };
    spec.seeds.len()
        * spec
            .scenarios
            .iter()
            .map(|&s| per_scenario(s))
            .sum::<usize>()
}
