//! Step time of the sandbox's model shapes (GPT-2 layout, 768-token vocabulary, 96 positions):
//! one causal-LM optimizer step on 16 × 96 tokens (pretraining), one SimPO and one reward-model
//! step on 32 pairs shaped as the sandbox's (a shared 18–26-token prompt, responses of 8–27
//! tokens), plus a no-grad log-prob forward of 2 and of 64 sequences (one pair versus a batch of 32
//! pairs, the server's batching case). Prints medians.
//!
//!     cargo bench -p superficial-training --bench train_step
//!
//! `STEPS=N` sets the repetitions (default 15).

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

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn sandbox_config(width: usize, layers: usize, heads: usize) -> Option<ModelConfig> {
    match ModelConfig::preset("tiny-gpt2")? {
        ModelConfig::Gpt2(c) => Some(ModelConfig::Gpt2(Gpt2Config {
            vocab_size: 768,
            n_positions: 96,
            n_embd: width,
            n_layer: layers,
            n_head: heads,
            bos_token_id: 767,
            eos_token_id: 767,
            ..c
        })),
        ModelConfig::Opt(_) => None,
    }
}

fn random_ids(rng: &mut ChaCha8Rng, len: usize) -> Vec<u32> {
    (0..len).map(|_| rng.random_range(0..767)).collect()
}

/// A preference pair shaped as the sandbox's: one prompt of 18–26 tokens, two responses of
/// 8–27 tokens each (their lengths differ, as a refusal's and a compliance's do).
fn sandbox_pair(rng: &mut ChaCha8Rng) -> (EncodedDialogue, EncodedDialogue) {
    let prompt_len = rng.random_range(18..=26);
    let prompt = random_ids(rng, prompt_len);
    let response = |rng: &mut ChaCha8Rng| {
        let len = rng.random_range(8..=27);
        EncodedDialogue::assemble(prompt.clone(), random_ids(rng, len), 96)
    };
    let chosen = response(rng);
    (chosen, response(rng))
}

/// Plain Adam at a constant rate, one minibatch per step, epochs enough for any bench length.
fn constant_lr(objective: Objective, lr: f64, batch_size: usize) -> TrainConfig {
    TrainConfig {
        objective,
        optimizer: AdamConfig {
            lr,
            ..Default::default()
        },
        schedule: Schedule::Constant,
        batch_size,
        minibatch_size: batch_size,
        epochs: 100,
        seed: 0,
        reshuffle_each_epoch: false,
        shards: DEFAULT_SHARDS,
    }
}

fn time_steps(run: &mut TrainingRun, steps: usize) -> Result<f64, Box<dyn std::error::Error>> {
    run.train_step()?; // warm-up
    let mut times = Vec::new();
    for _ in 0..steps {
        let t = Instant::now();
        run.train_step()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: first statement of `main`, before any other thread starts.
    unsafe { superficial_models::pin_cpu_thread_count() };
    // As `model_server::keep_freed_memory` does for the binaries (this crate cannot depend on
    // model-server): mimalloc's `purge_delay` (15) to -1, never return freed memory.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: setting a mimalloc option is thread-safe.
        unsafe { libmimalloc_sys::mi_option_set(15, -1) };
    }
    let steps = std::env::var("STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15usize);
    println!(
        "train_step bench: {} rayon threads, medians of {steps}",
        rayon::current_num_threads()
    );
    println!(
        "| shape | causal-LM step 16×96 (ms) | SimPO step 32 pairs (ms) | reward step 32 pairs (ms) | log-probs 2 seq (ms) | log-probs 64 seq (ms) |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for (name, width, layers, heads) in [
        ("gpt2-xs 16×1", 16, 1, 2),
        ("gpt2-s 32×2", 32, 2, 4),
        ("gpt2-l 64×2", 64, 2, 4),
    ] {
        let config = sandbox_config(width, layers, heads).ok_or("preset")?;
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let options = LoadOptions::default();

        let lm_examples: Vec<Example> = (0..64)
            .map(|_| Example::Tokens(random_ids(&mut rng, 96)))
            .collect();
        let model = CausalLm::random_init(config.clone(), 1, &options)?;
        let mut lm_run = TrainingRun::new(
            model,
            lm_examples,
            constant_lr(Objective::CausalLm, 1e-3, 16),
        )?;
        let lm_ms = time_steps(&mut lm_run, steps)? * 1e3;

        let pair_examples: Vec<Example> = (0..64)
            .map(|_| {
                let (chosen, rejected) = sandbox_pair(&mut rng);
                Example::Preference {
                    chosen,
                    rejected,
                    conflict_prefers_rejected: true,
                    reference: None,
                }
            })
            .collect();
        let model = CausalLm::random_init(config.clone(), 1, &options)?;
        let mut simpo_run = TrainingRun::new(
            model,
            pair_examples,
            constant_lr(Objective::simpo(None), 1e-4, 32),
        )?;
        let simpo_ms = time_steps(&mut simpo_run, steps)? * 1e3;

        let reward_examples: Vec<Example> = (0..64)
            .map(|_| {
                let (c, r) = sandbox_pair(&mut rng);
                Example::RewardPair {
                    response_starts: [c.response_start(), r.response_start()],
                    slot_c: c.ids,
                    slot_r: r.ids,
                    target: 1.0,
                    conflict_prefers_slot_r: false,
                }
            })
            .collect();
        let model = CausalLm::random_init(config.clone(), 1, &options)?
            .with_fresh_reward_head(3, RewardReadout::LastTokenAndMeanLogprob)?;
        let mut reward_run = TrainingRun::new(
            model,
            reward_examples,
            constant_lr(
                Objective::Reward {
                    explicit_alpha: None,
                },
                1e-3,
                32,
            ),
        )?;
        let reward_ms = time_steps(&mut reward_run, steps)? * 1e3;

        let model = CausalLm::random_init(config, 1, &options)?;
        let sequences: Vec<Vec<u32>> = (0..64).map(|_| random_ids(&mut rng, 70)).collect();
        let mut forward_ms = Vec::new();
        for count in [2usize, 64] {
            model.sequence_logprobs(&sequences[..count])?;
            let mut times = Vec::new();
            for _ in 0..steps {
                let t = Instant::now();
                model.sequence_logprobs(&sequences[..count])?;
                times.push(t.elapsed().as_secs_f64());
            }
            forward_ms.push(median(times) * 1e3);
        }
        println!(
            "| {name} | {lm_ms:.1} | {simpo_ms:.1} | {reward_ms:.1} | {:.2} | {:.2} |",
            forward_ms[0], forward_ms[1]
        );
    }
    Ok(())
}
