//! Prometheus metrics of one server: request counts and latencies per RPC and status code,
//! dynamic-batch sizes, queue depth, resident models, training-job progress. Rendered in the
//! Prometheus text format on a separate port (`--metrics-listen`). Each server owns its
//! registry, so several servers in one process (tests, embedded clients) do not collide.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;

/// A settable integer.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, value: i64) {
        self.0.store(value, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Cumulative histogram with fixed upper bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<AtomicU64>,
    sum_micro: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: Vec<f64>) -> Self {
        let counts = (0..bounds.len()).map(|_| AtomicU64::new(0)).collect();
        Self {
            bounds,
            counts,
            sum_micro: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: f64) {
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            if value <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micro
            .fetch_add((value * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let total = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {total}");
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(
            out,
            "{name}_sum{braces} {}",
            self.sum_micro.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{braces} {total}");
    }
}

fn latency_bounds() -> Vec<f64> {
    // Geometric ×2 from 100 µs to ~100 s.
    (0..21).map(|i| 1e-4 * 2f64.powi(i)).collect()
}

fn size_bounds() -> Vec<f64> {
    (0..11).map(|i| 2f64.powi(i)).collect()
}

/// The registry.
#[derive(Debug)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String), u64>>,
    latencies: Mutex<BTreeMap<String, Histogram>>,
    pub batch_requests: Histogram,
    pub batch_sequences: Histogram,
    pub queue_depth: Gauge,
    pub active_tasks: Gauge,
    pub resident_models: Gauge,
    pub job_step: Gauge,
    pub job_total_steps: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::new(BTreeMap::new()),
            latencies: Mutex::new(BTreeMap::new()),
            batch_requests: Histogram::new(size_bounds()),
            batch_sequences: Histogram::new(size_bounds()),
            queue_depth: Gauge::default(),
            active_tasks: Gauge::default(),
            resident_models: Gauge::default(),
            job_step: Gauge::default(),
            job_total_steps: Gauge::default(),
        }
    }
}

impl Metrics {
    /// Records one finished RPC.
    pub fn observe_request(&self, rpc: &str, code: tonic::Code, elapsed: Duration) {
        if let Ok(mut requests) = self.requests.lock() {
            *requests
                .entry((rpc.to_string(), format!("{code:?}")))
                .or_default() += 1;
        }
        if let Ok(mut latencies) = self.latencies.lock() {
            latencies
                .entry(rpc.to_string())
                .or_insert_with(|| Histogram::new(latency_bounds()))
                .observe(elapsed.as_secs_f64());
        }
    }

    /// Records one dynamic batch.
    pub fn observe_batch(&self, requests: usize, sequences: usize) {
        self.batch_requests.observe(requests as f64);
        self.batch_sequences.observe(sequences as f64);
    }

    /// Requests counted for `rpc` with `code`.
    pub fn request_count(&self, rpc: &str, code: tonic::Code) -> u64 {
        self.requests
            .lock()
            .ok()
            .and_then(|r| r.get(&(rpc.to_string(), format!("{code:?}"))).copied())
            .unwrap_or(0)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP w2s_requests_total Finished RPCs by method and status code.\n# TYPE w2s_requests_total counter\n");
        if let Ok(requests) = self.requests.lock() {
            for ((rpc, code), n) in requests.iter() {
                let _ = writeln!(
                    out,
                    "w2s_requests_total{{rpc=\"{rpc}\",code=\"{code}\"}} {n}"
                );
            }
        }
        out.push_str("# HELP w2s_request_duration_seconds RPC latency.\n# TYPE w2s_request_duration_seconds histogram\n");
        if let Ok(latencies) = self.latencies.lock() {
            for (rpc, histogram) in latencies.iter() {
                histogram.render(
                    &mut out,
                    "w2s_request_duration_seconds",
                    &format!("rpc=\"{rpc}\""),
                );
            }
        }
        out.push_str("# HELP w2s_batch_requests Requests merged into one forward batch.\n# TYPE w2s_batch_requests histogram\n");
        self.batch_requests
            .render(&mut out, "w2s_batch_requests", "");
        out.push_str("# HELP w2s_batch_sequences Sequences in one forward batch.\n# TYPE w2s_batch_sequences histogram\n");
        self.batch_sequences
            .render(&mut out, "w2s_batch_sequences", "");
        for (name, help, gauge) in [
            (
                "w2s_queue_depth",
                "Requests waiting for the device worker.",
                &self.queue_depth,
            ),
            (
                "w2s_active_tasks",
                "Resumable inference tasks (scoring batches, generations) the worker is advancing.",
                &self.active_tasks,
            ),
            (
                "w2s_resident_models",
                "Models resident on the device.",
                &self.resident_models,
            ),
            (
                "w2s_job_step",
                "Steps completed by the running training job.",
                &self.job_step,
            ),
            (
                "w2s_job_total_steps",
                "Total steps of the running training job.",
                &self.job_total_steps,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}",
                gauge.get()
            );
        }
        out
    }
}

/// Serves `GET /metrics` on `listener` with hyper's HTTP/1 server until the task is dropped,
/// under the same connection limits as the gRPC port (cap, silent-connection timeout, accept
/// back-off); each connection gets `limits.first_bytes_within` in all (headers, answer and any
/// keep-alive), so a slow or stuck peer cannot hold a slot. With `token`, a request must carry
/// `Authorization: Bearer <token>` (401 otherwise).
pub async fn serve(
    listener: TcpListener,
    metrics: std::sync::Arc<Metrics>,
    limits: crate::connections::ConnectionLimits,
    token: Option<String>,
) {
    use tokio_stream::StreamExt;
    let token = std::sync::Arc::new(token);
    let mut incoming = crate::connections::guarded_incoming(listener, limits);
    while let Some(accepted) = incoming.next().await {
        let Ok(stream) = accepted else {
            continue;
        };
        let (metrics, token) = (metrics.clone(), token.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let answer = answer(&metrics, token.as_deref(), &request);
                async move { Ok::<_, std::convert::Infallible>(answer) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.first_bytes_within)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(limits.first_bytes_within, connection).await;
        });
    }
}

type Body = http_body_util::Full<bytes::Bytes>;

/// The answer to one request: the metrics, 401 without the token, 404 elsewhere.
fn answer<B>(
    metrics: &Metrics,
    token: Option<&str>,
    request: &hyper::Request<B>,
) -> hyper::Response<Body> {
    let reply = |status: u16, body: String| {
        let mut response = hyper::Response::new(Body::from(body));
        *response.status_mut() =
            hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        response
    };
    if let Some(token) = token {
        let expected = format!("Bearer {token}");
        let given = request
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if given != Some(expected.as_str()) {
            return reply(401, "missing or invalid bearer token\n".into());
        }
    }
    if request.method() == hyper::Method::GET && request.uri().path() == "/metrics" {
        reply(200, metrics.render())
    } else {
        reply(404, "only GET /metrics is served here\n".into())
    }
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
