//! Learning-rate schedules of the official code, as functions of the optimizer step.

use serde::{Deserialize, Serialize};

/// How the learning rate evolves over `total_steps` optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Schedule {
    /// The base rate throughout.
    Constant,
    /// `CosineAnnealingLR(T_max = total_steps, eta_min = 0)`: step `s` uses
    /// `lr * (1 + cos(pi * s / total)) / 2` (reward modeling).
    CosineToZero,
    /// `LambdaLR(min(1, (s + 1) / (floor(warmup_frac * total) + 1)))`: linear warm-up, then
    /// constant (SFT, SimPO, DPO; warmup_frac 0.1).
    LinearWarmupConstant { warmup_frac: f64 },
}

impl Schedule {
    /// Learning rate of optimizer step `step` (0-based).
    pub fn lr(&self, base: f64, step: usize, total_steps: usize) -> f64 {
        match *self {
            Schedule::Constant => base,
            Schedule::CosineToZero => {
                let total = total_steps.max(1) as f64;
                base * (1.0 + (std::f64::consts::PI * step as f64 / total).cos()) / 2.0
            }
            Schedule::LinearWarmupConstant { warmup_frac } => {
                let warmup = (warmup_frac * total_steps as f64).floor() + 1.0;
                base * ((step as f64 + 1.0) / warmup).min(1.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_starts_at_base_and_halves_midway() {
        let s = Schedule::CosineToZero;
        assert_eq!(s.lr(1.0, 0, 100), 1.0);
        assert!((s.lr(1.0, 50, 100) - 0.5).abs() < 1e-12);
        assert!(s.lr(1.0, 99, 100) < 0.001);
    }

    #[test]
    fn warmup_matches_the_official_lambda() {
        let s = Schedule::LinearWarmupConstant { warmup_frac: 0.1 };
        // total 125: floor(12.5) + 1 = 13 warm-up divisor.
        assert!((s.lr(1.0, 0, 125) - 1.0 / 13.0).abs() < 1e-12);
        assert!((s.lr(1.0, 11, 125) - 12.0 / 13.0).abs() < 1e-12);
        assert_eq!(s.lr(1.0, 12, 125), 1.0);
        assert_eq!(s.lr(1.0, 124, 125), 1.0);
    }
}
