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

/// The datasets under a data directory.
#[derive(Debug, Clone)]
pub struct DatasetStore {
    root: PathBuf,
}

impl DatasetStore {
    pub fn new(data_dir: &Path) -> std::io::Result<Self> {
        let root = data_dir.join("datasets");
        std::fs::create_dir_all(&root)?;
        Ok(Self { root })
    }

    /// Stores validated rows; the id is derived from the content, so uploading the same rows
    /// twice gives the same dataset.
    pub fn store(&self, name: &str, rows: &[Row]) -> ServiceResult<DatasetMeta> {
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
        if dir.join("meta.json").is_file() {
            return Ok(meta);
        }
        let tmp = self.root.join(format!(".{id}.partial"));
        let io = |e: std::io::Error| ServiceError::Internal(format!("storing dataset {id}: {e}"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io)?;
        std::fs::write(tmp.join("rows.jsonl"), body).map_err(io)?;
        let meta_text = serde_json::to_string_pretty(&meta)
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        std::fs::write(tmp.join("meta.json"), meta_text).map_err(io)?;
        std::fs::rename(&tmp, &dir).map_err(io)?;
        Ok(meta)
    }

    pub fn list(&self) -> ServiceResult<Vec<DatasetMeta>> {
        let mut out = Vec::new();
        let entries =
            std::fs::read_dir(&self.root).map_err(|e| ServiceError::Internal(e.to_string()))?;
        for entry in entries.flatten() {
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
