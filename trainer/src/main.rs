//! `trainer`: drives weak-to-strong experiments on the model server over gRPC.
//!
//! - `trainer run --spec FILE [--out DIR] [--server URL]`: the study of a TOML spec.
//! - `trainer presets`: the built-in model configurations with exact parameter counts.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use model_server::{ClientOptions, ServerConfig, Session};
use superficial_models::ModelConfig;
use superficial_models::model::parameter_layout;
use trainer::spec::StudySpec;
use trainer::study::{Study, StudyData};

#[derive(Debug, Parser)]
#[command(
    name = "trainer",
    version,
    about = "Trainer client of the superficial model server."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the study described by a TOML spec (see examples/).
    Run(RunArgs),
    /// Lists the built-in model presets with architecture, shape and parameter count.
    Presets,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The study spec.
    #[arg(long)]
    spec: PathBuf,
    /// Output folder (one sub-folder per run).
    #[arg(long, default_value = "results/study")]
    out: PathBuf,
    /// A running model server; without it an in-process server keeps its state in OUT/.server.
    #[arg(long, env = "W2S_SERVER")]
    server: Option<String>,
    /// Bearer token for --server.
    #[arg(long, env = "W2S_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Redo finished runs.
    #[arg(long)]
    force: bool,
    /// Override a spec field: KEY=VALUE in TOML syntax (repeatable), e.g. --set sizes.n_docs=256.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Run(args) => run(args).await,
        Command::Presets => {
            presets();
            Ok(())
        }
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let spec = StudySpec::from_file_with_overrides(&args.spec, &args.overrides)
        .map_err(anyhow::Error::msg)?;
    // All data is read and validated before any training starts.
    let data = StudyData::load(&spec)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut config = ServerConfig::ephemeral();
    config.data_dir = args.out.join(".server");
    config.model_root = PathBuf::from("/");
    let options = ClientOptions {
        token: args.token.clone(),
        ..Default::default()
    };
    let session = Session::open_with(args.server.as_deref(), &options, config)
        .await
        .context("opening a model-server session")?;
    let mut progress = trainer::progress::for_stderr();
    let mut study = Study::new(
        &spec,
        &data,
        session.client.clone(),
        args.out.clone(),
        args.force,
        progress.as_mut(),
    );
    let result = study.run_all().await;
    session.close().await?;
    let runs = result?;
    eprintln!("{} runs finished in {}", runs.len(), args.out.display());
    Ok(())
}

fn presets() {
    println!(
        "{:<18} {:<5} {:>7} {:>7} {:>6} {:>6} {:>14}",
        "preset", "arch", "vocab", "width", "layers", "ctx", "parameters"
    );
    for name in ModelConfig::PRESETS {
        let Some(config) = ModelConfig::preset(name) else {
            continue;
        };
        let parameters: usize = parameter_layout(&config)
            .iter()
            .map(|(_, shape, _)| shape.iter().product::<usize>())
            .sum();
        let (width, layers) = match &config {
            ModelConfig::Gpt2(c) => (c.n_embd, c.n_layer),
            ModelConfig::Opt(c) => (c.hidden_size, c.num_hidden_layers),
        };
        println!(
            "{:<18} {:<5} {:>7} {:>7} {:>6} {:>6} {:>14}",
            name,
            config.architecture().to_string(),
            config.vocab_size(),
            width,
            layers,
            config.max_positions(),
            parameters
        );
    }
}
