//! `load-client`: a load generator and benchmark for the model server. Prints numbers; asserts
//! nothing.
//!
//! 1. gRPC overhead: median time of TokenLogprobs on a batch of B texts of T tokens (default
//!    8 x 256, GPT-2-small shape, byte tokenizer) through the server, against the same
//!    tokenization + forward called in-process.
//! 2. Pair scoring throughput: single-pair ScorePairs requests from C concurrent clients
//!    (default 1, 8, 32), with dynamic batching on and off: sequences/s, p50 and p99 latency.
//! 3. Preference-pair generation: GeneratePairs over P prompts with k samples each (the policy
//!    judged by itself, mean log-prob): pairs/s and sampled tokens/s.
//!
//!     cargo run --release -p model-server --bin load-client -- [--preset gpt2] [--quick] [--only-pairs]

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use model_server::config::NamedSource;
use model_server::worker::parse_device;
use model_server::{RunningServer, ServerConfig, W2sClient};
use superficial_models::{CausalLm, LoadOptions, ModelConfig, TextTokenizer};
use w2s_proto::v1 as pb;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "load-client",
    about = "Benchmarks the model server over loopback gRPC."
)]
struct Args {
    /// Model preset for both parts.
    #[arg(long, default_value = "gpt2")]
    preset: String,
    /// Sequences per overhead request.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Tokens per overhead sequence.
    #[arg(long, default_value_t = 256)]
    tokens: usize,
    /// Repetitions of the overhead measurement (medians are reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Concurrency levels of the throughput sweep.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    concurrency: Vec<usize>,
    /// Requests per concurrency level and batching mode.
    #[arg(long, default_value_t = 64)]
    requests: usize,
    /// Bytes (= tokens) per response in the throughput sweep.
    #[arg(long, default_value_t = 48)]
    pair_tokens: usize,
    /// Prompts per GeneratePairs request.
    #[arg(long, default_value_t = 16)]
    pair_prompts: usize,
    /// Samples per prompt in GeneratePairs.
    #[arg(long, default_value_t = 4)]
    samples: u32,
    /// New tokens per GeneratePairs sample.
    #[arg(long, default_value_t = 24)]
    new_tokens: u32,
    /// Run only the GeneratePairs measurement.
    #[arg(long)]
    only_pairs: bool,
    /// Small settings for a smoke run.
    #[arg(long)]
    quick: bool,
    /// Device for both the server and the in-process baseline: `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn percentile(xs: &mut [f64], p: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    let i = ((xs.len() as f64 - 1.0) * p).round() as usize;
    xs[i]
}

async fn server(
    preset: &str,
    device: &str,
    max_batch_requests: usize,
) -> Result<(RunningServer, W2sClient)> {
    let mut config = ServerConfig::ephemeral();
    config.device = device.into();
    config.presets.push(NamedSource {
        name: "m".into(),
        value: preset.into(),
    });
    config.max_batch_requests = max_batch_requests;
    config.max_batch_tokens = 1 << 20;
    let server = RunningServer::start(config)
        .await
        .context("starting the server")?;
    let client = W2sClient::connect(&server.url()).await?;
    Ok((server, client))
}

fn text_of(tokens: usize, salt: usize) -> String {
    // The byte tokenizer makes one token per byte.
    (0..tokens)
        .map(|i| (b'a' + ((i * 7 + salt) % 26) as u8) as char)
        .collect()
}

fn main() -> Result<()> {
    // SAFETY: first statement of `main`, before any other thread starts.
    unsafe { model_server::run_binary(run()) }.context("starting the async runtime")?
}

async fn run() -> Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.reps = 2;
        args.requests = 16;
        args.tokens = 64;
    }
    println!(
        "load-client: preset {}, device {}, {} rayon threads, {} CPUs",
        args.preset,
        args.device,
        rayon_threads(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    if !args.only_pairs {
        overhead_and_scoring(&args).await?;
    }
    pair_generation(&args).await
}

/// 3. GeneratePairs throughput: the median over `reps` requests of `pair_prompts` prompts.
async fn pair_generation(args: &Args) -> Result<()> {
    let (srv, client) = server(&args.preset, &args.device, 64).await?;
    let prompts: Vec<String> = (0..args.pair_prompts)
        .map(|i| format!("\n\nHuman: {}?\n\nAssistant:", text_of(24 + i % 3, i)))
        .collect();
    let request = |seed: u64| pb::GeneratePairsRequest {
        policy: "m".into(),
        judge: "m".into(),
        judge_kind: pb::JudgeKind::MeanLogprob as i32,
        prompts: prompts.clone(),
        samples_per_prompt: args.samples,
        max_new_tokens: args.new_tokens,
        sampling: Some(pb::SamplingParams {
            temperature: 1.0,
            seed,
            ..Default::default()
        }),
        keep_prompt_end: false,
    };
    client.generate_pairs(request(0)).await?; // warm-up
    let mut seconds = Vec::new();
    let mut pairs = 0;
    for rep in 0..args.reps {
        let started = Instant::now();
        pairs = client.generate_pairs(request(rep as u64 + 1)).await?.len();
        seconds.push(started.elapsed().as_secs_f64());
    }
    srv.shutdown().await?;
    let s = median(seconds);
    let samples = args.pair_prompts * args.samples as usize;
    println!(
        "GeneratePairs: {} prompts x {} samples x {} new tokens: median {s:.3} s per request, \
         {:.1} pairs/s, {:.0} sampled tokens/s at most (medians of {})",
        args.pair_prompts,
        args.samples,
        args.new_tokens,
        pairs as f64 / s,
        (samples * args.new_tokens as usize) as f64 / s,
        args.reps
    );
    Ok(())
}

/// 1 and 2: gRPC overhead and single-pair scoring throughput.
async fn overhead_and_scoring(args: &Args) -> Result<()> {
    // 1. Overhead of gRPC against in-process calls.
    let texts: Vec<String> = (0..args.batch).map(|i| text_of(args.tokens, i)).collect();
    let (grpc_server, client) = server(&args.preset, &args.device, 64).await?;
    let request = pb::TokenLogprobsRequest {
        model: "m".into(),
        texts: texts.clone(),
        ..Default::default()
    };
    client.token_logprobs(request.clone()).await?; // warm-up
    let mut grpc = Vec::new();
    let mut server_compute = Vec::new();
    let mut server_queue = Vec::new();
    for _ in 0..args.reps {
        let t = Instant::now();
        let response = client.token_logprobs(request.clone()).await?;
        grpc.push(t.elapsed().as_secs_f64());
        let timing = response.timing.unwrap_or_default();
        server_compute.push(timing.compute_ns as f64 / 1e9);
        server_queue.push(timing.queue_ns as f64 / 1e9);
    }
    grpc_server.shutdown().await?;
    let config = ModelConfig::preset(&args.preset).context("unknown preset")?;
    let options = LoadOptions {
        device: parse_device(&args.device)?,
        ..LoadOptions::default()
    };
    let model = CausalLm::random_init(config, 0, &options)?;
    let tokenizer = TextTokenizer::bytes()?;
    let in_process_call = || -> Result<()> {
        let sequences: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| tokenizer.encode(t))
            .collect::<Result<_, _>>()?;
        model.sequence_logprobs(&sequences)?;
        Ok(())
    };
    in_process_call()?;
    let mut local = Vec::new();
    for _ in 0..args.reps {
        let t = Instant::now();
        in_process_call()?;
        local.push(t.elapsed().as_secs_f64());
    }
    drop(model);
    let (g, l) = (median(grpc), median(local));
    println!(
        "server-side stages (medians): queue {:.4} s, compute {:.4} s",
        median(server_queue),
        median(server_compute)
    );
    println!(
        "overhead: {} x {} tokens: gRPC median {:.4} s, in-process median {:.4} s, overhead {:+.2}%",
        args.batch,
        args.tokens,
        g,
        l,
        (g - l) / l * 100.0
    );

    // 2. Throughput of single-pair scoring.
    println!("| batching | concurrency | sequences/s | p50 ms | p99 ms |");
    println!("| --- | --- | --- | --- | --- |");
    for batching in [true, false] {
        let (srv, client) =
            server(&args.preset, &args.device, if batching { 64 } else { 1 }).await?;
        for &concurrency in &args.concurrency {
            let per_client = args.requests.div_ceil(concurrency);
            let started = Instant::now();
            let mut tasks = Vec::new();
            for c in 0..concurrency {
                let client = client.clone();
                let pair_tokens = args.pair_tokens;
                tasks.push(tokio::spawn(async move {
                    let mut latencies = Vec::with_capacity(per_client);
                    for r in 0..per_client {
                        let prompt =
                            format!("\n\nHuman: {}\n\nAssistant:", text_of(16, c * 1000 + r));
                        let request = pb::ScorePairsRequest {
                            model: "m".into(),
                            pairs: vec![pb::PreferencePair {
                                prompt,
                                chosen: text_of(pair_tokens, r),
                                rejected: text_of(pair_tokens, r + 1),
                            }],
                            scoring: pb::PairScoring::MeanLogprob as i32,
                            ..Default::default()
                        };
                        let t = Instant::now();
                        client.score_pairs(request).await?;
                        latencies.push(t.elapsed());
                    }
                    anyhow::Ok(latencies)
                }));
            }
            let mut latencies: Vec<f64> = Vec::new();
            for task in tasks {
                latencies.extend(
                    task.await??
                        .into_iter()
                        .map(|d: Duration| d.as_secs_f64() * 1e3),
                );
            }
            let elapsed = started.elapsed().as_secs_f64();
            let sequences = (latencies.len() * 2) as f64;
            let p50 = percentile(&mut latencies, 0.5);
            let p99 = percentile(&mut latencies, 0.99);
            println!(
                "| {} | {concurrency} | {:.1} | {p50:.1} | {p99:.1} |",
                if batching { "on" } else { "off" },
                sequences / elapsed
            );
        }
        srv.shutdown().await?;
    }
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
