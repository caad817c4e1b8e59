//! The knowledge sandbox end to end on a fixed small configuration: the whole pipeline is
//! deterministic (same seed → byte-identical world, models and predictions), the model cache is
//! reused, runs spread over two servers give the same predictions, and one progress total
//! covers every draw.

use std::collections::BTreeMap;
use std::path::Path;

use model_server::{ServerConfig, Session, W2sClient};
use superficial_tests::server_of_its_own;
use trainer::sandbox::experiment;
use trainer::sandbox::world::WorldConfig;
use trainer::sandbox::{ExperimentConfig, PretrainConfig, SizeSpec};
use trainer::spec::{Scenario, Setting};
use trainer::study::Progress;

/// Keeps the log lines, the run totals announced and the runs reported done.
#[derive(Default)]
struct Quiet {
    lines: Vec<String>,
    totals: Vec<usize>,
    done: usize,
}

impl Progress for Quiet {
    fn line(&mut self, text: &str) {
        self.lines.push(text.to_string());
    }
    fn set_total(&mut self, runs: usize) {
        assert_eq!(self.done, 0, "the total is announced before any run");
        self.totals.push(runs);
    }
    fn run_done(&mut self) {
        self.done += 1;
    }
}

fn size(name: &str, width: usize, layers: usize, reads: f64) -> SizeSpec {
    SizeSpec {
        name: name.into(),
        width,
        layers,
        heads: 2,
        reads,
    }
}

/// A configuration small enough to run twice in a test: determinism, not knowledge.
fn tiny() -> ExperimentConfig {
    let base = ExperimentConfig::quick();
    ExperimentConfig {
        world: WorldConfig {
            entities: 24,
            top_mentions: 8.0,
            train_gt_pairs: 32,
            train_w2s_pairs: 32,
            test_pairs: 48,
            helpful_pairs: 16,
            corpus_passes: 2,
            ..WorldConfig::default()
        },
        tokenizer_vocab: 400,
        // The smaller size reads half of the entities: its own corpus travels to each server.
        gpt2: vec![size("a", 16, 1, 0.5), size("b", 16, 2, 1.0)],
        pretrain: PretrainConfig {
            epochs: 1,
            ..base.pretrain.clone()
        },
        scenarios: vec![Scenario::Reward, Scenario::Simpo, Scenario::OnPolicy],
        settings: vec![Setting::None, Setting::Explicit],
        conflict: trainer::spec::ConflictSpec {
            explicit_alphas: vec![2.0],
            ..base.conflict.clone()
        },
        on_policy: trainer::spec::OnPolicySpec {
            rounds: 1,
            // 16 × (3 − 1) pairs: one DPO batch of the quick configuration's 32.
            prompts: 16,
            samples_per_prompt: 3,
            max_new_tokens: 8,
            ..Default::default()
        },
        ..base
    }
}

async fn run(
    config: &ExperimentConfig,
    out: &Path,
) -> (experiment::ExperimentOutcome, Vec<String>) {
    let mut embedded = ServerConfig::ephemeral();
    embedded.data_dir = out.join(".server");
    embedded.model_root = out.join(".server");
    let session = Session::open(None, embedded).await.unwrap();
    let outcome = run_on(config, out, std::slice::from_ref(&session.client)).await;
    session.close().await.unwrap();
    outcome
}

/// The experiment with its runs spread over `servers`.
async fn run_on(
    config: &ExperimentConfig,
    out: &Path,
    servers: &[W2sClient],
) -> (experiment::ExperimentOutcome, Vec<String>) {
    let mut progress = Quiet::default();
    let outcome = experiment::run(config, out, servers, Default::default(), &mut progress)
        .await
        .unwrap();
    // One total for every draw's runs, announced up front, that the runs then reach.
    assert_eq!(progress.totals, [outcome.runs]);
    assert_eq!(progress.done, outcome.runs);
    (outcome, progress.lines)
}

/// Every `predictions.jsonl`, `generations.jsonl` and `rounds.jsonl` under `runs/`, by run
/// folder and file.
fn predictions(out: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(out.join("runs")).unwrap() {
        let dir = entry.unwrap().path();
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        for kind in ["predictions.jsonl", "generations.jsonl", "rounds.jsonl"] {
            let file = dir.join(kind);
            if file.is_file() {
                files.insert(format!("{name}/{kind}"), std::fs::read(file).unwrap());
            }
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_gives_byte_identical_predictions_and_the_cache_is_reused() {
    let config = tiny();
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (outcome, log) = run(&config, a.path()).await;
    // Per scenario: 2 ceilings + 1 pair x 2 settings; on-policy also its ceiling (gt_judged).
    assert_eq!(outcome.runs, 13);
    assert!(outcome.summary.is_file());
    assert!(outcome.report_dir.join("report.md").is_file());
    assert!(outcome.report_dir.join("ds_vs_gap.svg").is_file());
    assert!(
        log.iter().any(|l| l.starts_with("pretraining a")),
        "{log:?}"
    );
    for split in [
        "harmless_train_gt",
        "harmless_train_w2s",
        "harmless_test",
        "helpful_train",
    ] {
        let path = a.path().join("world").join(format!("{split}.jsonl"));
        let rows = trainer::data::read_hh_jsonl(&path, None).unwrap();
        assert!(!rows.is_empty(), "{split}");
    }
    assert!(a.path().join("world/tokenizer/tokenizer.json").is_file());
    // Every run's compliant share and collapse class equal a recomputation from its
    // predictions.jsonl and the world's test file.
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(outcome.report_dir.join("report.json")).unwrap())
            .unwrap();
    let test_rows =
        trainer::data::read_hh_jsonl(&a.path().join("world/harmless_test.jsonl"), None).unwrap();
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 13);
    // `eval-client report OUT` finds the runs below the experiment's folder (in runs/), and
    // takes the model folders beside them (which have a config.json too) for no runs.
    let (found, warnings) = eval_client::report::load_runs(&[a.path().to_path_buf()]).unwrap();
    assert_eq!((found.len(), warnings.len()), (13, 0), "{warnings:?}");
    // The on-policy policies' answers, one per test prompt, graded in the report; their
    // rounds (SFT, then after each of the spec's rounds) as curves per role and variant.
    assert_eq!(report["answers"].as_array().unwrap().len(), 3);
    let curves = report["rounds"].as_array().unwrap();
    assert_eq!(curves.len(), 3);
    for curve in curves {
        assert_eq!(curve["points"].as_array().unwrap().len(), 2, "{curve}");
    }
    assert!(outcome.report_dir.join("rounds.svg").is_file());
    for run in runs {
        let id = run["run_id"].as_str().unwrap();
        let predictions =
            eval_client::run_folder::read_predictions(&a.path().join("runs").join(id)).unwrap();
        assert_eq!(predictions.len(), test_rows.len(), "{id}");
        let complied = predictions
            .iter()
            .zip(&test_rows)
            .filter(|(p, row)| {
                (p.p_chosen >= 0.5) == (row.compliant == Some(trainer::data::Side::Chosen))
            })
            .count();
        let share = complied as f64 / test_rows.len() as f64;
        assert!(
            (run["compliant_share"].as_f64().unwrap() - share).abs() < 1e-12,
            "{id}: {run}"
        );
        let expected = if share >= eval_client::collapse::COLLAPSE_THRESHOLD {
            serde_json::json!("always_comply")
        } else if share <= 1.0 - eval_client::collapse::COLLAPSE_THRESHOLD {
            serde_json::json!("always_refuse")
        } else {
            serde_json::Value::Null
        };
        assert_eq!(run["policy_collapse"], expected, "{id}");
    }

    // The second time spread over two servers that share no folder with the trainer (models,
    // datasets, weak labels and predictions travel over gRPC), and server 1 stops in the
    // middle of a run: its run moves to server 0, and the predictions stay byte-identical.
    let (server_a, client_a, _folders_a) = server_of_its_own().await;
    let (server_b, client_b, _folders_b) = server_of_its_own().await;
    let stopper = tokio::spawn({
        let mut training = client_b.training.clone();
        async move {
            loop {
                let running = training
                    .list_jobs(w2s_proto::v1::ListJobsRequest {})
                    .await
                    .map(|r| {
                        r.into_inner()
                            .jobs
                            .iter()
                            // A study job (pretraining, CAUSAL_LM, also runs there now).
                            .any(|j| {
                                j.state == w2s_proto::v1::JobState::Running as i32
                                    && j.objective != w2s_proto::v1::ObjectiveKind::CausalLm as i32
                            })
                    })
                    .unwrap_or(false);
                if running {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            server_b.shutdown().await.unwrap();
        }
    });
    let (_, log_b) = run_on(&config, b.path(), &[client_a, client_b]).await;
    stopper.await.unwrap();
    server_a.shutdown().await.unwrap();
    // The two sizes pretrained side by side, one on each server.
    assert!(
        log_b.iter().any(|l| l.contains("] pretraining a")),
        "{log_b:?}"
    );
    assert!(
        log_b
            .iter()
            .any(|l| l.starts_with("[server 1] pretraining ")),
        "{log_b:?}"
    );
    assert!(
        log_b
            .iter()
            .any(|l| l.starts_with("[server 1] server 1 failed")),
        "{log_b:?}"
    );
    assert!(log_b.iter().any(|l| l.starts_with("[server 1] run ")));
    assert!(!b.path().join(".server").exists());
    let (first, second) = (predictions(a.path()), predictions(b.path()));
    // 13 runs' predictions and the 3 on-policy policies' answers and rounds.
    assert_eq!(first.len(), 19);
    assert_eq!(
        first.keys().collect::<Vec<_>>(),
        second.keys().collect::<Vec<_>>()
    );
    for (name, bytes) in &first {
        assert!(second[name] == *bytes, "{name}: predictions differ");
    }

    // A second experiment in the same folder takes the pretrained models from the cache.
    let (_, log_again) = run(&config, a.path()).await;
    assert!(
        log_again
            .iter()
            .filter(|l| l.contains("found in the cache"))
            .count()
            == 2,
        "{log_again:?}"
    );
    assert!(!log_again.iter().any(|l| l.starts_with("pretraining ")));

    // Two draws: one progress total for both studies; draw 0's models and runs are reused.
    let two = ExperimentConfig {
        seeds: vec![0, 1],
        ..config.clone()
    };
    let (outcome, log_two) = run(&two, a.path()).await;
    assert_eq!(outcome.runs, 26);
    assert!(
        log_two
            .iter()
            .any(|l| l.starts_with("pretraining a of draw pretrain.seed=1")),
        "{log_two:?}"
    );
}
