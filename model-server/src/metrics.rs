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

use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

/// Serves `GET /metrics` on `listener` until the task is dropped, under the same connection
/// limits as the gRPC port (cap, silent-connection timeout, accept back-off); each connection
/// gets `limits.first_bytes_within` in all to send its request and receive the answer, so a
/// slow or stuck peer cannot hold a slot.
pub async fn serve(
    listener: TcpListener,
    metrics: std::sync::Arc<Metrics>,
    limits: crate::connections::ConnectionLimits,
) {
    use tokio_stream::StreamExt;
    let mut incoming = crate::connections::guarded_incoming(listener, limits);
    while let Some(accepted) = incoming.next().await {
        let Ok(mut stream) = accepted else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let answer = async move {
                let mut buffer = vec![0u8; 4096];
                let mut read = 0;
                while read < buffer.len() {
                    match stream.read(&mut buffer[read..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => read += n,
                    }
                    if buffer[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let request = String::from_utf8_lossy(&buffer[..read]);
                let (status, body) = if request.starts_with("GET /metrics") {
                    ("200 OK", metrics.render())
                } else {
                    (
                        "404 Not Found",
                        "only GET /metrics is served here\n".to_string(),
                    )
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            };
            let _ = tokio::time::timeout(limits.first_bytes_within, answer).await;
        });
    }
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
