//! Durable datasets: rows uploaded by clients are validated and stored as JSONL under
//! `DATA_DIR/datasets/<id>/`, written to a temporary folder and renamed into place, so a
//! dataset either exists completely or not at all.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{ServiceError, ServiceResult};

/// One stored row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Row {
    Pair {
        #[serde(default)]
        prompt: String,
        chosen: String,
        rejected: String,
        /// Probability that `chosen` is the better response.
        label: f32,
        chosen_is_human_choice: bool,
        /// Whether the explicit conflict's goal favours `chosen`; `None`: the human-rejected
        /// response (official form). Not serialised when unset, so older rows hash the same.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conflict_prefers_chosen: Option<bool>,
    },
    Text {
        text: String,
    },
    Prompt {
        prompt: String,
    },
}

/// Why a dataset row is unusable (the caller adds its index).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidRow(pub String);

impl From<String> for InvalidRow {
    fn from(message: String) -> Self {
        Self(message)
    }
}

impl From<&str> for InvalidRow {
    fn from(message: &str) -> Self {
        Self(message.to_string())
    }
}

impl Row {
    pub fn kind(&self) -> RowKind {
        match self {
            Row::Pair { .. } => RowKind::Pairs,
            Row::Text { .. } => RowKind::Texts,
            Row::Prompt { .. } => RowKind::Prompts,
        }
    }

    /// Checks a row; the error names the problem (the caller adds the row index).
    pub fn validate(&self) -> Result<(), InvalidRow> {
        match self {
            Row::Pair {
                prompt,
                chosen,
                rejected,
                label,
                ..
            } => {
                if chosen.is_empty() || rejected.is_empty() {
                    return Err("chosen and rejected must be non-empty".into());
                }
                if !(0.0..=1.0).contains(label) {
                    return Err(format!("label {label} is outside [0, 1]").into());
                }
                if prompt.is_empty() {
                    for (side, text) in [("chosen", chosen), ("rejected", rejected)] {
                        match superficial_models::tokenizer::split_dialogue(text) {
                            Some((_, response)) if !response.is_empty() => {}
                            Some(_) => return Err(format!("{side} has an empty response").into()),
                            None => {
                                return Err(format!(
                                    "{side} has no \"\\n\\nAssistant:\" marker and no prompt is given"
                                ).into());
                            }
                        }
                    }
                }
                Ok(())
            }
            Row::Text { text } if text.is_empty() => Err("text must be non-empty".into()),
            Row::Prompt { prompt } if prompt.is_empty() => Err("prompt must be non-empty".into()),
            _ => Ok(()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RowKind {
    Pairs,
    Texts,
    Prompts,
}

/// What the store knows about a dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetMeta {
    pub id: String,
    pub name: String,
    pub kind: RowKind,
    pub rows: u64,
    pub content_hash: String,
}

/// Distinguishes the temporary folders of concurrent writers in one process.
static WRITERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// An entry is complete when both of its files are there (they are written before the folder
/// is renamed into place, so only older versions or manual damage leave one without the other).
fn is_complete(dir: &Path) -> bool {
    dir.join("meta.json").is_file() && dir.join("rows.jsonl").is_file()
}

/// An I/O failure while storing: a full disk or quota is the client's RESOURCE_EXHAUSTED.
fn storage_error(what: &str, e: std::io::Error) -> ServiceError {
    match e.kind() {
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
            ServiceError::ResourceExhausted(format!("{what}: {e}"))
        }
        _ => ServiceError::Internal(format!("{what}: {e}")),
    }
}

/// The datasets under a data directory.
#[derive(Debug, Clone)]
pub struct DatasetStore {
    root: PathBuf,
}

impl DatasetStore {
    /// Opens the store; sweeps temporary folders left by writers that died (kill -9, a full
    /// disk) and moves incomplete entries aside as `.broken-<id>` so they are neither listed
    /// nor served, and a new upload of the same rows can commit.
    pub fn new(data_dir: &Path) -> std::io::Result<Self> {
        let root = data_dir.join("datasets");
        std::fs::create_dir_all(&root)?;
        for entry in std::fs::read_dir(&root)?.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let path = entry.path();
            if name.starts_with('.') && name.ends_with(".partial") {
                let _ = std::fs::remove_dir_all(&path);
            } else if name.starts_with("ds-") && !is_complete(&path) {
                let _ = std::fs::rename(&path, root.join(format!(".broken-{name}")));
            }
        }
        Ok(Self { root })
    }

    /// Stores validated rows; the id is derived from the content, so uploading the same rows
    /// twice gives the same dataset. Nothing is committed once `abandoned` is set (the client
    /// went away while the rows were being written).
    pub fn store(
        &self,
        name: &str,
        rows: &[Row],
        abandoned: &std::sync::atomic::AtomicBool,
    ) -> ServiceResult<DatasetMeta> {
        let mut upload = self.begin(name)?;
        for row in rows {
            upload.push(row)?;
        }
        upload.commit(abandoned)
    }

    /// Starts an upload written to disk row by row (bounded memory); see [`DatasetUpload`].
    pub fn begin(&self, name: &str) -> ServiceResult<DatasetUpload> {
        // Each writer has its own temporary folder, so concurrent uploads of the same rows
        // never touch each other's files; the first rename wins and the others find it done.
        let tmp = self.root.join(format!(
            ".upload.{}.{}.partial",
            std::process::id(),
            WRITERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&tmp).map_err(|e| storage_error("starting an upload", e))?;
        let file = std::fs::File::create(tmp.join("rows.jsonl"));
        let mut upload = DatasetUpload {
            root: self.root.clone(),
            name: name.to_string(),
            tmp,
            writer: None,
            hasher: Sha256::new(),
            kind: None,
            rows: 0,
        };
        upload.writer = Some(std::io::BufWriter::new(
            file.map_err(|e| storage_error("starting an upload", e))?,
        ));
        Ok(upload)
    }

    pub fn list(&self) -> ServiceResult<Vec<DatasetMeta>> {
        let mut out = Vec::new();
        let entries =
            std::fs::read_dir(&self.root).map_err(|e| ServiceError::Internal(e.to_string()))?;
        for entry in entries.flatten() {
            if !is_complete(&entry.path()) {
                continue;
            }
            let path = entry.path().join("meta.json");
            if let Ok(text) = std::fs::read_to_string(&path)
                && let Ok(meta) = serde_json::from_str::<DatasetMeta>(&text)
            {
                out.push(meta);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// The rows of dataset `id`.
    pub fn rows(&self, id: &str) -> ServiceResult<(DatasetMeta, Vec<Row>)> {
        if !id.starts_with("ds-") || id.contains('/') || id.contains("..") {
            return Err(ServiceError::invalid(
                "dataset_ids",
                format!("`{id}` is not a dataset id"),
            ));
        }
        let dir = self.root.join(id);
        let meta_text = std::fs::read_to_string(dir.join("meta.json"))
            .map_err(|_| ServiceError::UnknownDataset(id.to_string()))?;
        let meta: DatasetMeta = serde_json::from_str(&meta_text)
            .map_err(|e| ServiceError::Internal(format!("dataset {id}: {e}")))?;
        let body = std::fs::read_to_string(dir.join("rows.jsonl"))
            .map_err(|e| ServiceError::Internal(format!("dataset {id}: {e}")))?;
        let rows = body
            .lines()
            .enumerate()
            .map(|(i, line)| {
                serde_json::from_str(line)
                    .map_err(|e| ServiceError::Internal(format!("dataset {id} row {i}: {e}")))
            })
            .collect::<ServiceResult<Vec<Row>>>()?;
        Ok((meta, rows))
    }
}

/// A dataset being uploaded: rows are validated and appended to a temporary `rows.jsonl` as
/// they arrive; [`DatasetUpload::commit`] names the dataset by the hash of those bytes and
/// renames the folder into place. Dropped before that (an invalid row, a full disk, a client
/// that went away), it removes everything it wrote.
pub struct DatasetUpload {
    root: PathBuf,
    name: String,
    tmp: PathBuf,
    writer: Option<std::io::BufWriter<std::fs::File>>,
    hasher: Sha256,
    kind: Option<RowKind>,
    rows: u64,
}

impl DatasetUpload {
    /// Validates and appends the next row (`rows[i]` in errors is its index in the upload).
    pub fn push(&mut self, row: &Row) -> ServiceResult<()> {
        use std::io::Write as _;
        let field = || format!("rows[{}]", self.rows);
        let kind = *self.kind.get_or_insert(row.kind());
        if row.kind() != kind {
            return Err(ServiceError::invalid(
                field(),
                "all rows of a dataset must be of one kind",
            ));
        }
        row.validate()
            .map_err(|e| ServiceError::invalid(field(), e))?;
        let mut line = serde_json::to_string(row).map_err(|e| ServiceError::invalid(field(), e))?;
        line.push('\n');
        self.hasher.update(line.as_bytes());
        let writer = self
            .writer
            .as_mut()
            .ok_or_else(|| ServiceError::Internal("the upload is closed".into()))?;
        writer
            .write_all(line.as_bytes())
            .map_err(|e| storage_error("storing an upload", e))?;
        self.rows += 1;
        Ok(())
    }

    /// Flushes, names and commits the dataset, unless `abandoned` is set by then.
    pub fn commit(
        mut self,
        abandoned: &std::sync::atomic::AtomicBool,
    ) -> ServiceResult<DatasetMeta> {
        let kind = self
            .kind
            .ok_or_else(|| ServiceError::invalid("rows", "a dataset needs at least one row"))?;
        let writer = self
            .writer
            .take()
            .ok_or_else(|| ServiceError::Internal("the upload is closed".into()))?;
        let file = writer
            .into_inner()
            .map_err(|e| storage_error("storing an upload", e.into_error()))?;
        file.sync_all()
            .map_err(|e| storage_error("storing an upload", e))?;
        drop(file);
        let hash = format!("{:x}", std::mem::take(&mut self.hasher).finalize());
        let id = format!("ds-{}", &hash[..16]);
        let meta = DatasetMeta {
            id: id.clone(),
            name: self.name.clone(),
            kind,
            rows: self.rows,
            content_hash: hash,
        };
        let dir = self.root.join(&id);
        if is_complete(&dir) {
            return Ok(meta); // the drop removes our copy
        }
        let meta_text = serde_json::to_string_pretty(&meta)
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        let what = format!("storing dataset {id}");
        {
            use std::io::Write as _;
            let mut file = std::fs::File::create(self.tmp.join("meta.json"))
                .map_err(|e| storage_error(&what, e))?;
            file.write_all(meta_text.as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(|e| storage_error(&what, e))?;
        }
        if abandoned.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ServiceError::FailedPrecondition(
                "the upload was abandoned by its client; nothing was stored".into(),
            ));
        }
        match std::fs::rename(&self.tmp, &dir) {
            Ok(()) => Ok(meta),
            // Another writer committed the same content first.
            Err(_) if is_complete(&dir) => Ok(meta),
            Err(e) => Err(storage_error(&what, e)),
        }
    }

    /// Test hook: sends the rows to another file (e.g. `/dev/full`, to play a full disk).
    #[cfg(test)]
    fn redirect_rows_to(&mut self, path: &Path) {
        self.writer = Some(std::io::BufWriter::new(
            std::fs::OpenOptions::new().write(true).open(path).unwrap(),
        ));
    }
}

impl Drop for DatasetUpload {
    fn drop(&mut self) {
        self.writer = None;
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static KEPT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    fn rows(n: usize) -> Vec<Row> {
        (0..n)
            .map(|i| Row::Text {
                text: format!("row {i}"),
            })
            .collect()
    }

    #[test]
    fn concurrent_identical_uploads_all_succeed_into_one_usable_dataset() {
        let dir = tempfile::tempdir().unwrap();
        let store = DatasetStore::new(dir.path()).unwrap();
        let data = rows(2000);
        let ids: Vec<String> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|_| scope.spawn(|| store.store("same", &data, &KEPT).map(|m| m.id)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap().unwrap())
                .collect()
        });
        assert!(ids.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(store.list().unwrap().len(), 1);
        assert_eq!(store.rows(&ids[0]).unwrap().1, data);
        let names: Vec<String> = std::fs::read_dir(dir.path().join("datasets"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(names, vec![ids[0].clone()], "leftovers: {names:?}");
    }

    #[test]
    fn reopening_sweeps_leftovers_and_sets_broken_entries_aside() {
        let dir = tempfile::tempdir().unwrap();
        let store = DatasetStore::new(dir.path()).unwrap();
        let meta = store.store("x", &rows(3), &KEPT).unwrap();
        let root = dir.path().join("datasets");
        // A writer killed mid-upload, and an entry with meta.json but no rows.
        std::fs::create_dir(root.join(".ds-0000.1.0.partial")).unwrap();
        std::fs::remove_file(root.join(&meta.id).join("rows.jsonl")).unwrap();
        assert!(store.list().unwrap().is_empty());
        let store = DatasetStore::new(dir.path()).unwrap();
        assert!(!root.join(".ds-0000.1.0.partial").exists());
        assert!(!root.join(&meta.id).exists());
        // The same upload commits again and is usable.
        let again = store.store("x", &rows(3), &KEPT).unwrap();
        assert_eq!(again.id, meta.id);
        assert_eq!(store.rows(&meta.id).unwrap().1, rows(3));
    }

    #[test]
    fn a_full_disk_is_resource_exhausted_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = DatasetStore::new(dir.path()).unwrap();
        let mut upload = store.begin("x").unwrap();
        upload.redirect_rows_to(Path::new("/dev/full"));
        let data = rows(20_000); // more than the write buffer holds
        let error = match data.iter().try_for_each(|row| upload.push(row)) {
            Err(e) => {
                drop(upload); // as the upload handler does on an error
                e
            }
            Ok(()) => upload.commit(&KEPT).unwrap_err(),
        };
        assert_eq!(error.code(), tonic::Code::ResourceExhausted, "{error}");
        let left = std::fs::read_dir(dir.path().join("datasets"))
            .unwrap()
            .count();
        assert_eq!(left, 0, "temporary files left behind");
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn an_abandoned_upload_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = DatasetStore::new(dir.path()).unwrap();
        let abandoned = std::sync::atomic::AtomicBool::new(true);
        let err = store.store("x", &rows(3), &abandoned).unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
        assert!(store.list().unwrap().is_empty());
        let left = std::fs::read_dir(dir.path().join("datasets"))
            .unwrap()
            .count();
        assert_eq!(left, 0, "temporary files left behind");
    }
}
