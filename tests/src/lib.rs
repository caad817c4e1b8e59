//! Shared helpers for the cross-crate tests: fixture locations and reference files.

use std::path::PathBuf;

use serde::Deserialize;

/// `tests/fixtures/` of this repository.
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The reference checkpoints written by `tools/make_reference_fixtures.py`.
pub const REFERENCE_MODELS: &[&str] = &["gpt2", "opt-pre-ln", "opt-post-ln"];

pub fn reference_model_dir(name: &str) -> PathBuf {
    fixtures_dir().join("reference").join(name)
}

/// The HH-RLHF harmless single-turn splits, which `tools/fetch-hh-data.sh` puts in the
/// checkout's `data/` (`tools/test.sh` runs it through `tools/prepare-test-assets.sh`).
pub fn hh_data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data/hh-harmless-single-turn")
}

#[derive(Debug, Deserialize)]
pub struct ReferenceText {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<f64>,
    pub last_hidden: Vec<Vec<f64>>,
}

#[derive(Debug, Deserialize)]
pub struct Reference {
    pub tokenizer_class: String,
    pub texts: Vec<ReferenceText>,
}

/// Reads `reference.json` of a reference checkpoint.
pub fn load_reference(name: &str) -> Reference {
    let path = reference_model_dir(name).join("reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Largest absolute difference between two equally long sequences.
pub fn max_abs_diff(a: impl IntoIterator<Item = f64>, b: impl IntoIterator<Item = f64>) -> f64 {
    a.into_iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// The server's overall health status (the `""` service), over a fresh connection.
pub async fn health(url: &str) -> tonic_health::pb::health_check_response::ServingStatus {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let response = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    tonic_health::pb::health_check_response::ServingStatus::try_from(response.into_inner().status)
        .unwrap()
}

/// A model server whose data folder and model root are its own temporary folders, shared with
/// no one (clients reach it only over gRPC), and a client of it. Keep the folder alive as long
/// as the server.
pub async fn server_of_its_own() -> (
    model_server::RunningServer,
    model_server::W2sClient,
    tempfile::TempDir,
) {
    let folders = tempfile::tempdir().expect("a temporary folder");
    let mut config = model_server::ServerConfig::ephemeral();
    config.data_dir = folders.path().join("data");
    config.model_root = folders.path().join("root");
    std::fs::create_dir_all(&config.model_root).expect("the model root");
    let server = model_server::RunningServer::start(config)
        .await
        .expect("a server of its own");
    let client = model_server::W2sClient::connect(&server.url())
        .await
        .expect("a client");
    (server, client, folders)
}
