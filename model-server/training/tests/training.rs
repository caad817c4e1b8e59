//! The training engine on tiny models: finite-difference gradient checks of every objective,
//! loss decreasing under each objective, bit-identical reruns and resumes, non-finite errors,
//! and exported folders that reload.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use superficial_models::{
    CausalLm, EncodedDialogue, LoadOptions, ModelConfig, PrefixSharing, RewardReadout, Weights,
};
use superficial_training::objectives::{
    Pooling, attach_reference_logprobs, pooled_response_logprobs,
};
use superficial_training::{
    AdamConfig, DEFAULT_SHARDS, Example, Objective, Schedule, TrainConfig, TrainError, TrainingRun,
    frozen_copy,
};

fn tiny(preset: &str, dtype: DType, reward_head: bool) -> CausalLm {
    let options = LoadOptions {
        device: Device::Cpu,
        dtype,
    };
    let model = CausalLm::random_init(ModelConfig::preset(preset).unwrap(), 3, &options).unwrap();
    if reward_head {
        model
            .with_fresh_reward_head(4, RewardReadout::LastToken)
            .unwrap()
    } else {
        model
    }
}

fn ids(rng: &mut ChaCha8Rng, len: usize) -> Vec<u32> {
    (0..len).map(|_| rng.random_range(3..500)).collect()
}

fn dialogue(rng: &mut ChaCha8Rng, prompt: usize, response: usize) -> EncodedDialogue {
    EncodedDialogue::assemble(ids(rng, prompt), ids(rng, response), 64)
}

/// Examples of the kind `objective` trains on.
fn examples(objective: &Objective, n: usize, seed: u64) -> Vec<Example> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|i| match objective {
            Objective::CausalLm => Example::Tokens(ids(&mut rng, 6 + i % 5)),
            Objective::Reward { .. } => Example::RewardPair {
                slot_c: ids(&mut rng, 5 + i % 3),
                slot_r: ids(&mut rng, 4 + i % 4),
                response_starts: [2, 1 + i % 3],
                target: [0.0, 1.0, 0.3, 0.8][i % 4],
                conflict_prefers_slot_r: i % 3 != 0,
            },
            Objective::Sft => Example::Sft(dialogue(&mut rng, 4, 3 + i % 3)),
            Objective::Simpo { .. } | Objective::Dpo { .. } | Objective::Ipo { .. } => {
                Example::Preference {
                    chosen: dialogue(&mut rng, 4, 3 + i % 2),
                    rejected: dialogue(&mut rng, 4, 2 + i % 3),
                    conflict_prefers_rejected: i % 2 == 0,
                    reference: None,
                }
            }
        })
        .collect()
}

fn all_objectives() -> Vec<Objective> {
    vec![
        Objective::CausalLm,
        Objective::Reward {
            explicit_alpha: None,
        },
        Objective::Reward {
            explicit_alpha: Some(0.5),
        },
        Objective::Sft,
        Objective::simpo(None),
        Objective::simpo(Some(0.5)),
        Objective::dpo(None),
        Objective::dpo(Some(0.5)),
        Objective::Ipo { tau: 0.1 },
    ]
}

fn prepared(objective: &Objective, model: &CausalLm, n: usize, seed: u64) -> Vec<Example> {
    let mut data = examples(objective, n, seed);
    if matches!(objective, Objective::Dpo { .. } | Objective::Ipo { .. }) {
        // A reference that differs from the policy, so the reference term matters.
        let options = LoadOptions {
            device: Device::Cpu,
            dtype: model.dtype(),
        };
        let reference = CausalLm::random_init(model.config().clone(), 99, &options).unwrap();
        attach_reference_logprobs(&reference, &mut data, 4).unwrap();
    }
    data
}

/// The model rebuilt on variables, with those variables by name.
fn trainable(model: CausalLm) -> (CausalLm, Vec<(String, Var)>) {
    let config = model.config().clone();
    let (weights, vars) = model.weights().clone().into_trainable().unwrap();
    (CausalLm::from_weights(config, weights).unwrap(), vars)
}

/// Every objective on a fresh model, plus the reward objectives on a mean-log-prob read-out.
fn gradient_cases(preset: &str) -> Vec<(Objective, CausalLm)> {
    let mut cases: Vec<(Objective, CausalLm)> = all_objectives()
        .into_iter()
        .map(|o| (o, tiny(preset, DType::F64, o.needs_reward_head())))
        .collect();
    for alpha in [None, Some(0.5)] {
        let model = tiny(preset, DType::F64, false)
            .with_fresh_reward_head(4, RewardReadout::LastTokenAndMeanLogprob)
            .unwrap();
        cases.push((
            Objective::Reward {
                explicit_alpha: alpha,
            },
            model,
        ));
    }
    cases
}

#[test]
fn analytic_gradients_match_finite_differences_for_every_objective() {
    for preset in ["tiny-gpt2", "tiny-opt-post-ln"] {
        for (objective, model) in gradient_cases(preset) {
            let data = prepared(&objective, &model, 6, 11);
            let (model, vars) = trainable(model);
            let loss = objective.loss(&model, &data).unwrap().loss;
            let grads = loss.backward().unwrap();
            // A random direction over every parameter.
            let mut rng = ChaCha8Rng::seed_from_u64(5);
            let mut directions = Vec::new();
            let mut analytic = 0f64;
            for (_, var) in &vars {
                let d: Vec<f64> = (0..var.elem_count())
                    .map(|_| rng.random_range(-1.0..1.0))
                    .collect();
                let d = Tensor::from_vec(d, var.shape(), &Device::Cpu).unwrap();
                if let Some(g) = grads.get(var.as_tensor()) {
                    analytic += g
                        .mul(&d)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f64>()
                        .unwrap();
                }
                directions.push(d);
            }
            // Small enough that no ReLU unit of OPT changes side between the two evaluations.
            let eps = 1e-7;
            let at = |sign: f64| -> f64 {
                for ((_, var), d) in vars.iter().zip(&directions) {
                    var.set(
                        &(var.as_tensor() + (d * (sign * eps)).unwrap())
                            .unwrap()
                            .detach()
                            .copy()
                            .unwrap(),
                    )
                    .unwrap();
                }
                let value = objective
                    .loss(&model, &data)
                    .unwrap()
                    .loss
                    .to_scalar::<f64>()
                    .unwrap();
                for ((_, var), d) in vars.iter().zip(&directions) {
                    var.set(
                        &(var.as_tensor() - (d * (sign * eps)).unwrap())
                            .unwrap()
                            .detach()
                            .copy()
                            .unwrap(),
                    )
                    .unwrap();
                }
                value
            };
            let numeric = (at(1.0) - at(-1.0)) / (2.0 * eps);
            let error = (numeric - analytic).abs() / numeric.abs().max(analytic.abs()).max(1e-8);
            assert!(
                error < 1e-4,
                "{objective:?} ({:?}) on {preset}: numeric {numeric} analytic {analytic}",
                model.reward_readout()
            );
        }
    }
}

#[test]
fn shard_gradients_add_up_to_the_minibatch_gradient_for_every_objective() {
    // The trainer's decomposition: the minibatch loss is the sum of its shards' undivided loss
    // sums over the whole minibatch's normalizer (the explicit conflicts' means included).
    for objective in all_objectives() {
        let model = tiny("tiny-gpt2", DType::F64, objective.needs_reward_head());
        let data = prepared(&objective, &model, 7, 13);
        let (model, vars) = trainable(model);
        let whole = objective.loss(&model, &data).unwrap().loss;
        let whole_grads = whole.backward().unwrap();
        let normalizer = objective.normalizer(&data);
        let shards = [&data[..3], &data[3..5], &data[5..]];
        let mut shard_loss = 0f64;
        let shard_grads: Vec<_> = shards
            .iter()
            .map(|shard| {
                let sum = objective.loss_sum(&model, shard).unwrap().loss;
                shard_loss += sum.to_scalar::<f64>().unwrap() / normalizer;
                (sum / normalizer).unwrap().backward().unwrap()
            })
            .collect();
        let whole_loss = whole.to_scalar::<f64>().unwrap();
        assert!(
            (whole_loss - shard_loss).abs() < 1e-12 * whole_loss.abs().max(1.0),
            "{objective:?}: loss {whole_loss} vs shards {shard_loss}"
        );
        for (name, var) in &vars {
            let Some(expected) = whole_grads.get(var.as_tensor()) else {
                continue;
            };
            let mut summed = expected.zeros_like().unwrap();
            for grads in &shard_grads {
                if let Some(g) = grads.get(var.as_tensor()) {
                    summed = (summed + g).unwrap();
                }
            }
            let error = (expected - &summed)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            let scale = expected
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(
                error <= 1e-10 * scale.max(1e-12),
                "{objective:?}, {name}: shard gradients differ by {error} (scale {scale})"
            );
        }
    }
}

#[test]
fn sharded_training_does_not_depend_on_the_thread_count() {
    // Shards run concurrently on CPU; the arithmetic is fixed by the configuration, so one
    // thread and three threads must give the same bits.
    let objective = Objective::simpo(Some(0.5));
    let train = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let model = tiny("tiny-gpt2", DType::F32, false);
            let data = prepared(&objective, &model, 12, 37);
            let mut settings = config(objective, 1e-3, 6, 6, 2);
            settings.shards = 3;
            let mut run = TrainingRun::new(model, data, settings).unwrap();
            run.run(None, |_| true).unwrap();
            weights_of(run.model())
        })
    };
    assert_eq!(train(1), train(3));
}

fn config(
    objective: Objective,
    lr: f64,
    batch: usize,
    minibatch: usize,
    epochs: usize,
) -> TrainConfig {
    TrainConfig {
        objective,
        optimizer: AdamConfig {
            lr,
            max_grad_norm: Some(1.0),
            weight_decay: 0.01,
            ..Default::default()
        },
        schedule: Schedule::LinearWarmupConstant { warmup_frac: 0.1 },
        batch_size: batch,
        minibatch_size: minibatch,
        epochs,
        seed: 0,
        reshuffle_each_epoch: true,
        shards: DEFAULT_SHARDS,
    }
}

#[test]
fn every_objective_drives_its_loss_down() {
    for objective in all_objectives() {
        let model = tiny("tiny-gpt2", DType::F32, objective.needs_reward_head());
        let data = prepared(&objective, &model, 8, 21);
        let initial = objective
            .loss(&model, &data)
            .unwrap()
            .loss
            .to_scalar::<f32>()
            .unwrap();
        let mut run =
            TrainingRun::new(model, data.clone(), config(objective, 3e-3, 8, 4, 15)).unwrap();
        run.run(None, |m| {
            assert!(m.loss.is_finite() && m.grad_norm.is_finite());
            true
        })
        .unwrap();
        let last = objective
            .loss(run.model(), &data)
            .unwrap()
            .loss
            .to_scalar::<f32>()
            .unwrap();
        assert!(last < initial * 0.8, "{objective:?}: {initial} -> {last}");
    }
}

fn weights_of(model: &CausalLm) -> BTreeMap<String, Vec<f32>> {
    model
        .weights()
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            )
        })
        .collect()
}

#[test]
fn same_seed_and_data_give_bit_identical_weights() {
    let objective = Objective::Reward {
        explicit_alpha: Some(0.5),
    };
    let train = || {
        let model = tiny("tiny-opt", DType::F32, true);
        let data = prepared(&objective, &model, 12, 31);
        let mut run = TrainingRun::new(model, data, config(objective, 1e-3, 4, 2, 2)).unwrap();
        run.run(None, |_| true).unwrap();
        weights_of(run.model())
    };
    assert_eq!(train(), train());
}

#[test]
fn a_run_interrupted_at_any_step_resumes_to_the_same_weights() {
    let objective = Objective::simpo(Some(0.5));
    let make = || {
        let model = tiny("tiny-gpt2", DType::F32, false);
        let data = prepared(&objective, &model, 12, 41);
        let mut c = config(objective, 2e-3, 4, 2, 2);
        c.schedule = Schedule::CosineToZero;
        TrainingRun::new(model, data, c).unwrap()
    };
    let mut uninterrupted = make();
    let total = uninterrupted.total_steps();
    assert_eq!(total, 6);
    uninterrupted.run(None, |_| true).unwrap();
    let expected = weights_of(uninterrupted.model());
    for stop_after in 1..total {
        let dir = tempfile::tempdir().unwrap();
        let checkpoints = dir.path().join("ckpt");
        let mut first = make();
        let err = first
            .run(Some((&checkpoints, 2)), |m| m.step < stop_after)
            .unwrap_err();
        assert!(matches!(err, TrainError::Cancelled { step } if step == stop_after));
        drop(first);
        let mut second = make();
        assert!(second.resume_from(&checkpoints).unwrap());
        assert_eq!(second.step(), stop_after);
        second.run(Some((&checkpoints, 2)), |_| true).unwrap();
        assert_eq!(
            weights_of(second.model()),
            expected,
            "interrupted after step {stop_after}"
        );
    }
}

#[test]
fn a_checkpoint_of_another_run_is_refused() {
    let objective = Objective::Sft;
    let dir = tempfile::tempdir().unwrap();
    let model = tiny("tiny-gpt2", DType::F32, false);
    let data = prepared(&objective, &model, 8, 51);
    let mut run = TrainingRun::new(
        model.clone(),
        data.clone(),
        config(objective, 1e-3, 4, 4, 1),
    )
    .unwrap();
    run.run(Some((dir.path(), 1)), |_| true).unwrap();
    let mut other = TrainingRun::new(model, data, config(objective, 2e-3, 4, 4, 1)).unwrap();
    let err = other.resume_from(dir.path()).unwrap_err().to_string();
    assert!(err.contains("different run"), "{err}");
}

#[test]
fn a_non_finite_loss_stops_training_and_names_the_step() {
    let model = tiny("tiny-gpt2", DType::F32, false);
    let mut tensors = BTreeMap::new();
    for (name, tensor) in model.weights().iter() {
        let t = if name == "ln_f.weight" {
            (tensor * f64::NAN).unwrap()
        } else {
            tensor.clone()
        };
        tensors.insert(name.clone(), t);
    }
    let broken =
        CausalLm::from_weights(model.config().clone(), Weights::new(tensors, "test")).unwrap();
    let data = prepared(&Objective::CausalLm, &broken, 4, 61);
    let mut run =
        TrainingRun::new(broken, data, config(Objective::CausalLm, 1e-3, 2, 2, 1)).unwrap();
    let err = run.run(None, |_| true).unwrap_err();
    assert!(
        matches!(err, TrainError::NonFinite { step: 1, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("step 1"));
}

#[test]
fn bad_configurations_and_data_are_rejected_before_training() {
    let model = tiny("tiny-gpt2", DType::F32, false);
    let data = prepared(&Objective::Sft, &model, 8, 71);
    let err = TrainingRun::new(
        model.clone(),
        data.clone(),
        config(Objective::Sft, 1e-3, 8, 3, 1),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("does not divide"), "{err}");
    let err = TrainingRun::new(
        model.clone(),
        data.clone(),
        config(Objective::CausalLm, 1e-3, 4, 4, 1),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("example 0"), "{err}");
    let reward = prepared(
        &Objective::Reward {
            explicit_alpha: None,
        },
        &model,
        8,
        72,
    );
    let err = TrainingRun::new(
        model,
        reward,
        config(
            Objective::Reward {
                explicit_alpha: None,
            },
            1e-3,
            4,
            4,
            1,
        ),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("reward head"), "{err}");
}

#[test]
fn trained_model_exports_and_reloads_with_its_reward_head() {
    let objective = Objective::Reward {
        explicit_alpha: None,
    };
    let model = tiny("tiny-opt-post-ln", DType::F32, true);
    let data = prepared(&objective, &model, 8, 81);
    let mut run = TrainingRun::new(model, data.clone(), config(objective, 1e-3, 4, 4, 1)).unwrap();
    run.run(None, |_| true).unwrap();
    let trained = frozen_copy(run.model()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("export");
    superficial_training::export::save_hf_folder(&trained, None, &out).unwrap();
    let back = CausalLm::from_folder(&out, &LoadOptions::default()).unwrap();
    assert_eq!(
        back.weights().content_hash().unwrap(),
        trained.weights().content_hash().unwrap()
    );
    let a = objective
        .loss(&trained, &data)
        .unwrap()
        .loss
        .to_scalar::<f32>()
        .unwrap();
    let b = objective
        .loss(&back, &data)
        .unwrap()
        .loss
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(a, b);
}

#[test]
fn ipo_loss_is_the_squared_distance_of_the_reference_margin_from_its_target() {
    let model = tiny("tiny-gpt2", DType::F64, false);
    let tau = 0.25;
    let objective = Objective::Ipo { tau };
    let data = prepared(&objective, &model, 3, 7);
    let dialogues: Vec<&EncodedDialogue> = data
        .iter()
        .flat_map(|e| match e {
            Example::Preference {
                chosen, rejected, ..
            } => vec![chosen, rejected],
            _ => Vec::new(),
        })
        .collect();
    let sums: Vec<f64> =
        pooled_response_logprobs(&model, &dialogues, Pooling::Sum, PrefixSharing::Pairs)
            .unwrap()
            .to_vec1()
            .unwrap();
    let mut expected = 0.0;
    for (k, example) in data.iter().enumerate() {
        let Example::Preference {
            reference: Some([ref_c, ref_r]),
            ..
        } = example
        else {
            panic!("example {k} has no reference");
        };
        let margin = (sums[2 * k] - ref_c) - (sums[2 * k + 1] - ref_r);
        expected += (margin - 1.0 / (2.0 * tau)).powi(2);
    }
    let got = objective
        .loss_sum(&model, &data)
        .unwrap()
        .loss
        .to_scalar::<f64>()
        .unwrap();
    assert!(
        (got - expected).abs() < 1e-9 * expected.max(1.0),
        "{got} vs {expected}"
    );
    // Without the reference's log-probs there is nothing to be relative to.
    assert!(objective.validate(&examples(&objective, 2, 7)).is_err());
}
