//! What chunked prefill costs: one ~1000-token sequence on GPT-2-small (random weights, the
//! preset's shape) scored in one pass, and in chunks of 128 / 256 / 512 tokens through the KV
//! cache (the server's scoring path under `--max-pass-ms`). Prints the median of five
//! interleaved repetitions of each, and the longest single chunk.
//!
//!     cargo bench -p superficial-models --bench chunked_scoring

use std::time::{Duration, Instant};

use superficial_models::{ChunkedOutput, ChunkedScoring, LoadOptions, ModelConfig};

type BoxError = Box<dyn std::error::Error>;

const SEQUENCE_TOKENS: usize = 1000;
const CHUNKS: [usize; 3] = [128, 256, 512];
const ROUNDS: usize = 5;

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn main() -> Result<(), BoxError> {
    // SAFETY: first statement of `main`, before any other thread starts.
    let threads = unsafe { superficial_models::pin_cpu_thread_count() };
    let config = ModelConfig::preset("gpt2").ok_or("no gpt2 preset")?;
    let model = superficial_models::CausalLm::random_init(config, 0, &LoadOptions::default())?;
    let vocab = model.config().vocab_size() as u32;
    let ids: Vec<u32> = (0..SEQUENCE_TOKENS as u32)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();
    let sequences = vec![ids.clone()];
    let whole_pass = || -> Result<Duration, BoxError> {
        let started = Instant::now();
        model.sequence_logprobs(&sequences)?;
        Ok(started.elapsed())
    };
    let chunked = |chunk: usize| -> Result<(Duration, Duration), BoxError> {
        let started = Instant::now();
        let mut scoring = ChunkedScoring::new(&model, ids.clone(), ChunkedOutput::Logprobs)?;
        let mut longest = Duration::ZERO;
        while !scoring.is_done() {
            let pass = Instant::now();
            scoring.advance(&model, chunk)?;
            longest = longest.max(pass.elapsed());
        }
        scoring.into_logprobs()?;
        Ok((started.elapsed(), longest))
    };
    whole_pass()?; // warm-up
    let mut whole = Vec::new();
    let mut by_chunk: Vec<(Vec<Duration>, Vec<Duration>)> = vec![Default::default(); CHUNKS.len()];
    for _ in 0..ROUNDS {
        whole.push(whole_pass()?);
        for (k, &chunk) in CHUNKS.iter().enumerate() {
            let (total, longest) = chunked(chunk)?;
            by_chunk[k].0.push(total);
            by_chunk[k].1.push(longest);
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "chunked scoring, GPT-2-small, one {SEQUENCE_TOKENS}-token sequence, {threads} threads, \
         medians of {ROUNDS}"
    );
    println!("| pass | total ms | longest pass ms | vs one pass |");
    println!("| --- | --- | --- | --- |");
    let one = median(whole);
    println!("| one pass | {:.0} | {:.0} | 1.00 |", ms(one), ms(one));
    for (k, chunk) in CHUNKS.iter().enumerate() {
        let total = median(by_chunk[k].0.clone());
        let longest = median(by_chunk[k].1.clone());
        println!(
            "| {chunk}-token chunks | {:.0} | {:.0} | {:.2} |",
            ms(total),
            ms(longest),
            total.as_secs_f64() / one.as_secs_f64()
        );
    }
    Ok(())
}
