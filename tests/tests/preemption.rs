//! Long work never holds the device: while a maximal Generate, GeneratePairs or ScorePairs runs
//! on the GPT-2-small preset (minutes of CPU work each), health checks and tiny ScorePairs are
//! answered within a few uninterruptible passes and the long work is still running; a client
//! that goes away stops its work; passes sized by time (`--max-pass-ms`) keep 16 ~1000-token
//! sequences from becoming one long pass, splitting each into chunks; and the health watchdog reports NOT_SERVING while the
//! device loop is stuck in one long step.
//!
//! The waits are measured against the length of one uninterruptible pass on this machine at
//! this moment (CI runs other tests beside these, on two cores), not against fixed times.

use std::sync::Arc;
use std::time::{Duration, Instant};

use model_server::metrics::Metrics;
use model_server::{RunningServer, ServerConfig, W2sClient};
use superficial_tests::health;
use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use w2s_proto::v1 as pb;
use w2s_proto::v1::load_model_request::Source;

/// The tests share the process's rayon pool: one's unsliced pass would slow the other's
/// short requests, so they take turns.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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

fn tiny_pair_request() -> pb::ScorePairsRequest {
    pb::ScorePairsRequest {
        model: "tiny".into(),
        pairs: vec![pb::PreferencePair {
            prompt: String::new(),
            chosen: "\n\nHuman: a?\n\nAssistant: yes".into(),
            rejected: "\n\nHuman: a?\n\nAssistant: no".into(),
        }],
        scoring: pb::PairScoring::Reward as i32,
        ..Default::default()
    }
}

/// A ScorePairs on `big` of `pairs` pairs whose sides are ~110 byte-level tokens each.
fn long_pairs_request(pairs: usize) -> pb::ScorePairsRequest {
    pairs_request(pairs, 20)
}

/// A ScorePairs on `big` of `pairs` pairs whose sides are `words` five-byte words long (the
/// preset's tokenizer is byte-level: 190 words make a ~1000-token sequence).
fn pairs_request(pairs: usize, words: usize) -> pb::ScorePairsRequest {
    let long = |side: &str| format!("{side} {}", "word ".repeat(words));
    pb::ScorePairsRequest {
        model: "big".into(),
        pairs: (0..pairs)
            .map(|i| pb::PreferencePair {
                prompt: format!("question {i}"),
                chosen: long("yes"),
                rejected: long("no"),
            })
            .collect(),
        scoring: pb::PairScoring::MeanLogprob as i32,
        ..Default::default()
    }
}

/// How long a short request may wait while long work runs: it waits for the pass in progress
/// (at most one `big` pass of `max_batch_tokens`), then for its own. Measured here as the
/// median of three idle one-pair ScorePairs on `big` (two such passes), times four, and never
/// below 2 s. The long requests below run for minutes, so any such bound shows they are
/// sliced.
async fn patience(client: &W2sClient) -> Duration {
    patience_for(client, long_pairs_request(1)).await
}

/// [`patience`] measured with `one_pair` (a one-pair request on `big`) instead.
async fn patience_for(client: &W2sClient, one_pair: pb::ScorePairsRequest) -> Duration {
    let mut times = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        client.score_pairs(one_pair.clone()).await.unwrap();
        times.push(started.elapsed());
    }
    times.sort();
    let patience = (times[1] * 4).max(Duration::from_secs(2));
    eprintln!(
        "two idle passes of big: {:.0} ms; patience {:.1} s",
        times[1].as_secs_f64() * 1e3,
        patience.as_secs_f64()
    );
    patience
}

/// Health and a tiny ScorePairs within `patience`, three times over, while `what` runs.
async fn short_requests_are_served(url: &str, client: &W2sClient, patience: Duration, what: &str) {
    for round in 0..3 {
        let started = Instant::now();
        let status = tokio::time::timeout(patience, health(url))
            .await
            .unwrap_or_else(|_| panic!("{what}, round {round}: health took over {patience:?}"));
        assert_eq!(status, ServingStatus::Serving, "{what}");
        let health_took = started.elapsed();
        let started = Instant::now();
        let Ok(scores) =
            tokio::time::timeout(patience, client.score_pairs(tiny_pair_request())).await
        else {
            panic!("{what}, round {round}: tiny ScorePairs took over {patience:?}");
        };
        let scores = scores.unwrap();
        assert_eq!(scores.scores.len(), 1);
        eprintln!(
            "{what}, round {round}: health {:.0} ms, tiny ScorePairs {:.0} ms",
            health_took.as_secs_f64() * 1e3,
            started.elapsed().as_secs_f64() * 1e3
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The abandoned work was dropped, not left running to its end: the worker's task count falls
/// to zero well before the work could have finished (it had minutes left), and the device
/// serves again.
async fn abandoned_work_stops(metrics: &Arc<Metrics>, client: &W2sClient, what: &str) {
    let started = Instant::now();
    while metrics.active_tasks.get() > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{what}: 30 s after the client left, the worker still runs {} tasks",
            metrics.active_tasks.get()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "{what}: the worker dropped the abandoned work {:.0} ms after the client left",
        started.elapsed().as_secs_f64() * 1e3
    );
    client.score_pairs(tiny_pair_request()).await.unwrap();
}

/// A server on `dir` (after `adjust` on its config) with the GPT-2-small preset as `big` and
/// tiny-gpt2 with a reward head as `tiny`.
async fn server_with_gpt2_small(
    dir: &std::path::Path,
    adjust: impl FnOnce(&mut ServerConfig),
) -> (RunningServer, String, W2sClient) {
    let mut config = ServerConfig::ephemeral();
    config.data_dir = dir.to_path_buf();
    config.model_root = dir.to_path_buf();
    adjust(&mut config);
    let server = RunningServer::start(config).await.unwrap();
    let url = server.url();
    let client = W2sClient::connect(&url).await.unwrap();
    client
        .load_model(preset("big", "gpt2", false))
        .await
        .unwrap();
    client
        .load_model(preset("tiny", "tiny-gpt2", true))
        .await
        .unwrap();
    (server, url, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn maximal_requests_leave_room_for_short_ones() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (server, url, client) = server_with_gpt2_small(dir.path(), |config| {
        // The longest pass that cannot be interrupted: one 128-token sequence of GPT-2-small.
        config.max_batch_tokens = 128;
    })
    .await;
    let metrics = server.metrics();
    let patience = patience(&client).await;

    // Generate: 1000 new tokens of GPT-2-small (the 1024-position limit).
    let mut stream = client
        .inference
        .clone()
        .generate(pb::GenerateRequest {
            model: "big".into(),
            prompt: "Hello".into(),
            max_new_tokens: 1000,
            sampling: None,
            stop_at_eos: Some(false),
        })
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap(); // running
    short_requests_are_served(&url, &client, patience, "Generate").await;
    assert_eq!(
        metrics.active_tasks.get(),
        1,
        "the generation is still running"
    );
    drop(stream);
    abandoned_work_stops(&metrics, &client, "Generate").await;

    // GeneratePairs: 4 prompts x 16 samples x 1000 tokens (the generated-token limit).
    let pairs = {
        let mut inference = client.inference.clone();
        tokio::spawn(async move {
            inference
                .generate_pairs(pb::GeneratePairsRequest {
                    policy: "big".into(),
                    judge: "tiny".into(),
                    judge_kind: pb::JudgeKind::Reward as i32,
                    prompts: (0..4).map(|i| format!("prompt {i}")).collect(),
                    samples_per_prompt: 16,
                    max_new_tokens: 1000,
                    sampling: None,
                    keep_prompt_end: false,
                })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    short_requests_are_served(&url, &client, patience, "GeneratePairs").await;
    assert!(!pairs.is_finished(), "GeneratePairs is still running");
    pairs.abort();
    abandoned_work_stops(&metrics, &client, "GeneratePairs").await;

    // ScorePairs: the most pairs a request may carry, each side ~110 tokens of GPT-2-small.
    let request = long_pairs_request(4096);
    scoring_leaves_room(&url, &client, &metrics, patience, request, "ScorePairs").await;
    server.shutdown().await.unwrap();
}

/// While `request` (a ScorePairs that runs far longer than `patience`) is scored, short
/// requests are served within `patience` and `request` is still running; once its client
/// leaves, its work stops.
async fn scoring_leaves_room(
    url: &str,
    client: &W2sClient,
    metrics: &Arc<Metrics>,
    patience: Duration,
    request: pb::ScorePairsRequest,
    what: &str,
) {
    let scoring = {
        let mut inference = client.inference.clone();
        tokio::spawn(async move { inference.score_pairs(request).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    short_requests_are_served(url, client, patience, what).await;
    assert!(!scoring.is_finished(), "{what} is still running");
    scoring.abort();
    abandoned_work_stops(metrics, client, what).await;
}

/// Passes sized by time (`--max-pass-ms`) with the default token budget: a ScorePairs of
/// 8 pairs of ~1000-token sides on GPT-2-small would be one pass of 16 x ~1000 tokens (tens of
/// seconds on two cores) under `--max-batch-tokens` alone; with a 500 ms target each
/// ~1000-token sequence (a ~2 s pass whole) runs in chunks through the KV cache, and a tiny
/// request on another model waits for at most the chunk in progress: it is answered within
/// 2 s, four pass targets.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn passes_sized_by_time_let_a_tiny_request_through_long_sequences() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (server, url, client) = server_with_gpt2_small(dir.path(), |config| {
        assert_eq!(config.max_batch_tokens, 16384, "the default token budget");
        config.max_pass_ms = 500.0;
    })
    .await;
    let metrics = server.metrics();
    // Idle one-pair requests of big: the first measures big's rate; their time is printed.
    patience_for(&client, pairs_request(1, 190)).await;
    let patience = Duration::from_secs(2);

    // It takes about eight one-pair times.
    let request = pairs_request(8, 190);
    let what = "16 x 1000-token ScorePairs";
    scoring_leaves_room(&url, &client, &metrics, patience, request, what).await;
    server.shutdown().await.unwrap();
}

/// The watchdog: with `--stall-seconds` below the length of one training step, health goes
/// NOT_SERVING during a step and SERVING again once the device loop moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_reports_not_serving_while_the_device_loop_is_stuck() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (server, url, client) =
        server_with_gpt2_small(dir.path(), |config| config.stall_seconds = 0.2).await;
    // (Loading GPT-2-small is itself a step longer than 0.2 s.)
    wait_for_serving(&url).await;
    // One pass over 8 x 1024 tokens of GPT-2-small: seconds of work that cannot be sliced
    // (the default batch budget of 16384 tokens takes all 8 sequences at once).
    let text = "word ".repeat(1100);
    let scoring = {
        let mut inference = client.inference.clone();
        tokio::spawn(async move {
            inference
                .token_logprobs(pb::TokenLogprobsRequest {
                    model: "big".into(),
                    texts: vec![text; 8],
                    truncate: true,
                    ..Default::default()
                })
                .await
        })
    };
    let started = Instant::now();
    let mut saw_not_serving = false;
    while started.elapsed() < Duration::from_secs(60) && !scoring.is_finished() {
        if health(&url).await == ServingStatus::NotServing {
            saw_not_serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        saw_not_serving,
        "health never reported the stuck device loop"
    );
    scoring.await.unwrap().unwrap();
    wait_for_serving(&url).await;
    server.shutdown().await.unwrap();
}

async fn wait_for_serving(url: &str) {
    let started = Instant::now();
    while health(url).await != ServingStatus::Serving {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "health stayed NOT_SERVING with an idle device loop"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
