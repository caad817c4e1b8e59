//! Named weight tensors: reading them from HF checkpoint folders (single or sharded safetensors,
//! `pytorch_model.bin`), normalising HF name prefixes, random initialisation, saving, and a
//! content hash. Models are built from a [`Weights`] by name, so every source goes through one
//! path.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// Tensor name of the scalar reward head (`Linear(hidden, 1, bias=False)`), saved beside the
/// HF tensors in `model.safetensors`. `transformers` ignores it when loading a causal LM.
pub const REWARD_HEAD_TENSOR: &str = "reward_head.weight";

/// Tensor name of the reward read-out's log-likelihood scale (shape `[1]`): present only in
/// models whose reward adds `scale · Σ log p(token)` over the sequence to the head's score
/// (see `RewardReadout::LastTokenAndMeanLogprob`). Saved beside [`REWARD_HEAD_TENSOR`].
pub const REWARD_LOGLIK_SCALE_TENSOR: &str = "reward_head.loglik_scale";

/// Tensors written and read under their own names, without the architecture prefix.
fn is_unprefixed(name: &str) -> bool {
    name == REWARD_HEAD_TENSOR || name == REWARD_LOGLIK_SCALE_TENSOR || name == "lm_head.weight"
}

/// A set of named tensors in HF naming with the architecture prefix normalised:
/// GPT-2 names start at `wte`/`h.N`/`ln_f` (no `transformer.`), OPT names at `decoder.`
/// (no `model.`).
#[derive(Debug, Clone)]
pub struct Weights {
    tensors: BTreeMap<String, Tensor>,
    /// Where the tensors came from, for error messages ("model.safetensors", "random init").
    origin: String,
}

impl Weights {
    pub fn new(tensors: BTreeMap<String, Tensor>, origin: impl Into<String>) -> Self {
        Self {
            tensors,
            origin: origin.into(),
        }
    }

    /// Reads every tensor of the checkpoint in `dir` as `dtype` on `device`.
    pub fn from_folder(
        dir: &Path,
        config: &ModelConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let files = weight_files(dir)?;
        let mut tensors = BTreeMap::new();
        for file in &files {
            for (name, tensor) in read_weight_file(file, device)? {
                let tensor = tensor.to_dtype(dtype)?;
                if let Some(name) = normalise_name(config, &name) {
                    tensors.insert(name, tensor);
                }
            }
        }
        let origin = files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Ok(Self { tensors, origin })
    }

    /// Fresh weights for `config`, GPT-2 style: normal(0, 0.02) matrices and embeddings, zero
    /// biases, unit LayerNorm gains. Deterministic in `seed`.
    pub fn random_init(
        config: &ModelConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut tensors = BTreeMap::new();
        for (name, shape, init) in crate::model::parameter_layout(config) {
            let numel: usize = shape.iter().product();
            let values: Vec<f32> = match init {
                Init::Normal(std) => (0..numel)
                    .map(|_| std * standard_normal(&mut rng))
                    .collect(),
                Init::Zeros => vec![0.0; numel],
                Init::Ones => vec![1.0; numel],
            };
            let tensor = Tensor::from_vec(values, shape.as_slice(), device)?.to_dtype(dtype)?;
            tensors.insert(name, tensor);
        }
        Ok(Self {
            tensors,
            origin: format!("random init (seed {seed})"),
        })
    }

    /// Where the tensors came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn insert(&mut self, name: impl Into<String>, tensor: Tensor) {
        self.tensors.insert(name.into(), tensor);
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.tensors.iter()
    }

    /// The tensor `name` with the expected shape, or an error naming the tensor and file.
    pub fn get(&self, name: &str, expected: &[usize]) -> Result<Tensor> {
        let tensor = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                file: self.origin.clone(),
            })?;
        if tensor.dims() != expected {
            return Err(ModelError::TensorShape {
                name: name.to_string(),
                file: self.origin.clone(),
                expected: expected.to_vec(),
                actual: tensor.dims().to_vec(),
            });
        }
        Ok(tensor.clone())
    }

    /// Turns every tensor into a trainable [`Var`]; the returned weights share storage with the
    /// vars, so a model built from them receives gradients for each var.
    pub fn into_trainable(self) -> Result<(Self, Vec<(String, Var)>)> {
        let mut vars = Vec::with_capacity(self.tensors.len());
        let mut tensors = BTreeMap::new();
        for (name, tensor) in self.tensors {
            let var = Var::from_tensor(&tensor)?;
            tensors.insert(name.clone(), var.as_tensor().clone());
            vars.push((name, var));
        }
        Ok((
            Self {
                tensors,
                origin: self.origin,
            },
            vars,
        ))
    }

    /// Total number of scalars.
    pub fn parameter_count(&self) -> u64 {
        self.tensors.values().map(|t| t.elem_count() as u64).sum()
    }

    /// Bytes held by the tensors.
    pub fn memory_bytes(&self) -> u64 {
        self.tensors
            .values()
            .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
            .sum()
    }

    /// Hex SHA-256 over (name, shape, little-endian f32 values) in name order: equal weights give
    /// equal hashes whatever file format they came from.
    pub fn content_hash(&self) -> Result<String> {
        let mut hasher = Sha256::new();
        for (name, tensor) in &self.tensors {
            hasher.update(name.as_bytes());
            hasher.update([0u8]);
            for dim in tensor.dims() {
                hasher.update((*dim as u64).to_le_bytes());
            }
            let values = tensor
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            for value in values {
                hasher.update(value.to_le_bytes());
            }
        }
        Ok(format!("{:x}", hasher.finalize()))
    }

    /// Writes the tensors in HF naming (`transformer.`/`model.` prefixes restored) to a
    /// safetensors file. Tied LM heads are not written (transformers re-ties them).
    pub fn save_safetensors(&self, config: &ModelConfig, path: &Path) -> Result<()> {
        let prefix = match config {
            ModelConfig::Gpt2(_) => "transformer.",
            ModelConfig::Opt(_) => "model.",
        };
        let mut out = std::collections::HashMap::new();
        for (name, tensor) in &self.tensors {
            let hf_name = if is_unprefixed(name) {
                name.clone()
            } else {
                format!("{prefix}{name}")
            };
            out.insert(hf_name, tensor.to_dtype(DType::F32)?.contiguous()?);
        }
        let mut metadata = std::collections::HashMap::new();
        // transformers refuses safetensors files without `format: pt`.
        metadata.insert("format".to_string(), "pt".to_string());
        safetensors::serialize_to_file(&out, Some(metadata), path).map_err(|e| {
            ModelError::WeightsFile {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }
        })
    }
}

/// How a fresh parameter is initialised.
#[derive(Debug, Clone, Copy)]
pub enum Init {
    Normal(f32),
    Zeros,
    Ones,
}

fn standard_normal(rng: &mut ChaCha8Rng) -> f32 {
    // Box-Muller: keeps the dependency set small and the stream reproducible.
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// The weight files of a checkpoint folder, in the order they should be read.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Config {
                path: index.clone(),
                reason: e.to_string(),
            })?;
        let map = value
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| ModelError::Config {
                path: index.clone(),
                reason: "no object field `weight_map`".into(),
            })?;
        let shards: BTreeSet<String> = map
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        let mut files = Vec::new();
        for shard in shards {
            if shard.contains('/') || shard.contains("..") {
                return Err(ModelError::Config {
                    path: index.clone(),
                    reason: format!("shard name `{shard}` must be a plain file name"),
                });
            }
            let path = dir.join(&shard);
            if !path.is_file() {
                return Err(ModelError::WeightsFile {
                    path,
                    reason: format!("shard listed in {} is missing", index.display()),
                });
            }
            files.push(path);
        }
        return Ok(files);
    }
    let bin = dir.join("pytorch_model.bin");
    if bin.is_file() {
        return Ok(vec![bin]);
    }
    Err(ModelError::NoWeights {
        dir: dir.to_path_buf(),
    })
}

fn read_weight_file(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let weights_error = |e: candle_core::Error| ModelError::WeightsFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let is_safetensors = path.extension().is_some_and(|ext| ext == "safetensors");
    if is_safetensors {
        let map = candle_core::safetensors::load(path, device).map_err(weights_error)?;
        Ok(map.into_iter().collect())
    } else {
        let tensors = candle_core::pickle::read_all(path).map_err(weights_error)?;
        tensors
            .into_iter()
            .map(|(name, t)| Ok((name, t.to_device(device)?)))
            .collect()
    }
}

/// Maps an HF tensor name to this library's naming, or `None` for buffers the models do not use
/// (GPT-2's `attn.bias`/`attn.masked_bias` causal masks).
fn normalise_name(config: &ModelConfig, name: &str) -> Option<String> {
    if is_unprefixed(name) {
        return Some(name.to_string());
    }
    match config {
        ModelConfig::Gpt2(_) => {
            let name = name.strip_prefix("transformer.").unwrap_or(name);
            if name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") {
                return None;
            }
            Some(name.to_string())
        }
        ModelConfig::Opt(_) => {
            let name = name.strip_prefix("model.").unwrap_or(name);
            Some(name.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalised_for_both_prefix_styles() {
        let gpt2 = ModelConfig::preset("tiny-gpt2").unwrap();
        let opt = ModelConfig::preset("tiny-opt").unwrap();
        assert_eq!(
            normalise_name(&gpt2, "transformer.h.0.ln_1.weight").unwrap(),
            "h.0.ln_1.weight"
        );
        assert_eq!(
            normalise_name(&gpt2, "h.0.ln_1.weight").unwrap(),
            "h.0.ln_1.weight"
        );
        assert!(normalise_name(&gpt2, "h.0.attn.bias").is_none());
        assert_eq!(
            normalise_name(&opt, "model.decoder.embed_tokens.weight").unwrap(),
            "decoder.embed_tokens.weight"
        );
        assert_eq!(
            normalise_name(&opt, "decoder.embed_tokens.weight").unwrap(),
            "decoder.embed_tokens.weight"
        );
    }

    #[test]
    fn folder_without_weights_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = weight_files(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no weights found"), "{err}");
    }
}
