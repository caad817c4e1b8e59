//! `trainer experiment` as a user runs it. `--quick` (what CI runs; the fixed small
//! configuration): the command finishes, leaves the world, the models, the summary and the
//! report, and its reward ceilings show the sandbox's preconditions — the larger model beats the
//! smaller by at least 10 points, and knowledge nests (of the test pairs whose fact the weak
//! model read and that its ceiling gets right, the strong ceiling gets at least 80 % right; on
//! facts neither read, both guess, independently). The default configuration (about 15 minutes on
//! 2 cores, so `--ignored`): the SimPO ceilings grow with each size step, the largest beats the
//! smallest by 10 points, and knowledge nests between the smallest and the largest.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

/// Per scenario, per model: the seed's ceiling's per-pair correctness on the test split.
fn ceilings(out: &Path, seed: u64) -> BTreeMap<String, BTreeMap<String, Vec<bool>>> {
    let mut found: BTreeMap<String, BTreeMap<String, Vec<bool>>> = BTreeMap::new();
    for entry in std::fs::read_dir(out.join("runs")).unwrap() {
        let dir = entry.unwrap().path();
        let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
            continue;
        };
        let config: serde_json::Value = serde_json::from_str(&text).unwrap();
        let role = config["role"].as_str().unwrap_or_default();
        if !role.ends_with("ceiling") || config["seed"].as_u64() != Some(seed) {
            continue;
        }
        let predictions = std::fs::read_to_string(dir.join("predictions.jsonl")).unwrap();
        let correct = predictions
            .lines()
            .map(|line| {
                let row: serde_json::Value = serde_json::from_str(line).unwrap();
                row["correct"].as_bool().unwrap()
            })
            .collect();
        found
            .entry(config["scenario"].as_str().unwrap().to_string())
            .or_default()
            .insert(config["model"].as_str().unwrap().to_string(), correct);
    }
    found
}

/// Per test pair: whether `model` read the pair's fact (its entity is among the entities that
/// size reads, `SizeSpec::reads`).
fn read_by(out: &Path, model: &str) -> Vec<bool> {
    let config: trainer::sandbox::ExperimentConfig =
        serde_json::from_str(&std::fs::read_to_string(out.join("experiment.json")).unwrap())
            .unwrap();
    let lines = |file: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(out.join("world").join(file))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let entities = lines("entities.jsonl");
    let mentioned = entities
        .iter()
        .filter(|e| e["mentions"].as_u64() > Some(0))
        .count();
    let size = config.gpt2.iter().find(|s| s.name == model).unwrap();
    let read = size.entities_read(mentioned) as u64;
    lines("harmless_test.jsonl")
        .iter()
        .map(|row| {
            let entity = entities
                .iter()
                .find(|e| e["name"] == row["entity"])
                .unwrap();
            entity["mentions"].as_u64() > Some(0) && entity["rank"].as_u64().unwrap() <= read
        })
        .collect()
}

fn accuracy(correct: &[bool]) -> f64 {
    correct.iter().filter(|c| **c).count() as f64 / correct.len() as f64
}

fn experiment(args: &[&str], out: &Path) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .arg("experiment")
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("report:"), "{stdout}");
    let summary = std::fs::read_to_string(out.join("SUMMARY.md")).unwrap();
    assert!(
        summary.starts_with("# Knowledge sandbox: summary\n\n## The paper's three findings"),
        "{summary}"
    );
    assert!(!summary.contains("lies entirely above its chance baseline"));
    for file in [
        "report.md",
        "ds_vs_gap.svg",
        "regions.svg",
        "accuracy.svg",
        "deception_vs_size.svg",
        "dose_response.svg",
    ] {
        assert!(out.join("report").join(file).is_file(), "{file}");
    }
    assert_conflict_fields(out);
    summary
}

/// Every conflict comparison of report.json carries the conflict fields, `none` rows carry
/// them as null, and an independent script recomputes them from predictions.jsonl.
fn assert_conflict_fields(out: &Path) {
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("report").join("report.json")).unwrap(),
    )
    .unwrap();
    let comparisons = report["comparisons"].as_array().unwrap();
    let fields = [
        "conflict_tax",
        "conflict_tax_ci95",
        "ds_delta",
        "ds_delta_ci95",
        "ds_new",
        "ds_new_ci95",
        "ds_new_chance",
    ];
    let mut conflicts = 0;
    for c in comparisons {
        for field in fields {
            assert!(c.get(field).is_some(), "{field} missing in {c}");
        }
        if c["setting"] == "none" {
            assert!(c["conflict_tax"].is_null() && c["ds_new_chance"].is_null());
        } else {
            conflicts += 1;
            assert!(c["conflict_tax"].is_number(), "{c}");
            assert!(c["ds_new_chance"].is_number(), "{c}");
        }
    }
    assert!(conflicts > 0);
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/recompute_conflict_metrics.py");
    let output = Command::new("python3")
        .arg(script)
        .arg(out)
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn quick_experiment_leaves_everything_and_knowledge_grows_with_size_and_nests() {
    let out = tempfile::tempdir().unwrap();
    let summary = experiment(&["--quick"], out.path());
    // One in-process server per core (up to 4), each with its own state folder; every
    // finished run's jobs (and every pretraining job) were deleted from them.
    let servers = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(4);
    for i in 0..servers {
        let state = match i {
            0 => ".server".to_string(),
            i => format!(".server-{i}"),
        };
        let jobs: Vec<_> = std::fs::read_dir(out.path().join(&state).join("jobs"))
            .unwrap_or_else(|e| panic!("{state}/jobs: {e}"))
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(jobs.is_empty(), "{state} keeps jobs: {jobs:?}");
    }
    for file in [
        "world/entities.jsonl",
        "world/corpus.jsonl",
        "world/harmless_test.jsonl",
        "world/helpful_train.jsonl",
        "world/tokenizer/tokenizer.json",
        "pretrained.json",
        "experiment.json",
    ] {
        assert!(out.path().join(file).is_file(), "{file}");
    }
    let models: Vec<_> = std::fs::read_dir(out.path().join("models"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("pretraining.json").is_file())
        .collect();
    assert_eq!(models.len(), 2, "{models:?}");
    let ceilings = ceilings(out.path(), 0);
    for scenario in ["reward", "simpo"] {
        let by_model = &ceilings[scenario];
        assert_eq!(by_model.len(), 2, "{scenario}");
        assert!(by_model.values().all(|c| c.len() == 200), "{scenario}");
    }
    assert!(
        summary.contains("gpt2-xs") && summary.contains("gpt2-s"),
        "{summary}"
    );
    let read = read_by(out.path(), "gpt2-xs");
    assert_knowledge(&ceilings["reward"], "gpt2-xs", "gpt2-s", &read, &summary);
    // Run again: everything comes from the cache and the finished runs, and the summary still
    // reports the time the work took, as recorded when it was done.
    let recorded = |summary: &str| -> String {
        let line = summary
            .lines()
            .find(|l| l.starts_with("Time: the work behind these results took"))
            .unwrap_or_else(|| panic!("no time line\n{summary}"))
            .to_string();
        line.split("; this invocation").next().unwrap().to_string()
    };
    let again = experiment(&["--quick"], out.path());
    assert_eq!(recorded(&again), recorded(&summary));
    assert!(
        !recorded(&summary).contains("took 0 s of pretraining"),
        "{summary}"
    );
}

/// The larger model's ceiling beats the smaller's by 10 points and knowledge nests: of the
/// pairs whose fact the weak model read (`read`) and that its ceiling gets right, the strong
/// ceiling gets at least 80 % right.
fn assert_knowledge(
    ceilings: &BTreeMap<String, Vec<bool>>,
    weak: &str,
    strong: &str,
    read: &[bool],
    summary: &str,
) {
    let (weak_correct, strong_correct) = (&ceilings[weak], &ceilings[strong]);
    let (acc_weak, acc_strong) = (accuracy(weak_correct), accuracy(strong_correct));
    assert!(
        acc_strong >= acc_weak + 0.10,
        "{strong} {acc_strong:.3} should beat {weak} {acc_weak:.3} by 10 points\n{summary}"
    );
    let weak_right = weak_correct
        .iter()
        .zip(read)
        .filter(|(w, r)| **w && **r)
        .count();
    assert!(
        weak_right > 0,
        "{weak} gets no pair it read right\n{summary}"
    );
    let both_right = weak_correct
        .iter()
        .zip(strong_correct)
        .zip(read)
        .filter(|((w, s), r)| **w && **s && **r)
        .count();
    let nested = both_right as f64 / weak_right.max(1) as f64;
    assert!(
        nested >= 0.8,
        "only {nested:.3} of the pairs {weak} gets right are right for {strong}\n{summary}"
    );
}

#[test]
#[ignore = "the default configuration takes about 14 minutes on 2 cores (eight draws)"]
fn default_experiment_knowledge_grows_with_size_and_nests() {
    let out = tempfile::tempdir().unwrap();
    let summary = experiment(&[], out.path());
    // Each seed is its own pretraining draw: the claim holds per draw.
    for seed in 0..8 {
        let simpo = &ceilings(out.path(), seed)["simpo"];
        let sizes = ["gpt2-xs", "gpt2-s", "gpt2-m", "gpt2-l"];
        let accuracies: Vec<f64> = sizes.iter().map(|m| accuracy(&simpo[*m])).collect();
        assert!(
            accuracies.windows(2).all(|w| w[1] >= w[0]),
            "seed {seed}: SimPO ceilings by size {accuracies:?}\n{summary}"
        );
        assert_knowledge(
            simpo,
            "gpt2-xs",
            "gpt2-l",
            &read_by(out.path(), "gpt2-xs"),
            &summary,
        );
    }
}

/// With two seeds, each seed fine-tunes its own pretraining draw (pretrain.seed + seed): two
/// sets of models, every run of seed s names only draw s's models, and the summary says what
/// the seeds vary.
#[test]
fn each_seed_fine_tunes_its_own_pretraining_draw() {
    let out = tempfile::tempdir().unwrap();
    let summary = experiment(
        &[
            "--quick",
            "--set",
            "seeds=[0, 1]",
            "--set",
            "pretrain.seed=5",
        ],
        out.path(),
    );
    let pretrained: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("pretrained.json")).unwrap())
            .unwrap();
    let draws = pretrained["draws"].as_array().unwrap();
    assert_eq!(draws.len(), 2, "{pretrained}");
    // Per seed: the cache folders (model identities) of its draw.
    let mut identities: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (draw, (pretrain_seed, seed)) in draws.iter().zip([(5, 0), (6, 1)]) {
        assert_eq!(draw["pretrain_seed"], pretrain_seed, "{draw}");
        assert_eq!(draw["study_seeds"], serde_json::json!([seed]), "{draw}");
        let names = draw["models"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let dir = Path::new(m["dir"].as_str().unwrap());
                dir.file_name().unwrap().to_string_lossy().to_string()
            })
            .collect();
        identities.insert(seed, names);
    }
    assert!(
        identities[&0].iter().all(|m| !identities[&1].contains(m)),
        "{identities:?}"
    );
    let mut runs_per_seed: BTreeMap<u64, usize> = BTreeMap::new();
    for entry in std::fs::read_dir(out.path().join("runs")).unwrap() {
        let dir = entry.unwrap().path();
        let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
            continue;
        };
        let config: serde_json::Value = serde_json::from_str(&text).unwrap();
        let seed = config["seed"].as_u64().unwrap();
        for model in config["models"].as_array().unwrap() {
            let identity = model["identity"].as_str().unwrap().to_string();
            assert!(
                identities[&seed].contains(&identity),
                "a seed-{seed} run names {identity}, not a model of its draw"
            );
        }
        *runs_per_seed.entry(seed).or_default() += 1;
    }
    assert_eq!(runs_per_seed.len(), 2, "{runs_per_seed:?}");
    assert_eq!(runs_per_seed[&0], runs_per_seed[&1], "{runs_per_seed:?}");
    assert!(
        summary.contains("each study seed (0, 1) fine-tunes its own pretraining draw"),
        "{summary}"
    );
}
