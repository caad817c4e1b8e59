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

impl Row {
    pub fn kind(&self) -> RowKind {
        match self {
            Row::Pair { .. } => RowKind::Pairs,
            Row::Text { .. } => RowKind::Texts,
            Row::Prompt { .. } => RowKind::Prompts,
        }
    }

    /// Checks a row; the error names the problem (the caller adds the row index).
    pub fn validate(&self) -> Result<(), String> {
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
                    return Err(format!("label {label} is outside [0, 1]"));
                }
                if prompt.is_empty() {
                    for (side, text) in [("chosen", chosen), ("rejected", rejected)] {
                        match superficial_models::tokenizer::split_dialogue(text) {
                            Some((_, response)) if !response.is_empty() => {}
                            Some(_) => return Err(format!("{side} has an empty response")),
                            None => {
                                return Err(format!(
                                    "{side} has no \"\\n\\nAssistant:\" marker and no prompt is given"
                                ));
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

/// Writes an entry's two files into `tmp` and flushes them to disk.
fn write_entry(tmp: &Path, rows: &[u8], meta: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    std::fs::create_dir_all(tmp)?;
    for (name, bytes) in [("rows.jsonl", rows), ("meta.json", meta)] {
        let mut file = std::fs::File::create(tmp.join(name))?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    Ok(())
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
        let kind = rows
            .first()
            .map(Row::kind)
            .ok_or_else(|| ServiceError::invalid("rows", "a dataset needs at least one row"))?;
        let mut body = String::new();
        for (i, row) in rows.iter().enumerate() {
            if row.kind() != kind {
                return Err(ServiceError::invalid(
                    format!("rows[{i}]"),
                    "all rows of a dataset must be of one kind",
                ));
            }
            row.validate()
                .map_err(|e| ServiceError::invalid(format!("rows[{i}]"), e))?;
            body.push_str(
                &serde_json::to_string(row)
                    .map_err(|e| ServiceError::invalid(format!("rows[{i}]"), e))?,
            );
            body.push('\n');
        }
        let hash = format!("{:x}", Sha256::digest(body.as_bytes()));
        let id = format!("ds-{}", &hash[..16]);
        let meta = DatasetMeta {
            id: id.clone(),
            name: name.to_string(),
            kind,
            rows: rows.len() as u64,
            content_hash: hash,
        };
        let dir = self.root.join(&id);
        if is_complete(&dir) {
            return Ok(meta);
        }
        let meta_text = serde_json::to_string_pretty(&meta)
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        // Each writer has its own temporary folder, so concurrent uploads of the same rows
        // never touch each other's files; the first rename wins and the others find it done.
        let tmp = self.root.join(format!(
            ".{id}.{}.{}.partial",
            std::process::id(),
            WRITERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let written = write_entry(&tmp, body.as_bytes(), meta_text.as_bytes());
        if abandoned.load(std::sync::atomic::Ordering::SeqCst) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(ServiceError::FailedPrecondition(
                "the upload was abandoned by its client; nothing was stored".into(),
            ));
        }
        let committed = written.and_then(|()| match std::fs::rename(&tmp, &dir) {
            Ok(()) => Ok(()),
            // Another writer committed the same content first.
            Err(_) if is_complete(&dir) => Ok(()),
            Err(e) => Err(e),
        });
        let _ = std::fs::remove_dir_all(&tmp);
        committed.map_err(|e| match e.kind() {
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
                ServiceError::ResourceExhausted(format!("storing dataset {id}: {e}"))
            }
            _ => ServiceError::Internal(format!("storing dataset {id}: {e}")),
        })?;
        Ok(meta)
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
