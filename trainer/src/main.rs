//! `trainer`: drives weak-to-strong experiments on the model server over gRPC.
//!
//! Available now: `trainer presets`, the model configurations the server can instantiate, with
//! their exact parameter counts (computed from the same layouts the models are built from).

use anyhow::Result;
use clap::{Parser, Subcommand};
use superficial_models::ModelConfig;
use superficial_models::model::parameter_layout;

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
    /// Lists the built-in model presets with architecture, shape and parameter count.
    Presets,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Presets => {
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
            Ok(())
        }
    }
}
