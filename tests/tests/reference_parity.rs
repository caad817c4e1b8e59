//! Parity with `transformers`: the three reference checkpoints (GPT-2, pre-LN OPT, post-LN OPT
//! with projections; three weight formats; both tokenizer layouts) must give identical token
//! ids and per-token log-probs and last hidden states within 1e-4, alone and in a right-padded
//! batch.

use superficial_models::{CausalLm, LoadOptions, PaddedBatch, Tensor, TextTokenizer};
use superficial_tests::{REFERENCE_MODELS, load_reference, max_abs_diff, reference_model_dir};

const TOLERANCE: f64 = 1e-4;

fn load(name: &str) -> (CausalLm, TextTokenizer) {
    let dir = reference_model_dir(name);
    let model = CausalLm::from_folder(&dir, &LoadOptions::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let tokenizer =
        TextTokenizer::from_folder(&dir, model.config()).unwrap_or_else(|e| panic!("{name}: {e}"));
    (model, tokenizer)
}

#[test]
fn token_ids_match_autotokenizer() {
    for name in REFERENCE_MODELS {
        let (_, tokenizer) = load(name);
        for case in load_reference(name).texts {
            let ids = tokenizer.encode(&case.text).unwrap();
            assert_eq!(ids, case.token_ids, "{name}: {:?}", case.text);
        }
    }
}

#[test]
fn logprobs_and_hidden_states_match_transformers() {
    for name in REFERENCE_MODELS {
        let (model, _) = load(name);
        for case in load_reference(name).texts {
            let ids = Tensor::new(case.token_ids.as_slice(), model.device())
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let hidden = model.hidden_states(&ids).unwrap();
            let ours: Vec<Vec<f32>> = hidden.squeeze(0).unwrap().to_vec2().unwrap();
            assert_eq!(ours.len(), case.last_hidden.len(), "{name}");
            let hidden_diff = max_abs_diff(
                ours.iter().flatten().map(|&x| x as f64),
                case.last_hidden.iter().flatten().copied(),
            );
            assert!(
                hidden_diff <= TOLERANCE,
                "{name}: hidden diff {hidden_diff:e} for {:?}",
                case.text
            );

            let logprobs: Vec<f32> = model
                .token_logprobs(&ids)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(logprobs.len(), case.logprobs.len(), "{name}");
            let diff = max_abs_diff(
                logprobs.iter().map(|&x| x as f64),
                case.logprobs.iter().copied(),
            );
            assert!(
                diff <= TOLERANCE,
                "{name}: logprob diff {diff:e} for {:?}",
                case.text
            );
        }
    }
}

#[test]
fn right_padded_batch_equals_reference_per_sequence() {
    for name in REFERENCE_MODELS {
        let (model, _) = load(name);
        let reference = load_reference(name);
        let sequences: Vec<Vec<u32>> = reference
            .texts
            .iter()
            .map(|c| c.token_ids.clone())
            .collect();
        let pad = model.config().pad_token_id();
        let batch = PaddedBatch::new(&sequences, pad, model.device()).unwrap();
        let logprobs: Vec<Vec<f32>> = model.token_logprobs(&batch.ids).unwrap().to_vec2().unwrap();
        for (row, case) in logprobs.iter().zip(&reference.texts) {
            let n = case.logprobs.len();
            let diff = max_abs_diff(
                row[..n].iter().map(|&x| x as f64),
                case.logprobs.iter().copied(),
            );
            assert!(diff <= TOLERANCE, "{name}: batched logprob diff {diff:e}");
        }
    }
}
