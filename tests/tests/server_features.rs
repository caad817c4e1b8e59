//! The model server's full API over loopback gRPC with tiny preset models: every RPC, the
//! error codes, training jobs (including one interrupted by a server restart), dynamic
//! batching, concurrency, metrics, authentication and TLS.

use std::time::Duration;

use model_server::{ClientOptions, RunningServer, ServerConfig, W2sClient};
use superficial_tests::health;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use w2s_proto::v1 as pb;
use w2s_proto::v1::load_model_request::Source;
use w2s_proto::v1::upload_dataset_request::Item;

fn config(data_dir: &std::path::Path) -> ServerConfig {
    let mut config = ServerConfig::ephemeral();
    config.data_dir = data_dir.to_path_buf();
    config.model_root = data_dir.to_path_buf();
    config
}

fn preset(name: &str, preset: &str, reward_head: bool) -> pb::LoadModelRequest {
    pb::LoadModelRequest {
        name: name.into(),
        source: Some(Source::Preset(preset.into())),
        role: "test".into(),
        reward_head,
        seed: 7,
        ..Default::default()
    }
}

/// Waits (at most 60 s) until the server's health check reports `want`.
async fn wait_for_health(url: &str, want: ServingStatus) {
    let started = std::time::Instant::now();
    while health(url).await != want {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "health never reported {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// TokenLogprobs of `copies` copies of `text` on `model`, as a task of its own.
fn spawn_logprobs(
    client: &W2sClient,
    model: &str,
    text: String,
    copies: usize,
) -> tokio::task::JoinHandle<Result<pb::TokenLogprobsResponse, model_server::ClientError>> {
    let client = client.clone();
    let request = pb::TokenLogprobsRequest {
        model: model.into(),
        texts: vec![text; copies],
        ..Default::default()
    };
    tokio::spawn(async move { client.token_logprobs(request).await })
}

fn code_of<T: std::fmt::Debug>(result: Result<T, model_server::ClientError>) -> Code {
    match result {
        Err(model_server::ClientError::Rpc(status)) => status.code(),
        other => panic!("expected an RPC error, got {other:?}"),
    }
}

/// What ListJobs answers.
async fn listed_jobs(client: &W2sClient) -> Vec<pb::JobInfo> {
    client
        .training
        .clone()
        .list_jobs(pb::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner()
        .jobs
}

fn dialogue(i: usize, answer: &str) -> String {
    format!("\n\nHuman: question {i}?\n\nAssistant: {answer} {i}")
}

fn pair_rows(n: usize) -> Vec<Item> {
    (0..n)
        .map(|i| {
            Item::Pair(pb::PairRow {
                prompt: String::new(),
                chosen: dialogue(i, "a helpful and harmless answer"),
                rejected: dialogue(i, "no"),
                label: Some(if i % 4 == 0 { 0.3 } else { 0.9 }),
                chosen_is_human_choice: Some(i % 3 != 0),
                conflict_prefers_chosen: None,
            })
        })
        .collect()
}

fn hyper(batch: u32, epochs: u32) -> pb::TrainingHyperparameters {
    pb::TrainingHyperparameters {
        lr: 1e-3,
        batch_size: batch,
        minibatch_size: batch / 2,
        epochs,
        schedule: pb::LrSchedule::WarmupConstant as i32,
        max_ctx: 96,
        seed: 3,
        shuffle: true,
        checkpoint_every: 1,
        ..Default::default()
    }
}

/// A server on `data_dir` with the tiny GPT-2 preset loaded as `policy`, and a client.
async fn server_with_policy(data_dir: &std::path::Path) -> (RunningServer, W2sClient) {
    let server = RunningServer::start(config(data_dir)).await.unwrap();
    let client = W2sClient::connect(&server.url()).await.unwrap();
    client
        .load_model(preset("policy", "tiny-gpt2", false))
        .await
        .unwrap();
    (server, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_rpc_works_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let (server, client) = server_with_policy(dir.path()).await;
    let judge = client
        .load_model(preset("judge", "tiny-opt", true))
        .await
        .unwrap();
    assert!(judge.has_reward_head);

    // ScoreTexts equals ScorePairs(reward) sides.
    let texts = vec![dialogue(1, "yes"), dialogue(1, "no")];
    let rewards = client
        .inference
        .clone()
        .score_texts(pb::ScoreTextsRequest {
            model: "judge".into(),
            texts: texts.clone(),
            max_ctx: 0,
        })
        .await
        .unwrap()
        .into_inner();
    // A text without tokens is the client's error (it used to be INTERNAL).
    let status = client
        .inference
        .clone()
        .score_texts(pb::ScoreTextsRequest {
            model: "judge".into(),
            texts: vec![texts[0].clone(), String::new()],
            max_ctx: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("texts[1]"), "{status:?}");
    let pair = pb::PreferencePair {
        prompt: String::new(),
        chosen: texts[0].clone(),
        rejected: texts[1].clone(),
    };
    let scored = client
        .score_pairs(pb::ScorePairsRequest {
            model: "judge".into(),
            pairs: vec![pair.clone()],
            scoring: pb::PairScoring::Reward as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!((scored.scores[0].chosen - rewards.rewards[0]).abs() < 1e-6);
    assert!((scored.scores[0].rejected - rewards.rewards[1]).abs() < 1e-6);

    // DPO scoring of a model against itself is exactly zero.
    let dpo = client
        .score_pairs(pb::ScorePairsRequest {
            model: "policy".into(),
            pairs: vec![pair.clone()],
            scoring: pb::PairScoring::Dpo as i32,
            reference_model: "policy".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(dpo.scores[0].margin, 0.0);

    // Generation streams tokens, then a final message; the same seed gives the same text.
    let generate = |seed| {
        let client = client.clone();
        async move {
            let mut stream = client
                .inference
                .clone()
                .generate(pb::GenerateRequest {
                    model: "policy".into(),
                    prompt: "\n\nHuman: hi\n\nAssistant:".into(),
                    max_new_tokens: 12,
                    sampling: Some(pb::SamplingParams {
                        temperature: 1.0,
                        top_k: 20,
                        top_p: 0.9,
                        seed,
                    }),
                    stop_at_eos: Some(false),
                })
                .await
                .unwrap()
                .into_inner();
            let (mut tokens, mut done) = (Vec::new(), None);
            while let Some(message) = stream.message().await.unwrap() {
                match message.event.unwrap() {
                    pb::generate_response::Event::Token(t) => tokens.push(t.id),
                    pb::generate_response::Event::Done(d) => done = Some(d),
                }
            }
            let done = done.expect("a final message");
            assert_eq!(done.token_ids, tokens);
            assert!(done.timing.is_some());
            tokens
        }
    };
    let a = generate(5).await;
    assert_eq!(a.len(), 12);
    assert_eq!(a, generate(5).await);

    // Preference-pair generation: k = 3 samples give 2 pairs per prompt, best first.
    let pairs = client
        .inference
        .clone()
        .generate_pairs(pb::GeneratePairsRequest {
            policy: "policy".into(),
            judge: "judge".into(),
            judge_kind: pb::JudgeKind::Reward as i32,
            prompts: vec![
                "\n\nHuman: a?\n\nAssistant:".into(),
                "\n\nHuman: b?\n\nAssistant:".into(),
            ],
            samples_per_prompt: 3,
            max_new_tokens: 8,
            sampling: Some(pb::SamplingParams {
                temperature: 1.0,
                top_k: 0,
                top_p: 1.0,
                seed: 1,
            }),
            keep_prompt_end: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pairs.pairs.len(), 4);
    for p in &pairs.pairs {
        assert!(p.chosen_score >= p.rejected_score);
        assert!(p.soft_label >= 0.5 && p.soft_label < 1.0);
    }
    // A prompt longer than the policy's 128 positions less the new tokens: refused, unless it
    // may keep its end; the pairs carry the whole prompt.
    let long_prompt = format!("\n\nHuman: {}?\n\nAssistant:", "x".repeat(150));
    let long_pairs = |keep_prompt_end: bool| {
        let mut inference = client.inference.clone();
        let prompt = long_prompt.clone();
        async move {
            inference
                .generate_pairs(pb::GeneratePairsRequest {
                    policy: "policy".into(),
                    judge: "judge".into(),
                    judge_kind: pb::JudgeKind::Reward as i32,
                    prompts: vec![prompt],
                    samples_per_prompt: 2,
                    max_new_tokens: 8,
                    sampling: None,
                    keep_prompt_end,
                })
                .await
        }
    };
    let status = long_pairs(false).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("prompts[0]"), "{status:?}");
    let kept = long_pairs(true).await.unwrap().into_inner().pairs;
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].prompt, long_prompt);

    // Datasets: upload, list; the same rows give the same id.
    let info = client.upload_dataset("pairs", pair_rows(16)).await.unwrap();
    assert_eq!((info.rows, info.kind), (16, pb::RowKind::Pairs as i32));
    assert_eq!(
        client
            .upload_dataset("again", pair_rows(16))
            .await
            .unwrap()
            .id,
        info.id
    );
    let listed = client
        .datasets
        .clone()
        .list_datasets(pb::ListDatasetsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.datasets.len(), 1);
    assert!(listed.next_page_token.is_empty());
    // Names and rows are bounded, and an upload starts with its header; none of these leaves
    // anything behind in the listing.
    let status = client
        .upload_dataset(&"n".repeat(1 << 20), pair_rows(2))
        .await
        .unwrap_err();
    assert!(format!("{status:#}").contains("header.name"), "{status:#}");
    let status = client
        .upload_dataset(
            "big row",
            vec![Item::Text(pb::TextRow {
                text: "x".repeat(10 << 20),
            })],
        )
        .await
        .unwrap_err();
    assert!(
        format!("{status:#}").contains("max-text-bytes"),
        "{status:#}"
    );
    let headless = client
        .datasets
        .clone()
        .upload_dataset(tokio_stream::iter(vec![pb::UploadDatasetRequest {
            item: Some(Item::Text(pb::TextRow { text: "a".into() })),
        }]))
        .await
        .unwrap_err();
    assert_eq!(
        headless.code(),
        tonic::Code::InvalidArgument,
        "{headless:?}"
    );
    // Pages: three datasets, two per page, in id order.
    client.upload_dataset("eight", pair_rows(8)).await.unwrap();
    client.upload_dataset("four", pair_rows(4)).await.unwrap();
    let page = |token: String| {
        let mut datasets = client.datasets.clone();
        async move {
            datasets
                .list_datasets(pb::ListDatasetsRequest {
                    page_size: 2,
                    page_token: token,
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let first = page(String::new()).await;
    assert_eq!(first.datasets.len(), 2);
    let second = page(first.next_page_token.clone()).await;
    assert_eq!(second.datasets.len(), 1);
    assert!(second.next_page_token.is_empty());
    let mut ids: Vec<String> = first
        .datasets
        .iter()
        .chain(&second.datasets)
        .map(|d| d.id.clone())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    ids.dedup();
    assert_eq!(ids.len(), 3);

    // A SimPO job, watched to the end; its model is registered and loadable by job id.
    let mut steps = Vec::new();
    let job = client
        .run_job(
            pb::StartJobRequest {
                objective: pb::ObjectiveKind::Simpo as i32,
                base_model: "policy".into(),
                dataset_ids: vec![info.id.clone()],
                hyperparameters: Some(pb::TrainingHyperparameters {
                    conflict_alpha: 0.5,
                    ..hyper(8, 2)
                }),
                output_model: "policy-simpo".into(),
            },
            |event| {
                if let Some(step) = &event.step {
                    steps.push(*step);
                }
            },
        )
        .await
        .unwrap();
    assert_eq!(job.state, pb::JobState::Succeeded as i32, "{job:?}");
    assert_eq!(steps.len(), 4);
    assert!(
        steps
            .iter()
            .all(|s| s.loss.is_finite() && s.tokens_per_second > 0.0 && s.accuracy.is_some())
    );
    assert_eq!(steps.last().unwrap().eta_seconds, 0.0);
    let models = client.list_models().await.unwrap();
    let trained = models.iter().find(|m| m.name == "policy-simpo").unwrap();
    let original = models.iter().find(|m| m.name == "policy").unwrap();
    assert_ne!(trained.content_hash, original.content_hash);
    let from_job = client
        .load_model(pb::LoadModelRequest {
            name: "again".into(),
            source: Some(Source::Job(job.id.clone())),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(from_job.content_hash, trained.content_hash);
    let jobs = client
        .training
        .clone()
        .list_jobs(pb::ListJobsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(jobs.jobs.len(), 1);

    // Export, then load the exported folder by path inside the model root.
    client
        .models
        .clone()
        .export_model(pb::ExportModelRequest {
            name: "policy-simpo".into(),
            path: "exported".into(),
        })
        .await
        .unwrap();
    let reloaded = client
        .load_model(pb::LoadModelRequest {
            name: "reloaded".into(),
            source: Some(Source::Path("exported".into())),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(reloaded.content_hash, trained.content_hash);
    client
        .models
        .clone()
        .unload_model(pb::UnloadModelRequest {
            name: "reloaded".into(),
        })
        .await
        .unwrap();
    assert!(
        !client
            .list_models()
            .await
            .unwrap()
            .iter()
            .any(|m| m.name == "reloaded")
    );

    // A reward job with the reward-mechanism conflict and slot orientation, then a cancelled job.
    let reward = client
        .run_job(
            pb::StartJobRequest {
                objective: pb::ObjectiveKind::Reward as i32,
                base_model: "policy".into(),
                dataset_ids: vec![info.id.clone()],
                hyperparameters: Some(pb::TrainingHyperparameters {
                    conflict_alpha: 0.5,
                    orient_slots: true,
                    schedule: pb::LrSchedule::CosineToZero as i32,
                    ..hyper(8, 1)
                }),
                output_model: "policy-rm".into(),
            },
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(reward.state, pb::JobState::Succeeded as i32, "{reward:?}");
    let long = client
        .training
        .clone()
        .start_job(pb::StartJobRequest {
            objective: pb::ObjectiveKind::Sft as i32,
            base_model: "policy".into(),
            dataset_ids: vec![info.id.clone()],
            hyperparameters: Some(hyper(2, 500)),
            output_model: "never".into(),
        })
        .await
        .unwrap()
        .into_inner();
    // A job that has not ended cannot be deleted.
    let delete = |id: &str| {
        let mut training = client.training.clone();
        let request = pb::DeleteJobRequest { id: id.into() };
        async move {
            training
                .delete_job(request)
                .await
                .map(|r| r.into_inner())
                .map_err(model_server::ClientError::from)
        }
    };
    assert_eq!(code_of(delete(&long.id).await), Code::FailedPrecondition);
    client
        .training
        .clone()
        .cancel_job(pb::CancelJobRequest {
            id: long.id.clone(),
        })
        .await
        .unwrap();
    let ended = client.follow_job(&long.id, &mut |_| {}).await.unwrap();
    assert_eq!(ended.state, pb::JobState::Cancelled as i32);

    // DeleteJob removes a finished job's folder and its listing; what was loaded from it stays.
    let job_dir = dir.path().join("jobs").join(&reward.id);
    assert!(job_dir.join("model").is_dir());
    let freed = delete(&reward.id).await.unwrap().freed_bytes;
    assert!(freed > 10_000, "freed {freed} bytes");
    assert!(!job_dir.exists());
    assert!(
        !std::fs::read_dir(dir.path().join("jobs"))
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains(&reward.id)),
        "nothing of the job is left beside the other jobs"
    );
    let listed = listed_jobs(&client).await;
    assert!(!listed.iter().any(|j| j.id == reward.id));
    assert!(listed.iter().any(|j| j.id == long.id));
    assert_eq!(code_of(delete(&reward.id).await), Code::NotFound);
    assert_eq!(client.delete_job_if_present(&reward.id).await.unwrap(), 0);
    assert_eq!(
        code_of(
            client
                .load_model(pb::LoadModelRequest {
                    name: "gone".into(),
                    source: Some(pb::load_model_request::Source::Job(reward.id.clone())),
                    ..Default::default()
                })
                .await
        ),
        Code::NotFound
    );
    assert!(
        client
            .list_models()
            .await
            .unwrap()
            .iter()
            .any(|m| m.name == "policy-rm"),
        "the model trained by the deleted job stays resident"
    );
    assert!(
        delete(&long.id).await.is_ok(),
        "a cancelled job can be deleted"
    );

    // Reflection lists every service without a proto file.
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(channel);
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(
        tonic_reflection::pb::v1::server_reflection_response::MessageResponse::ListServicesResponse(
            list,
        ),
    ) = response.message_response
    else {
        panic!("no service list")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in [
        "w2s.v1.Models",
        "w2s.v1.Inference",
        "w2s.v1.Datasets",
        "w2s.v1.Training",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == service),
            "{service} missing from {names:?}"
        );
    }
    // The older v1alpha protocol, which grpcurl, Postman and grpcui still use, answers too.
    use tonic_reflection::pb::v1alpha as alpha;
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let request = alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let response = alpha::server_reflection_client::ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        response.message_response,
        Some(alpha::server_reflection_response::MessageResponse::ListServicesResponse(list))
            if list.service.iter().any(|s| s.name == "w2s.v1.Inference")
    ));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn error_codes_auth_deadlines_and_overload() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.token = Some("s3cret".into());
    cfg.queue_capacity = 2;
    cfg.stall_seconds = 0.2;
    let server = RunningServer::start(cfg).await.unwrap();
    let anonymous = W2sClient::connect(&server.url()).await.unwrap();
    assert_eq!(
        code_of(anonymous.list_models().await),
        Code::Unauthenticated
    );
    let options = ClientOptions {
        token: Some("s3cret".into()),
        ..Default::default()
    };
    let client = W2sClient::connect_with(&server.url(), &options)
        .await
        .unwrap();
    client
        .load_model(preset("m", "tiny-gpt2", false))
        .await
        .unwrap();

    // A row-level validation error names the row.
    let mut rows = pair_rows(3);
    rows.push(Item::Pair(pb::PairRow {
        chosen: "no marker".into(),
        rejected: "x".into(),
        ..Default::default()
    }));
    match client.upload_dataset("bad", rows).await {
        Err(model_server::ClientError::Rpc(status)) => {
            assert_eq!(status.code(), Code::InvalidArgument);
            assert!(status.message().contains("rows[3]"), "{}", status.message());
        }
        other => panic!("{other:?}"),
    }
    // Unknown dataset and job.
    let start = pb::StartJobRequest {
        objective: pb::ObjectiveKind::Sft as i32,
        base_model: "m".into(),
        dataset_ids: vec!["ds-0000000000000000".into()],
        hyperparameters: Some(hyper(2, 1)),
        output_model: "out".into(),
    };
    assert_eq!(
        code_of(
            client
                .training
                .clone()
                .start_job(start.clone())
                .await
                .map(|r| r.into_inner())
                .map_err(model_server::ClientError::from)
        ),
        Code::NotFound
    );
    assert_eq!(
        code_of(
            client
                .training
                .clone()
                .cancel_job(pb::CancelJobRequest { id: "job-x".into() })
                .await
                .map(|r| r.into_inner())
                .map_err(model_server::ClientError::from)
        ),
        Code::NotFound
    );
    // Wrong row kind for the objective names the row; bad hyperparameters name the field.
    let texts = client
        .upload_dataset(
            "texts",
            vec![
                Item::Text(pb::TextRow {
                    text: "plain".into(),
                }),
                Item::Text(pb::TextRow {
                    text: "more".into(),
                }),
            ],
        )
        .await
        .unwrap();
    let mut wrong = start.clone();
    wrong.objective = pb::ObjectiveKind::Reward as i32;
    wrong.dataset_ids = vec![texts.id.clone()];
    // Refused before queueing (it used to start and fail on its first step).
    let status = client.training.clone().start_job(wrong).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("row 0"), "{}", status.message());
    let mut bad = start.clone();
    bad.dataset_ids = vec![texts.id.clone()];
    bad.hyperparameters = Some(pb::TrainingHyperparameters {
        minibatch_size: 3,
        ..hyper(2, 1)
    });
    match client.training.clone().start_job(bad).await {
        Err(status) => {
            assert_eq!(status.code(), Code::InvalidArgument);
            assert!(
                status.message().contains("minibatch_size"),
                "{}",
                status.message()
            );
        }
        Ok(r) => panic!("{r:?}"),
    }

    // Overload: while the device loop is held in one long pass, a burst finds a queue of 2;
    // exactly that many are accepted and served, the rest refused, none failed. (The loop drains
    // its queue between passes, so without the hold a fast machine would accept the whole burst.)
    client
        .load_model(preset("big", "gpt2", false))
        .await
        .unwrap();
    wait_for_health(&server.url(), ServingStatus::Serving).await;
    let long_text = "word ".repeat(20);
    let holder = spawn_logprobs(&client, "big", "word ".repeat(80), 4);
    // Health goes NOT_SERVING only once the device loop has been inside that pass for 0.2 s.
    wait_for_health(&server.url(), ServingStatus::NotServing).await;
    let tasks: Vec<_> = (0..24)
        .map(|_| spawn_logprobs(&client, "m", long_text.clone(), 8))
        .collect();
    let mut codes = Vec::new();
    for task in tasks {
        codes.push(match task.await.unwrap() {
            Ok(_) => Code::Ok,
            Err(model_server::ClientError::Rpc(s)) => s.code(),
            Err(e) => panic!("{e}"),
        });
    }
    holder.await.unwrap().unwrap();
    assert!(
        codes
            .iter()
            .all(|c| matches!(c, Code::Ok | Code::ResourceExhausted)),
        "{codes:?}"
    );
    assert_eq!(
        codes.iter().filter(|c| **c == Code::Ok).count(),
        2,
        "{codes:?}"
    );
    client.unload_if_present("big").await.unwrap();

    // Deadlines: a request that cannot finish in time ends with a deadline error.
    let mut request = tonic::Request::new(pb::TokenLogprobsRequest {
        model: "m".into(),
        texts: vec![long_text.clone(); 512],
        ..Default::default()
    });
    request.set_timeout(Duration::from_millis(1));
    let status = client
        .inference
        .clone()
        .token_logprobs(request)
        .await
        .unwrap_err();
    assert!(
        matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{status:?}"
    );
    server.shutdown().await.unwrap();
}

/// Loads a tiny OPT base model, uploads eight pairs and starts a preference job on them.
async fn start_pairs_job(
    client: &W2sClient,
    objective: pb::ObjectiveKind,
    hyperparameters: pb::TrainingHyperparameters,
) -> pb::JobInfo {
    client
        .load_model(preset("base", "tiny-opt-post-ln", false))
        .await
        .unwrap();
    let dataset = client.upload_dataset("pairs", pair_rows(8)).await.unwrap();
    client
        .training
        .clone()
        .start_job(pb::StartJobRequest {
            objective: objective as i32,
            base_model: "base".into(),
            dataset_ids: vec![dataset.id],
            hyperparameters: Some(hyperparameters),
            output_model: "trained".into(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn simpo_job_to_end(data_dir: &std::path::Path, interrupt_after: Option<u64>) -> String {
    let server = RunningServer::start(config(data_dir)).await.unwrap();
    let client = W2sClient::connect(&server.url()).await.unwrap();
    let job = start_pairs_job(
        &client,
        pb::ObjectiveKind::Dpo,
        pb::TrainingHyperparameters {
            conflict_alpha: 0.5,
            ..hyper(4, 3)
        },
    )
    .await;
    let Some(stop) = interrupt_after else {
        let ended = client.follow_job(&job.id, &mut |_| {}).await.unwrap();
        assert_eq!(ended.state, pb::JobState::Succeeded as i32, "{ended:?}");
        let hash = client
            .list_models()
            .await
            .unwrap()
            .into_iter()
            .find(|m| m.name == "trained")
            .unwrap()
            .content_hash;
        server.shutdown().await.unwrap();
        return hash;
    };
    // Watch until `stop` steps are done, then restart the server under the running job.
    let mut stream = client
        .training
        .clone()
        .watch_job(pb::WatchJobRequest { id: job.id.clone() })
        .await
        .unwrap()
        .into_inner();
    while let Some(event) = stream.message().await.unwrap() {
        if event.step.as_ref().is_some_and(|s| s.step >= stop) {
            break;
        }
    }
    drop(stream);
    server.shutdown().await.unwrap();
    let server = RunningServer::start(config(data_dir)).await.unwrap();
    let client = W2sClient::connect(&server.url()).await.unwrap();
    let mut first_step = None;
    let ended = client
        .follow_job(&job.id, &mut |e| {
            if let Some(s) = &e.step {
                first_step.get_or_insert(s.step);
            }
        })
        .await
        .unwrap();
    assert_eq!(ended.state, pb::JobState::Succeeded as i32, "{ended:?}");
    assert!(
        first_step.unwrap_or(u64::MAX) > stop,
        "resumed at {first_step:?}, stopped after {stop}"
    );
    let hash = client
        .list_models()
        .await
        .unwrap()
        .into_iter()
        .find(|m| m.name == "trained")
        .unwrap()
        .content_hash;
    server.shutdown().await.unwrap();
    hash
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_interrupted_by_a_server_restart_resumes_to_the_same_model() {
    let uninterrupted = tempfile::tempdir().unwrap();
    let interrupted = tempfile::tempdir().unwrap();
    let expected = simpo_job_to_end(uninterrupted.path(), None).await;
    let resumed = simpo_job_to_end(interrupted.path(), Some(2)).await;
    assert_eq!(resumed, expected);
    // A succeeded job keeps its exported model and drops its resume checkpoint.
    for data in [uninterrupted.path(), interrupted.path()] {
        let jobs: Vec<_> = std::fs::read_dir(data.join("jobs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(jobs.len(), 1, "{jobs:?}");
        assert!(jobs[0].join("model/config.json").is_file());
        assert!(!jobs[0].join("checkpoint").exists(), "{:?}", jobs[0]);
    }
}

async fn logprobs_of(server: &RunningServer, texts: &[String], concurrent: bool) -> Vec<Vec<f32>> {
    let client = W2sClient::connect(&server.url()).await.unwrap();
    let request = |text: String| pb::TokenLogprobsRequest {
        model: "m".into(),
        texts: vec![text],
        ..Default::default()
    };
    if concurrent {
        let tasks: Vec<_> = texts
            .iter()
            .map(|t| {
                let client = client.clone();
                let r = request(t.clone());
                tokio::spawn(async move { client.token_logprobs(r).await.unwrap() })
            })
            .collect();
        let mut out = Vec::new();
        for task in tasks {
            out.push(task.await.unwrap().sequences[0].logprobs.clone());
        }
        out
    } else {
        let mut out = Vec::new();
        for t in texts {
            out.push(
                client
                    .token_logprobs(request(t.clone()))
                    .await
                    .unwrap()
                    .sequences[0]
                    .logprobs
                    .clone(),
            );
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dynamic_batching_gives_unbatched_results_and_serves_many_clients() {
    let dir = tempfile::tempdir().unwrap();
    let mut batched_config = config(&dir.path().join("a"));
    batched_config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let batched = RunningServer::start(batched_config).await.unwrap();
    let mut single_config = config(&dir.path().join("b"));
    single_config.max_batch_requests = 1;
    let single = RunningServer::start(single_config).await.unwrap();
    // Passes sized by measured time: a 1 µs target cuts every pass after the first timed one
    // down to a single sequence, and sequences over 32 tokens into 32-token chunks through the
    // KV cache.
    let mut timed_config = config(&dir.path().join("c"));
    timed_config.max_pass_ms = 0.001;
    let timed = RunningServer::start(timed_config).await.unwrap();
    // A compute pool of its own with one thread (`--threads 1`), otherwise as `single`.
    let mut one_thread_config = config(&dir.path().join("d"));
    one_thread_config.max_batch_requests = 1;
    one_thread_config.threads = 1;
    let one_thread = RunningServer::start(one_thread_config).await.unwrap();
    for server in [&batched, &single, &timed, &one_thread] {
        W2sClient::connect(&server.url())
            .await
            .unwrap()
            .load_model(preset("m", "tiny-gpt2", false))
            .await
            .unwrap();
    }
    let texts: Vec<String> = (0..48)
        .map(|i| dialogue(i, &"abc ".repeat(3 * (i % 7) + 1)))
        .collect();
    let together = logprobs_of(&batched, &texts, true).await;
    let alone = logprobs_of(&single, &texts, false).await;
    let on_one_thread = logprobs_of(&one_thread, &texts, false).await;
    // The thread count splits the same work the same way: bit for bit the same numbers.
    assert_eq!(on_one_thread, alone, "one thread changed the log-probs");
    one_thread.shutdown().await.unwrap();
    let cut = logprobs_of(&timed, &texts, true).await;
    for ((a, b), c) in together.iter().zip(&alone).zip(&cut) {
        assert_eq!(a.len(), b.len());
        assert_eq!(c.len(), b.len());
        for ((x, y), z) in a.iter().zip(b).zip(c) {
            assert!((x - y).abs() <= 1e-5, "{x} vs {y}");
            assert!((z - y).abs() <= 1e-5, "timed passes: {z} vs {y}");
        }
    }
    timed.shutdown().await.unwrap();
    // Some requests were actually merged.
    let metrics = batched.metrics().render();
    let singles: u64 = metric_value(&metrics, "w2s_batch_requests_bucket{le=\"1.0\"}");
    let batches: u64 = metric_value(&metrics, "w2s_batch_requests_count");
    assert!(
        singles < batches,
        "no batch had more than one request:\n{metrics}"
    );

    // 32 concurrent clients x 50 requests: nothing fails except explicit overload.
    let mut tasks = Vec::new();
    for c in 0..32 {
        let url = batched.url();
        tasks.push(tokio::spawn(async move {
            let client = W2sClient::connect(&url).await.unwrap();
            let mut codes = Vec::new();
            for r in 0..50 {
                let result = client
                    .score_pairs(pb::ScorePairsRequest {
                        model: "m".into(),
                        pairs: vec![pb::PreferencePair {
                            prompt: String::new(),
                            chosen: dialogue(c * 50 + r, "fine"),
                            rejected: dialogue(c * 50 + r, "bad"),
                        }],
                        scoring: pb::PairScoring::MeanLogprob as i32,
                        ..Default::default()
                    })
                    .await;
                codes.push(match result {
                    Ok(_) => Code::Ok,
                    Err(model_server::ClientError::Rpc(s)) => s.code(),
                    Err(e) => panic!("client {c}: {e}"),
                });
            }
            codes
        }));
    }
    let mut ok = 0;
    for task in tasks {
        for code in task.await.unwrap() {
            assert!(
                matches!(code, Code::Ok | Code::ResourceExhausted),
                "{code:?}"
            );
            ok += usize::from(code == Code::Ok);
        }
    }
    assert!(ok > 0);

    // The metrics endpoint serves the registry over HTTP, and a Prometheus text parser reads
    // every metric of it.
    let addr = batched.metrics_addr().unwrap();
    let body = http_get(addr, "/metrics", None).await;
    assert!(
        body.starts_with("HTTP/1.1 200")
            && body.contains("w2s_requests_total{rpc=\"ScorePairs\",code=\"Ok\"}"),
        "{body}"
    );
    let exposition = body
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .unwrap_or_default();
    let scrape =
        prometheus_parse::Scrape::parse(exposition.lines().map(|l| Ok(l.to_string()))).unwrap();
    let sample = |name: &str, label: Option<(&str, &str)>| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| s.value.clone())
    };
    // OpenMetrics declares the counter family `w2s_requests` and its sample
    // `w2s_requests_total`; a Prometheus-text parser reads that sample untyped.
    let Some(
        prometheus_parse::Value::Counter(ok_scores) | prometheus_parse::Value::Untyped(ok_scores),
    ) = sample("w2s_requests_total", Some(("rpc", "ScorePairs")))
    else {
        panic!("no ScorePairs counter in\n{exposition}");
    };
    assert!(ok_scores >= 1.0);
    assert!(
        matches!(
            sample("w2s_request_duration_seconds", Some(("rpc", "ScorePairs"))),
            Some(prometheus_parse::Value::Histogram(_))
        ),
        "{exposition}"
    );
    for gauge in [
        "w2s_queue_depth",
        "w2s_active_tasks",
        "w2s_resident_models",
        "w2s_job_step",
        "w2s_job_total_steps",
    ] {
        assert!(
            matches!(sample(gauge, None), Some(prometheus_parse::Value::Gauge(_))),
            "{gauge} in\n{exposition}"
        );
    }
    assert_eq!(
        sample("w2s_resident_models", None),
        Some(prometheus_parse::Value::Gauge(1.0))
    );
    batched.shutdown().await.unwrap();
    single.shutdown().await.unwrap();
}

/// A second server on a data folder in use is refused with a clear error (they would share and
/// overwrite each other's jobs, models and datasets); the folder serves again once freed.
#[tokio::test]
async fn a_data_folder_serves_one_server_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let first = RunningServer::start(config(dir.path())).await.unwrap();
    let err = match RunningServer::start(config(dir.path())).await {
        Ok(_) => panic!("a second server started on the same data folder"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("in use by another server"), "{err}");
    assert!(err.contains(&dir.path().display().to_string()), "{err}");
    first.shutdown().await.unwrap();
    let again = RunningServer::start(config(dir.path())).await.unwrap();
    again.shutdown().await.unwrap();
}

/// At start-up, job folders are swept of what killed or disk-full writers leave (temporary
/// checkpoints, half-written JSON, export temporaries) and folders without a readable spec and
/// state are set aside, so they are neither listed nor resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_sweeps_job_leftovers_unfinished_deletions_and_sets_broken_jobs_aside() {
    let dir = tempfile::tempdir().unwrap();
    let hash = simpo_job_to_end(dir.path(), None).await;
    assert!(!hash.is_empty());
    let jobs = dir.path().join("jobs");
    let job = std::fs::read_dir(&jobs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.join("spec.json").is_file())
        .unwrap();
    std::fs::create_dir_all(job.join("checkpoint.tmp")).unwrap();
    std::fs::write(job.join("checkpoint.tmp/weights.safetensors"), b"half").unwrap();
    std::fs::write(job.join("state.json.tmp"), b"{").unwrap();
    std::fs::create_dir_all(job.join("model.partial")).unwrap();
    std::fs::create_dir_all(jobs.join("ghost/checkpoint")).unwrap();
    // A DeleteJob that the server did not finish (killed between the rename and the removal).
    std::fs::create_dir_all(jobs.join(".deleted-job-gone/model")).unwrap();
    std::fs::write(jobs.join(".deleted-job-gone/model/weights"), b"w").unwrap();
    let server = RunningServer::start(config(dir.path())).await.unwrap();
    let client = W2sClient::connect(&server.url()).await.unwrap();
    for leftover in ["checkpoint.tmp", "state.json.tmp", "model.partial"] {
        assert!(
            !job.join(leftover).exists(),
            "{leftover} survived the sweep"
        );
    }
    assert!(job.join("spec.json").is_file() && job.join("model").is_dir());
    assert!(!jobs.join("ghost").exists());
    assert!(jobs.join(".broken-ghost/checkpoint").is_dir());
    assert!(!jobs.join(".deleted-job-gone").exists());
    let listed = listed_jobs(&client).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    server.shutdown().await.unwrap();
}

/// One HTTP/1.1 request to the metrics port; the whole response.
async fn http_get(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> String {
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\n{auth}connection: close\r\n\r\n");
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).unwrap();
        body
    })
    .await
    .unwrap()
}

/// The metrics port (hyper's HTTP/1 server) asks for the bearer token with --metrics-token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_port_can_require_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    config.token = Some("secret-token".into());
    config.metrics_token = true;
    let server = RunningServer::start(config).await.unwrap();
    let addr = server.metrics_addr().unwrap();
    let refused = http_get(addr, "/metrics", None).await;
    assert!(refused.starts_with("HTTP/1.1 401"), "{refused}");
    let wrong = http_get(addr, "/metrics", Some("other")).await;
    assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
    let served = http_get(addr, "/metrics", Some("secret-token")).await;
    assert!(
        served.starts_with("HTTP/1.1 200") && served.contains("w2s_"),
        "{served}"
    );
    let elsewhere = http_get(addr, "/other", Some("secret-token")).await;
    assert!(elsewhere.starts_with("HTTP/1.1 404"), "{elsewhere}");
    server.shutdown().await.unwrap();
}

/// The queue-depth gauge counts requests waiting for the device thread: back to 0 once the
/// server has answered everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_depth_gauge_returns_to_zero_when_idle() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    let server = RunningServer::start(config).await.unwrap();
    let client = W2sClient::connect(&server.url()).await.unwrap();
    client
        .load_model(preset("m", "tiny-gpt2", false))
        .await
        .unwrap();
    let requests: Vec<_> = (0..6)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .token_logprobs(pb::TokenLogprobsRequest {
                        model: "m".into(),
                        texts: vec![format!("text number {i}")],
                        ..Default::default()
                    })
                    .await
            })
        })
        .collect();
    for request in requests {
        request.await.unwrap().unwrap();
    }
    let addr = server.metrics_addr().unwrap();
    let mut depth = u64::MAX;
    for _ in 0..50 {
        depth = metric_value(&http_get(addr, "/metrics", None).await, "w2s_queue_depth");
        if depth == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(depth, 0);
    server.shutdown().await.unwrap();
}

fn metric_value(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(key)
                .map(|v| v.trim().parse::<f64>().unwrap_or(0.0) as u64)
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_self_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let mut cfg = config(dir.path());
    cfg.tls_cert = Some(cert.clone());
    cfg.tls_key = Some(key);
    cfg.presets.push(model_server::config::NamedSource {
        name: "m".into(),
        value: "tiny-opt".into(),
    });
    let server = RunningServer::start(cfg).await.unwrap();
    let url = format!("https://localhost:{}", server.addr().port());
    let options = ClientOptions {
        tls_ca: Some(cert),
        tls_domain: Some("localhost".into()),
        ..Default::default()
    };
    let client = W2sClient::connect_with(&url, &options).await.unwrap();
    assert_eq!(client.list_models().await.unwrap().len(), 1);
    // Plain text against a TLS server fails.
    let plain = W2sClient::connect(&server.url()).await;
    if let Ok(plain) = plain {
        assert!(plain.list_models().await.is_err());
    }
    server.shutdown().await.unwrap();
}

/// Exports never delete data they did not write: into the data folder, over a folder that is
/// not a previous export, or over a file, they are refused and the data survives; a new folder
/// and a previous export are fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_refuse_to_replace_data_they_did_not_write() {
    let root = tempfile::tempdir().unwrap();
    let mut cfg = config(&root.path().join("w2s-data"));
    cfg.model_root = root.path().to_path_buf();
    let server = RunningServer::start(cfg).await.unwrap();
    let client = W2sClient::connect(&server.url()).await.unwrap();
    client
        .load_model(pb::LoadModelRequest {
            name: "tiny".into(),
            source: Some(Source::Preset("tiny-gpt2".into())),
            ..Default::default()
        })
        .await
        .unwrap();
    client.upload_dataset("keep", pair_rows(4)).await.unwrap();
    let datasets = root.path().join("w2s-data/datasets");
    let before = std::fs::read_dir(&datasets).unwrap().count();
    assert!(before > 0);
    std::fs::create_dir(root.path().join("notes")).unwrap();
    std::fs::write(root.path().join("notes/mine.txt"), "mine").unwrap();
    std::fs::write(root.path().join("file"), "x").unwrap();
    let export = |path: &str| {
        let mut models = client.models.clone();
        let path = path.to_string();
        async move {
            models
                .export_model(pb::ExportModelRequest {
                    name: "tiny".into(),
                    path,
                })
                .await
        }
    };
    for path in ["w2s-data", "w2s-data/datasets", "notes", "file"] {
        let status = export(path).await.unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::FailedPrecondition,
            "{path}: {status:?}"
        );
    }
    // A path through a file (ENOTDIR) is the client's mistake, not a server fault; so is a
    // model folder whose config.json is a directory (EISDIR).
    let status = export("file/sub").await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    std::fs::create_dir_all(root.path().join("odd/config.json")).unwrap();
    let status = client
        .models
        .clone()
        .load_model(pb::LoadModelRequest {
            name: "odd".into(),
            source: Some(Source::Path("odd".into())),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert_eq!(std::fs::read_dir(&datasets).unwrap().count(), before);
    assert_eq!(
        std::fs::read_to_string(root.path().join("notes/mine.txt")).unwrap(),
        "mine"
    );
    // A new folder, then the same folder again (a previous export), work; nothing is left over.
    export("out").await.unwrap();
    export("out").await.unwrap();
    assert!(root.path().join("out/config.json").is_file());
    let leftovers: Vec<String> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".partial") || n.contains(".replaced"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Model folders whose files lead out of the root, or are FIFOs, are refused at once (a FIFO
    // would block the device thread until written); links inside the root load.
    let load = |name: &str| {
        let mut models = client.models.clone();
        let name = name.to_string();
        async move {
            models
                .load_model(pb::LoadModelRequest {
                    name: name.clone(),
                    source: Some(Source::Path(name)),
                    ..Default::default()
                })
                .await
        }
    };
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.json"), "{}").unwrap();
    for name in ["linked", "escaping", "fifo"] {
        std::fs::create_dir(root.path().join(name)).unwrap();
        for entry in std::fs::read_dir(root.path().join("out")).unwrap() {
            let entry = entry.unwrap();
            std::os::unix::fs::symlink(
                entry.path(),
                root.path().join(name).join(entry.file_name()),
            )
            .unwrap();
        }
    }
    load("linked").await.unwrap();
    let escaping = root.path().join("escaping/tokenizer.json");
    let _ = std::fs::remove_file(&escaping);
    std::os::unix::fs::symlink(outside.path().join("secret.json"), &escaping).unwrap();
    let status = load("escaping").await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("escaping/tokenizer.json"),
        "{status:?}"
    );
    let fifo = root.path().join("fifo/config.json");
    std::fs::remove_file(&fifo).unwrap();
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), load("fifo"))
        .await
        .expect("a FIFO in a model folder must not block the load")
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        !status.message().contains(&*root.path().to_string_lossy()),
        "no absolute server path: {status:?}"
    );
    server.shutdown().await.unwrap();
}

/// Work caps are checked before queueing: the request that once wedged the device thread
/// (GeneratePairs with 4294967295 samples per prompt) and a 10 MB text are refused at once with
/// INVALID_ARGUMENT naming the limit, and the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_work_is_refused_before_it_reaches_the_device() {
    let dir = tempfile::tempdir().unwrap();
    let server = RunningServer::start(config(dir.path())).await.unwrap();
    let client = W2sClient::connect(&server.url()).await.unwrap();
    for name in ["policy", "judge"] {
        client
            .load_model(preset(name, "tiny-gpt2", name == "judge"))
            .await
            .unwrap();
    }
    // A one-token GeneratePairs that the server must refuse.
    let refused_pairs = |samples_per_prompt: u32, sampling: Option<pb::SamplingParams>| {
        let mut inference = client.inference.clone();
        async move {
            inference
                .generate_pairs(pb::GeneratePairsRequest {
                    policy: "policy".into(),
                    judge: "judge".into(),
                    judge_kind: pb::JudgeKind::Reward as i32,
                    prompts: vec!["\n\nHuman: a?\n\nAssistant:".into()],
                    samples_per_prompt,
                    max_new_tokens: 1,
                    sampling,
                    keep_prompt_end: false,
                })
                .await
                .unwrap_err()
        }
    };
    let status = refused_pairs(u32::MAX, None).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("--max-samples-per-prompt"),
        "{status:?}"
    );
    // Sampling settings out of range are refused, not quietly replaced.
    for (temperature, top_p, field) in [
        (1.0, -5.0, "top_p"),
        (1.0, 1.5, "top_p"),
        (-1.0, 0.9, "temperature"),
        (f64::NAN, 0.9, "temperature"),
    ] {
        let sampling = pb::SamplingParams {
            temperature,
            top_p,
            ..Default::default()
        };
        let status = refused_pairs(2, Some(sampling)).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(field), "{status:?}");
    }
    let huge = format!("\n\nHuman: {}\n\nAssistant: x", "a".repeat(10 << 20));
    let status = client
        .inference
        .clone()
        .score_pairs(pb::ScorePairsRequest {
            model: "judge".into(),
            pairs: vec![pb::PreferencePair {
                prompt: String::new(),
                chosen: huge.clone(),
                rejected: huge,
            }],
            scoring: pb::PairScoring::Reward as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("--max-text-bytes"), "{status:?}");
    // A small request is still served.
    let scores = client
        .score_pairs(pb::ScorePairsRequest {
            model: "judge".into(),
            pairs: vec![pb::PreferencePair {
                prompt: String::new(),
                chosen: "\n\nHuman: a?\n\nAssistant: yes".into(),
                rejected: "\n\nHuman: a?\n\nAssistant: no".into(),
            }],
            scoring: pb::PairScoring::Reward as i32,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(scores.scores.len(), 1);
    server.shutdown().await.unwrap();
}

/// Every StartJob field is checked before the job is queued: what used to be accepted and fail
/// later (or silently "succeed") is INVALID_ARGUMENT naming the field; a name that could forge
/// a log line is refused; two live jobs cannot share an output name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_job_validates_every_field_before_queueing() {
    let dir = tempfile::tempdir().unwrap();
    let (server, client) = server_with_policy(dir.path()).await;
    let pairs = client.upload_dataset("pairs", pair_rows(8)).await.unwrap();
    let texts = client
        .upload_dataset(
            "texts",
            (0..8)
                .map(|i| {
                    Item::Text(pb::TextRow {
                        text: format!("text {i}"),
                    })
                })
                .collect(),
        )
        .await
        .unwrap();
    let start = |objective: pb::ObjectiveKind,
                 dataset: &str,
                 h: pb::TrainingHyperparameters,
                 output: &str| {
        let mut training = client.training.clone();
        let request = pb::StartJobRequest {
            objective: objective as i32,
            base_model: "policy".into(),
            dataset_ids: vec![dataset.to_string()],
            hyperparameters: Some(h),
            output_model: output.to_string(),
        };
        async move { training.start_job(request).await }
    };
    let cases: Vec<(
        &str,
        pb::ObjectiveKind,
        &str,
        pb::TrainingHyperparameters,
        &str,
    )> = vec![
        (
            "weight_decay",
            pb::ObjectiveKind::Sft,
            &pairs.id,
            pb::TrainingHyperparameters {
                weight_decay: f64::NAN,
                ..hyper(4, 1)
            },
            "out",
        ),
        (
            "warmup_frac",
            pb::ObjectiveKind::Sft,
            &pairs.id,
            pb::TrainingHyperparameters {
                warmup_frac: Some(-5.0),
                ..hyper(4, 1)
            },
            "out",
        ),
        (
            "max_ctx",
            pb::ObjectiveKind::Sft,
            &pairs.id,
            pb::TrainingHyperparameters {
                max_ctx: 1,
                ..hyper(4, 1)
            },
            "out",
        ),
        (
            "batch_size",
            pb::ObjectiveKind::Sft,
            &pairs.id,
            hyper(64, 1),
            "out",
        ),
        (
            "dataset_ids",
            pb::ObjectiveKind::Simpo,
            &texts.id,
            hyper(4, 1),
            "out",
        ),
        (
            "output_model",
            pb::ObjectiveKind::Sft,
            &pairs.id,
            hyper(4, 1),
            "evil\nINFO forged",
        ),
    ];
    for (field, objective, dataset, h, output) in cases {
        let status = start(objective, dataset, h, output).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(status.message().contains(field), "{field}: {status:?}");
    }
    // Two live jobs may not write the same output model.
    start(pb::ObjectiveKind::Sft, &pairs.id, hyper(2, 500), "same")
        .await
        .unwrap();
    let status = start(pb::ObjectiveKind::Sft, &pairs.id, hyper(2, 1), "same")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    server.shutdown().await.unwrap();
}

/// The watch of a running job breaks when its server restarts: `follow_job` watches again and
/// follows the job, resumed by the new server on the same address, to its end, with the same
/// client (which used to stop at the first broken stream, ending a whole study).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn following_a_job_survives_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = RunningServer::start(config(dir.path())).await.unwrap();
    let url = server.url();
    let address: std::net::SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    let client = W2sClient::connect(&url).await.unwrap();
    // Far more steps than pass before the restart.
    let job = start_pairs_job(&client, pb::ObjectiveKind::Simpo, hyper(4, 60)).await;
    let (step_tx, mut step_rx) = tokio::sync::mpsc::unbounded_channel();
    let follower = tokio::spawn({
        let client = client.clone();
        let id = job.id.clone();
        async move {
            client
                .follow_job(&id, &mut |event| {
                    if let Some(step) = &event.step {
                        let _ = step_tx.send(step.step);
                    }
                })
                .await
        }
    });
    while let Some(step) = step_rx.recv().await {
        if step >= 2 {
            break;
        }
    }
    server.shutdown().await.unwrap();
    let mut restarted = config(dir.path());
    restarted.listen = address;
    let server = RunningServer::start(restarted).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(120), follower)
        .await
        .expect("the follow did not end")
        .unwrap()
        .unwrap();
    assert_eq!(ended.state, pb::JobState::Succeeded as i32, "{ended:?}");
    assert_eq!(ended.step, ended.total_steps);
    server.shutdown().await.unwrap();
}

/// IPO, added as a variant and its loss in `objectives.rs` plus its proto value: it trains over
/// gRPC like any preference objective, with its frozen reference, and refuses a conflict dose
/// (it has no conflict term).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipo_job_trains_end_to_end_and_refuses_a_conflict_dose() {
    let dir = tempfile::tempdir().unwrap();
    let server = RunningServer::start(config(dir.path())).await.unwrap();
    let client = W2sClient::connect(&server.url()).await.unwrap();
    let job = start_pairs_job(&client, pb::ObjectiveKind::Ipo, hyper(4, 2)).await;
    assert_eq!(job.objective, pb::ObjectiveKind::Ipo as i32);
    let ended = client.follow_job(&job.id, &mut |_| {}).await.unwrap();
    assert_eq!(ended.state, pb::JobState::Succeeded as i32, "{ended:?}");
    let dataset = client.upload_dataset("more", pair_rows(8)).await.unwrap();
    let refused = client
        .training
        .clone()
        .start_job(pb::StartJobRequest {
            objective: pb::ObjectiveKind::Ipo as i32,
            base_model: "base".into(),
            dataset_ids: vec![dataset.id],
            hyperparameters: Some(pb::TrainingHyperparameters {
                conflict_alpha: 0.5,
                ..hyper(4, 1)
            }),
            output_model: "other".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("conflict_alpha"), "{refused:?}");
    server.shutdown().await.unwrap();
}
