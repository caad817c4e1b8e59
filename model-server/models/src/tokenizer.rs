//! Tokenization as the reference pipeline does it: loading an HF tokenizer (`tokenizer.json`, or
//! GPT-2-style `vocab.json` + `merges.txt`), the special-token behaviour of each architecture
//! (OPT prepends `</s>`, GPT-2 adds nothing), the prompt/response split of an HH dialogue, and
//! truncation to `max_ctx`.
//!
//! Truncation rule (the official code's): a sequence longer than `max_ctx` keeps its **last**
//! `max_ctx` tokens. For a dialogue, the response mask is recomputed after truncation: if the
//! response alone is shorter than `max_ctx`, the last `len(response)` positions are response;
//! otherwise every kept position is.

use std::path::{Path, PathBuf};

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::config::{Architecture, ModelConfig};
use crate::error::{ModelError, Result};

/// The marker that starts the assistant's turn; the response begins after its last occurrence.
pub const ASSISTANT_MARKER: &str = "\n\nAssistant:";

/// Special tokens recognised in text when building a tokenizer from `vocab.json` +
/// `merges.txt` (each only if the vocabulary has it).
const KNOWN_SPECIAL_TOKENS: &[&str] = &["<|endoftext|>", "<s>", "</s>", "<pad>", "<unk>"];

/// A tokenizer that encodes exactly as the reference `AutoTokenizer` does with its default
/// special tokens.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    /// A BOS id this wrapper prepends: set for `vocab.json` + `merges.txt` folders whose
    /// `tokenizer_config.json` has `add_bos_token` (OPT's), as transformers does.
    bos_to_prepend: Option<u32>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("bos_to_prepend", &self.bos_to_prepend)
            .finish()
    }
}

fn tokenizer_error(dir: &Path, reason: impl ToString) -> ModelError {
    ModelError::Tokenizer {
        dir: dir.to_path_buf(),
        reason: reason.to_string(),
    }
}

impl TextTokenizer {
    /// Loads the tokenizer files of an HF folder of a model with `config`.
    pub fn from_folder(dir: &Path, config: &ModelConfig) -> Result<Self> {
        let tokenizer_json = dir.join("tokenizer.json");
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        let mut tokenizer = if tokenizer_json.is_file() {
            // tokenizer.json is complete: its post-processor already says which special tokens
            // are added (transformers ignores `add_bos_token` when this file exists).
            let inner =
                Tokenizer::from_file(&tokenizer_json).map_err(|e| tokenizer_error(dir, e))?;
            Self {
                inner,
                bos_to_prepend: None,
            }
        } else if vocab.is_file() && merges.is_file() {
            let inner = byte_level_bpe(dir, &vocab, &merges)?;
            let settings = TokenizerSettings::read(dir, config.architecture())?;
            let bos_to_prepend = if settings.add_bos_token {
                Some(inner.token_to_id(&settings.bos_token).ok_or_else(|| {
                    tokenizer_error(
                        dir,
                        format!(
                            "bos token `{}` is not in the vocabulary",
                            settings.bos_token
                        ),
                    )
                })?)
            } else {
                None
            };
            Self {
                inner,
                bos_to_prepend,
            }
        } else {
            return Err(tokenizer_error(
                dir,
                "no tokenizer.json and no vocab.json + merges.txt",
            ));
        };
        tokenizer
            .inner
            .with_truncation(None)
            .map_err(|e| tokenizer_error(dir, e))?;
        tokenizer.inner.with_padding(None);
        Ok(tokenizer)
    }

    /// Parses the text of a `tokenizer.json` (as [`TextTokenizer::from_folder`] reads the file).
    pub fn from_json_str(json: &str) -> Result<Self> {
        let mut inner: Tokenizer = json
            .parse()
            .map_err(|e| tokenizer_error(Path::new("tokenizer_json"), e))?;
        inner
            .with_truncation(None)
            .map_err(|e| tokenizer_error(Path::new("tokenizer_json"), e))?;
        inner.with_padding(None);
        Ok(Self {
            inner,
            bos_to_prepend: None,
        })
    }

    /// A byte-level tokenizer with no merges: token `i` is byte `i` (GPT-2's byte-to-unicode
    /// alphabet, so it saves as an ordinary `tokenizer.json`). Built-in presets use it, so any
    /// model can take text without tokenizer files.
    pub fn bytes() -> Result<Self> {
        let vocab: tokenizers::models::bpe::Vocab = (0u32..256)
            .map(|b| (byte_to_unicode(b as u8).to_string(), b))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, Vec::new())
            .build()
            .map_err(|e| tokenizer_error(Path::new("<bytes>"), e))?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevel::new(false, true, true)));
        Ok(Self {
            inner,
            bos_to_prepend: None,
        })
    }

    /// Trains a GPT-2-style byte-level BPE with `vocab_size` entries on `texts` (for corpora
    /// that have no pretrained tokenizer). `special_tokens` get the first ids, in order. The
    /// result is deterministic in its input and saves as an ordinary `tokenizer.json`.
    pub fn train_byte_level_bpe<'a>(
        texts: impl Iterator<Item = &'a str> + Send,
        vocab_size: usize,
        special_tokens: &[&str],
    ) -> Result<Self> {
        use tokenizers::models::TrainerWrapper;
        use tokenizers::models::bpe::BpeTrainer;
        let dir = Path::new("<training>");
        let specials: Vec<AddedToken> = special_tokens
            .iter()
            .map(|t| AddedToken::from(t.to_string(), true))
            .collect();
        let mut trainer: TrainerWrapper = BpeTrainer::builder()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(specials)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build()
            .into();
        let mut inner = Tokenizer::new(BPE::default());
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevel::new(false, true, true)));
        inner
            .train(&mut trainer, texts)
            .map_err(|e| tokenizer_error(dir, e))?;
        Ok(Self {
            inner,
            bos_to_prepend: None,
        })
    }

    /// Wraps a tokenizer built in code (e.g. trained on a corpus).
    pub fn from_tokenizer(inner: Tokenizer, bos_to_prepend: Option<u32>) -> Self {
        Self {
            inner,
            bos_to_prepend,
        }
    }

    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text` with the tokenizer's default special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| ModelError::InvalidInput(format!("cannot tokenize text: {e}")))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        ids.extend(self.bos_to_prepend);
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| ModelError::InvalidInput(format!("cannot decode ids: {e}")))
    }

    /// Writes `tokenizer.json` (with the BOS rule made explicit in its post-processor) and a
    /// minimal `tokenizer_config.json`, so that this project and `transformers` load the folder
    /// to the same encoder.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let inner = self.with_bos_template(dir)?;
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        inner
            .save(dir.join("tokenizer.json"), false)
            .map_err(|e| tokenizer_error(dir, e))?;
        let config = serde_json::json!({ "tokenizer_class": "GPT2Tokenizer" });
        let path = dir.join("tokenizer_config.json");
        std::fs::write(&path, config.to_string()).map_err(|e| ModelError::io(&path, e))
    }

    /// The text of the `tokenizer.json` that [`TextTokenizer::save`] writes (what
    /// [`TextTokenizer::from_json_str`] reads back).
    pub fn to_json_string(&self) -> Result<String> {
        let dir = Path::new("tokenizer_json");
        self.with_bos_template(dir)?
            .to_string(false)
            .map_err(|e| tokenizer_error(dir, e))
    }

    /// The inner tokenizer with a prepended BOS expressed as a post-processor, so that the
    /// saved file is complete on its own.
    fn with_bos_template(&self, dir: &Path) -> Result<Tokenizer> {
        let mut inner = self.inner.clone();
        if let Some(bos) = self.bos_to_prepend {
            let token = inner
                .id_to_token(bos)
                .ok_or_else(|| tokenizer_error(dir, format!("bos id {bos} has no token")))?;
            let template = TemplateProcessing::builder()
                .try_single(format!("{token} $A"))
                .map_err(|e| tokenizer_error(dir, e))?
                .special_tokens(vec![(token, bos)])
                .build()
                .map_err(|e| tokenizer_error(dir, e))?;
            inner.with_post_processor(Some(template));
        }
        Ok(inner)
    }

    /// Encodes a whole text and keeps its last `max_ctx` tokens. Returns the ids and whether
    /// anything was cut.
    pub fn encode_truncated(&self, text: &str, max_ctx: usize) -> Result<(Vec<u32>, bool)> {
        let ids = self.encode(text)?;
        Ok(keep_last(ids, max_ctx))
    }

    /// Encodes `prompt + response` as one text, as the reference reward model reads it, keeping
    /// the last `max_ctx` tokens. Returns the ids, the index of the first response token (the
    /// first token whose text starts at or after the prompt's end, from the one encoding's
    /// offsets: a token that straddles the boundary counts as prompt; 0 with an empty prompt)
    /// and whether anything was cut.
    pub fn encode_whole_text(
        &self,
        prompt: &str,
        response: &str,
        max_ctx: usize,
    ) -> Result<(Vec<u32>, usize, bool)> {
        let encoding = self
            .inner
            .encode(format!("{prompt}{response}"), true)
            .map_err(|e| ModelError::InvalidInput(format!("cannot tokenize text: {e}")))?;
        let prepended = usize::from(self.bos_to_prepend.is_some());
        let start = if prompt.is_empty() {
            0
        } else {
            prepended
                + encoding
                    .get_offsets()
                    .iter()
                    .position(|&(from, _)| from >= prompt.len())
                    .unwrap_or(encoding.len())
        };
        let mut ids = Vec::with_capacity(encoding.len() + prepended);
        ids.extend(self.bos_to_prepend);
        ids.extend_from_slice(encoding.get_ids());
        let total = ids.len();
        let (ids, truncated) = keep_last(ids, max_ctx);
        let cut = total - ids.len();
        Ok((ids, start.saturating_sub(cut), truncated))
    }

    /// [`Self::encode_whole_text`] of a whole HH dialogue, split at its last
    /// `"\n\nAssistant:"` (without the marker, the whole text is the response).
    pub fn encode_whole_dialogue(
        &self,
        text: &str,
        max_ctx: usize,
    ) -> Result<(Vec<u32>, usize, bool)> {
        let (prompt, response) = split_dialogue(text).unwrap_or(("", text));
        self.encode_whole_text(prompt, response, max_ctx)
    }

    /// Encodes an HH dialogue as the reference preference pipeline does: prompt (up to and
    /// including the last `"\n\nAssistant:"`) and response encoded separately, each with the
    /// default special tokens, concatenated, then truncated (see the module docs).
    pub fn encode_dialogue(&self, text: &str, max_ctx: usize) -> Result<EncodedDialogue> {
        let (prompt, response) = split_dialogue(text).ok_or_else(|| {
            ModelError::InvalidInput(format!(
                "dialogue has no {ASSISTANT_MARKER:?} marker: {:?}",
                preview(text)
            ))
        })?;
        self.encode_prompt_response(prompt, response, max_ctx)
    }

    /// Encodes an already split prompt and response (see [`Self::encode_dialogue`]).
    pub fn encode_prompt_response(
        &self,
        prompt: &str,
        response: &str,
        max_ctx: usize,
    ) -> Result<EncodedDialogue> {
        if response.is_empty() {
            return Err(ModelError::InvalidInput(format!(
                "empty response after prompt {:?}",
                preview(prompt)
            )));
        }
        let prompt_ids = self.encode(prompt)?;
        let response_ids = self.encode(response)?;
        Ok(EncodedDialogue::assemble(prompt_ids, response_ids, max_ctx))
    }
}

/// A dialogue's token ids with a per-token response mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedDialogue {
    pub ids: Vec<u32>,
    /// `response_mask[i]` is true when `ids[i]` belongs to the response.
    pub response_mask: Vec<bool>,
    pub truncated: bool,
}

impl EncodedDialogue {
    /// Index of the first response token (the length when there is none).
    pub fn response_start(&self) -> usize {
        self.response_mask.iter().take_while(|m| !**m).count()
    }

    /// Concatenates prompt and response ids and applies the truncation rule.
    pub fn assemble(prompt_ids: Vec<u32>, response_ids: Vec<u32>, max_ctx: usize) -> Self {
        let response_len = response_ids.len();
        let mut ids = prompt_ids;
        let prompt_len = ids.len();
        ids.extend(response_ids);
        if ids.len() > max_ctx {
            let (ids, _) = keep_last(ids, max_ctx);
            let response_kept = response_len.min(max_ctx);
            let mut response_mask = vec![false; max_ctx - response_kept];
            response_mask.extend(std::iter::repeat_n(true, response_kept));
            Self {
                ids,
                response_mask,
                truncated: true,
            }
        } else {
            let mut response_mask = vec![false; prompt_len];
            response_mask.extend(std::iter::repeat_n(true, response_len));
            Self {
                ids,
                response_mask,
                truncated: false,
            }
        }
    }

    /// Mask over next-token log-probs (length n-1): entry `i` is whether `ids[i+1]` is a
    /// response token.
    pub fn logprob_mask(&self) -> Vec<bool> {
        self.response_mask.iter().skip(1).copied().collect()
    }
}

/// Splits an HH dialogue at the last `"\n\nAssistant:"`: `(prompt including the marker,
/// response)`.
pub fn split_dialogue(text: &str) -> Option<(&str, &str)> {
    let at = text.rfind(ASSISTANT_MARKER)? + ASSISTANT_MARKER.len();
    Some((&text[..at], &text[at..]))
}

fn keep_last(ids: Vec<u32>, max_ctx: usize) -> (Vec<u32>, bool) {
    if ids.len() > max_ctx {
        let cut = ids.len() - max_ctx;
        (ids[cut..].to_vec(), true)
    } else {
        (ids, false)
    }
}

fn preview(text: &str) -> String {
    text.chars().take(60).collect()
}

/// The special-token settings of a `vocab.json` + `merges.txt` folder (`tokenizer_config.json`).
/// Without that file the architecture decides: OPT prepends `</s>`, GPT-2 adds nothing.
struct TokenizerSettings {
    add_bos_token: bool,
    bos_token: String,
}

impl TokenizerSettings {
    fn read(dir: &Path, architecture: Architecture) -> Result<Self> {
        let mut settings = match architecture {
            Architecture::Gpt2 => Self {
                add_bos_token: false,
                bos_token: "<|endoftext|>".into(),
            },
            Architecture::Opt => Self {
                add_bos_token: true,
                bos_token: "</s>".into(),
            },
        };
        let path: PathBuf = dir.join("tokenizer_config.json");
        if !path.is_file() {
            return Ok(settings);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| ModelError::Config {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if let Some(add) = value.get("add_bos_token").and_then(|v| v.as_bool()) {
            settings.add_bos_token = add;
        }
        // `bos_token` is a string or an AddedToken object with a `content` field.
        let bos = value.get("bos_token").and_then(|v| {
            v.as_str().map(str::to_string).or_else(|| {
                v.get("content")
                    .and_then(|c| c.as_str())
                    .map(str::to_string)
            })
        });
        if let Some(bos) = bos {
            settings.bos_token = bos;
        }
        Ok(settings)
    }
}

/// Builds the GPT-2 byte-level BPE from `vocab.json` + `merges.txt`.
fn byte_level_bpe(dir: &Path, vocab: &Path, merges: &Path) -> Result<Tokenizer> {
    let to_str = |p: &Path| {
        p.to_str()
            .map(str::to_string)
            .ok_or_else(|| tokenizer_error(dir, "path is not UTF-8"))
    };
    let bpe = BPE::from_file(&to_str(vocab)?, &to_str(merges)?)
        .build()
        .map_err(|e| tokenizer_error(dir, e))?;
    let mut tokenizer = Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tokenizer.with_decoder(Some(ByteLevel::new(false, true, true)));
    let specials: Vec<AddedToken> = KNOWN_SPECIAL_TOKENS
        .iter()
        .filter(|t| tokenizer.token_to_id(t).is_some())
        .map(|t| AddedToken::from(t.to_string(), true))
        .collect();
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| tokenizer_error(dir, e))?;
    Ok(tokenizer)
}

/// GPT-2's reversible byte-to-unicode map (printable bytes map to themselves).
fn byte_to_unicode(byte: u8) -> char {
    let printable = |b: u8| {
        (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    if printable(byte) {
        return char::from(byte);
    }
    let offset = (0..byte).filter(|b| !printable(*b)).count() as u32;
    char::from_u32(256 + offset).unwrap_or('?')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trained_bpe_is_deterministic_round_trips_and_reloads() {
        let corpus: Vec<String> = (0..200)
            .map(|i| format!("\n\nHuman: is the {} safe to touch?\n\nAssistant: the {} is hot, do not touch it {i}", i % 7, i % 5))
            .collect();
        let train = || {
            TextTokenizer::train_byte_level_bpe(
                corpus.iter().map(String::as_str),
                320,
                &["<|endoftext|>"],
            )
            .unwrap()
        };
        let (a, b) = (train(), train());
        let text = "\n\nHuman: is the stove safe?\n\nAssistant: no, it is hot";
        assert_eq!(a.encode(text).unwrap(), b.encode(text).unwrap());
        assert_eq!(a.decode(&a.encode(text).unwrap()).unwrap(), text);
        assert!(
            a.encode(text).unwrap().len() < text.len() / 2,
            "merges were learned"
        );
        assert_eq!(a.inner().token_to_id("<|endoftext|>"), Some(0));
        assert!(a.vocab_size() <= 320);
        let dir = tempfile::tempdir().unwrap();
        a.save(dir.path()).unwrap();
        let config = ModelConfig::preset("tiny-gpt2").unwrap();
        let back = TextTokenizer::from_folder(dir.path(), &config).unwrap();
        assert_eq!(back.encode(text).unwrap(), a.encode(text).unwrap());
    }

    #[test]
    fn byte_tokenizer_maps_each_byte_to_its_value() {
        let t = TextTokenizer::bytes().unwrap();
        assert_eq!(t.vocab_size(), 256);
        assert_eq!(t.encode("Az !").unwrap(), vec![65, 122, 32, 33]);
        assert_eq!(t.encode("é").unwrap(), vec![0xC3, 0xA9]);
        assert_eq!(
            t.decode(&t.encode("héllo\n\nAssistant:").unwrap()).unwrap(),
            "héllo\n\nAssistant:"
        );
    }

    #[test]
    fn split_is_at_the_last_marker() {
        let text = "\n\nHuman: hi\n\nAssistant: a\n\nHuman: more\n\nAssistant: b";
        let (prompt, response) = split_dialogue(text).unwrap();
        assert!(prompt.ends_with("more\n\nAssistant:"));
        assert_eq!(response, " b");
        assert!(split_dialogue("no marker").is_none());
    }

    #[test]
    fn assemble_without_truncation_masks_the_response() {
        let d = EncodedDialogue::assemble(vec![1, 2, 3], vec![4, 5], 10);
        assert_eq!(d.ids, vec![1, 2, 3, 4, 5]);
        assert_eq!(d.response_mask, vec![false, false, false, true, true]);
        assert_eq!(d.logprob_mask(), vec![false, false, true, true]);
        assert!(!d.truncated);
    }

    #[test]
    fn truncation_keeps_the_end_and_the_response() {
        let d = EncodedDialogue::assemble(vec![1, 2, 3, 4], vec![5, 6], 4);
        assert_eq!(d.ids, vec![3, 4, 5, 6]);
        assert_eq!(d.response_mask, vec![false, false, true, true]);
        assert!(d.truncated);
        let long = EncodedDialogue::assemble(vec![1, 2], vec![3, 4, 5, 6, 7], 3);
        assert_eq!(long.ids, vec![5, 6, 7]);
        assert_eq!(long.response_mask, vec![true, true, true]);
    }

    #[test]
    fn whole_text_marks_where_the_response_starts() {
        let t = TextTokenizer::bytes().unwrap();
        let prompt = "\n\nHuman: hi\n\nAssistant:";
        let (ids, start, cut) = t.encode_whole_text(prompt, " ok", 100).unwrap();
        assert_eq!(ids, t.encode(&format!("{prompt} ok")).unwrap());
        assert_eq!((start, cut), (prompt.len(), false));
        // Truncation moves the start with the cut, and past it the whole row is response.
        let (ids, start, cut) = t.encode_whole_text(prompt, " ok", 5).unwrap();
        assert_eq!((ids.len(), start, cut), (5, 2, true));
        let (_, start, _) = t.encode_whole_text(prompt, " ok", 2).unwrap();
        assert_eq!(start, 0);
        assert_eq!(t.encode_whole_text("", "x", 10).unwrap().1, 0);
        let dialogue = format!("{prompt} ok");
        assert_eq!(
            t.encode_whole_dialogue(&dialogue, 100).unwrap().1,
            prompt.len()
        );
        assert_eq!(t.encode_whole_dialogue("no marker", 100).unwrap().1, 0);
    }

    #[test]
    fn keep_last_cuts_from_the_front() {
        assert_eq!(keep_last(vec![1, 2, 3], 2), (vec![2, 3], true));
        assert_eq!(keep_last(vec![1, 2], 2), (vec![1, 2], false));
    }
}
