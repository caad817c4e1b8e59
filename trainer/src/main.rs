//! `trainer`: drives weak-to-strong experiments on the model server over gRPC.
//!
//! - `trainer run --spec FILE [--out DIR] [--server URL]`: the study of a TOML spec.
//! - `trainer presets`: the built-in model configurations with exact parameter counts.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use model_server::{ClientOptions, ServerConfig, Session, W2sClient};
use superficial_models::ModelConfig;
use superficial_models::model::parameter_count;
use trainer::sandbox::{ExperimentConfig, Family, experiment};
use trainer::spec::StudySpec;
use trainer::study::{Study, StudyData};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Runs the knowledge sandbox end to end: world, pretraining, study, report.
    Experiment(ExperimentArgs),
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
    #[command(flatten)]
    server: ServerArgs,
    /// Redo finished runs.
    #[arg(long)]
    force: bool,
    /// Keep each finished run's training jobs (checkpoints and trained model) on the server;
    /// by default they are deleted once the run's results are written.
    #[arg(long)]
    keep_models: bool,
    /// Override a spec field: KEY=VALUE in TOML syntax (repeatable), e.g. --set sizes.n_docs=256.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct ExperimentArgs {
    /// Output folder: world, cached models, runs, report [default: results/sandbox, or
    /// results/sandbox-on-policy with --on-policy].
    #[arg(long)]
    out: Option<PathBuf>,
    /// The small configuration (under a minute on 2 CPU cores; what CI runs).
    #[arg(long)]
    quick: bool,
    /// The on-policy grid instead of the default's scenarios: every pair of the default's
    /// models and draws, on-policy students without a conflict and with the explicit one at
    /// α 1 and 4 (under 10 minutes on 2 CPU cores; docs/sandbox.md).
    #[arg(long, conflicts_with = "quick")]
    on_policy: bool,
    /// The full configuration as TOML, or as JSON like the `experiment.json` every run writes.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Number of study seeds, each fine-tuning its own pretraining draw (default 8; --quick uses 1).
    #[arg(long)]
    seeds: Option<usize>,
    /// Entities (facts) in the world.
    #[arg(long)]
    entities: Option<usize>,
    /// Preference pairs per split (train_gt, train_w2s, test, helpful).
    #[arg(long)]
    pairs: Option<usize>,
    /// Multiply every model's width by this factor (e.g. 2 for larger models).
    #[arg(long)]
    width_scale: Option<f64>,
    /// Renditions of the pretraining corpus (more = longer pretraining, more facts learned).
    #[arg(long)]
    corpus_passes: Option<usize>,
    /// Family of the weak-to-strong grid.
    #[arg(long, value_enum)]
    family: Option<Family>,
    /// Override any configuration field: KEY=VALUE in TOML syntax, e.g. --set world.zipf_exponent=1.1.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    overrides: Vec<String>,
    #[command(flatten)]
    server: ServerArgs,
    /// Redo finished runs (pretrained models stay cached).
    #[arg(long)]
    force: bool,
    /// Keep each finished run's training jobs (checkpoints and trained model) on the server;
    /// by default they are deleted once the run's results are written.
    #[arg(long)]
    keep_models: bool,
    /// Stop after pretraining and the knowledge probe (writes OUT/pretrained.md).
    #[arg(long)]
    pretrain_only: bool,
}

impl ExperimentArgs {
    fn out(&self) -> PathBuf {
        match (&self.out, self.on_policy) {
            (Some(out), _) => out.clone(),
            (None, true) => PathBuf::from("results/sandbox-on-policy"),
            (None, false) => PathBuf::from("results/sandbox"),
        }
    }

    fn config(&self) -> Result<ExperimentConfig> {
        let mut config = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                if path.extension().is_some_and(|e| e == "json") {
                    serde_json::from_str(&text)
                        .with_context(|| format!("parsing {}", path.display()))?
                } else {
                    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
                }
            }
            None if self.quick => ExperimentConfig::quick(),
            None if self.on_policy => ExperimentConfig::on_policy(),
            None => ExperimentConfig::default(),
        };
        if let Some(n) = self.seeds {
            config.seeds = (0..n as u64).collect();
        }
        if let Some(n) = self.entities {
            config.world.entities = n;
        }
        if let Some(n) = self.pairs {
            let w = &mut config.world;
            (
                w.train_gt_pairs,
                w.train_w2s_pairs,
                w.test_pairs,
                w.helpful_pairs,
            ) = (n, n, n, n);
        }
        if let Some(scale) = self.width_scale {
            if !(scale > 0.0 && scale.is_finite()) {
                bail!("--width-scale must be positive");
            }
            for size in config.gpt2.iter_mut().chain(config.opt.iter_mut()) {
                let width = ((size.width as f64 * scale) as usize).max(size.heads);
                size.width = width.div_ceil(size.heads) * size.heads;
            }
        }
        if let Some(passes) = self.corpus_passes {
            config.world.corpus_passes = passes;
        }
        if let Some(family) = self.family {
            config.family = family;
        }
        let config = config
            .with_overrides(&self.overrides)
            .map_err(anyhow::Error::msg)?;
        config.validate().map_err(anyhow::Error::msg)?;
        Ok(config)
    }
}

/// Where the model servers are (shared by `run` and `experiment`).
#[derive(Debug, clap::Args)]
struct ServerArgs {
    /// A running model server (repeatable, or comma-separated in the env var): the study's runs
    /// are spread over all of them, one run in flight per server, and a server that fails
    /// mid-run has its run moved to another. Without any, an in-process server keeps its state
    /// in OUT/.server. Servers need no folder in common with the trainer.
    #[arg(long = "server", env = "W2S_SERVER", value_delimiter = ',')]
    servers: Vec<String>,
    /// How long to wait for each --server to answer before giving up, in seconds (servers
    /// started beside the trainer, as in a Kubernetes Job or a Slurm allocation, may still be
    /// starting).
    #[arg(long, env = "W2S_WAIT_SECONDS", default_value_t = 120.0)]
    wait_seconds: f64,
    /// Bearer token for --server.
    #[arg(long, env = "W2S_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Without --server: how many in-process servers to start (state in OUT/.server,
    /// OUT/.server-1, …), the cores split evenly between them. Runs are spread over them like
    /// over remote servers, with identical results. Default: one per core (up to 4) for
    /// `experiment`, whose models are tiny and whose single runs use two cores at 1.5x one;
    /// 1 for `run` (each server holds its own copy of every model).
    #[arg(long, env = "W2S_LOCAL_SERVERS")]
    local_servers: Option<usize>,
}

/// The study's servers: a session (the first server, or an in-process one) and the others.
struct Servers {
    session: Session,
    more: Vec<W2sClient>,
    /// In-process servers beyond the session's.
    local: Vec<Session>,
}

impl Servers {
    fn clients(&self) -> Vec<W2sClient> {
        std::iter::once(self.session.client.clone())
            .chain(self.more.iter().cloned())
            .collect()
    }

    /// Stops the in-process servers (checkpointing their jobs).
    async fn close(self) -> Result<()> {
        self.session.close().await?;
        for session in self.local {
            session.close().await?;
        }
        Ok(())
    }
}

/// Creates `out` and takes its lock file (`.trainer.lock`, held until the returned file is
/// dropped): two trainers writing the same run folders would overwrite each other's work.
fn lock_out(out: &Path) -> Result<std::fs::File> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let path = out.join(".trainer.lock");
    model_server::server::hold_lock_file(&path)
        .with_context(|| format!("locking {}", path.display()))?
        .with_context(|| {
            format!(
                "{} is in use by another trainer (it holds {}): give this one another --out, or \
                 wait for that one to finish",
                out.display(),
                path.display()
            )
        })
}

/// Creates `out` and connects to the given servers, or starts an in-process server that keeps
/// its state in `out/.server`.
async fn open_servers(out: &Path, server: &ServerArgs, default_local: usize) -> Result<Servers> {
    let local = if server.servers.is_empty() {
        server.local_servers.unwrap_or(default_local).max(1)
    } else {
        1
    };
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    // One in-process server takes the shared pool (every core); several split the cores.
    let threads = if local > 1 { (cores / local).max(1) } else { 0 };
    let session = open_session(out, server, ".server", threads).await?;
    let options = ClientOptions {
        token: server.token.clone(),
        ..Default::default()
    };
    let mut more = Vec::new();
    for url in server.servers.iter().skip(1) {
        more.push(connect_when_up(url, &options, server.wait_seconds).await?);
    }
    let mut extra = Vec::new();
    for i in 1..local {
        let session = open_session(out, server, &format!(".server-{i}"), threads).await?;
        more.push(session.client.clone());
        extra.push(session);
    }
    Ok(Servers {
        session,
        more,
        local: extra,
    })
}

/// In-process servers for `experiment` when neither --server nor --local-servers says
/// otherwise: one per core, at most 4.
fn default_local_servers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(4)
}

/// Connects to `url` and asks it for its identity, retrying each second for up to `wait`
/// seconds while it is not up yet.
async fn connect_when_up(url: &str, options: &ClientOptions, wait: f64) -> Result<W2sClient> {
    let started = std::time::Instant::now();
    loop {
        let attempt = async {
            let client = W2sClient::connect_with(url, options).await?;
            client.server_info().await?;
            Ok::<_, model_server::ClientError>(client)
        }
        .await;
        match attempt {
            Ok(client) => return Ok(client),
            // A malformed URL or unreadable TLS file will not get better by waiting.
            Err(e @ model_server::ClientError::Settings(_)) => return Err(e.into()),
            Err(e) if started.elapsed().as_secs_f64() < wait => {
                print_at_most_every_10_seconds(&format!(
                    "waiting for {url} (up to {wait} s, --wait-seconds): {e}"
                ));
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "{url} did not answer within {wait} s (tried once a second; \
                         --wait-seconds or W2S_WAIT_SECONDS sets how long to wait)"
                    )
                });
            }
        }
    }
}

/// One line per retry, not per second of a long wait.
fn print_at_most_every_10_seconds(line: &str) {
    static LAST: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    if let Ok(mut last) = LAST.lock()
        && last.is_none_or(|t| t.elapsed().as_secs() >= 10)
    {
        *last = Some(std::time::Instant::now());
        eprintln!("{line}");
    }
}

async fn open_session(
    out: &Path,
    server: &ServerArgs,
    state: &str,
    threads: usize,
) -> Result<Session> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut config = ServerConfig::ephemeral();
    config.data_dir = out.join(state);
    // Models travel over gRPC (uploads, downloads, random inits), never by server-side path.
    config.model_root = out.join(state);
    config.threads = threads;
    let options = ClientOptions {
        token: server.token.clone(),
        ..Default::default()
    };
    if let Some(url) = server.servers.first() {
        // Wait for the first server like the others, then open the session on it.
        connect_when_up(url, &options, server.wait_seconds).await?;
    }
    Session::open_with(server.servers.first().map(String::as_str), &options, config)
        .await
        .context("opening a model-server session")
}

async fn experiment(args: ExperimentArgs) -> Result<()> {
    let config = args.config()?;
    let out = args.out();
    let _lock = lock_out(&out)?;
    let servers = open_servers(&out, &args.server, default_local_servers()).await?;
    let started = std::time::Instant::now();
    let mut progress = trainer::progress::for_stderr();
    let result = experiment::run(
        &config,
        &out,
        &servers.clients(),
        experiment::ExperimentOptions {
            force: args.force,
            pretrain_only: args.pretrain_only,
            keep_models: args.keep_models,
        },
        progress.as_mut(),
    )
    .await;
    drop(progress);
    servers.close().await?;
    let outcome = result?;
    eprintln!(
        "sandbox study finished in {:.0} s: {} runs; {} on disk under {}",
        started.elapsed().as_secs_f64(),
        outcome.runs,
        megabytes(model_server::jobs::folder_bytes(&out)),
        out.display()
    );
    println!("summary: {}", outcome.summary.display());
    println!(
        "report:  {}",
        outcome.report_dir.join("report.md").display()
    );
    Ok(())
}

fn main() -> Result<()> {
    // SAFETY: first statement of `main`, before any other thread starts.
    unsafe { model_server::run_binary(dispatch()) }.context("starting the async runtime")?
}

async fn dispatch() -> Result<()> {
    match Cli::parse().command {
        Command::Run(args) => run(args).await,
        Command::Experiment(args) => experiment(args).await,
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
    let _lock = lock_out(&args.out)?;
    let servers = open_servers(&args.out, &args.server, 1).await?;
    let mut progress = trainer::progress::for_stderr();
    let mut study = Study::new(
        &spec,
        &data,
        servers.session.client.clone(),
        args.out.clone(),
        args.force,
        progress.as_mut(),
    )
    .keeping_models(args.keep_models)
    .with_more_servers(servers.more.iter().cloned());
    let result = study.run_all().await;
    servers.close().await?;
    let runs = result?;
    eprintln!(
        "{} runs finished in {} ({} on disk there)",
        runs.len(),
        args.out.display(),
        megabytes(model_server::jobs::folder_bytes(&args.out))
    );
    Ok(())
}

/// A byte count for a person: "12.3 MB".
fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
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
        let parameters = parameter_count(&config);
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
