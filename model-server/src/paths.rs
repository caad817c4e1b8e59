//! Confines client-supplied paths to a configured root: no `..` escapes, no symlink escapes.

use std::path::{Path, PathBuf};

use crate::error::{ServiceError, ServiceResult};

/// Resolves `requested` (absolute, or relative to `root`) and checks that the real path,
/// symlinks resolved, lies inside the real `root`.
pub fn resolve_in_root(root: &Path, requested: &str) -> ServiceResult<PathBuf> {
    if requested.is_empty() {
        return Err(ServiceError::invalid("path", "must not be empty"));
    }
    if requested.contains('\0') {
        return Err(ServiceError::invalid("path", "contains a NUL byte"));
    }
    let root = root.canonicalize().map_err(|e| {
        ServiceError::FailedPrecondition(format!("model root {}: {e}", root.display()))
    })?;
    let candidate = Path::new(requested);
    let joined = if candidate.is_absolute() {
        candidate.to_path_buf()
    } else {
        root.join(candidate)
    };
    let real = joined.canonicalize().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ServiceError::PathNotFound(requested.to_string()),
        _ => ServiceError::invalid("path", format!("{requested}: {e}")),
    })?;
    if !real.starts_with(&root) {
        return Err(ServiceError::OutsideRoot(requested.to_string()));
    }
    Ok(real)
}

/// Checks every entry of the model folder `folder` (already resolved inside `root`) that a load
/// could open: regular files and folders pass; a symlink must lead, symlinks resolved, to a
/// regular file or folder inside the real `root`; anything else (a FIFO, socket or device) is
/// refused. Opening a FIFO blocks the device thread until someone writes to it, and a link out
/// of the root reads a file the server was never given. `requested` names the folder in errors
/// (the client's words, never the server's absolute path).
/// Largest small JSON file of a model folder the server reads whole (`config.json`,
/// `generation_config.json`, `tokenizer_config.json`, `special_tokens_map.json`): real ones
/// are a few KiB.
pub const MAX_CONFIG_FILE_BYTES: u64 = 1 << 20;
/// Largest tokenizer file the server reads whole (`tokenizer.json`, `vocab.json`,
/// `merges.txt`): the largest public tokenizers are ~35 MB.
pub const MAX_TOKENIZER_FILE_BYTES: u64 = 64 << 20;

/// The most bytes the server reads of the folder file `name` into memory at once; `None` for
/// files it maps or streams (weights) or never opens.
fn whole_read_limit(name: &str) -> Option<u64> {
    match name {
        "config.json"
        | "generation_config.json"
        | "tokenizer_config.json"
        | "special_tokens_map.json" => Some(MAX_CONFIG_FILE_BYTES),
        "tokenizer.json" | "vocab.json" | "merges.txt" => Some(MAX_TOKENIZER_FILE_BYTES),
        _ => None,
    }
}

/// Refuses a file the server would read whole when it is larger than real ones ever are.
pub fn check_file_size(name: &str, shown: &str, bytes: u64) -> ServiceResult<()> {
    match whole_read_limit(name) {
        Some(limit) if bytes > limit => Err(ServiceError::invalid(
            "path",
            format!("{shown} is {bytes} bytes; the server reads at most {limit} bytes of it"),
        )),
        _ => Ok(()),
    }
}

pub fn check_folder_files(root: &Path, folder: &Path, requested: &str) -> ServiceResult<()> {
    let root = root.canonicalize().map_err(|e| {
        ServiceError::FailedPrecondition(format!("model root {}: {e}", root.display()))
    })?;
    let unreadable = |e: std::io::Error| ServiceError::invalid("path", format!("{requested}: {e}"));
    for entry in std::fs::read_dir(folder).map_err(unreadable)? {
        let entry = entry.map_err(unreadable)?;
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let name = format!("{requested}/{file_name}");
        let kind = entry.file_type().map_err(unreadable)?;
        if kind.is_dir() {
            continue;
        }
        if kind.is_file() {
            let bytes = entry.metadata().map_err(unreadable)?.len();
            check_file_size(&file_name, &name, bytes)?;
            continue;
        }
        if kind.is_symlink() {
            let real = entry.path().canonicalize().map_err(|e| {
                ServiceError::invalid(
                    "path",
                    format!("{name}: a link that cannot be followed ({e})"),
                )
            })?;
            if !real.starts_with(&root) {
                return Err(ServiceError::OutsideRoot(name));
            }
            let target = real.metadata().map_err(unreadable)?;
            if target.is_file() {
                check_file_size(&file_name, &name, target.len())?;
                continue;
            }
            if target.is_dir() {
                continue;
            }
        }
        return Err(ServiceError::invalid(
            "path",
            format!("{name} is not a regular file (a FIFO, socket or device cannot be loaded)"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_read_whole_are_refused_when_larger_than_real_ones() {
        let root = tempfile::tempdir().unwrap();
        let folder = root.path().join("m");
        std::fs::create_dir(&folder).unwrap();
        std::fs::write(folder.join("config.json"), "{}").unwrap();
        // Sparse: the size is what counts, not the bytes on disk.
        let weights = std::fs::File::create(folder.join("model.safetensors")).unwrap();
        weights.set_len(MAX_TOKENIZER_FILE_BYTES * 4).unwrap();
        assert!(check_folder_files(root.path(), &folder, "m").is_ok());
        let tokenizer = std::fs::File::create(folder.join("tokenizer.json")).unwrap();
        tokenizer.set_len(MAX_TOKENIZER_FILE_BYTES + 1).unwrap();
        let err = check_folder_files(root.path(), &folder, "m").unwrap_err();
        assert!(err.to_string().contains("m/tokenizer.json is"), "{err}");
        std::fs::remove_file(folder.join("tokenizer.json")).unwrap();
        let config = std::fs::File::create(folder.join("config.json")).unwrap();
        config.set_len(MAX_CONFIG_FILE_BYTES + 1).unwrap();
        let err = check_folder_files(root.path(), &folder, "m").unwrap_err();
        assert!(matches!(err, ServiceError::InvalidArgument { .. }), "{err}");
    }

    #[test]
    fn paths_inside_resolve_and_escapes_are_denied() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("m")).unwrap();
        assert!(resolve_in_root(root.path(), "m").is_ok());
        let abs = root.path().join("m");
        assert!(resolve_in_root(root.path(), abs.to_str().unwrap()).is_ok());
        let err = resolve_in_root(root.path(), "m/../..").unwrap_err();
        assert!(matches!(err, ServiceError::OutsideRoot(_)), "{err}");
        std::os::unix::fs::symlink(outside.path(), root.path().join("link")).unwrap();
        let err = resolve_in_root(root.path(), "link").unwrap_err();
        assert!(matches!(err, ServiceError::OutsideRoot(_)), "{err}");
        let err = resolve_in_root(root.path(), "nope").unwrap_err();
        assert!(matches!(err, ServiceError::PathNotFound(_)), "{err}");
    }

    #[test]
    fn model_folder_files_must_be_regular_and_inside_the_root() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let folder = root.path().join("m");
        std::fs::create_dir(&folder).unwrap();
        std::fs::write(folder.join("config.json"), "{}").unwrap();
        std::fs::write(root.path().join("shared.json"), "{}").unwrap();
        // A link to a file elsewhere inside the root (an HF cache's blobs) is fine.
        std::os::unix::fs::symlink(root.path().join("shared.json"), folder.join("vocab.json"))
            .unwrap();
        assert!(check_folder_files(root.path(), &folder, "m").is_ok());
        // A link out of the root is refused, named by the client's path only.
        std::fs::write(outside.path().join("secret"), "x").unwrap();
        let link = folder.join("tokenizer.json");
        std::os::unix::fs::symlink(outside.path().join("secret"), &link).unwrap();
        let err = check_folder_files(root.path(), &folder, "m").unwrap_err();
        assert!(
            matches!(&err, ServiceError::OutsideRoot(p) if p == "m/tokenizer.json"),
            "{err}"
        );
        std::fs::remove_file(&link).unwrap();
        // A dangling link and a FIFO are refused as client errors.
        std::os::unix::fs::symlink(root.path().join("gone"), &link).unwrap();
        let err = check_folder_files(root.path(), &folder, "m").unwrap_err();
        assert!(matches!(err, ServiceError::InvalidArgument { .. }), "{err}");
        std::fs::remove_file(&link).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(folder.join("model.safetensors"))
            .status()
            .unwrap();
        assert!(made.success());
        let err = check_folder_files(root.path(), &folder, "m").unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        assert!(
            !err.to_string().contains(&*root.path().to_string_lossy()),
            "{err}"
        );
    }
}
