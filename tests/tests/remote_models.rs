//! Models travel over gRPC, so a client never needs the server's disk: a folder on the
//! client's machine is uploaded (checked, content-addressed, deduplicated), trained on the
//! server, downloaded, and gives the same log-probs when loaded here and on a second server
//! with folders of its own; random initialisations are made on the server from a config; a
//! corrupted or abandoned upload leaves nothing behind.

use std::path::Path;

use model_server::W2sClient;
use superficial_models::{CausalLm, LoadOptions, ModelConfig, TextTokenizer};
use superficial_tests::server_of_its_own;
use tonic::Code;
use w2s_proto::v1 as pb;
use w2s_proto::v1::load_model_request::Source;

fn load(name: &str) -> pb::LoadModelRequest {
    pb::LoadModelRequest {
        name: name.into(),
        role: "test".into(),
        ..Default::default()
    }
}

/// The tiny GPT-2 preset as an HF folder on the client's side (random init, byte tokenizer).
fn client_folder(dir: &Path) -> ModelConfig {
    let config = ModelConfig::preset("tiny-gpt2").unwrap();
    let model = CausalLm::random_init(config.clone(), 11, &LoadOptions::default()).unwrap();
    model.save_folder(dir).unwrap();
    TextTokenizer::bytes().unwrap().save(dir).unwrap();
    config
}

const TEXTS: [&str; 2] = [
    "\n\nHuman: is the sky blue?\n\nAssistant: yes, on a clear day",
    "\n\nHuman: what is two plus two?\n\nAssistant: four",
];

async fn server_logprobs(client: &W2sClient, model: &str) -> Vec<Vec<f32>> {
    client
        .token_logprobs(pb::TokenLogprobsRequest {
            model: model.into(),
            texts: TEXTS.iter().map(|t| t.to_string()).collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .sequences
        .into_iter()
        .map(|s| s.logprobs)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_model_uploaded_trained_remotely_and_downloaded_gives_the_same_logprobs() {
    let (server, client, server_folders) = server_of_its_own().await;
    let here = tempfile::tempdir().unwrap();
    let base_dir = here.path().join("base");
    client_folder(&base_dir);

    // Upload; a second load of the same folder goes by digest (no bytes) to the same weights.
    let first = client.upload_model(load("base"), &base_dir).await.unwrap();
    assert!(first.source.starts_with("uploaded:"), "{first:?}");
    let again = client
        .upload_model(load("base-again"), &base_dir)
        .await
        .unwrap();
    assert_eq!(first.content_hash, again.content_hash);
    assert_eq!(first.source, again.source);
    let local = CausalLm::from_folder(&base_dir, &LoadOptions::default()).unwrap();
    assert_eq!(local.weights().content_hash().unwrap(), first.content_hash);

    // Train on the server (a short causal-LM job), then download the result here.
    let dataset = client
        .upload_dataset(
            "texts",
            TEXTS
                .iter()
                .map(|t| {
                    pb::upload_dataset_request::Item::Text(pb::TextRow {
                        text: t.to_string(),
                    })
                })
                .collect(),
        )
        .await
        .unwrap();
    let ended = client
        .run_job(
            pb::StartJobRequest {
                objective: pb::ObjectiveKind::CausalLm as i32,
                base_model: "base".into(),
                dataset_ids: vec![dataset.id],
                hyperparameters: Some(pb::TrainingHyperparameters {
                    lr: 1e-3,
                    batch_size: 2,
                    minibatch_size: 2,
                    epochs: 3,
                    max_ctx: 96,
                    seed: 1,
                    schedule: pb::LrSchedule::Constant as i32,
                    ..Default::default()
                }),
                output_model: "trained".into(),
            },
            |_| {},
        )
        .await
        .unwrap();
    assert_eq!(ended.state, pb::JobState::Succeeded as i32, "{ended:?}");
    let trained_dir = here.path().join("trained");
    client
        .download_model("trained", &trained_dir)
        .await
        .unwrap();
    assert!(trained_dir.join("config.json").is_file());
    assert!(trained_dir.join("model.safetensors").is_file());
    assert!(trained_dir.join("tokenizer.json").is_file());
    // Only into a new folder.
    assert!(
        client
            .download_model("trained", &trained_dir)
            .await
            .is_err()
    );

    // The same log-probs: on the training server, loaded here, and on a second server.
    let on_server = server_logprobs(&client, "trained").await;
    let downloaded = CausalLm::from_folder(&trained_dir, &LoadOptions::default()).unwrap();
    let tokenizer = TextTokenizer::from_folder(&trained_dir, downloaded.config()).unwrap();
    let sequences: Vec<Vec<u32>> = TEXTS.iter().map(|t| tokenizer.encode(t).unwrap()).collect();
    let here_logprobs = downloaded.sequence_logprobs(&sequences).unwrap();
    for (a, b) in on_server.iter().zip(&here_logprobs) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-5, "{x} vs {y}");
        }
    }
    let (other, other_client, other_folders) = server_of_its_own().await;
    other_client
        .upload_model(load("trained"), &trained_dir)
        .await
        .unwrap();
    assert_eq!(server_logprobs(&other_client, "trained").await, on_server);
    // Neither server's folders hold anything of the client's, nor the client's of theirs.
    for folders in [server_folders.path(), other_folders.path()] {
        assert!(!folders.starts_with(here.path()) && !here.path().starts_with(folders));
    }
    other.shutdown().await.unwrap();
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_inits_are_made_on_the_server_and_bad_uploads_leave_nothing() {
    let (server, client, folders) = server_of_its_own().await;
    let config = ModelConfig::preset("tiny-opt").unwrap();
    let made = client
        .load_model(pb::LoadModelRequest {
            source: Some(Source::RandomInit(pb::RandomInit {
                config_json: config.to_hf_json().to_string(),
                tokenizer_json: String::new(),
            })),
            seed: 5,
            ..load("init")
        })
        .await
        .unwrap();
    let local = CausalLm::random_init(config, 5, &LoadOptions::default()).unwrap();
    assert_eq!(made.content_hash, local.weights().content_hash().unwrap());
    let status = client
        .models
        .clone()
        .load_model(pb::LoadModelRequest {
            source: Some(Source::RandomInit(pb::RandomInit {
                config_json: "{\"model_type\": \"llama\"}".into(),
                tokenizer_json: String::new(),
            })),
            ..load("bad")
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // A config claiming 2^40 layers is refused at once and the server stays up (it once built
    // a per-layer list of that length for the memory check and aborted).
    let mut huge = ModelConfig::preset("tiny-opt").unwrap().to_hf_json();
    huge["num_hidden_layers"] = serde_json::json!(1u64 << 40);
    let status = client
        .models
        .clone()
        .load_model(pb::LoadModelRequest {
            source: Some(Source::RandomInit(pb::RandomInit {
                config_json: huge.to_string(),
                tokenizer_json: String::new(),
            })),
            ..load("huge")
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("layers"), "{status:?}");
    assert!(client.list_models().await.is_ok());
    let status = client
        .models
        .clone()
        .load_model(pb::LoadModelRequest {
            source: Some(Source::Uploaded("0".repeat(64))),
            ..load("missing")
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");

    // A header that lies about a file's digest: refused, nothing kept.
    let upload = |files: Vec<pb::ModelFile>, data: Vec<u8>| {
        let mut models = client.models.clone();
        async move {
            let messages = vec![
                pb::UploadModelRequest {
                    part: Some(pb::upload_model_request::Part::Header(
                        pb::UploadModelHeader {
                            load: Some(load("lied")),
                            files,
                        },
                    )),
                },
                pb::UploadModelRequest {
                    part: Some(pb::upload_model_request::Part::Data(data)),
                },
            ];
            models.upload_model(tokio_stream::iter(messages)).await
        }
    };
    let file = |name: &str, size: u64| pb::ModelFile {
        name: name.into(),
        size,
        sha256: "ab".repeat(32),
    };
    let status = upload(vec![file("config.json", 2)], b"{}".to_vec())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("SHA-256"), "{status:?}");
    for (files, needle) in [
        (vec![file("../config.json", 2)], "plain file name"),
        (vec![file("weights.bin", 2)], "config.json"),
    ] {
        let status = upload(files, b"{}".to_vec()).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(needle), "{status:?}");
    }
    // A stream that ends early (the client went away mid-file) is not committed.
    let status = upload(vec![file("config.json", 10)], b"{}".to_vec())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // A folder that arrives whole and checked but cannot be loaded is not kept either.
    let unloadable = tempfile::tempdir().unwrap();
    std::fs::write(
        unloadable.path().join("config.json"),
        "{\"model_type\": \"llama\"}",
    )
    .unwrap();
    let Err(model_server::ClientError::Rpc(status)) = client
        .upload_model(load("unloadable"), unloadable.path())
        .await
    else {
        panic!("an unloadable folder was accepted");
    };
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let kept: Vec<_> = std::fs::read_dir(folders.path().join("data/models"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(kept.is_empty(), "{kept:?}");
    server.shutdown().await.unwrap();
}

/// Each DownloadModel stream stages a whole export: beyond `--max-downloads` (2) at once, a
/// download is refused with RESOURCE_EXHAUSTED, and a slot comes back when a stream ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_downloads_are_bounded() {
    let (server, client, _folders) = server_of_its_own().await;
    // ~18 MB of weights: more than HTTP/2 flow control lets through unread, so a stream whose
    // client reads nothing stays open on the server.
    let config = serde_json::json!({
        "model_type": "gpt2", "vocab_size": 5000, "n_positions": 64,
        "n_embd": 256, "n_layer": 4, "n_head": 4,
    });
    client
        .load_model(pb::LoadModelRequest {
            source: Some(Source::RandomInit(pb::RandomInit {
                config_json: config.to_string(),
                tokenizer_json: String::new(),
            })),
            ..load("exported")
        })
        .await
        .unwrap();
    let request = || pb::DownloadModelRequest {
        name: "exported".into(),
    };
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut stream = client
            .models
            .clone()
            .download_model(request())
            .await
            .unwrap()
            .into_inner();
        // The first message arrives once the export is staged; the stream is then held open.
        assert!(stream.message().await.unwrap().is_some());
        open.push(stream);
    }
    let status = client
        .models
        .clone()
        .download_model(request())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("--max-downloads"), "{status:?}");
    drop(open.pop());
    // The server notices the dropped stream when it next sends; allow it a few seconds.
    let mut served = None;
    for _ in 0..50 {
        match client.models.clone().download_model(request()).await {
            Ok(stream) => {
                served = Some(stream);
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    }
    assert!(
        served.is_some(),
        "no download slot came back after a stream ended"
    );
    drop(open);
    drop(served);
    server.shutdown().await.unwrap();
}
