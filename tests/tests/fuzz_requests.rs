//! Property-based fuzzing of the server's request messages (issue "Hardening"): random
//! ScorePairs, TokenLogprobs, ScoreTexts, Generate, GeneratePairs, LoadModel, UnloadModel,
//! ExportModel, UploadDataset, StartJob, WatchJob, CancelJob and DeleteJob requests (odd strings, NUL and
//! newlines, huge and NaN numbers, unknown names and enum values) against one in-process server
//! with tiny models. Every answer must be OK or a client-error code (never INTERNAL, UNKNOWN or
//! UNAVAILABLE, which would mean a server fault, a panic or a dead server), and the server must
//! still answer a valid request afterwards. Seeded and bounded, so CI runs the same cases.

use std::time::Duration;

use model_server::{RunningServer, ServerConfig, W2sClient};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use tonic::Code;
use w2s_proto::v1 as pb;
use w2s_proto::v1::load_model_request::Source;
use w2s_proto::v1::upload_dataset_request::Item;

/// Strings a hostile client might send: printable text, control characters, dialogue markers,
/// path tricks, long runs.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        ".{0,24}",
        "[a-z \n]{0,40}",
        Just(String::new()),
        Just(" ".into()),
        Just("\0".into()),
        Just("\n\nHuman: hi?\n\nAssistant: yes".into()),
        Just("../../etc".into()),
        Just("/".into()),
        "[\u{0}-\u{1f}]{1,8}",
        Just("x".repeat(3000)),
    ]
}

fn model_name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => Just("policy".to_string()),
        3 => Just("judge".to_string()),
        1 => Just("missing".to_string()),
        1 => "[a-z]{1,8}",
        2 => text(),
    ]
}

fn count() -> impl Strategy<Value = u32> {
    prop_oneof![
        0..40u32,
        Just(1024),
        Just(1025),
        Just(u32::MAX),
        any::<u32>()
    ]
}

fn real() -> impl Strategy<Value = f64> {
    prop_oneof![
        8 => 0.0..2.0f64,
        1 => -2.0..0.0f64,
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(-1e300),
        1 => Just(0.0),
        1 => any::<f64>(),
    ]
}

fn pairs() -> impl Strategy<Value = Vec<pb::PreferencePair>> {
    prop::collection::vec(
        (text(), text(), text()).prop_map(|(prompt, chosen, rejected)| pb::PreferencePair {
            prompt,
            chosen,
            rejected,
        }),
        0..4,
    )
}

fn hyperparameters() -> impl Strategy<Value = pb::TrainingHyperparameters> {
    (
        (
            real(),
            count(),
            count(),
            prop_oneof![1..3u32, Just(0), Just(u32::MAX)],
        ),
        (prop::option::of(real()), real(), real(), count()),
        (any::<u64>(), any::<bool>(), real(), real(), real(), count()),
    )
        .prop_map(
            |(
                (lr, batch_size, minibatch_size, epochs),
                (warmup_frac, weight_decay, max_grad_norm, max_ctx),
                (seed, shuffle, beta, gamma, conflict_alpha, checkpoint_every),
            )| pb::TrainingHyperparameters {
                lr,
                batch_size,
                minibatch_size,
                epochs,
                warmup_frac,
                weight_decay,
                max_grad_norm,
                max_ctx,
                seed,
                shuffle,
                beta,
                gamma,
                conflict_alpha,
                checkpoint_every,
                ..Default::default()
            },
        )
}

fn upload_item() -> impl Strategy<Value = Item> {
    prop_oneof![
        text().prop_map(|name| Item::Header(pb::DatasetHeader { name })),
        (text(), text(), text(), prop::option::of(-1.0..2.0f32)).prop_map(
            |(prompt, chosen, rejected, label)| Item::Pair(pb::PairRow {
                prompt,
                chosen,
                rejected,
                label,
                chosen_is_human_choice: None,
                conflict_prefers_chosen: None,
            })
        ),
        text().prop_map(|text| Item::Text(pb::TextRow { text })),
        text().prop_map(|prompt| Item::Prompt(pb::PromptRow { prompt })),
    ]
}

/// A valid HF config of the tiny GPT-2 preset, for server-side random initialisations.
const TINY_CONFIG: &str = r#"{"model_type": "gpt2", "vocab_size": 512, "n_positions": 128, "n_embd": 32, "n_layer": 2, "n_head": 4}"#;

#[derive(Debug, Clone)]
enum Request {
    ScorePairs(pb::ScorePairsRequest),
    TokenLogprobs(pb::TokenLogprobsRequest),
    ScoreTexts(pb::ScoreTextsRequest),
    Generate(pb::GenerateRequest),
    GeneratePairs(pb::GeneratePairsRequest),
    Load(pb::LoadModelRequest),
    Unload(pb::UnloadModelRequest),
    Export(pb::ExportModelRequest),
    Upload(Vec<Item>),
    UploadModel(Vec<pb::UploadModelRequest>),
    DownloadModel(pb::DownloadModelRequest),
    StartJob(pb::StartJobRequest),
    Watch(String),
    Cancel(String),
    Delete(String),
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (
            model_name(),
            pairs(),
            prop_oneof![1..5i32, any::<i32>()],
            count(),
            prop_oneof![Just(String::new()), model_name()]
        )
            .prop_map(|(model, pairs, scoring, max_ctx, reference_model)| {
                Request::ScorePairs(pb::ScorePairsRequest {
                    model,
                    pairs,
                    scoring,
                    max_ctx,
                    reference_model,
                })
            }),
        (
            model_name(),
            prop::collection::vec(text(), 0..4),
            any::<bool>(),
            count(),
            any::<bool>()
        )
            .prop_map(|(model, texts, split_dialogue, max_ctx, truncate)| {
                Request::TokenLogprobs(pb::TokenLogprobsRequest {
                    model,
                    texts,
                    split_dialogue,
                    max_ctx,
                    truncate,
                })
            }),
        (model_name(), prop::collection::vec(text(), 0..4), count()).prop_map(
            |(model, texts, max_ctx)| Request::ScoreTexts(pb::ScoreTextsRequest {
                model,
                texts,
                max_ctx,
            })
        ),
        (
            model_name(),
            text(),
            prop_oneof![0..24u32, Just(1025), Just(u32::MAX)],
            (real(), count(), real(), any::<u64>()),
            prop::option::of(any::<bool>())
        )
            .prop_map(
                |(
                    model,
                    prompt,
                    max_new_tokens,
                    (temperature, top_k, top_p, seed),
                    stop_at_eos,
                )| {
                    Request::Generate(pb::GenerateRequest {
                        model,
                        prompt,
                        max_new_tokens,
                        sampling: Some(pb::SamplingParams {
                            temperature,
                            top_k,
                            top_p,
                            seed,
                        }),
                        stop_at_eos,
                    })
                }
            ),
        (
            model_name(),
            model_name(),
            prop::collection::vec(text(), 0..3),
            prop_oneof![0..4u32, Just(17), Just(u32::MAX)],
            prop_oneof![0..16u32, Just(1025), Just(u32::MAX)],
            (real(), count(), real(), any::<u64>()),
        )
            .prop_map(
                |(policy, judge, prompts, samples_per_prompt, max_new_tokens, (t, k, p, seed))| {
                    Request::GeneratePairs(pb::GeneratePairsRequest {
                        policy,
                        judge,
                        prompts,
                        samples_per_prompt,
                        max_new_tokens,
                        sampling: Some(pb::SamplingParams {
                            temperature: t,
                            top_k: k,
                            top_p: p,
                            seed,
                        }),
                        ..Default::default()
                    })
                }
            ),
        (
            prop_oneof!["[a-z]{1,8}", text()],
            prop_oneof![
                text().prop_map(Source::Preset),
                text().prop_map(Source::Path),
                Just(Source::Preset("tiny-gpt2".into())),
                text().prop_map(Source::Uploaded),
                (
                    prop_oneof![
                        text(),
                        Just(TINY_CONFIG.to_string()),
                        Just("{\"model_type\": \"gpt2\", \"n_embd\": -1}".to_string()),
                    ],
                    prop_oneof![Just(String::new()), text()]
                )
                    .prop_map(|(config_json, tokenizer_json)| Source::RandomInit(
                        pb::RandomInit {
                            config_json,
                            tokenizer_json
                        }
                    )),
            ],
            text(),
            any::<bool>(),
            any::<u64>()
        )
            .prop_map(|(name, source, role, reward_head, seed)| Request::Load(
                pb::LoadModelRequest {
                    name,
                    source: Some(source),
                    role,
                    reward_head,
                    seed,
                    ..Default::default()
                }
            )),
        // Never the two models the other requests use.
        text()
            .prop_filter("keeps the fixtures", |n| n != "policy" && n != "judge")
            .prop_map(|name| Request::Unload(pb::UnloadModelRequest { name })),
        (model_name(), text())
            .prop_map(|(name, path)| Request::Export(pb::ExportModelRequest { name, path })),
        // Most uploads start with their header, as the server requires; some do not.
        (
            prop::option::weighted(0.8, text()),
            prop::collection::vec(upload_item(), 0..5)
        )
            .prop_map(|(header, mut items)| {
                if let Some(name) = header {
                    items.insert(0, Item::Header(pb::DatasetHeader { name }));
                }
                Request::Upload(items)
            }),
        (
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("config.json".to_string()),
                        Just("../x".to_string()),
                        text()
                    ],
                    prop_oneof![0..8u64, Just(u64::MAX)],
                    prop_oneof![text(), Just("ab".repeat(32))]
                ),
                0..3
            ),
            prop::collection::vec(prop::collection::vec(any::<u8>(), 0..12), 0..3),
            any::<bool>()
        )
            .prop_map(|(files, chunks, header_first)| {
                use pb::upload_model_request::Part;
                let header = pb::UploadModelRequest {
                    part: Some(Part::Header(pb::UploadModelHeader {
                        load: Some(pb::LoadModelRequest {
                            name: "fuzzed".into(),
                            ..Default::default()
                        }),
                        files: files
                            .into_iter()
                            .map(|(name, size, sha256)| pb::ModelFile { name, size, sha256 })
                            .collect(),
                    })),
                };
                let data = chunks.into_iter().map(|bytes| pb::UploadModelRequest {
                    part: Some(Part::Data(bytes)),
                });
                let mut messages: Vec<_> = data.collect();
                if header_first {
                    messages.insert(0, header);
                } else {
                    messages.push(header);
                }
                Request::UploadModel(messages)
            }),
        model_name().prop_map(|name| Request::DownloadModel(pb::DownloadModelRequest { name })),
        (
            any::<i32>().prop_map(|o| o.rem_euclid(8)),
            model_name(),
            prop::collection::vec(text(), 0..2),
            hyperparameters(),
            text()
        )
            .prop_map(
                |(objective, base_model, dataset_ids, hyper, output_model)| {
                    Request::StartJob(pb::StartJobRequest {
                        objective,
                        base_model,
                        dataset_ids,
                        hyperparameters: Some(hyper),
                        output_model,
                    })
                }
            ),
        text().prop_map(Request::Watch),
        text().prop_map(Request::Cancel),
        text().prop_map(Request::Delete),
    ]
}

/// Reads a server stream to its end: OK, or the code it ended with.
async fn drain<T>(mut stream: tonic::Streaming<T>) -> Code {
    loop {
        match stream.message().await {
            Ok(Some(_)) => {}
            Ok(None) => return Code::Ok,
            Err(s) => return s.code(),
        }
    }
}

/// Sends one request and returns its status code (OK when it succeeded).
async fn send(client: &W2sClient, request: Request) -> Code {
    let code = |r: Result<(), tonic::Status>| r.map_or_else(|s| s.code(), |_| Code::Ok);
    match request {
        Request::ScorePairs(r) => code(client.inference.clone().score_pairs(r).await.map(drop)),
        Request::TokenLogprobs(r) => {
            code(client.inference.clone().token_logprobs(r).await.map(drop))
        }
        Request::ScoreTexts(r) => code(client.inference.clone().score_texts(r).await.map(drop)),
        Request::Generate(r) => match client.inference.clone().generate(r).await {
            Err(s) => s.code(),
            Ok(stream) => drain(stream.into_inner()).await,
        },
        Request::GeneratePairs(r) => {
            code(client.inference.clone().generate_pairs(r).await.map(drop))
        }
        Request::Load(r) => code(client.models.clone().load_model(r).await.map(drop)),
        Request::Unload(r) => code(client.models.clone().unload_model(r).await.map(drop)),
        Request::Export(r) => code(client.models.clone().export_model(r).await.map(drop)),
        Request::Upload(items) => {
            let messages: Vec<pb::UploadDatasetRequest> = items
                .into_iter()
                .map(|item| pb::UploadDatasetRequest { item: Some(item) })
                .collect();
            code(
                client
                    .datasets
                    .clone()
                    .upload_dataset(tokio_stream::iter(messages))
                    .await
                    .map(drop),
            )
        }
        Request::UploadModel(messages) => code(
            client
                .models
                .clone()
                .upload_model(tokio_stream::iter(messages))
                .await
                .map(drop),
        ),
        Request::DownloadModel(r) => match client.models.clone().download_model(r).await {
            Err(s) => s.code(),
            Ok(stream) => drain(stream.into_inner()).await,
        },
        Request::StartJob(r) => {
            let started = client.training.clone().start_job(r).await;
            match started {
                Err(s) => s.code(),
                Ok(job) => {
                    // A fuzzed job that happens to be valid must not keep the device busy.
                    let id = job.into_inner().id;
                    code(
                        client
                            .training
                            .clone()
                            .cancel_job(pb::CancelJobRequest { id })
                            .await
                            .map(drop),
                    )
                }
            }
        }
        Request::Watch(id) => {
            match client
                .training
                .clone()
                .watch_job(pb::WatchJobRequest { id })
                .await
            {
                Err(s) => s.code(),
                Ok(_) => Code::Ok,
            }
        }
        Request::Cancel(id) => code(
            client
                .training
                .clone()
                .cancel_job(pb::CancelJobRequest { id })
                .await
                .map(drop),
        ),
        Request::Delete(id) => code(
            client
                .training
                .clone()
                .delete_job(pb::DeleteJobRequest { id })
                .await
                .map(drop),
        ),
    }
}

#[test]
fn fuzzed_requests_get_client_errors_and_leave_a_live_server() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let data = tempfile::tempdir().unwrap();
    let (server, client) = runtime.block_on(async {
        let mut config = ServerConfig::ephemeral();
        config.data_dir = data.path().join("data");
        config.model_root = data.path().to_path_buf();
        let server = RunningServer::start(config).await.unwrap();
        let client = W2sClient::connect(&server.url()).await.unwrap();
        for (name, reward_head) in [("policy", false), ("judge", true)] {
            client
                .load_model(pb::LoadModelRequest {
                    name: name.into(),
                    source: Some(Source::Preset("tiny-gpt2".into())),
                    role: String::new(),
                    reward_head,
                    seed: 1,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        (server, client)
    });
    let cases = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    let rng = TestRng::deterministic_rng(RngAlgorithm::ChaCha);
    let mut runner = TestRunner::new_with_rng(config, rng);
    let seen = std::cell::RefCell::new(std::collections::BTreeMap::<String, usize>::new());
    let result = runner.run(&request(), |request| {
        let shown = format!("{request:?}");
        let shown: String = shown.chars().take(400).collect();
        let code = runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(60), send(&client, request)).await
        });
        let code = code.map_err(|_| TestCaseError::fail(format!("no answer in 60 s: {shown}")))?;
        let kind = shown.split('(').next().unwrap_or_default().to_string();
        *seen
            .borrow_mut()
            .entry(format!("{kind} {code:?}"))
            .or_default() += 1;
        prop_assert!(
            !matches!(code, Code::Internal | Code::Unknown | Code::Unavailable),
            "{code:?} for {shown}"
        );
        Ok(())
    });
    result.unwrap();
    // Still alive and correct for a valid request.
    runtime.block_on(async {
        let scores = client
            .inference
            .clone()
            .score_pairs(pb::ScorePairsRequest {
                model: "policy".into(),
                pairs: vec![pb::PreferencePair {
                    prompt: "\n\nHuman: hi?".into(),
                    chosen: "\n\nAssistant: hello".into(),
                    rejected: "\n\nAssistant: no".into(),
                }],
                scoring: pb::PairScoring::MeanLogprob as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(scores.scores.len(), 1);
        server.shutdown().await.unwrap();
    });
    // Both outcomes occurred: the cases reached the server's logic, not just its front door.
    let seen = seen.into_inner();
    eprintln!("answers by request kind: {seen:?}");
    let answered_ok = |kind: &str| {
        seen.keys()
            .any(|k| k.starts_with(kind) && k.ends_with(" Ok"))
    };
    for kind in [
        "ScorePairs",
        "TokenLogprobs",
        "ScoreTexts",
        "Generate",
        "Upload",
    ] {
        assert!(
            answered_ok(kind),
            "no {kind} case got through validation: {seen:?}"
        );
    }
}

/// Sends and receives raw bytes, so a test can put any byte string on the wire.
#[derive(Debug, Clone, Default)]
struct RawBytes;

impl tonic::codec::Codec for RawBytes {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBytes;
    type Decoder = RawBytes;
    fn encoder(&mut self) -> Self::Encoder {
        RawBytes
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawBytes
    }
}

impl tonic::codec::Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(buf, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = prost::bytes::Buf::remaining(buf);
        Ok(Some(prost::bytes::Buf::copy_to_bytes(buf, n).to_vec()))
    }
}

/// Random byte strings sent to every unary method: a message the schema does not allow is the
/// client's fault (INVALID_ARGUMENT), never INTERNAL or UNKNOWN, and the server stays up.
#[test]
fn undecodable_messages_are_the_clients_fault() {
    const UNARY: [&str; 13] = [
        "/w2s.v1.Models/ListModels",
        "/w2s.v1.Models/LoadModel",
        "/w2s.v1.Models/UnloadModel",
        "/w2s.v1.Models/ExportModel",
        "/w2s.v1.Inference/ScorePairs",
        "/w2s.v1.Inference/TokenLogprobs",
        "/w2s.v1.Inference/ScoreTexts",
        "/w2s.v1.Inference/GeneratePairs",
        "/w2s.v1.Datasets/ListDatasets",
        "/w2s.v1.Training/StartJob",
        "/w2s.v1.Training/CancelJob",
        "/w2s.v1.Training/ListJobs",
        "/w2s.v1.Training/DeleteJob",
    ];
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let data = tempfile::tempdir().unwrap();
    runtime.block_on(async {
        let mut config = ServerConfig::ephemeral();
        config.data_dir = data.path().join("data");
        config.model_root = data.path().to_path_buf();
        let server = RunningServer::start(config).await.unwrap();
        let channel = tonic::transport::Channel::from_shared(server.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut rng = TestRng::deterministic_rng(RngAlgorithm::ChaCha);
        let mut codes = std::collections::BTreeMap::<String, usize>::new();
        for case in 0..600 {
            let path = UNARY[case % UNARY.len()];
            let len = (rng.next_u32() % 48) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| rng.next_u32() as u8).collect();
            let mut grpc = tonic::client::Grpc::new(channel.clone());
            grpc.ready().await.unwrap();
            let answer = grpc
                .unary(
                    tonic::Request::new(bytes.clone()),
                    tonic::codegen::http::uri::PathAndQuery::from_static(path),
                    RawBytes,
                )
                .await;
            let code = answer.map(|_| Code::Ok).unwrap_or_else(|s| s.code());
            *codes.entry(format!("{code:?}")).or_default() += 1;
            assert!(
                !matches!(code, Code::Internal | Code::Unknown | Code::Unavailable),
                "{code:?} for {path} with {bytes:?}"
            );
        }
        eprintln!("answers: {codes:?}");
        assert!(codes.contains_key("InvalidArgument"), "{codes:?}");
        let client = W2sClient::connect(&server.url()).await.unwrap();
        client.list_models().await.unwrap();
        server.shutdown().await.unwrap();
    });
}
