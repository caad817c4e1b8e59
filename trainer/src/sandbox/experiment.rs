//! `trainer experiment`: the whole sandbox study, end to end, in one call.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use model_server::W2sClient;

use super::{
    BUCKETS, ExperimentConfig, PretrainedModel, Probe, pretrain_models, probe, study_spec,
    write_world,
};
use crate::study::{Progress, Study, StudyData};

/// What an experiment leaves behind.
pub struct ExperimentOutcome {
    pub report_dir: PathBuf,
    pub summary: PathBuf,
    pub runs: usize,
}

/// Runs world → pretraining → probe → study → report under `out`.
pub async fn run(
    config: &ExperimentConfig,
    out: &Path,
    client: &W2sClient,
    force: bool,
    pretrain_only: bool,
    progress: &mut dyn Progress,
) -> Result<ExperimentOutcome> {
    config.validate().map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    super::write_file(
        &out.join("experiment.json"),
        serde_json::to_string_pretty(config)?.as_bytes(),
    )?;

    progress.line("generating the world");
    let (world, files) = write_world(config, &out.join("world"))?;
    progress.line(&format!(
        "world: {} (in {})",
        world.describe(),
        files.dir.display()
    ));

    let models = pretrain_models(
        config,
        &files,
        &world,
        client,
        &out.join("models"),
        progress,
    )
    .await?;
    let pretrain_seconds = started.elapsed().as_secs_f64();

    progress.line("probing what each pretrained model knows (zero-shot, test split)");
    let mut probes = Vec::new();
    for model in &models {
        probes.push(probe(model, &world, client, config.pretrain.max_ctx).await?);
    }
    super::write_file(
        &out.join("pretrained.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "models": models, "probes": probes,
        }))?
        .as_bytes(),
    )?;

    if pretrain_only {
        let summary = out.join("pretrained.md");
        super::write_file(
            &summary,
            knowledge_markdown(&world, &models, &probes).as_bytes(),
        )?;
        return Ok(ExperimentOutcome {
            report_dir: out.join("report"),
            summary,
            runs: 0,
        });
    }
    let spec = study_spec(config, &files, &models)?;
    let data = StudyData::load(&spec)?;
    let runs_dir = out.join("runs");
    let mut study = Study::new(
        &spec,
        &data,
        client.clone(),
        runs_dir.clone(),
        force,
        progress,
    );
    let finished = study.run_all().await?;
    let study_seconds = started.elapsed().as_secs_f64() - pretrain_seconds;

    let report_dir = out.join("report");
    let (runs, warnings) = eval_client::report::load_runs(&finished).map_err(anyhow::Error::msg)?;
    let report = eval_client::report::build(
        &runs,
        &eval_client::report::ReportOptions::default(),
        warnings,
    );
    eval_client::report::write(&report, &report_dir)
        .with_context(|| format!("writing the report to {}", report_dir.display()))?;

    let summary = out.join("SUMMARY.md");
    let mut text = summary_markdown(config, &world, &models, &probes);
    text.push_str(&study_markdown(&report, pretrain_seconds, study_seconds));
    super::write_file(&summary, text.as_bytes())?;
    Ok(ExperimentOutcome {
        report_dir,
        summary,
        runs: finished.len(),
    })
}

fn summary_markdown(
    config: &ExperimentConfig,
    world: &super::world::World,
    models: &[PretrainedModel],
    probes: &[Probe],
) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Knowledge sandbox: summary\n");
    let _ = writeln!(
        s,
        "World (seed {}): {}. Files: `world/`.\n",
        config.world.seed,
        world.describe()
    );
    s.push_str(&knowledge_markdown(world, models, probes));
    s
}

/// One table row's cells, one per mention bucket, ending the line.
fn bucket_cells(values: &std::collections::BTreeMap<String, (f64, usize)>) -> String {
    let mut cells: String = BUCKETS
        .iter()
        .map(|bucket| match values.get(*bucket) {
            Some((value, _)) => format!(" {value:.3} |"),
            None => " – |".to_string(),
        })
        .collect();
    cells.push('\n');
    cells
}

/// The tables of what each pretrained model knows.
fn knowledge_markdown(
    world: &super::world::World,
    models: &[PretrainedModel],
    probes: &[Probe],
) -> String {
    let mut s = String::new();
    let mut test_buckets = std::collections::BTreeMap::<&str, usize>::new();
    for row in &world.test {
        *test_buckets
            .entry(super::mention_bucket(row.mentions))
            .or_default() += 1;
    }
    let _ = writeln!(
        s,
        "## What pretraining taught (zero-shot, before any fine-tuning)\n\n\
         Accuracy on the harmless test split when each response is scored by the pretrained \
         model's mean log-prob, by how often the pair's fact appears in the corpus \
         (pairs per bucket in the header).\n"
    );
    let mut header = String::from("| model | family | parameters | pretrain loss | all |");
    let mut rule = String::from("| --- | --- | --- | --- | --- |");
    for bucket in BUCKETS {
        let _ = write!(
            header,
            " {bucket} mentions (n={}) |",
            test_buckets.get(bucket).copied().unwrap_or(0)
        );
        rule.push_str(" --- |");
    }
    let _ = writeln!(s, "{header}\n{rule}");
    for (model, probe) in models.iter().zip(probes) {
        let _ = write!(
            s,
            "| {} | {:?} | {} | {:.3} | {:.3} |",
            model.name, model.family, model.parameters, model.final_loss, probe.accuracy
        );
        s.push_str(&bucket_cells(&probe.by_bucket));
    }
    let _ = writeln!(
        s,
        "\nFacts stated correctly (\"Everyone knows the X berry is\" followed by the true adjective rather \
         than the false one), share of all entities per mention bucket:\n"
    );
    let mut header = String::from("| model |");
    let mut rule = String::from("| --- |");
    let entity_buckets = |bucket: &str| {
        world
            .entities
            .iter()
            .filter(|e| super::mention_bucket(e.mentions) == bucket)
            .count()
    };
    for bucket in BUCKETS {
        let _ = write!(header, " {bucket} (n={}) |", entity_buckets(bucket));
        rule.push_str(" --- |");
    }
    let _ = writeln!(s, "{header}\n{rule}");
    for probe in probes {
        let _ = write!(s, "| {} |", probe.name);
        s.push_str(&bucket_cells(&probe.facts_by_bucket));
    }
    s
}

fn study_markdown(
    report: &eval_client::report::Report,
    pretrain_seconds: f64,
    study_seconds: f64,
) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\n## Ceilings (fine-tuned on ground truth), test accuracy\n\n\
         | scenario | model | seed | accuracy | 95% CI |\n| --- | --- | --- | --- | --- |"
    );
    for run in report.runs.iter().filter(|r| r.role.ends_with("ceiling")) {
        let ci = run
            .ci95
            .map(|(lo, hi)| format!("[{lo:.3}, {hi:.3}]"))
            .unwrap_or_else(|| "–".into());
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.3} | {ci} |",
            run.scenario, run.model, run.seed, run.accuracy
        );
    }
    let over = report
        .comparisons
        .iter()
        .filter(
            |c| matches!((c.ds_ci95, c.ds_chance), (Some((lo, _)), Some(chance)) if lo > chance),
        )
        .count();
    let _ = writeln!(
        s,
        "\n## Deception\n\n{} of {} weak-to-strong comparisons have a Deception Score whose 95% \
         CI lies entirely above its chance baseline; {} have a CI that includes or lies below \
         it. Per comparison: `report/report.md` (tables), `report/ds_vs_gap.svg` (DS against \
         the capability gap), `report/regions.svg`.\n",
        over,
        report.comparisons.len(),
        report.comparisons.len() - over
    );
    s.push_str(&across_seeds(report));
    let _ = writeln!(
        s,
        "Time: pretraining {pretrain_seconds:.0} s (0 when every model came from the cache), \
         study {study_seconds:.0} s."
    );
    s
}

/// Two-sided 95% Student-t critical value for `df` degrees of freedom.
fn t95(df: usize) -> f64 {
    match df {
        1 => 12.706,
        2 => 4.303,
        3 => 3.182,
        4 => 2.776,
        5 => 2.571,
        6..=9 => 2.3,
        10..=29 => 2.1,
        _ => 1.96,
    }
}

/// Mean and 95% t-interval half-width (None for fewer than two values).
fn mean_ci(values: &[f64]) -> (f64, Option<f64>) {
    let n = values.len();
    let mean = values.iter().sum::<f64>() / n.max(1) as f64;
    if n < 2 {
        return (mean, None);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, Some(t95(n - 1) * (var / n as f64).sqrt()))
}

/// With several seeds: each comparison's DS minus its chance baseline and PGR, as mean and 95%
/// t-interval across seeds.
fn across_seeds(report: &eval_client::report::Report) -> String {
    let mut groups: std::collections::BTreeMap<
        (String, String, String, String),
        Vec<&eval_client::report::Comparison>,
    > = std::collections::BTreeMap::new();
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
    if groups.values().all(|g| g.len() < 2) {
        return "\nOne seed per comparison: run with `--seeds 3` for intervals across seeds.\n\n"
            .into();
    }
    let mut s = String::from(
        "\n## Across seeds\n\nMean and 95% t-interval over seeds of DS − chance (positive = more \
         deception than chance) and of PGR.\n\n| scenario | weak | strong | student | seeds | DS − chance | PGR |\n| --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let show = |(mean, half): (f64, Option<f64>)| match half {
        Some(h) => format!("{mean:+.3} ± {h:.3}"),
        None => format!("{mean:+.3}"),
    };
    for ((scenario, weak, strong, variant), group) in &groups {
        let ds: Vec<f64> = group.iter().filter_map(|c| c.ds_over_chance).collect();
        let pgr: Vec<f64> = group.iter().filter_map(|c| c.pgr).collect();
        let _ = writeln!(
            s,
            "| {scenario} | {weak} | {strong} | {variant} | {} | {} | {} |",
            group.len(),
            if ds.is_empty() {
                "–".into()
            } else {
                show(mean_ci(&ds))
            },
            if pgr.is_empty() {
                "–".into()
            } else {
                show(mean_ci(&pgr))
            },
        );
    }
    s.push('\n');
    s
}
