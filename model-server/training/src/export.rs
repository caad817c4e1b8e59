//! Exporting a model as an HF-layout folder: `config.json`, `model.safetensors` (the reward head,
//! if any, under `reward_head.weight`) and tokenizer files, written into a temporary sibling
//! folder and renamed into place so a crash never leaves a partial export.

use std::path::Path;

use superficial_models::{CausalLm, TextTokenizer};

use crate::error::{Result, TrainError};

/// Writes `model` (and `tokenizer`) to `dir`, replacing an existing export.
pub fn save_hf_folder(
    model: &CausalLm,
    tokenizer: Option<&TextTokenizer>,
    dir: &Path,
) -> Result<()> {
    let mut tmp_name = dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    tmp_name.push(".partial");
    let tmp = dir.with_file_name(tmp_name);
    let _ = std::fs::remove_dir_all(&tmp);
    model.save_folder(&tmp)?;
    if let Some(tokenizer) = tokenizer {
        tokenizer.save(&tmp)?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| TrainError::io(dir, e))?;
    Ok(())
}
