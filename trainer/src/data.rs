//! HH-format preference data (`{"chosen": dialogue, "rejected": dialogue}` per JSONL line),
//! validated line by line before any training: a malformed line, a missing field or an empty
//! response (nothing after the last `"\n\nAssistant:"`) stops the study with `file:line` and
//! the reason.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use superficial_models::tokenizer::split_dialogue;

/// A bad line (or an unreadable file).
#[derive(Debug, thiserror::Error)]
#[error("{}:{line}: {reason}", .path.display())]
pub struct DataError {
    pub path: PathBuf,
    /// 1-based line number (0 when the file itself could not be read).
    pub line: usize,
    pub reason: String,
}

/// One of the two responses of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    Chosen,
    Rejected,
}

/// One preference pair in human order.
#[derive(Debug, Clone, PartialEq)]
pub struct HhPair {
    /// 0-based row in the file.
    pub row: usize,
    pub chosen: String,
    pub rejected: String,
    /// Which response complies with the request (optional `"compliant": "chosen"|"rejected"`
    /// field; HH-RLHF does not carry it, the sandbox's splits do). The compliance form of the
    /// explicit conflict needs it.
    pub compliant: Option<Side>,
}

/// Reads the first `limit` rows (all when `None`) of an HH JSONL file, validating each.
pub fn read_hh_jsonl(path: &Path, limit: Option<usize>) -> Result<Vec<HhPair>, DataError> {
    let error = |line: usize, reason: String| DataError {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| error(0, e.to_string()))?;
    let mut pairs = Vec::new();
    for (index, line) in std::io::BufReader::new(file).lines().enumerate() {
        if limit.is_some_and(|n| pairs.len() >= n) {
            break;
        }
        let number = index + 1;
        let line = line.map_err(|e| error(number, e.to_string()))?;
        if line.trim().is_empty() {
            return Err(error(number, "empty line".into()));
        }
        let value: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| error(number, format!("malformed JSON: {e}")))?;
        let field = |name: &str| -> Result<String, DataError> {
            match value.get(name) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(_) => Err(error(number, format!("field `{name}` is not a string"))),
                None => Err(error(number, format!("missing field `{name}`"))),
            }
        };
        let chosen = field("chosen")?;
        let rejected = field("rejected")?;
        for (name, text) in [("chosen", &chosen), ("rejected", &rejected)] {
            match split_dialogue(text) {
                None => {
                    return Err(error(
                        number,
                        format!("`{name}` has no \"\\n\\nAssistant:\" turn"),
                    ));
                }
                // Whitespace-only responses occur in the official data (silent refusals) and
                // still encode to tokens; only a missing response is an error.
                Some((_, "")) => {
                    return Err(error(number, format!("`{name}` has an empty response")));
                }
                Some(_) => {}
            }
        }
        let compliant = match value.get("compliant") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) if s == "chosen" => Some(Side::Chosen),
            Some(serde_json::Value::String(s)) if s == "rejected" => Some(Side::Rejected),
            Some(other) => {
                return Err(error(
                    number,
                    format!("field `compliant` is {other}, expected \"chosen\" or \"rejected\""),
                ));
            }
        };
        pairs.push(HhPair {
            row: pairs.len(),
            chosen,
            rejected,
            compliant,
        });
    }
    if let Some(n) = limit
        && pairs.len() < n
    {
        return Err(error(
            pairs.len() + 1,
            format!("the file has {} rows, {n} were asked for", pairs.len()),
        ));
    }
    Ok(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(lines: &[&str]) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        use std::io::Write;
        for line in lines {
            writeln!(file, "{line}").unwrap();
        }
        file
    }

    const GOOD: &str = r#"{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"}"#;

    #[test]
    fn reads_valid_rows_in_order() {
        let file = write(&[GOOD, GOOD]);
        let pairs = read_hh_jsonl(file.path(), None).unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[1].row, 1);
        assert_eq!(pairs[1].compliant, None);
        let marked = GOOD.replace('}', r#", "compliant": "rejected"}"#);
        let file = write(&[&marked]);
        let pairs = read_hh_jsonl(file.path(), None).unwrap();
        assert_eq!(pairs[0].compliant, Some(Side::Rejected));
        assert_eq!(read_hh_jsonl(file.path(), Some(1)).unwrap().len(), 1);
    }

    #[test]
    fn bad_lines_name_file_line_and_reason() {
        let cases: [(&str, &str); 6] = [
            (
                r#"{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c", "compliant": "both"}"#,
                "field `compliant` is \"both\"",
            ),
            ("{not json", "malformed JSON"),
            (
                r#"{"chosen": "\n\nHuman: a\n\nAssistant: b"}"#,
                "missing field `rejected`",
            ),
            (
                r#"{"chosen": 3, "rejected": "x"}"#,
                "`chosen` is not a string",
            ),
            (
                r#"{"chosen": "no turn", "rejected": "\n\nHuman: a\n\nAssistant: b"}"#,
                "no \"\\n\\nAssistant:\" turn",
            ),
            (
                r#"{"chosen": "\n\nHuman: a\n\nAssistant:", "rejected": "\n\nHuman: a\n\nAssistant: b"}"#,
                "empty response",
            ),
        ];
        for (bad, reason) in cases {
            let file = write(&[GOOD, bad]);
            let err = read_hh_jsonl(file.path(), None).unwrap_err().to_string();
            let expected = format!("{}:2: ", file.path().display());
            assert!(err.starts_with(&expected) && err.contains(reason), "{err}");
        }
    }

    #[test]
    fn too_few_rows_is_an_error() {
        let file = write(&[GOOD]);
        let err = read_hh_jsonl(file.path(), Some(3)).unwrap_err().to_string();
        assert!(err.contains("has 1 rows, 3 were asked for"), "{err}");
    }

    #[test]
    fn the_hh_splits_are_valid() {
        // Placed by tools/fetch-hh-data.sh (tools/test.sh runs it).
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/hh-harmless-single-turn");
        for split in ["harmless_train_gt", "harmless_train_w2s", "harmless_test"] {
            let pairs = read_hh_jsonl(&dir.join(format!("{split}.jsonl")), None).unwrap();
            assert_eq!(pairs.len(), 4000, "{split}");
        }
    }
}
