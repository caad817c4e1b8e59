//! Exporting a model as an HF-layout folder: `config.json`, `model.safetensors` (the reward head,
//! if any, under `reward_head.weight`) and tokenizer files, written into a temporary sibling
//! folder and renamed into place so a crash never leaves a partial export.

use std::path::Path;

use superficial_models::{CausalLm, TextTokenizer};

use crate::checkpoint::{sibling, swap_in};
use crate::error::{Result, TrainError};

/// Marker file written into every export: only a folder that carries it may be replaced by a
/// later export, so an export can never delete a folder it did not create.
pub const EXPORT_MARKER: &str = ".superficial-export";

/// Writes `model` (and `tokenizer`) to `dir`: a new folder, or a replacement of a previous
/// export (a folder carrying [`EXPORT_MARKER`]). An existing file or any other folder is
/// refused untouched. The export is written next to `dir` and renamed into place; on failure
/// the temporary folder is removed.
pub fn save_hf_folder(
    model: &CausalLm,
    tokenizer: Option<&TextTokenizer>,
    dir: &Path,
) -> Result<()> {
    check_destination(dir)?;
    let tmp = sibling(dir, ".partial");
    let _ = std::fs::remove_dir_all(&tmp);
    let written = (|| -> Result<()> {
        model.save_folder(&tmp)?;
        if let Some(tokenizer) = tokenizer {
            tokenizer.save(&tmp)?;
        }
        let marker = tmp.join(EXPORT_MARKER);
        std::fs::write(&marker, b"written by superficial's HF export\n")
            .map_err(|e| TrainError::io(&marker, e))?;
        swap_in(&tmp, dir, &sibling(dir, ".replaced"))?;
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written
}

/// Refuses destinations that exist and are not a previous export.
pub fn check_destination(dir: &Path) -> Result<()> {
    let refuse = |reason: &str| {
        Err(TrainError::RefusedDestination {
            path: dir.to_path_buf(),
            reason: reason.to_string(),
        })
    };
    match std::fs::symlink_metadata(dir) {
        Err(_) => Ok(()),
        Ok(meta) if !meta.is_dir() => {
            refuse("exists and is not a folder; export into a new folder")
        }
        Ok(_) if dir.join(EXPORT_MARKER).is_file() => Ok(()),
        Ok(_) => refuse(
            "exists and is not a previous export (no .superficial-export marker); export into a new folder",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_new_folders_and_previous_exports_are_accepted() {
        let root = tempfile::tempdir().unwrap();
        assert!(check_destination(&root.path().join("new")).is_ok());
        let data = root.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::write(data.join("precious.jsonl"), "x").unwrap();
        let err = check_destination(&data).unwrap_err().to_string();
        assert!(err.contains("not a previous export"), "{err}");
        assert!(data.join("precious.jsonl").is_file());
        let file = root.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(
            check_destination(&file)
                .unwrap_err()
                .to_string()
                .contains("not a folder")
        );
        let export = root.path().join("export");
        std::fs::create_dir(&export).unwrap();
        std::fs::write(export.join(EXPORT_MARKER), "").unwrap();
        assert!(check_destination(&export).is_ok());
    }
}
