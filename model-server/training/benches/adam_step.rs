//! Optimizer step time on GPT-2-small-shaped parameters (124M f32): this project's in-place
//! Adam versus `candle_nn::AdamW`. Prints the median of a few steps each.
//!
//!     cargo bench -p superficial-training --bench adam_step

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use superficial_models::ModelConfig;
use superficial_models::model::parameter_layout;
use superficial_training::AdamConfig;
use superficial_training::optimizer::Adam;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let steps = std::env::var("STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5usize);
    let config = ModelConfig::preset("gpt2").ok_or("preset")?;
    let device = Device::Cpu;
    let layout = parameter_layout(&config);
    let make_vars = || -> candle_core::Result<Vec<(String, Var)>> {
        layout
            .iter()
            .map(|(name, shape, _)| {
                Ok((
                    name.clone(),
                    Var::from_tensor(&Tensor::randn(0f32, 0.02, shape.as_slice(), &device)?)?,
                ))
            })
            .collect()
    };
    let vars = make_vars()?;
    let params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let grads: Vec<Option<Tensor>> = vars
        .iter()
        .map(|(_, v)| Tensor::randn(0f32, 1e-3, v.shape(), &device).map(Some))
        .collect::<candle_core::Result<_>>()?;
    println!(
        "parameters: {params} (gpt2 shape), {} threads",
        rayon::current_num_threads()
    );

    let mut ours = Adam::new(
        vars,
        AdamConfig {
            lr: 1e-5,
            ..Default::default()
        },
    )?;
    let mut times = Vec::new();
    for step in 0..steps {
        let t = Instant::now();
        ours.step(&grads, 1e-5, step + 1)?;
        times.push(t.elapsed().as_secs_f64());
    }
    println!(
        "superficial Adam (in place): median {:.3} s/step over {steps} steps",
        median(times)
    );

    let vars = make_vars()?;
    // GradStore has no public constructor: d/dw sum(w * g) = g gives the same gradients.
    let mut surrogate = Tensor::zeros((), DType::F32, &device)?;
    for ((_, var), grad) in vars.iter().zip(&grads) {
        if let Some(g) = grad {
            surrogate = (surrogate + var.as_tensor().mul(g)?.sum_all()?)?;
        }
    }
    let store = surrogate.backward()?;
    let mut candle = candle_nn::AdamW::new(
        vars.into_iter().map(|(_, v)| v).collect(),
        candle_nn::ParamsAdamW {
            lr: 1e-5,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut times = Vec::new();
    for _ in 0..steps.min(3) {
        let t = Instant::now();
        candle.step(&store)?;
        times.push(t.elapsed().as_secs_f64());
    }
    println!(
        "candle_nn::AdamW: median {:.3} s/step over {} steps",
        median(times),
        steps.min(3)
    );
    Ok(())
}
