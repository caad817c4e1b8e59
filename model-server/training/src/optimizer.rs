//! Adam / AdamW owned by the project and updated in place.
//!
//! On CPU (f32) the moments live in plain host buffers and each parameter is updated by one
//! fused, multi-threaded pass (moments and weights together) through candle's in-place custom
//! op; the gradient norm is read without allocating. No temporaries the size of the model are
//! created, which is what makes `candle_nn::AdamW` take seconds per step on 124M parameters.
//! Other devices use an equivalent tensor-op path on moment variables. The arithmetic follows
//! `torch.optim.Adam`/`AdamW` (lerp first moment, bias corrections, eps added after the
//! square root), so the same seed and data give bit-identical weights run after run.

use std::sync::Mutex;

use candle_core::{CpuStorage, DType, Layout, Storage, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// Optimizer hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled (AdamW) weight decay; 0 gives plain Adam as in the official code. Never
    /// applied to biases and LayerNorm parameters.
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value (`clip_grad_norm_`), if set.
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 1e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            max_grad_norm: None,
        }
    }
}

impl AdamConfig {
    pub fn validate(&self) -> Result<()> {
        let ok = self.lr >= 0.0
            && (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2)
            && self.eps > 0.0
            && self.weight_decay >= 0.0
            && self.max_grad_norm.is_none_or(|n| n > 0.0);
        if ok {
            Ok(())
        } else {
            Err(TrainError::InvalidConfig(format!(
                "bad optimizer settings {self:?}"
            )))
        }
    }
}

/// Parameter groups: biases and LayerNorm gains/biases get no weight decay.
pub fn decays(name: &str) -> bool {
    let is_norm = name.contains("ln_") || name.contains("layer_norm") || name.starts_with("ln_f");
    !(name.ends_with(".bias") || is_norm)
}

/// First and second moments of one parameter.
enum Moments {
    /// CPU f32 parameters: host buffers updated by the fused kernel.
    Host { m: Vec<f32>, v: Vec<f32> },
    /// Any other device or dtype: tensors updated with tensor ops.
    Device { m: Var, v: Var },
}

struct Param {
    name: String,
    var: Var,
    moments: Moments,
    decay: bool,
}

fn uses_host_kernel(var: &Var) -> bool {
    var.device().is_cpu() && var.dtype() == DType::F32
}

/// Adam/AdamW over a fixed list of named variables.
pub struct Adam {
    config: AdamConfig,
    params: Vec<Param>,
    steps: u64,
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy)]
pub struct StepReport {
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f64,
}

impl Adam {
    pub fn new(vars: Vec<(String, Var)>, config: AdamConfig) -> Result<Self> {
        config.validate()?;
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                let moments = if uses_host_kernel(&var) {
                    let n = var.elem_count();
                    Moments::Host {
                        m: vec![0.0; n],
                        v: vec![0.0; n],
                    }
                } else {
                    let zeros = var.as_tensor().zeros_like()?;
                    Moments::Device {
                        m: Var::from_tensor(&zeros)?,
                        v: Var::from_tensor(&zeros.copy()?)?,
                    }
                };
                Ok(Param {
                    decay: decays(&name),
                    moments,
                    name,
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config,
            params,
            steps: 0,
        })
    }

    pub fn config(&self) -> &AdamConfig {
        &self.config
    }

    /// Optimizer steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The variables in optimizer order.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.var))
    }

    /// Applies one update with learning rate `lr`. `grads[i]` is the gradient of the i-th
    /// variable (`None`: not used by the loss; left untouched, as PyTorch does). Fails, naming
    /// `step`, if any gradient is not finite.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64, step: usize) -> Result<StepReport> {
        if grads.len() != self.params.len() {
            return Err(TrainError::InvalidConfig(format!(
                "{} gradients for {} parameters",
                grads.len(),
                self.params.len()
            )));
        }
        let mut squared = 0f64;
        for (param, grad) in self.params.iter().zip(grads) {
            if let Some(grad) = grad {
                let s = sum_of_squares(grad)?;
                if !s.is_finite() {
                    return Err(TrainError::NonFinite {
                        step,
                        what: format!("gradient of {}", param.name),
                    });
                }
                squared += s;
            }
        }
        let grad_norm = squared.sqrt();
        let scale = match self.config.max_grad_norm {
            Some(max) if grad_norm > max => max / (grad_norm + 1e-6),
            _ => 1.0,
        };
        self.steps += 1;
        let t = self.steps as i32;
        let c = self.config;
        let bias_correction1 = 1.0 - c.beta1.powi(t);
        let bias_correction2 = 1.0 - c.beta2.powi(t);
        let update = ParamUpdate {
            step_size: (lr / bias_correction1) as f32,
            bias_correction2_sqrt: bias_correction2.sqrt() as f32,
            eps: c.eps as f32,
            decay_factor: 1.0,
        };
        for (param, grad) in self.params.iter_mut().zip(grads) {
            let Some(grad) = grad else { continue };
            let update = ParamUpdate {
                decay_factor: if param.decay {
                    (1.0 - lr * c.weight_decay) as f32
                } else {
                    1.0
                },
                ..update
            };
            let rates = MomentRates {
                first: (1.0 - c.beta1) as f32,
                second: (1.0 - c.beta2) as f32,
                grad_scale: scale as f32,
            };
            match &mut param.moments {
                Moments::Host { m, v } if grad.dtype() == DType::F32 => {
                    let grad = grad.contiguous()?;
                    let kernel = FusedAdam {
                        m: Mutex::new(std::mem::take(m)),
                        v: Mutex::new(std::mem::take(v)),
                        rates,
                        update,
                    };
                    let result = param.var.as_tensor().inplace_op2(&grad, &kernel);
                    *m = kernel.m.into_inner().unwrap_or_default();
                    *v = kernel.v.into_inner().unwrap_or_default();
                    result?;
                }
                Moments::Host { .. } => {
                    return Err(TrainError::InvalidConfig(format!(
                        "gradient of {} is {:?}, expected f32",
                        param.name,
                        grad.dtype()
                    )));
                }
                Moments::Device { m, v } => {
                    step_with_tensor_ops(&param.var, m, v, grad, &rates, &update)?
                }
            }
        }
        Ok(StepReport { grad_norm })
    }

    /// The moment tensors by parameter name, for checkpoints.
    pub fn moments(&self) -> Result<Vec<(String, Tensor, Tensor)>> {
        self.params
            .iter()
            .map(|p| {
                let (m, v) = match &p.moments {
                    Moments::Host { m, v } => {
                        let shape = p.var.shape();
                        (
                            Tensor::from_slice(m, shape, p.var.device())?,
                            Tensor::from_slice(v, shape, p.var.device())?,
                        )
                    }
                    Moments::Device { m, v } => (m.as_tensor().clone(), v.as_tensor().clone()),
                };
                Ok((p.name.clone(), m, v))
            })
            .collect()
    }

    /// Restores moments and the step count from a checkpoint.
    pub fn restore(
        &mut self,
        lookup: impl Fn(&str) -> Option<(Tensor, Tensor)>,
        steps: u64,
    ) -> Result<()> {
        for param in &mut self.params {
            let (m, v) = lookup(&param.name).ok_or_else(|| {
                TrainError::InvalidData(format!(
                    "checkpoint has no optimizer state for {}",
                    param.name
                ))
            })?;
            if m.dims() != param.var.dims() || v.dims() != param.var.dims() {
                return Err(TrainError::InvalidData(format!(
                    "optimizer state of {} has the wrong shape",
                    param.name
                )));
            }
            match &mut param.moments {
                Moments::Host { m: hm, v: hv } => {
                    *hm = m.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                    *hv = v.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                }
                Moments::Device { m: dm, v: dv } => {
                    dm.set(&m.to_dtype(dm.dtype())?.to_device(dm.device())?)?;
                    dv.set(&v.to_dtype(dv.dtype())?.to_device(dv.device())?)?;
                }
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// The update with ordinary tensor ops, for devices and dtypes without the host kernel.
fn step_with_tensor_ops(
    var: &Var,
    m: &Var,
    v: &Var,
    grad: &Tensor,
    rates: &MomentRates,
    update: &ParamUpdate,
) -> Result<()> {
    let grad = (grad.to_dtype(var.dtype())? * rates.grad_scale as f64)?;
    let m_old = m.as_tensor();
    let m_new = (m_old + ((&grad - m_old)? * rates.first as f64)?)?;
    let v_old = v.as_tensor();
    let v_new = ((v_old * (1.0 - rates.second as f64))? + (grad.sqr()? * rates.second as f64)?)?;
    let denom = ((v_new.sqrt()? / update.bias_correction2_sqrt as f64)? + update.eps as f64)?;
    let p = var.as_tensor();
    let p_new =
        ((p * update.decay_factor as f64)? - (m_new.div(&denom)? * update.step_size as f64)?)?;
    m.set(&m_new)?;
    v.set(&v_new)?;
    var.set(&p_new)?;
    Ok(())
}

/// Σ g² in f64 without allocating on CPU; partial sums are combined in a fixed order so the
/// result (and hence clipping) is deterministic.
fn sum_of_squares(grad: &Tensor) -> Result<f64> {
    {
        let (storage, layout) = grad.storage_and_layout();
        if let (Storage::Cpu(CpuStorage::F32(values)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            let partial: Vec<f64> = values[start..end]
                .par_chunks(CHUNK)
                .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                .collect();
            return Ok(partial.iter().sum());
        }
    }
    Ok(grad
        .to_dtype(DType::F64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()?)
}

/// Chunk length of the parallel CPU kernels.
const CHUNK: usize = 1 << 15;

fn f32_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("adam: {what} is not contiguous")))?;
    match storage {
        CpuStorage::F32(values) => Ok(&values[start..end]),
        _ => candle_core::bail!("adam: {what} is not f32"),
    }
}

fn f32_slice_mut<'a>(
    storage: &'a mut CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a mut [f32]> {
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("adam: {what} is not contiguous")))?;
    match storage {
        CpuStorage::F32(values) => Ok(&mut values[start..end]),
        _ => candle_core::bail!("adam: {what} is not f32"),
    }
}

/// Weights of the moment updates and the clipping scale of the gradient.
#[derive(Debug, Clone, Copy)]
struct MomentRates {
    /// 1 − β1: `m ← m + (1 − β1)·(g − m)` (torch's `lerp_`).
    first: f32,
    /// 1 − β2: `v ← β2·v + (1 − β2)·g²`.
    second: f32,
    grad_scale: f32,
}

/// `p ← p·decay − step_size · m / (sqrt(v) / sqrt(bc2) + eps)`.
#[derive(Debug, Clone, Copy)]
struct ParamUpdate {
    step_size: f32,
    bias_correction2_sqrt: f32,
    eps: f32,
    decay_factor: f32,
}

/// One fused pass over a CPU parameter: moments, then the weight, element by element.
struct FusedAdam {
    m: Mutex<Vec<f32>>,
    v: Mutex<Vec<f32>>,
    rates: MomentRates,
    update: ParamUpdate,
}

impl candle_core::InplaceOp2 for FusedAdam {
    fn name(&self) -> &'static str {
        "fused-adam"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let param = f32_slice_mut(s1, l1, "parameter")?;
        let grad = f32_slice(s2, l2, "gradient")?;
        let mut m = self
            .m
            .lock()
            .map_err(|_| candle_core::Error::Msg("adam: poisoned moments".into()))?;
        let mut v = self
            .v
            .lock()
            .map_err(|_| candle_core::Error::Msg("adam: poisoned moments".into()))?;
        if param.len() != grad.len() || param.len() != m.len() || param.len() != v.len() {
            candle_core::bail!("adam: parameter, gradient and moment sizes differ");
        }
        let (r, u) = (self.rates, self.update);
        param
            .par_chunks_mut(CHUNK)
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .zip(grad.par_chunks(CHUNK))
            .for_each(|(((p, m), v), g)| {
                for (((p, m), v), g) in p.iter_mut().zip(m).zip(v).zip(g) {
                    let g = g * r.grad_scale;
                    *m += r.first * (g - *m);
                    *v = *v * (1.0 - r.second) + r.second * g * g;
                    let denom = v.sqrt() / u.bias_correction2_sqrt + u.eps;
                    *p = *p * u.decay_factor - u.step_size * (*m / denom);
                }
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(values: &[f32]) -> Var {
        Var::from_tensor(&Tensor::new(values, &Device::Cpu).unwrap()).unwrap()
    }

    #[test]
    fn first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
        // Adam's first step is lr * g / (|g| + eps) ≈ lr * sign(g).
        let w = var(&[1.0, -2.0, 3.0]);
        let mut adam = Adam::new(
            vec![("w".into(), w.clone())],
            AdamConfig {
                lr: 0.1,
                ..Default::default()
            },
        )
        .unwrap();
        let g = Tensor::new(&[0.5f32, -4.0, 0.0], &Device::Cpu).unwrap();
        adam.step(&[Some(g)], 0.1, 0).unwrap();
        let out = w.as_tensor().to_vec1::<f32>().unwrap();
        assert!(
            (out[0] - 0.9).abs() < 1e-6 && (out[1] + 1.9).abs() < 1e-6 && out[2] == 3.0,
            "{out:?}"
        );
    }

    #[test]
    fn host_kernel_and_tensor_op_paths_agree_over_steps() {
        // f32 parameters take the fused host kernel, f64 ones the tensor-op path.
        let config = AdamConfig {
            lr: 0.01,
            weight_decay: 0.1,
            max_grad_norm: Some(0.5),
            ..Default::default()
        };
        let values = [0.3f32, -0.7, 1.1, 0.0];
        let a = var(&values);
        let b = Var::from_tensor(
            &Tensor::new(&values, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap(),
        )
        .unwrap();
        let mut host = Adam::new(vec![("w".into(), a.clone())], config).unwrap();
        let mut tensor_ops = Adam::new(vec![("w".into(), b.clone())], config).unwrap();
        assert!(matches!(host.params[0].moments, Moments::Host { .. }));
        assert!(matches!(
            tensor_ops.params[0].moments,
            Moments::Device { .. }
        ));
        for step in 0..5 {
            let g = Tensor::new(&[0.2f32 * step as f32, -1.0, 0.4, 3.0], &Device::Cpu).unwrap();
            let report = host.step(&[Some(g.clone())], 0.01, step).unwrap();
            let report64 = tensor_ops
                .step(&[Some(g.to_dtype(DType::F64).unwrap())], 0.01, step)
                .unwrap();
            assert!((report.grad_norm - report64.grad_norm).abs() < 1e-9);
        }
        let x = a.as_tensor().to_vec1::<f32>().unwrap();
        let y = b.as_tensor().to_vec1::<f64>().unwrap();
        for (p, q) in x.iter().zip(&y) {
            assert!((*p as f64 - q).abs() < 1e-6, "{x:?} vs {y:?}");
        }
        // Moments round-trip through a checkpoint.
        let saved = host.moments().unwrap();
        let mut restored = Adam::new(vec![("w".into(), var(&values))], config).unwrap();
        restored
            .restore(
                |n| {
                    saved
                        .iter()
                        .find(|(name, _, _)| name == n)
                        .map(|(_, m, v)| (m.clone(), v.clone()))
                },
                5,
            )
            .unwrap();
        let again = restored.moments().unwrap();
        assert_eq!(
            saved[0].1.to_vec1::<f32>().unwrap(),
            again[0].1.to_vec1::<f32>().unwrap()
        );
        assert_eq!(
            saved[0].2.to_vec1::<f32>().unwrap(),
            again[0].2.to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn non_finite_gradient_names_the_step_and_parameter() {
        let w = var(&[1.0]);
        let mut adam = Adam::new(
            vec![("h.0.mlp.c_fc.weight".into(), w)],
            AdamConfig::default(),
        )
        .unwrap();
        let g = Tensor::new(&[f32::NAN], &Device::Cpu).unwrap();
        let err = adam.step(&[Some(g)], 1e-3, 17).unwrap_err().to_string();
        assert!(
            err.contains("step 17") && err.contains("h.0.mlp.c_fc.weight"),
            "{err}"
        );
    }

    #[test]
    fn parameter_groups_exclude_biases_and_norms() {
        assert!(decays("h.0.attn.c_attn.weight"));
        assert!(decays("wte.weight"));
        assert!(!decays("h.0.attn.c_attn.bias"));
        assert!(!decays("h.3.ln_1.weight"));
        assert!(!decays("ln_f.weight"));
        assert!(!decays("decoder.layers.0.self_attn_layer_norm.weight"));
        assert!(!decays("decoder.final_layer_norm.weight"));
    }
}
