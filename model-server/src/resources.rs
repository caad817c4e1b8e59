//! What the server can hold: the host's memory (CPU models live in it), the estimated size of
//! a model before it is loaded, and the refusal of a load that cannot fit, so that a model too
//! large for the machine is a clear RESOURCE_EXHAUSTED instead of the kernel's OOM killer; and
//! the disk an export (ExportModel, DownloadModel's staging) needs, refused the same way before
//! a byte is written rather than failing half-way with a full disk.

use std::path::Path;

use superficial_models::{DType, ModelConfig, model::parameter_count};

use crate::error::{ServiceError, ServiceResult};

/// `(MemTotal, MemAvailable)` of `/proc/meminfo`, in bytes; `None` where there is no such file.
pub fn host_memory() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kib| kib * 1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

/// Bytes the weights of a model with `config` take in `dtype`.
pub fn weight_bytes(config: &ModelConfig, dtype: DType) -> u64 {
    (parameter_count(config) as u64).saturating_mul(dtype.size_in_bytes() as u64)
}

/// The config of a model folder, for an estimate before loading (errors are left to the load).
pub fn folder_config(dir: &Path) -> Option<ModelConfig> {
    ModelConfig::from_file(&dir.join("config.json")).ok()
}

/// Refuses a CPU load whose weights exceed the memory available now (the load needs at least
/// that much again while it reads the file, so this is a floor, not a guarantee).
pub fn check_fits(
    name: &str,
    config: &ModelConfig,
    dtype: DType,
    on_cpu: bool,
) -> ServiceResult<()> {
    if !on_cpu {
        return Ok(());
    }
    let Some((_, available)) = host_memory() else {
        return Ok(());
    };
    let needed = weight_bytes(config, dtype);
    if needed > available {
        return Err(ServiceError::ResourceExhausted(format!(
            "model `{name}` needs {:.2} GiB for its weights; {:.2} GiB of memory is available",
            needed as f64 / (1u64 << 30) as f64,
            available as f64 / (1u64 << 30) as f64
        )));
    }
    Ok(())
}

/// Disk an export must leave free beyond its own files, so that an export never fills the
/// data disk that checkpoints, uploads and run outputs share.
pub const DISK_RESERVE_BYTES: u64 = 256 << 20;

/// What an export writes besides the weights (config, tokenizer, marker): a generous bound, the
/// largest tokenizer file a folder may hold.
const EXPORT_OVERHEAD_BYTES: u64 = crate::paths::MAX_TOKENIZER_FILE_BYTES;

/// Bytes an HF export of a model with `config` in `dtype` writes, at most.
pub fn export_bytes(config: &ModelConfig, dtype: DType) -> u64 {
    weight_bytes(config, dtype).saturating_add(EXPORT_OVERHEAD_BYTES)
}

/// Free bytes on the file system that holds `dir` (or its nearest existing ancestor, for a
/// folder not yet created); `None` where that cannot be asked.
pub fn free_disk(dir: &Path) -> Option<u64> {
    let existing = dir.ancestors().find(|p| p.exists())?;
    fs2::available_space(existing).ok()
}

/// Refuses an export of `needed` bytes into `dir` that would leave less than
/// [`DISK_RESERVE_BYTES`] free.
pub fn check_disk(name: &str, dir: &Path, needed: u64) -> ServiceResult<()> {
    let Some(free) = free_disk(dir) else {
        return Ok(());
    };
    if needed.saturating_add(DISK_RESERVE_BYTES) > free {
        return Err(ServiceError::ResourceExhausted(format!(
            "exporting `{name}` writes up to {:.2} GiB; the server's disk has {:.2} GiB free and \
             keeps {} MiB in reserve",
            needed as f64 / (1u64 << 30) as f64,
            free as f64 / (1u64 << 30) as f64,
            DISK_RESERVE_BYTES >> 20
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_read_and_a_model_larger_than_memory_is_refused() {
        let (total, available) = host_memory().expect("/proc/meminfo");
        assert!(total >= available && available > 0);
        let small = ModelConfig::preset("tiny-gpt2").unwrap();
        check_fits("small", &small, DType::F32, true).unwrap();
        // OPT-6.7b in f32 is 27 GB: more than this machine's memory in CI (and if not, the
        // check still has to pass, which it then does).
        let big = ModelConfig::preset("opt-6.7b").unwrap();
        let verdict = check_fits("big", &big, DType::F32, true);
        assert_eq!(verdict.is_err(), weight_bytes(&big, DType::F32) > available);
        if let Err(e) = verdict {
            assert_eq!(e.code(), tonic::Code::ResourceExhausted);
            assert!(e.to_string().contains("GiB"), "{e}");
        }
        check_fits("big", &big, DType::F32, false).unwrap();
    }

    #[test]
    fn an_export_larger_than_the_free_disk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let not_yet = dir.path().join("a/b/c");
        let free = free_disk(&not_yet).expect("statvfs of the temp dir");
        assert!(free > 0);
        check_disk("small", &not_yet, 1 << 20).unwrap_or_else(|e| {
            // Only a nearly full disk refuses a megabyte.
            assert!(free < DISK_RESERVE_BYTES + (1 << 20), "{e}");
        });
        let e = check_disk("huge", &not_yet, free).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.to_string().contains("free"), "{e}");
        let gpt2 = ModelConfig::preset("gpt2").unwrap();
        assert!(export_bytes(&gpt2, DType::F32) > weight_bytes(&gpt2, DType::F32));
    }
}
