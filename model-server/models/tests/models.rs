//! Behaviour of the models that does not need reference fixtures: gradients reach every
//! trainable tensor, padding and batching do not change per-sequence results, cached decoding
//! equals full re-forwards, chunked scoring equals one whole pass, and saved folders reload to
//! the same weights.

use superficial_models::generation::{
    GenerationConfig, SamplingConfig, generate, greedy_without_cache,
};
use superficial_models::{
    CausalLm, ChunkedOutput, ChunkedScoring, LoadOptions, ModelConfig, PackedSequences,
    PaddedBatch, PrefixSharing, REWARD_HEAD_TENSOR, REWARD_LOGLIK_SCALE_TENSOR, RewardReadout,
    Tensor, Weights,
};

const ARCHITECTURES: &[&str] = &["tiny-gpt2", "tiny-opt", "tiny-opt-post-ln"];

fn tiny(preset: &str, seed: u64) -> CausalLm {
    CausalLm::random_init(
        ModelConfig::preset(preset).unwrap(),
        seed,
        &LoadOptions::default(),
    )
    .unwrap()
}

/// Where each of [`sequences`]' responses starts (the third has a single token).
const STARTS: [usize; 4] = [3, 1, 0, 6];

fn sequences() -> Vec<Vec<u32>> {
    // Id 0 appears inside sequences on purpose: it is a real token (GPT-2's "!"), never padding.
    vec![
        vec![5, 0, 17, 300, 2, 9, 0],
        vec![1, 2, 3],
        vec![0],
        vec![44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54],
    ]
}

/// Every variable's gradient exists and has a finite, nonzero norm.
fn assert_every_tensor_has_a_gradient(
    preset: &str,
    vars: &[(String, candle_core::Var)],
    grads: &candle_core::backprop::GradStore,
) {
    for (name, var) in vars {
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{preset}: no gradient for {name}"));
        let norm = grad
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{preset}: gradient of {name} is {norm}"
        );
    }
}

#[test]
fn every_trainable_tensor_receives_a_nonzero_gradient() {
    for preset in ARCHITECTURES {
        let model = tiny(preset, 1)
            .with_fresh_reward_head(2, RewardReadout::LastToken)
            .unwrap();
        let config = model.config().clone();
        let (weights, vars) = model.weights().clone().into_trainable().unwrap();
        let model = CausalLm::from_weights(config, weights).unwrap();
        let batch = PaddedBatch::new(&sequences(), 1, model.device()).unwrap();
        let hidden = model.hidden_states(&batch.ids).unwrap();
        // Language-model and reward paths together, so the head and the tied embedding count.
        let lm = model
            .logits_from_hidden(&hidden)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let reward = model
            .rewards_from_hidden(&hidden, &batch.lengths)
            .unwrap()
            .sum_all()
            .unwrap();
        let loss = (lm + reward).unwrap();
        let grads = loss.backward().unwrap();
        assert!(!vars.is_empty());
        assert_every_tensor_has_a_gradient(preset, &vars, &grads);
    }
}

#[test]
fn loglik_readout_gives_every_tensor_and_its_scale_a_gradient() {
    for preset in ARCHITECTURES {
        let model = tiny(preset, 1)
            .with_fresh_reward_head(2, RewardReadout::LastTokenAndMeanLogprob)
            .unwrap();
        assert_eq!(
            model.reward_readout(),
            RewardReadout::LastTokenAndMeanLogprob
        );
        let config = model.config().clone();
        let (weights, vars) = model.weights().clone().into_trainable().unwrap();
        let model = CausalLm::from_weights(config, weights).unwrap();
        let batch = PaddedBatch::new(&sequences(), 1, model.device()).unwrap();
        // The reward alone: the log-likelihood term must reach the body and the (tied) head.
        let loss = model.rewards(&batch, &STARTS).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        assert!(vars.iter().any(|(n, _)| n == REWARD_LOGLIK_SCALE_TENSOR));
        assert_every_tensor_has_a_gradient(preset, &vars, &grads);
    }
}

#[test]
fn mean_logprob_readout_adds_the_scaled_response_mean_to_the_head_score() {
    for preset in ARCHITECTURES {
        let plain = tiny(preset, 3)
            .with_fresh_reward_head(4, RewardReadout::LastToken)
            .unwrap();
        let fresh = tiny(preset, 3)
            .with_fresh_reward_head(4, RewardReadout::LastTokenAndMeanLogprob)
            .unwrap();
        let seqs = sequences();
        let logprobs = plain.sequence_logprobs(&seqs).unwrap();
        // Tokens from the start on (token 0 has no log-prob), averaged.
        let means: Vec<f32> = logprobs
            .iter()
            .zip(STARTS)
            .map(|(lp, start)| {
                let response = &lp[start.max(1) - 1..];
                if response.is_empty() {
                    0.0
                } else {
                    response.iter().sum::<f32>() / response.len() as f32
                }
            })
            .collect();
        // A fresh head starts at zero: the reward is the response's mean log-prob.
        let total = fresh.sequence_rewards(&seqs, &STARTS).unwrap();
        for (i, mean) in means.iter().enumerate() {
            assert!((total[i] - mean).abs() < 1e-4, "{preset} row {i}");
        }
        // With the plain model's random head and a scale of 2: head + 2 · mean.
        let mut weights = fresh.weights().clone();
        let width = plain.config().output_dim();
        let head = plain
            .weights()
            .get(REWARD_HEAD_TENSOR, &[1, width])
            .unwrap();
        weights.insert(REWARD_HEAD_TENSOR, head);
        weights.insert(
            REWARD_LOGLIK_SCALE_TENSOR,
            Tensor::new(&[2f32], &candle_core::Device::Cpu).unwrap(),
        );
        let both = CausalLm::from_weights(fresh.config().clone(), weights).unwrap();
        let head_only = plain.sequence_rewards(&seqs, &STARTS).unwrap();
        let total = both.sequence_rewards(&seqs, &STARTS).unwrap();
        for (i, mean) in means.iter().enumerate() {
            let expected = head_only[i] + 2.0 * mean;
            assert!(
                (total[i] - expected).abs() < 1e-4,
                "{preset} row {i}: {} vs {expected}",
                total[i]
            );
        }
        // A one-token sequence has no log-prob term.
        assert!((total[2] - head_only[2]).abs() < 1e-6);
        // The start matters: the whole row's mean differs from the response's.
        let whole = both.sequence_rewards(&seqs, &[0; 4]).unwrap();
        assert!((whole[3] - total[3]).abs() > 1e-6, "{preset}");
    }
}

#[test]
fn batched_and_padded_results_equal_unpadded_ones() {
    for (preset, readout) in ARCHITECTURES.iter().flat_map(|p| {
        [
            RewardReadout::LastToken,
            RewardReadout::LastTokenAndMeanLogprob,
        ]
        .map(|r| (p, r))
    }) {
        let model = tiny(preset, 3).with_fresh_reward_head(4, readout).unwrap();
        let seqs = sequences();
        // Pad with a token that also occurs in the data: results must not depend on the pad id.
        let batch = PaddedBatch::new(&seqs, 0, model.device()).unwrap();
        let rewards: Vec<f32> = model.rewards(&batch, &STARTS).unwrap().to_vec1().unwrap();
        let logprobs: Vec<Vec<f32>> = model.token_logprobs(&batch.ids).unwrap().to_vec2().unwrap();
        for (i, seq) in seqs.iter().enumerate() {
            let single = PaddedBatch::new(std::slice::from_ref(seq), 0, model.device()).unwrap();
            let reward: Vec<f32> = model
                .rewards(&single, &STARTS[i..=i])
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!((reward[0] - rewards[i]).abs() < 1e-5, "{preset} row {i}");
            let lp: Vec<Vec<f32>> = model
                .token_logprobs(&single.ids)
                .unwrap()
                .to_vec2()
                .unwrap();
            for (a, b) in lp[0].iter().zip(&logprobs[i]) {
                assert!((a - b).abs() < 1e-5, "{preset} row {i}: {a} vs {b}");
            }
        }
    }
}

/// A model whose reward head is random and nonzero, with a log-prob scale of 2.
fn with_head_and_scale(preset: &str) -> CausalLm {
    let plain = tiny(preset, 3)
        .with_fresh_reward_head(4, RewardReadout::LastToken)
        .unwrap();
    let width = plain.config().output_dim();
    let mut weights = plain.weights().clone();
    weights.insert(
        REWARD_LOGLIK_SCALE_TENSOR,
        Tensor::new(&[2f32], &candle_core::Device::Cpu).unwrap(),
    );
    assert!(weights.get(REWARD_HEAD_TENSOR, &[1, width]).is_ok());
    CausalLm::from_weights(plain.config().clone(), weights).unwrap()
}

#[test]
fn chunked_scoring_equals_one_whole_pass() {
    for preset in ARCHITECTURES {
        for model in [
            tiny(preset, 3)
                .with_fresh_reward_head(4, RewardReadout::LastToken)
                .unwrap(),
            with_head_and_scale(preset),
        ] {
            let seqs = sequences();
            let whole_logprobs = model.sequence_logprobs(&seqs).unwrap();
            let whole_rewards = model.sequence_rewards(&seqs, &STARTS).unwrap();
            for chunk in [1, 2, 3, 5, 64] {
                for (i, seq) in seqs.iter().enumerate() {
                    let mut scoring =
                        ChunkedScoring::new(&model, seq.clone(), ChunkedOutput::Logprobs).unwrap();
                    let mut passes = 0;
                    while !scoring.is_done() {
                        let ran = scoring.advance(&model, chunk).unwrap();
                        assert!(ran >= 1 && ran <= chunk, "{preset}: ran {ran} of {chunk}");
                        passes += 1;
                    }
                    assert_eq!(passes, seq.len().div_ceil(chunk), "{preset} row {i}");
                    let logprobs = scoring.into_logprobs().unwrap();
                    assert_eq!(logprobs.len(), whole_logprobs[i].len());
                    for (a, b) in logprobs.iter().zip(&whole_logprobs[i]) {
                        assert!((a - b).abs() < 1e-5, "{preset} row {i} chunk {chunk}");
                    }
                    let output = ChunkedOutput::Reward {
                        response_start: STARTS[i],
                    };
                    let mut scoring = ChunkedScoring::new(&model, seq.clone(), output).unwrap();
                    assert!(scoring.reward(&model).is_err(), "read before it ran");
                    while !scoring.is_done() {
                        scoring.advance(&model, chunk).unwrap();
                    }
                    let reward = scoring.reward(&model).unwrap();
                    assert!(
                        (reward - whole_rewards[i]).abs() < 1e-5,
                        "{preset} row {i} chunk {chunk}: {reward} vs {}",
                        whole_rewards[i]
                    );
                }
            }
        }
    }
}

#[test]
fn chunked_scoring_refuses_what_one_pass_refuses() {
    let model = tiny("tiny-gpt2", 3);
    let max = model.config().max_positions();
    assert!(ChunkedScoring::new(&model, vec![], ChunkedOutput::Logprobs).is_err());
    assert!(ChunkedScoring::new(&model, vec![1; max + 1], ChunkedOutput::Logprobs).is_err());
    let reward = ChunkedOutput::Reward { response_start: 0 };
    assert!(
        ChunkedScoring::new(&model, vec![1, 2], reward).is_err(),
        "no head"
    );
    let vocab = model.config().vocab_size() as u32;
    assert!(ChunkedScoring::new(&model, vec![1, vocab], ChunkedOutput::Logprobs).is_err());
}

#[test]
fn reward_is_read_at_the_last_real_token() {
    let model = tiny("tiny-gpt2", 5)
        .with_fresh_reward_head(6, RewardReadout::LastToken)
        .unwrap();
    // [a, 0, b] and its prefix [a, 0]: the reward of the prefix is read at the `0` token, which
    // an `ids != 0` rule would skip.
    let full = PaddedBatch::new(&[vec![7, 0, 9]], 3, model.device()).unwrap();
    let prefix = PaddedBatch::new(&[vec![7, 0]], 3, model.device()).unwrap();
    let hidden = model.hidden_states(&full.ids).unwrap();
    let at_zero = model
        .rewards_from_hidden(&hidden, &[2])
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let prefix_reward = model
        .rewards(&prefix, &[0])
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!((at_zero[0] - prefix_reward[0]).abs() < 1e-6);
    let last = model
        .rewards(&full, &[0])
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!((last[0] - at_zero[0]).abs() > 1e-6);
}

#[test]
fn cached_greedy_decoding_equals_full_reforward() {
    for preset in ARCHITECTURES {
        let model = tiny(preset, 7);
        let prompt = [3u32, 14, 15, 92, 65];
        let config = GenerationConfig {
            max_new_tokens: 12,
            sampling: SamplingConfig {
                temperature: 0.0,
                ..Default::default()
            },
            stop_tokens: vec![],
        };
        let cached = generate(&model, &prompt, &config, |_| true).unwrap();
        let uncached = greedy_without_cache(&model, &prompt, 12).unwrap();
        assert_eq!(cached, uncached, "{preset}");
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_seed_dependent() {
    let model = tiny("tiny-opt", 8);
    let run = |seed| {
        let config = GenerationConfig {
            max_new_tokens: 20,
            sampling: SamplingConfig {
                temperature: 1.5,
                top_k: 50,
                top_p: 0.95,
                seed,
            },
            stop_tokens: vec![],
        };
        generate(&model, &[4, 5, 6], &config, |_| true).unwrap()
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}

#[test]
fn too_long_and_out_of_vocab_inputs_are_errors() {
    let model = tiny("tiny-gpt2", 9);
    let max = model.config().max_positions();
    let long = Tensor::zeros((1, max + 1), candle_core::DType::U32, model.device()).unwrap();
    let err = model.hidden_states(&long).unwrap_err().to_string();
    assert!(
        err.contains(&format!("{}", max + 1)) && err.contains(&max.to_string()),
        "{err}"
    );
    let bad = Tensor::new(&[[1u32, 100_000]], model.device()).unwrap();
    let err = model.hidden_states(&bad).unwrap_err().to_string();
    assert!(err.contains("100000"), "{err}");
    // Packed rows: the limit is per sequence, not on the total.
    let pack = |seqs: &[Vec<u32>]| {
        PackedSequences::new(seqs, PrefixSharing::Pairs, model.device()).unwrap()
    };
    let fits = vec![vec![1u32; max], vec![2u32; max]];
    assert!(model.packed_hidden_states(&pack(&fits)).is_ok());
    let err = model
        .packed_hidden_states(&pack(&[vec![1u32; max + 1], vec![1u32; 2]]))
        .unwrap_err()
        .to_string();
    assert!(err.contains(&format!("{}", max + 1)), "{err}");
    let err = model
        .packed_hidden_states(&pack(&[vec![1u32, 100_000], vec![1u32]]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("100000"), "{err}");
}

#[test]
fn saved_folder_reloads_to_identical_weights_and_outputs() {
    for (preset, readout) in ARCHITECTURES.iter().flat_map(|p| {
        [
            RewardReadout::LastToken,
            RewardReadout::LastTokenAndMeanLogprob,
        ]
        .map(|r| (p, r))
    }) {
        let model = tiny(preset, 10)
            .with_fresh_reward_head(11, readout)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        model.save_folder(dir.path()).unwrap();
        let back = CausalLm::from_folder(dir.path(), &LoadOptions::default()).unwrap();
        assert!(back.has_reward_head());
        assert_eq!(back.reward_readout(), readout, "{preset}");
        assert_eq!(
            model.weights().content_hash().unwrap(),
            back.weights().content_hash().unwrap(),
            "{preset}"
        );
        let batch = PaddedBatch::new(&sequences(), 1, model.device()).unwrap();
        let a: Vec<f32> = model.rewards(&batch, &STARTS).unwrap().to_vec1().unwrap();
        let b: Vec<f32> = back.rewards(&batch, &STARTS).unwrap().to_vec1().unwrap();
        assert_eq!(a, b);
    }
}

#[test]
fn missing_tensor_error_names_the_tensor_and_file() {
    let model = tiny("tiny-opt", 12);
    let dir = tempfile::tempdir().unwrap();
    model.save_folder(dir.path()).unwrap();
    // Drop one tensor from the saved file.
    let path = dir.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    tensors.remove("model.decoder.layers.1.fc2.bias");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let err = CausalLm::from_folder(dir.path(), &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("decoder.layers.1.fc2.bias") && err.contains("model.safetensors"),
        "{err}"
    );
}

#[test]
fn random_init_is_deterministic_in_the_seed() {
    let config = ModelConfig::preset("tiny-gpt2").unwrap();
    let device = candle_core::Device::Cpu;
    let a = Weights::random_init(&config, 1, candle_core::DType::F32, &device).unwrap();
    let b = Weights::random_init(&config, 1, candle_core::DType::F32, &device).unwrap();
    let c = Weights::random_init(&config, 2, candle_core::DType::F32, &device).unwrap();
    assert_eq!(a.content_hash().unwrap(), b.content_hash().unwrap());
    assert_ne!(a.content_hash().unwrap(), c.content_hash().unwrap());
    // GPT-2 style init: embeddings have std close to 0.02.
    let wte = a.get("wte.weight", &[512, 32]).unwrap();
    let std = wte
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt();
    assert!((std - 0.02).abs() < 0.002, "{std}");
}

/// Pairs with a shared prompt of 3 tokens, one sequence that is a prefix of its partner,
/// nothing shared, and a long shared prefix; response starts per sequence.
fn pairs() -> (Vec<Vec<u32>>, Vec<usize>) {
    (
        vec![
            vec![5, 0, 17, 300, 2, 9, 0],
            vec![5, 0, 17, 41, 7],
            vec![1, 2, 3],
            vec![1, 2, 3, 4],
            vec![0],
            vec![8, 9],
            vec![44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54],
            vec![44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 99],
        ],
        vec![3, 3, 1, 2, 0, 1, 6, 6],
    )
}

/// Packed rows (with and without prompt sharing) give the padded batch's rewards and
/// log-probs, and the same gradient in every trainable tensor, on the fused CPU path (f32) and
/// the composed one (f64).
#[test]
fn packed_sequences_equal_the_padded_batch_in_values_and_gradients() {
    let (seqs, starts) = pairs();
    for (preset, readout, dtype) in ARCHITECTURES.iter().flat_map(|p| {
        [
            (RewardReadout::LastToken, candle_core::DType::F32),
            (
                RewardReadout::LastTokenAndMeanLogprob,
                candle_core::DType::F32,
            ),
            (
                RewardReadout::LastTokenAndMeanLogprob,
                candle_core::DType::F64,
            ),
        ]
        .map(|(r, d)| (p, r, d))
    }) {
        let options = LoadOptions {
            dtype,
            ..LoadOptions::default()
        };
        let model = CausalLm::random_init(ModelConfig::preset(preset).unwrap(), 3, &options)
            .unwrap()
            .with_fresh_reward_head(4, readout)
            .unwrap();
        let config = model.config().clone();
        let (weights, vars) = model.weights().clone().into_trainable().unwrap();
        let model = CausalLm::from_weights(config, weights).unwrap();
        // Distinct weights per sequence so that no gradient cancels by symmetry.
        let coefficients = Tensor::new(
            &[1.0f32, -0.5, 0.25, 2.0, -1.5, 0.75, 1.25, -2.0],
            model.device(),
        )
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
        let objective = |rewards: Tensor| rewards.mul(&coefficients).unwrap().sum_all().unwrap();
        let padded = PaddedBatch::new(&seqs, 1, model.device()).unwrap();
        let reference = model.rewards(&padded, &starts).unwrap();
        let reference_grads = objective(reference.clone()).backward().unwrap();
        let reference_logprobs: Vec<Vec<f64>> = model
            .token_logprobs(&padded.ids)
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .to_vec2()
            .unwrap();
        for sharing in [PrefixSharing::None, PrefixSharing::Pairs] {
            let what = format!("{preset} {readout:?} {dtype:?} {sharing:?}");
            let packed = PackedSequences::new(&seqs, sharing, model.device()).unwrap();
            let rewards = model.packed_rewards(&packed, &starts).unwrap();
            let diff = (&rewards - &reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_dtype(candle_core::DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(diff < 1e-5, "{what}: rewards differ by {diff}");
            let grads = objective(rewards).backward().unwrap();
            for (name, var) in &vars {
                let (a, b) = (
                    grads.get(var.as_tensor()).unwrap(),
                    reference_grads.get(var.as_tensor()).unwrap(),
                );
                let scale = b.abs().unwrap().max_all().unwrap();
                let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
                let (scale, diff) = (
                    scale
                        .to_dtype(candle_core::DType::F64)
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap(),
                    diff.to_dtype(candle_core::DType::F64)
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap(),
                );
                assert!(
                    diff <= 1e-4 * scale.max(1e-3),
                    "{what}: gradient of {name} differs by {diff} (scale {scale})"
                );
            }
            // Every token's log-prob, from the packed rows.
            let hidden = model.packed_hidden_states(&packed).unwrap();
            let predictions: Vec<_> = (0..seqs.len())
                .flat_map(|k| packed.predictions(k, 0..seqs[k].len()))
                .collect();
            let logprobs: Vec<f64> = model
                .packed_logprobs(&hidden, &predictions)
                .unwrap()
                .to_dtype(candle_core::DType::F64)
                .unwrap()
                .to_vec1()
                .unwrap();
            let expected: Vec<f64> = seqs
                .iter()
                .enumerate()
                .flat_map(|(k, seq)| reference_logprobs[k][..seq.len() - 1].to_vec())
                .collect();
            assert_eq!(logprobs.len(), expected.len(), "{what}");
            for (i, (a, b)) in logprobs.iter().zip(&expected).enumerate() {
                assert!((a - b).abs() < 1e-4, "{what}: log-prob {i}: {a} vs {b}");
            }
        }
    }
}
