//! End-to-end over loopback gRPC: a real server with the reference checkpoints and presets,
//! driven through the client library. Checks results against direct model calls and every
//! error code the Foundation API defines.

use model_server::config::NamedSource;
use model_server::{RunningServer, ServerConfig, W2sClient};
use superficial_models::{CausalLm, LoadOptions, TextTokenizer};
use superficial_tests::{fixtures_dir, load_reference, max_abs_diff, reference_model_dir};
use tonic::Code;
use w2s_proto::v1 as pb;

async fn start() -> (RunningServer, W2sClient) {
    let mut config = ServerConfig::ephemeral();
    config.model_root = fixtures_dir();
    config.models.push(NamedSource {
        name: "gpt2-ref".into(),
        value: reference_model_dir("gpt2").display().to_string(),
    });
    config.presets.push(NamedSource {
        name: "tiny".into(),
        value: "tiny-opt".into(),
    });
    let server = RunningServer::start(config).await.unwrap();
    let client = W2sClient::connect(&server.url()).await.unwrap();
    (server, client)
}

fn code_of(result: Result<impl std::fmt::Debug, model_server::ClientError>) -> Code {
    match result {
        Err(model_server::ClientError::Rpc(status)) => status.code(),
        other => panic!("expected an RPC error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_models_logprobs_and_scores() {
    let (server, client) = start().await;

    // Health: SERVING once start-up models are loaded.
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    for service in ["", "w2s.v1.Inference", "w2s.v1.Models"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{service:?}"
        );
    }

    // Load through the API, by a path relative to the model root.
    let info = client
        .load_model(pb::LoadModelRequest {
            name: "opt-ref".into(),
            source: Some(pb::load_model_request::Source::Path(
                "reference/opt-post-ln".into(),
            )),
            role: "strong".into(),
            reward_head: true,
            seed: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(info.architecture, pb::Architecture::Opt as i32);
    assert!(info.has_reward_head && info.parameter_count > 0 && info.content_hash.len() == 64);
    let names: Vec<String> = client
        .list_models()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.name)
        .collect();
    assert_eq!(names, vec!["gpt2-ref", "opt-ref", "tiny"]);

    // Log-probs over gRPC equal transformers' reference.
    for (model, fixture) in [("gpt2-ref", "gpt2"), ("opt-ref", "opt-post-ln")] {
        let reference = load_reference(fixture);
        let response = client
            .token_logprobs(pb::TokenLogprobsRequest {
                model: model.into(),
                texts: reference.texts.iter().map(|t| t.text.clone()).collect(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(response.timing.is_some());
        for (seq, case) in response.sequences.iter().zip(&reference.texts) {
            assert_eq!(seq.token_ids, case.token_ids);
            let diff = max_abs_diff(
                seq.logprobs.iter().map(|&x| x as f64),
                case.logprobs.iter().copied(),
            );
            assert!(diff <= 1e-4, "{model}: {diff:e}");
        }
    }

    // Pair scoring equals direct computation with the library.
    let dir = reference_model_dir("gpt2");
    let model = CausalLm::from_folder(&dir, &LoadOptions::default()).unwrap();
    let tokenizer = TextTokenizer::from_folder(&dir, model.config()).unwrap();
    let pair = pb::PreferencePair {
        prompt: String::new(),
        chosen: "\n\nHuman: Help me?\n\nAssistant: Sure, here is how.".into(),
        rejected: "\n\nHuman: Help me?\n\nAssistant: No!".into(),
    };
    let response = client
        .score_pairs(pb::ScorePairsRequest {
            model: "gpt2-ref".into(),
            pairs: vec![pair.clone()],
            scoring: pb::PairScoring::MeanLogprob as i32,
            max_ctx: 0,
            ..Default::default()
        })
        .await
        .unwrap();
    let mean = |text: &str| {
        let d = tokenizer.encode_dialogue(text, 96).unwrap();
        let lp = model
            .sequence_logprobs(std::slice::from_ref(&d.ids))
            .unwrap()
            .remove(0);
        let mask = d.logprob_mask();
        let picked: Vec<f64> = lp
            .iter()
            .zip(&mask)
            .filter(|(_, m)| **m)
            .map(|(x, _)| *x as f64)
            .collect();
        picked.iter().sum::<f64>() / picked.len() as f64
    };
    let score = &response.scores[0];
    assert!((score.chosen - mean(&pair.chosen)).abs() < 1e-5);
    assert!((score.rejected - mean(&pair.rejected)).abs() < 1e-5);
    assert!((score.margin - (score.chosen - score.rejected)).abs() < 1e-12);
    assert!((score.p_chosen - 1.0 / (1.0 + (-score.margin).exp())).abs() < 1e-12);

    // Reward scoring works with a head, and is refused without one.
    let reward = client
        .score_pairs(pb::ScorePairsRequest {
            model: "opt-ref".into(),
            pairs: vec![pair.clone(), pair.clone()],
            scoring: pb::PairScoring::Reward as i32,
            max_ctx: 0,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(reward.scores.len(), 2);
    assert_eq!(reward.scores[0].margin, reward.scores[1].margin);
    let no_head = client
        .score_pairs(pb::ScorePairsRequest {
            model: "gpt2-ref".into(),
            pairs: vec![pair.clone()],
            scoring: pb::PairScoring::Reward as i32,
            max_ctx: 0,
            ..Default::default()
        })
        .await;
    assert_eq!(code_of(no_head), Code::FailedPrecondition);

    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_map_to_the_documented_codes() {
    let (server, client) = start().await;
    let logprobs = |model: &str, text: &str, truncate: bool| pb::TokenLogprobsRequest {
        model: model.into(),
        texts: vec![text.into()],
        max_ctx: 8,
        truncate,
        ..Default::default()
    };
    // Unknown model.
    assert_eq!(
        code_of(client.token_logprobs(logprobs("nope", "hi", false)).await),
        Code::NotFound
    );
    // Too long without truncation: INVALID_ARGUMENT naming the field; with truncation, the end
    // of the sequence is kept.
    let long = "one two three four five six seven eight nine ten eleven twelve";
    match client
        .token_logprobs(logprobs("gpt2-ref", long, false))
        .await
    {
        Err(model_server::ClientError::Rpc(status)) => {
            assert_eq!(status.code(), Code::InvalidArgument);
            assert!(
                status.message().contains("texts[0]"),
                "{}",
                status.message()
            );
        }
        other => panic!("{other:?}"),
    }
    let kept = client
        .token_logprobs(logprobs("gpt2-ref", long, true))
        .await
        .unwrap();
    assert_eq!(kept.sequences[0].token_ids.len(), 8);
    assert!(kept.sequences[0].truncated);
    // A preset tokenizes bytes: "hi" is two tokens.
    let bytes = client
        .token_logprobs(logprobs("tiny", "hi", false))
        .await
        .unwrap();
    assert_eq!(bytes.sequences[0].token_ids, vec![104, 105]);
    // A dialogue without the assistant marker, when split is asked for.
    let mut split = logprobs("gpt2-ref", "no marker here", false);
    split.split_dialogue = true;
    assert_eq!(
        code_of(client.token_logprobs(split).await),
        Code::InvalidArgument
    );
    // DPO scoring against a reference with another tokenizer compares different tokens.
    let dpo = pb::ScorePairsRequest {
        model: "gpt2-ref".into(),
        pairs: vec![pb::PreferencePair {
            prompt: "\n\nHuman: hi\n\nAssistant:".into(),
            chosen: " yes".into(),
            rejected: " no".into(),
        }],
        scoring: pb::PairScoring::Dpo as i32,
        reference_model: "tiny".into(),
        ..Default::default()
    };
    match client.score_pairs(dpo).await {
        Err(model_server::ClientError::Rpc(status)) => {
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            assert!(status.message().contains("tokenizer"), "{status:?}");
        }
        other => panic!("{other:?}"),
    }
    // Paths outside the model root, missing paths, duplicate names, unknown presets.
    let load = |name: &str, source: pb::load_model_request::Source| pb::LoadModelRequest {
        name: name.into(),
        source: Some(source),
        ..Default::default()
    };
    use pb::load_model_request::Source;
    assert_eq!(
        code_of(
            client
                .load_model(load("x", Source::Path("../../".into())))
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code_of(
            client
                .load_model(load("x", Source::Path("/etc".into())))
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code_of(
            client
                .load_model(load("x", Source::Path("reference/missing".into())))
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code_of(
            client
                .load_model(load("tiny", Source::Preset("tiny-gpt2".into())))
                .await
        ),
        Code::AlreadyExists
    );
    assert_eq!(
        code_of(
            client
                .load_model(load("y", Source::Preset("gpt-5".into())))
                .await
        ),
        Code::InvalidArgument
    );
    // A folder that is not a checkpoint.
    assert_eq!(
        code_of(
            client
                .load_model(load("z", Source::Path("reference".into())))
                .await
        ),
        Code::NotFound
    );
    // Missing scoring mode.
    let pairs = pb::ScorePairsRequest {
        model: "gpt2-ref".into(),
        pairs: vec![pb::PreferencePair::default()],
        ..Default::default()
    };
    assert_eq!(
        code_of(client.score_pairs(pairs).await),
        Code::InvalidArgument
    );
    server.shutdown().await.unwrap();
}
