//! The `eval-client logprobs` command line, embedded and against a running server: stdout is
//! one JSON object matching transformers' reference for the fixture checkpoints.

use std::path::PathBuf;
use std::process::Command;

use model_server::{RunningServer, ServerConfig};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/reference")
        .join(name)
}

#[derive(serde::Deserialize)]
struct Output {
    model: String,
    token_ids: Vec<u32>,
    logprobs: Vec<f64>,
}

fn reference(name: &str, index: usize) -> (String, Vec<u32>, Vec<f64>) {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    let case = &value["texts"][index];
    (
        case["text"].as_str().unwrap().to_string(),
        serde_json::from_value(case["token_ids"].clone()).unwrap(),
        serde_json::from_value(case["logprobs"].clone()).unwrap(),
    )
}

fn run(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_eval-client"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn check(output: &Output, ids: &[u32], logprobs: &[f64]) {
    assert_eq!(output.token_ids, ids);
    assert_eq!(output.logprobs.len(), ids.len() - 1);
    for (a, b) in output.logprobs.iter().zip(logprobs) {
        assert!((a - b).abs() <= 1e-4, "{a} vs {b}");
    }
}

#[test]
fn logprobs_in_process_matches_reference_for_every_architecture() {
    for name in ["gpt2", "opt-pre-ln", "opt-post-ln"] {
        let (text, ids, logprobs) = reference(name, 0);
        let dir = fixture(name);
        let output = run(&[
            "logprobs",
            "--model",
            dir.to_str().unwrap(),
            "--text",
            &text,
        ]);
        assert_eq!(output.model, name);
        check(&output, &ids, &logprobs);
    }
}

#[test]
fn logprobs_against_a_running_server() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // The server shares no folder with the client: the model folder is uploaded.
    let server_folders = tempfile::tempdir().unwrap();
    let mut config = ServerConfig::ephemeral();
    config.model_root = server_folders.path().to_path_buf();
    config.data_dir = server_folders.path().join("data");
    let dir = fixture("opt-pre-ln");
    // The server also loaded a model of the same name from its own copy of the folder (as
    // `model-server --model opt-pre-ln=PATH` does): the client's folder is the same model by
    // content, whatever the two paths look like, and the call works.
    let copy = server_folders.path().join("opt-pre-ln");
    std::fs::create_dir_all(&copy).unwrap();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
    }
    config.models.push(model_server::config::NamedSource {
        name: "opt-pre-ln".into(),
        value: copy.display().to_string(),
    });
    let server = runtime.block_on(RunningServer::start(config)).unwrap();
    let url = server.url();
    let (text, ids, logprobs) = reference("opt-pre-ln", 1);
    // A URL without a scheme is refused at once, with the fix.
    let no_scheme = url.trim_start_matches("http://").to_string();
    let failed = Command::new(env!("CARGO_BIN_EXE_eval-client"))
        .args([
            "logprobs",
            "--server",
            &no_scheme,
            "--model",
            dir.to_str().unwrap(),
            "--text",
            &text,
        ])
        .output()
        .unwrap();
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains("no scheme") && stderr.contains("http://"),
        "{stderr}"
    );
    for _ in 0..2 {
        // The second call finds the model already resident and reuses it.
        let output = run(&[
            "logprobs",
            "--server",
            &url,
            "--model",
            dir.to_str().unwrap(),
            "--text",
            &text,
        ]);
        check(&output, &ids, &logprobs);
    }
    runtime.block_on(server.shutdown()).unwrap();
}

#[test]
fn missing_folder_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_eval-client"))
        .args(["logprobs", "--model", "/definitely/not/here", "--text", "x"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/definitely/not/here"), "{stderr}");
}
