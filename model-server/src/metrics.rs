//! Prometheus metrics of one server: request counts and latencies per RPC and status code,
//! dynamic-batch sizes, queue depth, resident models, training-job progress, kept in a
//! `prometheus-client` registry and rendered in the OpenMetrics text format on a separate port
//! (`--metrics-listen`). Each server owns its
//! registry, so several servers in one process (tests, embedded clients) do not collide.

use std::net::SocketAddr;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// The exposition format the registry renders (OpenMetrics text, which Prometheus scrapes).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    rpc: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    rpc: String,
}

/// Latency buckets: geometric ×2 from 100 µs to ~100 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1e-4, 2.0, 21))
}

/// Size buckets: powers of two up to 1024.
fn size_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 11))
}

/// The registry and handles to its metrics (each handle shares its value with the registry).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latencies: Family<RpcLabels, Histogram, fn() -> Histogram>,
    batch_requests: Histogram,
    batch_sequences: Histogram,
    pub queue_depth: Gauge,
    pub active_tasks: Gauge,
    pub resident_models: Gauge,
    pub job_step: Gauge,
    pub job_total_steps: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "w2s_requests",
            "Finished RPCs by method and status code",
            requests.clone(),
        );
        let latencies = Family::<RpcLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "w2s_request_duration_seconds",
            "RPC latency",
            latencies.clone(),
        );
        let batch_requests = size_histogram();
        registry.register(
            "w2s_batch_requests",
            "Requests merged into one forward batch",
            batch_requests.clone(),
        );
        let batch_sequences = size_histogram();
        registry.register(
            "w2s_batch_sequences",
            "Sequences in one forward batch",
            batch_sequences.clone(),
        );
        let mut gauge = |name: &str, help: &str| {
            let gauge = Gauge::default();
            registry.register(name, help, gauge.clone());
            gauge
        };
        let queue_depth = gauge("w2s_queue_depth", "Requests waiting for the device worker");
        let active_tasks = gauge(
            "w2s_active_tasks",
            "Resumable inference tasks (scoring batches, generations) the worker is advancing",
        );
        let resident_models = gauge("w2s_resident_models", "Models resident on the device");
        let job_step = gauge(
            "w2s_job_step",
            "Steps completed by the running training job",
        );
        let job_total_steps = gauge(
            "w2s_job_total_steps",
            "Total steps of the running training job",
        );
        Self {
            registry,
            requests,
            latencies,
            batch_requests,
            batch_sequences,
            queue_depth,
            active_tasks,
            resident_models,
            job_step,
            job_total_steps,
        }
    }
}

impl Metrics {
    /// Records one finished RPC.
    pub fn observe_request(&self, rpc: &str, code: tonic::Code, elapsed: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                rpc: rpc.to_string(),
                code: format!("{code:?}"),
            })
            .inc();
        self.latencies
            .get_or_create(&RpcLabels {
                rpc: rpc.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Records one dynamic batch.
    pub fn observe_batch(&self, requests: usize, sequences: usize) {
        self.batch_requests.observe(requests as f64);
        self.batch_sequences.observe(sequences as f64);
    }

    /// The exposition of every metric ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; a metric that could not be encoded would leave
        // the text cut short, which a scraper reports.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
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

const PLAIN: &str = "text/plain; charset=utf-8";

/// The answer to one request: the metrics, 401 without the token, 404 elsewhere.
fn answer<B>(
    metrics: &Metrics,
    token: Option<&str>,
    request: &hyper::Request<B>,
) -> hyper::Response<Body> {
    let reply = |status: u16, content_type: &'static str, body: String| {
        let mut response = hyper::Response::new(Body::from(body));
        *response.status_mut() =
            hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(content_type),
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
            return reply(401, PLAIN, "missing or invalid bearer token\n".into());
        }
    }
    if request.method() == hyper::Method::GET && request.uri().path() == "/metrics" {
        reply(200, CONTENT_TYPE, metrics.render())
    } else {
        reply(404, PLAIN, "only GET /metrics is served here\n".into())
    }
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
