//! Training checkpoints: weights, optimizer moments and the loop position, written atomically
//! (a new folder is renamed into place) so that a crash never leaves a half-written checkpoint
//! that looks complete; and [`write_file_atomic`], the one atomic file writer of the workspace
//! (job records, run folders).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

const WEIGHTS: &str = "weights.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";

/// Writes `bytes` to `path` atomically: a temporary sibling `.NAME.tmp`, fsync, rename. A
/// crash leaves the old file or the new one, never a torn one (a leftover `.tmp` is the
/// caller's to sweep).
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)
}

/// The loop position stored with a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimizer steps completed.
    pub step: usize,
    pub total_steps: usize,
    /// Examples consumed so far (the data position; with per-epoch reshuffling the order of
    /// each epoch is a pure function of (seed, epoch), so this plus the seed is the RNG state).
    pub examples_seen: usize,
    pub seed: u64,
    /// Hash of the run's configuration, data and initial weights; a checkpoint of another run is
    /// refused.
    pub fingerprint: String,
}

/// What a checkpoint holds.
pub struct Checkpoint {
    pub state: CheckpointState,
    pub weights: HashMap<String, Tensor>,
    pub moments: HashMap<String, (Tensor, Tensor)>,
}

fn checkpoint_error(path: &Path, reason: impl ToString) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// `dir` with `suffix` appended to its name (a temporary or previous version beside it).
pub(crate) fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(suffix);
    dir.with_file_name(name)
}

/// Writes a checkpoint to `dir`, replacing any previous one atomically.
pub fn save(
    dir: &Path,
    state: &CheckpointState,
    weights: &[(String, Tensor)],
    moments: &[(String, Tensor, Tensor)],
) -> Result<()> {
    let tmp = sibling(dir, ".tmp");
    let old = sibling(dir, ".old");
    let _ = std::fs::remove_dir_all(&tmp);
    let written = (|| {
        std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        let weight_map: HashMap<String, Tensor> = weights.iter().cloned().collect();
        candle_core::safetensors::save(&weight_map, tmp.join(WEIGHTS))?;
        let mut moment_map = HashMap::new();
        for (name, m, v) in moments {
            moment_map.insert(format!("m.{name}"), m.clone());
            moment_map.insert(format!("v.{name}"), v.clone());
        }
        candle_core::safetensors::save(&moment_map, tmp.join(OPTIMIZER))?;
        let text = serde_json::to_string_pretty(state).map_err(|e| checkpoint_error(dir, e))?;
        std::fs::write(tmp.join(STATE), text).map_err(|e| TrainError::io(tmp.join(STATE), e))?;
        // On disk before the rename makes it the checkpoint.
        for file in [WEIGHTS, OPTIMIZER, STATE] {
            let path = tmp.join(file);
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| TrainError::io(&path, e))?;
        }
        Ok(())
    })();
    if let Err(e) = written {
        // A full disk (or any failure) leaves no half-written checkpoint behind.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    swap_in(&tmp, dir, &old)
}

/// Moves the finished folder `tmp` to `dir`. A previous `dir` moves aside to `old` first and is
/// removed last, so a crash between the renames leaves it there rather than deleted.
pub(crate) fn swap_in(tmp: &Path, dir: &Path, old: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(old);
    if dir.exists() {
        std::fs::rename(dir, old).map_err(|e| TrainError::io(dir, e))?;
    }
    std::fs::rename(tmp, dir).map_err(|e| TrainError::io(dir, e))?;
    let _ = std::fs::remove_dir_all(old);
    Ok(())
}

/// Reads the checkpoint in `dir` (or the previous one if a crash interrupted a replacement).
/// `Ok(None)` when there is none.
pub fn load(dir: &Path, device: &Device) -> Result<Option<Checkpoint>> {
    let old = sibling(dir, ".old");
    let dir = if dir.join(STATE).is_file() {
        dir.to_path_buf()
    } else if old.join(STATE).is_file() {
        old
    } else {
        return Ok(None);
    };
    let text =
        std::fs::read_to_string(dir.join(STATE)).map_err(|e| TrainError::io(dir.join(STATE), e))?;
    let state: CheckpointState =
        serde_json::from_str(&text).map_err(|e| checkpoint_error(&dir, e))?;
    let weights = candle_core::safetensors::load(dir.join(WEIGHTS), device)
        .map_err(|e| checkpoint_error(&dir.join(WEIGHTS), e))?;
    let mut raw = candle_core::safetensors::load(dir.join(OPTIMIZER), device)
        .map_err(|e| checkpoint_error(&dir.join(OPTIMIZER), e))?;
    let mut moments = HashMap::new();
    let names: Vec<String> = raw
        .keys()
        .filter_map(|k| k.strip_prefix("m.").map(str::to_string))
        .collect();
    for name in names {
        let m = raw.remove(&format!("m.{name}"));
        let v = raw.remove(&format!("v.{name}"));
        match (m, v) {
            (Some(m), Some(v)) => {
                moments.insert(name, (m, v));
            }
            _ => {
                return Err(checkpoint_error(
                    &dir,
                    format!("incomplete moments for {name}"),
                ));
            }
        }
    }
    Ok(Some(Checkpoint {
        state,
        weights,
        moments,
    }))
}
