//! `trainer experiment --quick` over two model-server processes that share no folder with the
//! trainer (each has its own data folder and model root in its own temporary folder; the trainer
//! runs from yet another working directory), one of them killed with SIGKILL in the middle of
//! the study: the study completes on the other, and its predictions are byte-identical to the
//! embedded single-server run.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The `model-server` binary next to this package's `trainer` (the workspace builds both).
fn model_server_binary() -> PathBuf {
    let trainer = PathBuf::from(env!("CARGO_BIN_EXE_trainer"));
    let server = trainer.with_file_name("model-server");
    assert!(
        server.is_file(),
        "{} is missing: build the workspace (cargo build --release --workspace) first",
        server.display()
    );
    server
}

/// Starts a server with folders of its own; returns it, its URL and its folders.
fn start_server() -> (Child, String, tempfile::TempDir) {
    let folders = tempfile::tempdir().unwrap();
    let root = folders.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    let mut child = Command::new(model_server_binary())
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(folders.path().join("data"))
        .arg("--model-root")
        .arg(&root)
        .current_dir(folders.path())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("server exited before it was ready")
            .unwrap();
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    // Keep reading, so the server never blocks on a full pipe.
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(drop));
    (child, format!("http://{addr}"), folders)
}

fn trainer(args: &[&str], cwd: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_trainer"));
    command
        .args(["experiment", "--quick"])
        .args(args)
        .current_dir(cwd);
    command
}

/// Every `predictions.jsonl` under `OUT/runs/`, by run folder name.
fn predictions(out: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(out.join("runs")).unwrap() {
        let dir = entry.unwrap().path();
        let file = dir.join("predictions.jsonl");
        if file.is_file() {
            let name = dir.file_name().unwrap().to_string_lossy().to_string();
            files.insert(name, std::fs::read(file).unwrap());
        }
    }
    files
}

#[test]
fn a_study_over_two_servers_survives_a_killed_server_with_identical_predictions() {
    let work = tempfile::tempdir().unwrap();
    let embedded_out = work.path().join("embedded");
    let status = trainer(&["--out", embedded_out.to_str().unwrap()], work.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "embedded run: {status}");

    let (mut server_a, url_a, folders_a) = start_server();
    let (mut server_b, url_b, folders_b) = start_server();
    let pooled_out = work.path().join("pooled");
    let mut study = trainer(
        &[
            "--out",
            pooled_out.to_str().unwrap(),
            "--server",
            &url_a,
            "--server",
            &url_b,
        ],
        work.path(),
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut log = Vec::new();
    let mut killed = false;
    for line in BufReader::new(study.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        // Server 1 is in the middle of a study run (not pretraining, which it also does): its
        // training job has taken steps.
        if !killed
            && line.contains("[server 1]")
            && line.contains(": step ")
            && !line.contains("pretrain")
        {
            server_b.kill().unwrap(); // SIGKILL
            server_b.wait().unwrap();
            killed = true;
        }
        log.push(line);
    }
    let status = study.wait().unwrap();
    let log = log.join("\n");
    assert!(status.success(), "pooled run: {status}\n{log}");
    assert!(killed, "server 1 never took a step:\n{log}");
    assert!(log.contains("server 1 failed"), "{log}");
    server_a.kill().unwrap();
    server_a.wait().unwrap();

    let (embedded, pooled) = (predictions(&embedded_out), predictions(&pooled_out));
    assert!(embedded.len() >= 10, "{:?}", embedded.keys());
    assert_eq!(
        embedded.keys().collect::<Vec<_>>(),
        pooled.keys().collect::<Vec<_>>()
    );
    for (run, bytes) in &embedded {
        assert!(pooled[run] == *bytes, "{run}: predictions differ");
    }
    // Nothing of the trainer's went into the servers' folders, nor the reverse.
    assert!(!pooled_out.join(".server").exists());
    for folders in [folders_a.path(), folders_b.path()] {
        assert!(!folders.starts_with(work.path()) && !work.path().starts_with(folders));
    }
}
