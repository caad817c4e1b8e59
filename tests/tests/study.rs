//! The study end to end on the shared HH data with two tiny random-init models: `trainer`'s
//! runner writes the run folders of the contract, a rerun skips finished runs, an interrupted
//! run redone gives the same predictions, and `eval-client`'s report has every comparison.

use std::path::Path;

use model_server::{ServerConfig, Session};
use trainer::spec::{ModelSpec, Scenario, Setting, StageHyper, StudySpec};
use trainer::study::{Progress, Study, StudyData};

struct Quiet(Vec<String>);

impl Progress for Quiet {
    fn line(&mut self, text: &str) {
        self.0.push(text.to_string());
    }
}

fn spec() -> StudySpec {
    let data = superficial_tests::hh_data_dir();
    let hyper = |lr| StageHyper {
        lr,
        batch_size: 16,
        minibatch_size: 16,
        max_ctx: 96,
        ..StageHyper::default()
    };
    StudySpec {
        data: trainer::spec::DataFiles {
            gt: data.join("harmless_train_gt.jsonl"),
            w2s: data.join("harmless_train_w2s.jsonl"),
            test: data.join("harmless_test.jsonl"),
            helpful: None,
        },
        sizes: trainer::spec::Sizes {
            n_docs: 32,
            n_w2s_docs: 32,
            n_test_docs: 48,
            n_extra_docs: 0,
        },
        models: vec![
            ModelSpec {
                name: "small".into(),
                path: None,
                preset: Some("tiny-gpt2".into()),
                seed: 1,
                identity: None,
            },
            ModelSpec {
                name: "big".into(),
                path: None,
                preset: Some("tiny-opt".into()),
                seed: 2,
                identity: None,
            },
        ],
        scenarios: vec![Scenario::Reward, Scenario::Simpo],
        settings: vec![Setting::None, Setting::Explicit],
        seeds: vec![0],
        high_conf: false,
        bootstrap: Vec::new(),
        reward: hyper(1e-3),
        preference: hyper(1e-4),
        conflict: Default::default(),
        on_policy: Default::default(),
    }
}

async fn run(spec: &StudySpec, out: &Path) -> (Vec<std::path::PathBuf>, Vec<String>) {
    run_keeping(spec, out, false).await
}

/// [`run`], keeping the server's job folders when `keep_models` (as `--keep-models` does).
async fn run_keeping(
    spec: &StudySpec,
    out: &Path,
    keep_models: bool,
) -> (Vec<std::path::PathBuf>, Vec<String>) {
    let data = StudyData::load(spec).unwrap();
    let mut config = ServerConfig::ephemeral();
    config.data_dir = out.join(".server");
    let session = Session::open(None, config).await.unwrap();
    let mut progress = Quiet(Vec::new());
    let dirs = Study::new(
        spec,
        &data,
        session.client.clone(),
        out.to_path_buf(),
        false,
        &mut progress,
    )
    .keeping_models(keep_models)
    .run_all()
    .await
    .unwrap();
    session.close().await.unwrap();
    (dirs, progress.0)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn study_runs_resumes_and_reports() {
    let spec = spec();
    let out = tempfile::tempdir().unwrap();
    let (dirs, _) = run(&spec, out.path()).await;
    // Per scenario: 2 ceilings + 1 pair x 2 settings.
    assert_eq!(dirs.len(), 8);
    // Every run's jobs were deleted on the server once its results were written.
    let job_folders: Vec<_> = std::fs::read_dir(out.path().join(".server/jobs"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        job_folders.is_empty(),
        "left on the server: {job_folders:?}"
    );
    for dir in &dirs {
        for file in [
            "config.json",
            "log.jsonl",
            "predictions.jsonl",
            "results_summary.json",
        ] {
            assert!(dir.join(file).is_file(), "{} lacks {file}", dir.display());
        }
        let config: serde_json::Value =
            serde_json::from_str(&read(&dir.join("config.json"))).unwrap();
        for key in [
            "scenario",
            "role",
            "model",
            "weak_model",
            "setting",
            "seed",
            "high_conf",
            "data_hashes",
            "code_version",
        ] {
            assert!(
                config.get(key).is_some(),
                "{}: config.json lacks {key}",
                dir.display()
            );
        }
        let predictions = read(&dir.join("predictions.jsonl"));
        assert_eq!(predictions.lines().count(), 48);
        let first: serde_json::Value =
            serde_json::from_str(predictions.lines().next().unwrap()).unwrap();
        assert_eq!(first["id"], 0);
        let p = first["p_chosen"].as_f64().unwrap();
        assert_eq!(first["correct"].as_bool().unwrap(), p >= 0.5);
        if config["weak_model"].is_null() {
            assert_eq!(read(&dir.join("weak_labels.jsonl")).lines().count(), 32);
        }
        assert!(
            read(&dir.join("log.jsonl")).lines().count() >= 2,
            "{}",
            dir.display()
        );
    }

    // A rerun skips every finished run.
    let (again, lines) = run(&spec, out.path()).await;
    assert_eq!(again, dirs);
    assert_eq!(lines.iter().filter(|l| l.starts_with("skip ")).count(), 8);

    // An interrupted student (no results yet) is redone to the same predictions.
    let student = dirs
        .iter()
        .find(|d| d.to_string_lossy().contains("simpo-w2s"))
        .unwrap();
    let before = read(&student.join("predictions.jsonl"));
    std::fs::remove_file(student.join("results_summary.json")).unwrap();
    std::fs::remove_file(student.join("predictions.jsonl")).unwrap();
    let (_, lines) = run(&spec, out.path()).await;
    assert_eq!(lines.iter().filter(|l| l.starts_with("skip ")).count(), 7);
    assert_eq!(read(&student.join("predictions.jsonl")), before);

    // The report: one comparison per (scenario, setting), all required keys.
    let (runs, warnings) = eval_client::report::load_runs(&[out.path().to_path_buf()]).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let report = eval_client::report::build(
        &runs,
        &eval_client::report::ReportOptions {
            bootstrap_resamples: 200,
            ..Default::default()
        },
        warnings,
    );
    assert_eq!(report.comparisons.len(), 4);
    let json = eval_client::report::json(&report);
    for c in json["comparisons"].as_array().unwrap() {
        for key in [
            "scenario",
            "weak",
            "strong",
            "setting",
            "seed",
            "acc_weak",
            "acc_strong",
            "acc_w2s",
            "pgr",
            "ds",
            "ds_chance",
        ] {
            assert!(c.get(key).is_some(), "comparison lacks {key}");
        }
    }
    assert_eq!(report.regions.len(), 2);
    let written = eval_client::report::write(&report, out.path()).unwrap();
    for name in [
        "report.md",
        "report.json",
        "report.csv",
        "accuracy.png",
        "ds_vs_gap.svg",
        "regions.png",
    ] {
        assert!(
            written.iter().any(|p| p.ends_with(name)),
            "{name} not written"
        );
    }
}

/// Regression: a bootstrapped student once trained on its weak teacher's labels of the W2S
/// split instead of the intermediate's labels of the ground-truth split, because uploads were
/// cached under a name that matched whenever both label sets had the same size (always with the
/// paper's sizes). The bootstrapped student's preference job must read rows of the
/// ground-truth split, oriented as the intermediate labelled them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrapped_student_trains_on_the_intermediates_labels() {
    let mut spec = spec();
    let tiny = |name: &str, seed| ModelSpec {
        name: name.into(),
        path: None,
        preset: Some("tiny-gpt2".into()),
        seed,
        identity: None,
    };
    spec.models = vec![tiny("w", 1), tiny("i", 2), tiny("s", 3)];
    spec.scenarios = vec![Scenario::Simpo];
    spec.settings = vec![Setting::None];
    spec.bootstrap = vec![["w".into(), "i".into(), "s".into()]];
    assert_eq!(spec.sizes.n_docs, spec.sizes.n_w2s_docs);
    let out = tempfile::tempdir().unwrap();
    // The server's job folders are read below.
    let (dirs, _) = run_keeping(&spec, out.path(), true).await;
    let find = |prefix: &str| {
        dirs.iter()
            .find(|d| {
                d.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
            })
            .unwrap_or_else(|| panic!("no run {prefix} in {dirs:?}"))
    };
    let chain = find("simpo-bootstrap-w-to-s-none");
    let intermediate = find("simpo-intermediate-w-to-i-none");
    let direct = find("simpo-w2s-w-to-s-none");
    // The rows the chain's preference job trained on.
    let jobs: serde_json::Value = serde_json::from_str(&read(&chain.join("jobs.json"))).unwrap();
    let job = jobs["preference"].as_str().unwrap();
    let job_spec: serde_json::Value = serde_json::from_str(&read(
        &out.path().join(".server/jobs").join(job).join("spec.json"),
    ))
    .unwrap();
    let dataset = job_spec["dataset_ids"][0].as_str().unwrap();
    let rows: Vec<serde_json::Value> = read(
        &out.path()
            .join(".server/datasets")
            .join(dataset)
            .join("rows.jsonl"),
    )
    .lines()
    .map(|l| serde_json::from_str(l).unwrap())
    .collect();
    let data = StudyData::load(&spec).unwrap();
    let labels: Vec<serde_json::Value> = read(&intermediate.join("weak_labels.jsonl"))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), data.gt.len());
    for ((row, pair), label) in rows.iter().zip(&data.gt).zip(&labels) {
        // The intermediate's preferred response of the ground-truth pair goes first.
        let (first, second) = if label["margin"].as_f64().unwrap() >= 0.0 {
            (&pair.chosen, &pair.rejected)
        } else {
            (&pair.rejected, &pair.chosen)
        };
        assert_eq!(row["chosen"].as_str().unwrap(), first.as_str());
        assert_eq!(row["rejected"].as_str().unwrap(), second.as_str());
    }
    assert_ne!(
        read(&chain.join("predictions.jsonl")),
        read(&direct.join("predictions.jsonl")),
        "the chain's student equals the direct student"
    );
}
