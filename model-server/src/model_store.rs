//! Model folders that travel over gRPC, so no client needs the server's disk: uploads
//! (`UploadModel`) are streamed to disk under `DATA_DIR/models/`, checked against the sizes and
//! SHA-256 digests their header announced, and committed atomically under the folder's content
//! digest; downloads (`DownloadModel`) are exported into `DATA_DIR/downloads/` and streamed
//! back file by file. The digest rule and the file-name rule are shared with the client
//! library, which computes the same digest before it uploads (to skip bytes the server has).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use w2s_proto::v1 as pb;

use crate::error::{ServiceError, ServiceResult};

/// Most files one model folder may hold (sharded checkpoints have a few dozen).
pub const MAX_MODEL_FILES: usize = 256;

/// Bytes per streamed data message.
pub const CHUNK_BYTES: usize = 1 << 20;

/// A plain file name: letters, digits, `.`, `_`, `-`, no leading dot, at most 255 bytes.
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The folder digest: hex SHA-256 of `name \t size \t sha256 \n` over the files sorted by name.
pub fn folder_digest(files: &[pb::ModelFile]) -> String {
    let mut sorted: Vec<&pb::ModelFile> = files.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut hasher = Sha256::new();
    for file in sorted {
        hasher.update(format!("{}\t{}\t{}\n", file.name, file.size, file.sha256).as_bytes());
    }
    hex(&hasher.finalize())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The plain files of a folder with their sizes and digests, sorted by name (hidden files, such
/// as export markers, are not part of a model).
pub fn describe_folder(dir: &Path) -> std::io::Result<Vec<pb::ModelFile>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with('.') || !entry.file_type()?.is_file() {
            continue;
        }
        if !is_plain_file_name(&name) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{}: not a plain file name", entry.path().display()),
            ));
        }
        let mut hasher = Sha256::new();
        let mut reader = std::fs::File::open(entry.path())?;
        let size = std::io::copy(&mut reader, &mut hasher)?;
        files.push(pb::ModelFile {
            name,
            size,
            sha256: hex(&hasher.finalize()),
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// Where uploaded folders live, by digest.
#[derive(Debug, Clone)]
pub struct ModelStore {
    root: PathBuf,
    downloads: PathBuf,
}

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

fn unique_suffix() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    )
}

impl ModelStore {
    /// Creates the folders and removes what an interrupted upload or download left behind.
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        let store = Self {
            root: data_dir.join("models"),
            downloads: data_dir.join("downloads"),
        };
        std::fs::create_dir_all(&store.root)?;
        for entry in std::fs::read_dir(&store.root)?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".partial-") {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let _ = std::fs::remove_dir_all(&store.downloads);
        std::fs::create_dir_all(&store.downloads)?;
        Ok(store)
    }

    /// The committed folder of `digest`, when the server holds it.
    pub fn folder(&self, digest: &str) -> Option<PathBuf> {
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let dir = self.root.join(digest.to_ascii_lowercase());
        dir.is_dir().then_some(dir)
    }

    /// Checks an upload's header and opens its temporary folder.
    pub fn begin(&self, files: Vec<pb::ModelFile>, max_bytes: u64) -> ServiceResult<Upload> {
        if files.is_empty() {
            return Err(ServiceError::invalid("files", "an upload needs files"));
        }
        if files.len() > MAX_MODEL_FILES {
            return Err(ServiceError::invalid(
                "files",
                format!(
                    "{} files exceed the limit of {MAX_MODEL_FILES}",
                    files.len()
                ),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        let mut total = 0u64;
        for (i, file) in files.iter().enumerate() {
            let field = format!("files[{i}]");
            if !is_plain_file_name(&file.name) {
                return Err(ServiceError::invalid(
                    format!("{field}.name"),
                    "must be a plain file name (letters, digits, `.`, `_`, `-`; no leading dot)",
                ));
            }
            if !names.insert(file.name.as_str()) {
                return Err(ServiceError::invalid(
                    format!("{field}.name"),
                    format!("`{}` appears twice", file.name),
                ));
            }
            if file.sha256.len() != 64 || !file.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(ServiceError::invalid(
                    format!("{field}.sha256"),
                    "must be 64 hex digits",
                ));
            }
            crate::paths::check_file_size(&file.name, &file.name, file.size)?;
            total = total.saturating_add(file.size);
        }
        if !names.contains("config.json") {
            return Err(ServiceError::invalid(
                "files",
                "a model folder needs config.json",
            ));
        }
        if total > max_bytes {
            return Err(ServiceError::invalid(
                "files",
                format!(
                    "{total} bytes exceed the server's limit of {max_bytes} (--max-model-upload-bytes)"
                ),
            ));
        }
        let dir = self.root.join(format!(".partial-{}", unique_suffix()));
        std::fs::create_dir_all(&dir).map_err(|e| io_error("creating the upload folder", e))?;
        Ok(Upload {
            digest: folder_digest(&files),
            files,
            dir,
            root: self.root.clone(),
            current: 0,
            written: 0,
            writer: None,
            hasher: Sha256::new(),
        })
    }

    /// A fresh folder for one download's export; removed by [`DownloadFolder`]'s drop.
    pub fn download_folder(&self) -> DownloadFolder {
        DownloadFolder(self.downloads.join(unique_suffix()))
    }
}

fn io_error(what: &str, e: std::io::Error) -> ServiceError {
    if e.raw_os_error() == Some(28) {
        // ENOSPC: the client can retry elsewhere; nothing is left behind.
        ServiceError::ResourceExhausted(format!("{what}: the server's disk is full"))
    } else {
        ServiceError::Internal(format!("{what}: {e}"))
    }
}

/// An upload being written. Dropping it before [`Upload::commit`] (an error, a client that
/// went away) removes everything it wrote.
pub struct Upload {
    digest: String,
    files: Vec<pb::ModelFile>,
    dir: PathBuf,
    root: PathBuf,
    /// Index of the file being written.
    current: usize,
    written: u64,
    writer: Option<std::io::BufWriter<std::fs::File>>,
    hasher: Sha256,
}

impl Upload {
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Appends the next bytes of the stream (they may span several files).
    pub fn write(&mut self, mut data: &[u8]) -> ServiceResult<()> {
        while !data.is_empty() {
            self.skip_empty_files()?;
            let Some(file) = self.files.get(self.current) else {
                return Err(ServiceError::invalid(
                    "data",
                    "more bytes than the header's files announce",
                ));
            };
            let room = (file.size - self.written) as usize;
            let (now, rest) = data.split_at(room.min(data.len()));
            if self.writer.is_none() {
                let path = self.dir.join(&file.name);
                let created = std::fs::File::create(&path)
                    .map_err(|e| io_error(&format!("creating {}", file.name), e))?;
                self.writer = Some(std::io::BufWriter::with_capacity(CHUNK_BYTES, created));
            }
            if let Some(writer) = &mut self.writer {
                writer
                    .write_all(now)
                    .map_err(|e| io_error(&format!("writing {}", file.name), e))?;
            }
            self.hasher.update(now);
            self.written += now.len() as u64;
            data = rest;
            if self.written == file.size {
                self.finish_file()?;
            }
        }
        Ok(())
    }

    /// Files of size zero are complete before any byte arrives.
    fn skip_empty_files(&mut self) -> ServiceResult<()> {
        while let Some(file) = self.files.get(self.current) {
            if file.size > 0 || self.writer.is_some() {
                break;
            }
            std::fs::File::create(self.dir.join(&file.name))
                .map_err(|e| io_error(&format!("creating {}", file.name), e))?;
            self.finish_file()?;
        }
        Ok(())
    }

    fn finish_file(&mut self) -> ServiceResult<()> {
        let file = &self.files[self.current];
        if let Some(writer) = self.writer.take() {
            let inner = writer
                .into_inner()
                .map_err(|e| io_error(&format!("writing {}", file.name), e.into_error()))?;
            inner
                .sync_all()
                .map_err(|e| io_error(&format!("syncing {}", file.name), e))?;
        }
        let digest = hex(&std::mem::take(&mut self.hasher).finalize());
        if digest != file.sha256.to_ascii_lowercase() {
            return Err(ServiceError::invalid(
                format!("files[{}].sha256", self.current),
                format!(
                    "`{}` arrived with SHA-256 {digest}, the header said {}",
                    file.name, file.sha256
                ),
            ));
        }
        self.current += 1;
        self.written = 0;
        Ok(())
    }

    /// After the stream ended normally: every file complete and checked, then the folder is
    /// renamed into place under its digest (an identical folder already there is kept).
    pub fn commit(self) -> ServiceResult<PathBuf> {
        self.commit_new().map(|committed| committed.folder)
    }

    /// As [`Upload::commit`], saying whether this upload put the folder there (so a load that
    /// then fails can take it away again: a failed upload leaves nothing).
    pub fn commit_new(mut self) -> ServiceResult<Committed> {
        self.skip_empty_files()?;
        if self.current < self.files.len() {
            let file = &self.files[self.current];
            return Err(ServiceError::invalid(
                "data",
                format!(
                    "the stream ended after {} of {} bytes of `{}`",
                    self.written, file.size, file.name
                ),
            ));
        }
        let target = self.root.join(&self.digest);
        let existing = |folder| Committed {
            folder,
            created: false,
        };
        if target.is_dir() {
            return Ok(existing(target)); // the drop removes our copy
        }
        match std::fs::rename(&self.dir, &target) {
            Ok(()) => {
                if let Ok(root) = std::fs::File::open(&self.root) {
                    let _ = root.sync_all();
                }
                Ok(Committed {
                    folder: target,
                    created: true,
                })
            }
            // A concurrent identical upload won the rename.
            Err(_) if target.is_dir() => Ok(existing(target)),
            Err(e) => Err(io_error("committing the upload", e)),
        }
    }
}

/// Where a committed upload lies, and whether this upload created it.
#[derive(Debug)]
pub struct Committed {
    pub folder: PathBuf,
    pub created: bool,
}

impl Drop for Upload {
    fn drop(&mut self) {
        self.writer = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A download's temporary export; removed when dropped (the stream ended or its client left).
pub struct DownloadFolder(pub PathBuf);

impl Drop for DownloadFolder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, bytes: &[u8]) -> pb::ModelFile {
        pb::ModelFile {
            name: name.into(),
            size: bytes.len() as u64,
            sha256: hex(&Sha256::digest(bytes)),
        }
    }

    #[test]
    fn an_upload_is_checked_committed_once_and_leaves_nothing_when_dropped() {
        let data = tempfile::tempdir().unwrap();
        let store = ModelStore::open(data.path()).unwrap();
        let files = vec![
            file("config.json", b"{}"),
            file("empty.txt", b""),
            file("model.safetensors", b"weights"),
        ];
        let digest = folder_digest(&files);
        assert!(store.folder(&digest).is_none());
        let mut upload = store.begin(files.clone(), 1 << 20).unwrap();
        // Bytes may split anywhere, across files.
        upload.write(b"{").unwrap();
        upload.write(b"}wei").unwrap();
        upload.write(b"ghts").unwrap();
        let dir = upload.commit().unwrap();
        assert_eq!(store.folder(&digest), Some(dir.clone()));
        assert_eq!(
            std::fs::read(dir.join("model.safetensors")).unwrap(),
            b"weights"
        );
        assert_eq!(describe_folder(&dir).unwrap(), files);
        // A corrupted byte is refused, a short stream too, and neither leaves anything.
        let mut upload = store.begin(files.clone(), 1 << 20).unwrap();
        let error = upload.write(b"{]").unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error}");
        drop(upload);
        let mut upload = store.begin(files.clone(), 1 << 20).unwrap();
        upload.write(b"{}wei").unwrap();
        assert!(upload.commit().is_err());
        let mut upload = store.begin(files, 1 << 20).unwrap();
        assert!(upload.write(b"{}weightsX").is_err());
        drop(upload);
        let leftovers: Vec<_> = std::fs::read_dir(data.path().join("models"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
    }

    #[test]
    fn a_full_disk_is_resource_exhausted_and_leaves_nothing() {
        let data = tempfile::tempdir().unwrap();
        let store = ModelStore::open(data.path()).unwrap();
        let files = vec![
            file("config.json", b"{}"),
            file("model.safetensors", b"weights"),
        ];
        let mut upload = store.begin(files, 1 << 20).unwrap();
        // The weights file lands on a device that is always full.
        std::os::unix::fs::symlink("/dev/full", upload.dir.join("model.safetensors")).unwrap();
        let error = upload.write(b"{}weights").unwrap_err();
        assert_eq!(error.code(), tonic::Code::ResourceExhausted, "{error}");
        drop(upload);
        let left = std::fs::read_dir(data.path().join("models"))
            .unwrap()
            .count();
        assert_eq!(left, 0, "temporary files left behind");
    }

    #[test]
    fn headers_are_validated() {
        let data = tempfile::tempdir().unwrap();
        let store = ModelStore::open(data.path()).unwrap();
        for (files, needle) in [
            (vec![file("model.safetensors", b"w")], "config.json"),
            (
                vec![file("config.json", b"{}"), file("../x", b"")],
                "plain file name",
            ),
            (
                vec![file("config.json", b"{}"), file(".hidden", b"")],
                "plain file name",
            ),
            (
                vec![file("config.json", b"{}"), file("config.json", b"")],
                "twice",
            ),
            (
                vec![file("config.json", &[0; 100])],
                "--max-model-upload-bytes",
            ),
        ] {
            let error = store.begin(files, 50).err().unwrap();
            assert!(error.to_string().contains(needle), "{error}");
        }
    }
}
