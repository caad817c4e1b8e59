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

#[cfg(test)]
mod tests {
    use super::*;

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
}
