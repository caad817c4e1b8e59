//! The `model-server` binary as an operator runs it: configuration from flags and environment
//! variables, the ready line with the bound address, a Python client generated from the proto
//! (grpcio-tools) driving it, and a graceful exit on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("W2S_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/.cache/pyenv/bin/python");
    assert!(
        venv.is_file(),
        "{} is missing: run tools/prepare-test-assets.sh (the README's test command does) or set W2S_PYTHON",
        venv.display()
    );
    venv
}

/// Starts the server and returns it with the address from its ready line.
fn start(
    args: &[&str],
    envs: &[(&str, &str)],
) -> (Child, String, std::thread::JoinHandle<Vec<String>>) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_model-server"));
    command.args(args).envs(envs.iter().copied());
    start_command(command)
}

/// Spawns `command` (the server, possibly behind a shell) and waits for its ready line.
fn start_command(mut command: Command) -> (Child, String, std::thread::JoinHandle<Vec<String>>) {
    let mut child = command
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
    let rest = std::thread::spawn(move || lines.map_while(Result::ok).collect());
    (child, addr, rest)
}

fn terminate(child: &mut Child) -> std::process::ExitStatus {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap()
}

#[test]
fn python_client_drives_the_server_binary_and_sigterm_stops_it_cleanly() {
    let data = tempfile::tempdir().unwrap();
    let (mut child, addr, logs) = start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.path().to_str().unwrap(),
        ],
        &[
            ("W2S_PRESETS", "env-model=tiny-opt"),
            ("W2S_MODEL_ROOT", data.path().to_str().unwrap()),
        ],
    );
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../clients/python/w2s_example.py");
    let out = Command::new(python())
        .arg(&script)
        .args([
            "--server",
            &addr,
            "--stubs",
            data.path().join("stubs").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["job_state"], "JOB_STATE_SUCCEEDED");
    assert_eq!(summary["dataset_rows"], 8);
    let models: Vec<String> = serde_json::from_value(summary["models"].clone()).unwrap();
    assert!(models.contains(&"env-model".to_string()) && models.contains(&"py-policy".to_string()));
    assert_eq!(summary["steps"].as_array().unwrap().len(), 2);
    let p = summary["p_chosen"].as_f64().unwrap();
    assert!(p > 0.0 && p < 1.0);
    let status = terminate(&mut child);
    assert!(status.success(), "exit status {status:?}");
    let logs = logs.join().unwrap();
    assert!(logs.iter().any(|l| l.contains("shutting down")), "{logs:?}");
}

#[test]
fn refuses_a_public_address_without_a_token() {
    let out = Command::new(env!("CARGO_BIN_EXE_model-server"))
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--token"), "{stderr}");
}

/// SIGTERM while a client watches a long training job: the watch ends with UNAVAILABLE and the
/// process exits within the drain limit instead of waiting for the job (or the client's
/// deadline). The bound is generous; it only separates "drained" from "waited for the job".
#[test]
fn sigterm_with_a_watch_open_exits_within_the_drain_limit() {
    use w2s_proto::v1 as pb;
    use w2s_proto::v1::upload_dataset_request::Item;

    let data = tempfile::tempdir().unwrap();
    let (mut child, addr, _logs) = start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.path().to_str().unwrap(),
            "--preset",
            "policy=tiny-gpt2",
            "--drain-seconds",
            "2",
        ],
        &[],
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut watch = runtime.block_on(async {
        let client = model_server::W2sClient::connect(&format!("http://{addr}"))
            .await
            .unwrap();
        let rows = (0..8)
            .map(|i| {
                Item::Pair(pb::PairRow {
                    prompt: String::new(),
                    chosen: format!("\n\nHuman: q{i}?\n\nAssistant: a long helpful answer {i}"),
                    rejected: format!("\n\nHuman: q{i}?\n\nAssistant: no {i}"),
                    label: Some(0.8),
                    chosen_is_human_choice: Some(true),
                    conflict_prefers_chosen: None,
                })
            })
            .collect();
        let dataset = client.upload_dataset("pairs", rows).await.unwrap();
        // Far more steps than the test waits for.
        let job = client
            .training
            .clone()
            .start_job(pb::StartJobRequest {
                objective: pb::ObjectiveKind::Simpo as i32,
                base_model: "policy".into(),
                dataset_ids: vec![dataset.id],
                hyperparameters: Some(pb::TrainingHyperparameters {
                    lr: 1e-4,
                    batch_size: 2,
                    minibatch_size: 2,
                    epochs: 100_000,
                    max_ctx: 64,
                    seed: 1,
                    schedule: pb::LrSchedule::WarmupConstant as i32,
                    ..Default::default()
                }),
                output_model: "trained".into(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut watch = client
            .training
            .clone()
            .watch_job(pb::WatchJobRequest { id: job.id })
            .await
            .unwrap()
            .into_inner();
        // Wait until the job is really training.
        while let Some(event) = watch.message().await.unwrap() {
            if event.step.is_some() {
                break;
            }
        }
        watch
    });
    let sent = std::time::Instant::now();
    let status = terminate(&mut child);
    let took = sent.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert!(
        took.as_secs_f64() < 12.0,
        "exit took {took:?} with a 2 s drain"
    );
    let ended = runtime.block_on(async {
        loop {
            match watch.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => break None,
                Err(status) => break Some(status.code()),
            }
        }
    });
    assert!(
        matches!(ended, None | Some(tonic::Code::Unavailable)),
        "watch ended with {ended:?}"
    );
}

/// A new client connects and lists the models within 30 s.
fn assert_a_new_client_is_served(addr: &str) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let served = runtime.block_on(async {
        tokio::time::timeout(std::time::Duration::from_secs(30), async {
            let client = model_server::W2sClient::connect(&format!("http://{addr}")).await?;
            client.list_models().await
        })
        .await
    });
    assert!(
        matches!(served, Ok(Ok(_))),
        "a new client was not served: {served:?}"
    );
}

/// Connections that start the handshake and stall (one byte; the HTTP/2 preface alone) hold
/// every connection permit: they are closed after `--first-bytes-seconds`, and a new client is
/// served.
#[test]
fn stalled_handshakes_do_not_lock_out_a_new_client() {
    use std::io::Write as _;
    let data = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_model-server"));
    command.args([
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        &data.path().display().to_string(),
        "--max-connections",
        "16",
        "--first-bytes-seconds",
        "1",
    ]);
    let (mut child, addr, _logs) = start_command(command);
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let stalled: Vec<std::net::TcpStream> = (0..32)
        .filter_map(|i| {
            let mut stream = std::net::TcpStream::connect(&addr).ok()?;
            let bytes: &[u8] = if i % 2 == 0 { b"P" } else { preface };
            stream.write_all(bytes).ok()?;
            Some(stream)
        })
        .collect();
    assert_eq!(stalled.len(), 32);
    assert_a_new_client_is_served(&addr);
    drop(stalled);
    let status = terminate(&mut child);
    assert!(status.success(), "exit status {status:?}");
}

/// 300 connections that never speak, against a server allowed only 128 file descriptors: a new
/// client is still served, because silent connections are closed after `--first-bytes-seconds`
/// and accept errors (EMFILE) back off instead of spinning.
#[test]
fn silent_connections_do_not_lock_out_a_new_client() {
    let data = tempfile::tempdir().unwrap();
    let binary = env!("CARGO_BIN_EXE_model-server");
    let mut shell = Command::new("sh");
    shell.args([
        "-c",
        &format!(
            "ulimit -n 128 && exec '{binary}' --listen 127.0.0.1:0 --data-dir '{}' \
             --max-connections 64 --first-bytes-seconds 1",
            data.path().display()
        ),
    ]);
    let (mut child, addr, _logs) = start_command(shell);
    let silent: Vec<std::net::TcpStream> = (0..300)
        .filter_map(|_| std::net::TcpStream::connect(&addr).ok())
        .collect();
    assert!(
        silent.len() >= 200,
        "only {} connections opened",
        silent.len()
    );
    assert_a_new_client_is_served(&addr);
    drop(silent);
    let status = terminate(&mut child);
    assert!(status.success(), "exit status {status:?}");
}

/// Model configs whose sizes would need more memory than any machine has are refused at
/// once, before anything scales with them, and the server keeps serving. The server runs under
/// a 6 GiB address-space limit, so a regression fails this test instead of taking the test
/// machine down (it once aborted on "memory allocation of 1879048192 bytes failed", or was
/// OOM-killed at 24 GB).
#[test]
fn absurd_model_configs_are_refused_at_once_under_an_address_space_limit() {
    use pb::load_model_request::Source;
    use w2s_proto::v1 as pb;
    let data = tempfile::tempdir().unwrap();
    let root = data.path().join("models");
    let folder = root.join("huge");
    std::fs::create_dir_all(&folder).unwrap();
    let gpt2 = |n_embd: u64, n_layer: u64, n_head: u64, vocab: u64| {
        serde_json::json!({
            "model_type": "gpt2", "vocab_size": vocab, "n_positions": 64,
            "n_embd": n_embd, "n_layer": n_layer, "n_head": n_head,
        })
        .to_string()
    };
    std::fs::write(folder.join("config.json"), gpt2(16, 1 << 40, 2, 300)).unwrap();
    let binary = env!("CARGO_BIN_EXE_model-server");
    let mut shell = Command::new("sh");
    shell.args([
        "-c",
        &format!(
            "ulimit -v 6291456 && exec '{binary}' --listen 127.0.0.1:0 --data-dir '{}' \
             --model-root '{}'",
            data.path().join("data").display(),
            root.display()
        ),
    ]);
    let (mut child, addr, _logs) = start_command(shell);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = model_server::W2sClient::connect(&format!("http://{addr}"))
            .await
            .unwrap();
        let max = u64::MAX;
        let sources = [
            Source::RandomInit(pb::RandomInit {
                config_json: gpt2(16, 1 << 40, 2, 300),
                tokenizer_json: String::new(),
            }),
            Source::RandomInit(pb::RandomInit {
                config_json: gpt2(max, max, max, max),
                tokenizer_json: String::new(),
            }),
            Source::RandomInit(pb::RandomInit {
                config_json: gpt2(1 << 31, 1 << 31, 1 << 31, 1 << 31),
                tokenizer_json: String::new(),
            }),
            Source::Path("huge".into()),
        ];
        for (i, source) in sources.into_iter().enumerate() {
            let request = pb::LoadModelRequest {
                name: format!("huge-{i}"),
                source: Some(source.clone()),
                ..Default::default()
            };
            // A generous bound: it checks that the refusal does not build anything that scales
            // with the config (then it would take minutes or abort), not how fast it is.
            let answer = tokio::time::timeout(
                std::time::Duration::from_secs(20),
                client.load_model(request),
            )
            .await
            .unwrap_or_else(|_| panic!("{source:?}: no answer within 20 s"));
            let Err(model_server::ClientError::Rpc(status)) = answer else {
                panic!("{source:?}: not refused: {answer:?}");
            };
            assert!(
                matches!(
                    status.code(),
                    tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted
                ),
                "{source:?}: {status:?}"
            );
            assert!(
                !status.message().contains(data.path().to_str().unwrap()),
                "{status:?}"
            );
        }
        assert!(client.list_models().await.unwrap().is_empty());
    });
    let status = terminate(&mut child);
    assert!(status.success(), "exit status {status:?}");
}

/// The README's Python snippet, run as written (the address aside) against the binary after
/// `pip install ./clients/python` (into a folder of its own, with the test venv's grpcio and
/// protobuf).
#[test]
fn the_readme_python_snippet_scores_a_pair_after_pip_install() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
    let snippet = readme
        .split("```python\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a ```python block in README.md");
    assert!(snippet.lines().count() <= 6, "{snippet}");
    // Installed from a copy: a build writes `build/` and `*.egg-info` beside the sources.
    let source = tempfile::tempdir().unwrap();
    copy_tree(&repo.join("clients/python"), source.path());
    let installed = tempfile::tempdir().unwrap();
    let pip = Command::new(python())
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
        ])
        .arg("--target")
        .arg(installed.path())
        .arg(source.path())
        .output()
        .unwrap();
    assert!(
        pip.status.success(),
        "pip install ./clients/python failed:\n{}",
        String::from_utf8_lossy(&pip.stderr)
    );
    let data = tempfile::tempdir().unwrap();
    let (mut child, addr, _logs) = start(
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.path().to_str().unwrap(),
        ],
        &[],
    );
    let out = Command::new(python())
        .arg("-c")
        .arg(snippet.replace("127.0.0.1:50051", &addr))
        .env("PYTHONPATH", installed.path())
        .current_dir(data.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the README snippet failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    let numbers: Vec<f64> = printed
        .split_whitespace()
        .map(|w| w.parse().unwrap())
        .collect();
    // margin, then p_chosen = sigmoid(margin).
    assert_eq!(numbers.len(), 2, "{printed}");
    let sigmoid = 1.0 / (1.0 + (-numbers[0]).exp());
    assert!((numbers[1] - sigmoid).abs() < 1e-9, "{printed}");
    let status = terminate(&mut child);
    assert!(status.success(), "exit status {status:?}");
}

/// Copies the files of `from` into `to` (which exists), recursively, skipping build leftovers.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        let skip = name == "build"
            || name == "__pycache__"
            || name.to_string_lossy().ends_with(".egg-info");
        if skip {
            continue;
        }
        let target = to.join(&name);
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
