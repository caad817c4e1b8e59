//! The project's side of the PyTorch comparison (`tools/bench/compare.py`): the same workloads
//! as `tools/bench/torch_peer.py`, timed one repetition per request so the driver can interleave
//! the two implementations on a quiet machine.
//!
//! Protocol (stdin/stdout, one line each): `list` answers the workload names separated by
//! spaces; a workload name answers the seconds of one repetition (the first request of a
//! workload builds its model and runs one untimed warm-up); `quit` ends. Only one workload's
//! models are kept at a time (the GPT-2-small ones hold ~1.5 GB with optimizer state).
//!
//!     cargo bench -p superficial-training --bench workloads            # runs each once
//!     cargo bench -p superficial-training --bench workloads -- --serve # the protocol
//!
//! `BENCH_DEVICE=cuda:0` runs every workload on a GPU (a build with `--features cuda`, see
//! `tools/build-cuda.sh`); each repetition ends with a device synchronisation so the time is the
//! work's, not the launch queue's.

use std::io::{BufRead, Write};
use std::time::Instant;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use superficial_models::config::Gpt2Config;
use superficial_models::{CausalLm, EncodedDialogue, LoadOptions, ModelConfig, RewardReadout};
use superficial_training::{
    AdamConfig, DEFAULT_SHARDS, Example, Objective, Schedule, TrainConfig, TrainingRun,
};

type BoxError = Box<dyn std::error::Error>;

/// The device named by `BENCH_DEVICE`: `cpu` (default), `cuda` or `cuda:N`.
fn bench_device() -> Result<candle_core::Device, BoxError> {
    let name = std::env::var("BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    match name.as_str() {
        "cpu" => Ok(candle_core::Device::Cpu),
        "cuda" => Ok(candle_core::Device::new_cuda(0)?),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(ordinal)) => Ok(candle_core::Device::new_cuda(ordinal)?),
            _ => Err(format!("BENCH_DEVICE={other}: expected cpu, cuda or cuda:N").into()),
        },
    }
}

/// Every workload: name, model shape, what one repetition does. Shapes are the issue's:
/// GPT-2-small (124M) at the paper's scale and the sandbox's 2-layer, 768-token models.
const WORKLOADS: &[&str] = &[
    "gpt2s-lm-forward-8x256",
    "gpt2s-reward-forward-8x256",
    "gpt2s-reward-step-2x4x128",
    "gpt2s-lm-step-4x128",
    "gpt2s-simpo-step-2x4x128",
    "gpt2s-dpo-step-2x4x128",
    "w32-lm-step-16x96",
    "w32-simpo-step-32x70",
    "w32-reward-step-32x70",
    "w32-logprobs-64x70",
    "w32-logprobs-2x70",
    "w64-lm-step-16x96",
    "w64-simpo-step-32x70",
    "w64-reward-step-32x70",
    "w64-logprobs-64x70",
    "w64-logprobs-2x70",
    "sgemm-2048",
];

/// A built workload: one call is one timed repetition.
enum Workload {
    Train(Box<TrainingRun>),
    Logprobs(CausalLm, Vec<Vec<u32>>),
    Rewards(CausalLm, Vec<Vec<u32>>),
    /// A square f32 matrix product: the gemm this CPU reaches through candle.
    Matmul(candle_core::Tensor, candle_core::Tensor),
}

impl Workload {
    fn run(&mut self, device: &candle_core::Device) -> Result<(), BoxError> {
        match self {
            Workload::Train(run) => {
                run.train_step()?;
            }
            Workload::Logprobs(model, sequences) => {
                model.sequence_logprobs(sequences)?;
            }
            Workload::Rewards(model, sequences) => {
                model.sequence_rewards(sequences, &vec![0; sequences.len()])?;
            }
            Workload::Matmul(a, b) => {
                a.matmul(b)?;
            }
        }
        device.synchronize()?;
        Ok(())
    }
}

fn sandbox_config(width: usize) -> Result<ModelConfig, BoxError> {
    match ModelConfig::preset("tiny-gpt2").ok_or("no tiny-gpt2 preset")? {
        ModelConfig::Gpt2(c) => Ok(ModelConfig::Gpt2(Gpt2Config {
            vocab_size: 768,
            n_positions: 96,
            n_embd: width,
            n_layer: 2,
            n_head: 4,
            bos_token_id: 767,
            eos_token_id: 767,
            ..c
        })),
        ModelConfig::Opt(_) => Err("tiny-gpt2 preset is not GPT-2".into()),
    }
}

fn random_ids(rng: &mut ChaCha8Rng, vocab: u32, len: usize) -> Vec<u32> {
    (0..len).map(|_| rng.random_range(0..vocab - 1)).collect()
}

/// Adam at a constant rate, one minibatch per step, as many epochs as any bench needs.
fn train_config(objective: Objective, batch_size: usize) -> TrainConfig {
    TrainConfig {
        objective,
        optimizer: AdamConfig {
            lr: 1e-5,
            ..Default::default()
        },
        schedule: Schedule::Constant,
        batch_size,
        minibatch_size: batch_size,
        epochs: 1000,
        seed: 0,
        reshuffle_each_epoch: false,
        shards: DEFAULT_SHARDS,
    }
}

fn build(name: &str, device: &candle_core::Device) -> Result<Workload, BoxError> {
    let mut parts = name.split('-');
    let shape = parts.next().ok_or("empty workload name")?;
    if shape == "sgemm" {
        let n: usize = parts.next().ok_or("sgemm without a size")?.parse()?;
        return Ok(Workload::Matmul(
            candle_core::Tensor::randn(0f32, 1.0, (n, n), device)?,
            candle_core::Tensor::randn(0f32, 1.0, (n, n), device)?,
        ));
    }
    let config = match shape {
        "gpt2s" => ModelConfig::preset("gpt2").ok_or("no gpt2 preset")?,
        "w32" => sandbox_config(32)?,
        "w64" => sandbox_config(64)?,
        _ => return Err(format!("unknown workload {name}").into()),
    };
    let vocab = config.vocab_size() as u32;
    let dims: Vec<usize> = name
        .rsplit('-')
        .next()
        .unwrap_or_default()
        .split('x')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let kind = name
        .strip_prefix(shape)
        .and_then(|rest| rest.rsplit_once('-'))
        .map(|(kind, _)| kind.trim_start_matches('-'))
        .ok_or("workload name without a kind")?;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let options = LoadOptions {
        device: device.clone(),
        ..LoadOptions::default()
    };
    let model = CausalLm::random_init(config, 1, &options)?;
    // Pairs: `[2, pairs, len]` or `[pairs, len]`; each pair has two sequences.
    let (pairs, len) = match dims.as_slice() {
        [2, p, l] | [p, l] => (*p, *l),
        _ => return Err(format!("workload {name}: bad dimensions").into()),
    };
    let preference = |rng: &mut ChaCha8Rng, reference: bool| -> Vec<Example> {
        (0..pairs)
            .map(|_| {
                let half = len / 2;
                let dialogue = |rng: &mut ChaCha8Rng| {
                    EncodedDialogue::assemble(
                        random_ids(rng, vocab, half),
                        random_ids(rng, vocab, len - half),
                        len,
                    )
                };
                Example::Preference {
                    chosen: dialogue(rng),
                    rejected: dialogue(rng),
                    conflict_prefers_rejected: true,
                    reference: reference.then_some([-1.0, -1.2]),
                }
            })
            .collect()
    };
    let workload = match kind {
        "lm-forward" | "logprobs" => Workload::Logprobs(
            model,
            (0..pairs)
                .map(|_| random_ids(&mut rng, vocab, len))
                .collect(),
        ),
        "reward-forward" => Workload::Rewards(
            model.with_fresh_reward_head(3, RewardReadout::LastToken)?,
            (0..pairs)
                .map(|_| random_ids(&mut rng, vocab, len))
                .collect(),
        ),
        "lm-step" => {
            let examples = (0..pairs)
                .map(|_| Example::Tokens(random_ids(&mut rng, vocab, len)))
                .collect();
            Workload::Train(Box::new(TrainingRun::new(
                model,
                examples,
                train_config(Objective::CausalLm, pairs),
            )?))
        }
        "reward-step" => {
            let examples = (0..pairs)
                .map(|_| Example::RewardPair {
                    slot_c: random_ids(&mut rng, vocab, len),
                    slot_r: random_ids(&mut rng, vocab, len),
                    response_starts: [len / 2, len / 2],
                    target: 1.0,
                    conflict_prefers_slot_r: false,
                })
                .collect();
            Workload::Train(Box::new(TrainingRun::new(
                model.with_fresh_reward_head(3, RewardReadout::LastToken)?,
                examples,
                train_config(
                    Objective::Reward {
                        explicit_alpha: None,
                    },
                    pairs,
                ),
            )?))
        }
        "simpo-step" => Workload::Train(Box::new(TrainingRun::new(
            model,
            preference(&mut rng, false),
            train_config(Objective::simpo(None), pairs),
        )?)),
        "dpo-step" => Workload::Train(Box::new(TrainingRun::new(
            model,
            preference(&mut rng, true),
            train_config(Objective::dpo(None), pairs),
        )?)),
        _ => return Err(format!("unknown workload {name}").into()),
    };
    Ok(workload)
}

fn main() -> Result<(), BoxError> {
    // SAFETY: first statement of `main`, before any other thread starts.
    unsafe { superficial_models::pin_cpu_thread_count() };
    // As `model_server::keep_freed_memory` does for the binaries (this crate cannot depend on
    // model-server): mimalloc's `purge_delay` (15) to -1, never return freed memory.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting a mimalloc option is thread-safe.
        unsafe { libmimalloc_sys::mi_option_set(15, -1) };
    }
    let serve = std::env::args().any(|a| a == "--serve");
    let device = bench_device()?;
    let mut current: Option<(String, Workload)> = None;
    let mut time = |name: &str| -> Result<f64, BoxError> {
        if current.as_ref().map(|(n, _)| n.as_str()) != Some(name) {
            current = None; // free the previous workload's models first
            let mut workload = build(name, &device)?;
            workload.run(&device)?; // warm-up
            current = Some((name.to_string(), workload));
        }
        let (_, workload) = current.as_mut().ok_or("no workload")?;
        let start = Instant::now();
        workload.run(&device)?;
        Ok(start.elapsed().as_secs_f64())
    };
    if !serve {
        println!(
            "workloads bench: {} rayon threads, one repetition each",
            rayon::current_num_threads()
        );
        for name in WORKLOADS {
            println!("{name}: {:.4} s", time(name)?);
        }
        return Ok(());
    }
    let stdout = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let request = line.trim();
        let answer = match request {
            "" => continue,
            "quit" => break,
            "list" => WORKLOADS.join(" "),
            name => match time(name) {
                Ok(seconds) => format!("{seconds:.6}"),
                Err(e) => format!("error {e}"),
            },
        };
        let mut out = stdout.lock();
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
    Ok(())
}
