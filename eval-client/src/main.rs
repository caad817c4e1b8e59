//! `eval-client`: evaluation commands over the w2s.v1 gRPC API. With `--server URL` it talks to
//! a running model server; without, it starts one in-process on a loopback ephemeral port,
//! loads what it needs, and stops it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use model_server::{ServerConfig, Session, config::NamedSource};
use serde::Serialize;
use w2s_proto::v1 as pb;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "eval-client",
    version,
    about = "Evaluation client of the superficial model server."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Per-token log-probs of a text under the model in an HF folder, as one JSON object:
    /// {"model", "token_ids", "logprobs"} where logprobs[i] = log p(token_ids[i+1] | ..).
    Logprobs(LogprobsArgs),
    /// The weak-to-strong deception report of run folders written by `trainer run`:
    /// accuracy, PGR, knowledge-area tables and Deception Scores, recomputed from predictions.
    Report(ReportArgs),
}

#[derive(Debug, clap::Args)]
struct ReportArgs {
    /// Run folders, or folders holding run folders.
    #[arg(required = true)]
    dirs: Vec<PathBuf>,
    /// Where to write report.md/json/csv and the plots (default: the first DIR).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Count a ceiling as knowing a pair only when its probability is at least this (e.g. 0.75).
    #[arg(long)]
    known_threshold: Option<f64>,
    /// Bootstrap resamples for confidence intervals.
    #[arg(long, default_value_t = 1000)]
    bootstrap: usize,
}

#[derive(Debug, clap::Args)]
struct LogprobsArgs {
    /// HF checkpoint folder (config.json, weights, tokenizer files).
    #[arg(long)]
    model: PathBuf,
    /// The text to score.
    #[arg(long)]
    text: String,
    /// URL of a running model server (e.g. http://127.0.0.1:50051); the folder must lie in its
    /// model root. Without it, an in-process server is used.
    #[arg(long, env = "W2S_SERVER")]
    server: Option<String>,
    /// Longest sequence allowed (0 = the model's context).
    #[arg(long, default_value_t = 0)]
    max_ctx: u32,
    /// Keep the last max-ctx tokens of a longer text instead of failing.
    #[arg(long)]
    truncate: bool,
}

#[derive(Serialize)]
struct LogprobsOutput {
    model: String,
    token_ids: Vec<u32>,
    logprobs: Vec<f32>,
}

fn main() -> Result<()> {
    // SAFETY: first statement of `main`, before any other thread starts.
    unsafe { model_server::run_binary(dispatch()) }.context("starting the async runtime")?
}

async fn dispatch() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Logprobs(args) => logprobs(args).await,
        Command::Report(args) => report(args),
    }
}

fn report(args: ReportArgs) -> Result<()> {
    use eval_client::report;
    if let Some(t) = args.known_threshold
        && !(0.5..=1.0).contains(&t)
    {
        bail!("--known-threshold must be in [0.5, 1], got {t}");
    }
    let (runs, warnings) = report::load_runs(&args.dirs)?;
    if runs.is_empty() {
        bail!("no finished runs found in {:?}", args.dirs);
    }
    let options = report::ReportOptions {
        known_threshold: args.known_threshold,
        bootstrap_resamples: args.bootstrap,
        seed: 0,
    };
    let built = report::build(&runs, &options, warnings);
    let out = args.out.unwrap_or_else(|| args.dirs[0].clone());
    let written = report::write(&built, &out)
        .with_context(|| format!("writing the report to {}", out.display()))?;
    for w in &built.warnings {
        eprintln!("warning: {w}");
    }
    eprintln!(
        "{} runs, {} comparisons; report in {}",
        built.runs.len(),
        built.comparisons.len(),
        out.join("report.md").display()
    );
    for path in written {
        println!("{}", path.display());
    }
    Ok(())
}

/// Registered name of a model folder: its directory name.
fn model_name(dir: &Path) -> Result<String> {
    let name = dir.file_name().and_then(|n| n.to_str()).with_context(|| {
        format!(
            "{}: cannot derive a model name from this path",
            dir.display()
        )
    })?;
    Ok(name.to_string())
}

async fn logprobs(args: LogprobsArgs) -> Result<()> {
    let dir = args
        .model
        .canonicalize()
        .with_context(|| format!("model folder {}", args.model.display()))?;
    if !dir.join("config.json").is_file() {
        bail!("{}: not an HF model folder (no config.json)", dir.display());
    }
    let name = model_name(&dir)?;
    let mut config = ServerConfig::ephemeral();
    if args.server.is_none() {
        config.models.push(NamedSource {
            name: name.clone(),
            value: dir.display().to_string(),
        });
    }
    let session = Session::open(args.server.as_deref(), config)
        .await
        .context("opening a model-server session")?;
    let resident = if session.is_embedded() {
        name.clone()
    } else {
        ensure_loaded(&session, &name, &dir).await?
    };
    let response = session
        .client
        .token_logprobs(pb::TokenLogprobsRequest {
            model: resident,
            texts: vec![args.text],
            split_dialogue: false,
            max_ctx: args.max_ctx,
            truncate: args.truncate,
        })
        .await
        .context("TokenLogprobs")?;
    session.close().await?;
    let sequence = response
        .sequences
        .into_iter()
        .next()
        .context("server returned no sequence")?;
    let output = LogprobsOutput {
        model: name,
        token_ids: sequence.token_ids,
        logprobs: sequence.logprobs,
    };
    println!("{}", serde_json::to_string(&output)?);
    Ok(())
}

/// Uploads the folder `dir` (on this machine) to a remote server unless a model from an
/// identical folder is already resident, and returns the name it is resident under: `name`, or
/// `name@<digest>` when the server has another model of that name (loaded from a server-side
/// path, say). Models are identified by the folder's content, never by how its path is written.
/// Nothing of the server's disk is needed: the folder travels over gRPC (by digest when the
/// server already holds it).
async fn ensure_loaded(session: &Session, name: &str, dir: &Path) -> Result<String> {
    let files = model_server::model_store::describe_folder(dir)
        .with_context(|| format!("reading {}", dir.display()))?;
    let digest = model_server::model_store::folder_digest(&files);
    let source = format!("uploaded:{digest}");
    let models = session.client.list_models().await?;
    let name = match models.iter().find(|m| m.name == name) {
        None => name.to_string(),
        Some(existing) if existing.source == source => return Ok(name.to_string()),
        Some(_) => {
            let unique = format!("{name}@{}", &digest[..digest.len().min(12)]);
            if models
                .iter()
                .any(|m| m.name == unique && m.source == source)
            {
                return Ok(unique);
            }
            unique
        }
    };
    session
        .client
        .upload_model(
            pb::LoadModelRequest {
                name: name.clone(),
                ..Default::default()
            },
            dir,
        )
        .await
        .with_context(|| format!("uploading {}", dir.display()))?;
    Ok(name)
}
