//! Server configuration: every flag has an environment-variable twin, and the whole struct is
//! validated before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use clap::Parser;

/// `NAME=VALUE` as given to `--model` and `--preset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedSource {
    pub name: String,
    pub value: String,
}

impl FromStr for NamedSource {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, value) = s
            .split_once('=')
            .ok_or_else(|| format!("expected NAME=VALUE, got `{s}`"))?;
        if name.is_empty() || value.is_empty() {
            return Err(format!(
                "expected NAME=VALUE with both parts non-empty, got `{s}`"
            ));
        }
        Ok(Self {
            name: name.to_string(),
            value: value.to_string(),
        })
    }
}

/// A setting (flag, environment variable, device, token) the server cannot use; the message
/// names it and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl From<String> for ConfigError {
    fn from(message: String) -> Self {
        Self(message)
    }
}

impl From<&str> for ConfigError {
    fn from(message: &str) -> Self {
        Self(message.to_string())
    }
}

/// Most CPU threads one server's pool may have (`--threads`).
pub const MAX_THREADS: usize = 1024;

/// The model server's settings.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "model-server",
    version,
    about = "Serves weak and strong GPT-2/OPT models over gRPC (package w2s.v1)."
)]
pub struct ServerConfig {
    /// Address to listen on; port 0 picks a free port. A non-loopback address needs --token
    /// (or --insecure).
    #[arg(long, env = "W2S_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Bearer token every w2s.v1 call must carry (`authorization: Bearer TOKEN`).
    #[arg(long, env = "W2S_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Allow a non-loopback listen address without a token.
    #[arg(long, env = "W2S_INSECURE")]
    pub insecure: bool,
    /// PEM certificate chain for TLS (with --tls-key).
    #[arg(long, env = "W2S_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS (with --tls-cert).
    #[arg(long, env = "W2S_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Address of the Prometheus metrics endpoint (GET /metrics); off when not given.
    #[arg(long, env = "W2S_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Require the bearer token (`--token`) on the metrics port too (Prometheus sends it with
    /// `authorization.credentials`).
    #[arg(long, env = "W2S_METRICS_TOKEN")]
    pub metrics_token: bool,
    /// Folder for uploaded datasets and training jobs (created if missing).
    #[arg(long, env = "W2S_DATA_DIR", default_value = "w2s-data")]
    pub data_dir: PathBuf,
    /// Load an HF checkpoint folder at start-up: NAME=DIR (repeatable; comma-separated in the env var).
    #[arg(long = "model", env = "W2S_MODELS", value_delimiter = ',')]
    pub models: Vec<NamedSource>,
    /// Load a built-in random-init preset at start-up: NAME=PRESET (repeatable).
    #[arg(long = "preset", env = "W2S_PRESETS", value_delimiter = ',')]
    pub presets: Vec<NamedSource>,
    /// Folder that LoadModel paths must lie in (symlinks resolved).
    #[arg(long, env = "W2S_MODEL_ROOT", default_value = ".")]
    pub model_root: PathBuf,
    /// Device for tensors: `cpu` or `cuda:N` (CUDA needs a build with the `cuda` feature).
    #[arg(long, env = "W2S_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, env = "W2S_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_message_bytes: usize,
    /// Requests that may wait for the device; beyond this the server answers RESOURCE_EXHAUSTED.
    #[arg(long, env = "W2S_QUEUE_CAPACITY", default_value_t = 1024)]
    pub queue_capacity: usize,
    /// Largest forward pass, in padded tokens (rows x longest row).
    #[arg(long, env = "W2S_MAX_BATCH_TOKENS", default_value_t = 16384)]
    pub max_batch_tokens: usize,
    /// Most concurrent requests merged into one batch; 1 turns dynamic batching off.
    #[arg(long, env = "W2S_MAX_BATCH_REQUESTS", default_value_t = 64)]
    pub max_batch_requests: usize,
    /// Default checkpoint interval of training jobs, in steps.
    #[arg(long, env = "W2S_CHECKPOINT_EVERY", default_value_t = 25)]
    pub checkpoint_every: usize,
    /// Seed for random initialisation of start-up presets.
    #[arg(long, env = "W2S_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Most texts (or pairs) one scoring request may carry.
    #[arg(long, env = "W2S_MAX_REQUEST_TEXTS", default_value_t = 4096)]
    pub max_request_texts: usize,
    /// Largest single text (prompt, response or dialogue) of a request, in bytes.
    #[arg(long, env = "W2S_MAX_TEXT_BYTES", default_value_t = 256 * 1024)]
    pub max_text_bytes: usize,
    /// Most new tokens one Generate or GeneratePairs sample may ask for.
    #[arg(long, env = "W2S_MAX_NEW_TOKENS", default_value_t = 1024)]
    pub max_new_tokens: usize,
    /// Most samples per prompt in GeneratePairs.
    #[arg(long, env = "W2S_MAX_SAMPLES_PER_PROMPT", default_value_t = 16)]
    pub max_samples_per_prompt: usize,
    /// Most generated tokens one GeneratePairs request may ask for in all
    /// (prompts x samples per prompt x new tokens).
    #[arg(long, env = "W2S_MAX_GENERATED_TOKENS", default_value_t = 65536)]
    pub max_generated_tokens: usize,
    /// On shutdown (SIGTERM, Ctrl-C), how long in-flight requests may take to finish, in
    /// seconds; open WatchJob streams end at once with UNAVAILABLE, and what is still running
    /// after this is cut off (the training job is checkpointed either way).
    #[arg(long, env = "W2S_DRAIN_SECONDS", default_value_t = 10.0)]
    pub drain_seconds: f64,
    /// Largest dataset upload, in bytes of row text (rows are written to disk as they arrive;
    /// this caps the disk one upload may take).
    #[arg(long, env = "W2S_MAX_UPLOAD_BYTES", default_value_t = 1 << 30)]
    pub max_upload_bytes: usize,
    /// Longest time one turn of the device loop advances long work (generations, big scoring
    /// requests, preference-pair generation) before it looks at queued requests again, in
    /// milliseconds. Each piece of work advances by at least one forward pass per turn, and
    /// one training step runs per turn.
    #[arg(long, env = "W2S_SLICE_MS", default_value_t = 50.0)]
    pub slice_ms: f64,
    /// Target duration of one forward pass of scoring or log-prob work, in milliseconds: the
    /// server learns each model's throughput (padded tokens per second, as it runs) and cuts
    /// batches so that a pass stays near this, never below one sequence (a single sequence
    /// that takes longer still runs whole). Bounds how long a small request waits behind a
    /// big one on a slow model; `--max-batch-tokens` stays the hard cap. Off (0) by default:
    /// with it, batch composition depends on measured speed, so scores can differ in the last
    /// bits between runs (they agree to ~1e-5), where token-sized batches are reproducible.
    #[arg(long, env = "W2S_MAX_PASS_MS", default_value_t = 0.0)]
    pub max_pass_ms: f64,
    /// CPU threads of this server's tensor work: a pool of its own that the device thread runs
    /// in. 0 (default): the process's shared pool (every core). Several servers in one process
    /// (a trainer's in-process servers) each take their share, so their work does not contend
    /// for the same threads.
    #[arg(long, env = "W2S_THREADS", default_value_t = 0)]
    pub threads: usize,
    /// Report NOT_SERVING on grpc.health.v1 while the device loop has work but has made no
    /// progress for this many seconds (a stuck device or a runaway step); 0 turns it off.
    #[arg(long, env = "W2S_STALL_SECONDS", default_value_t = 300.0)]
    pub stall_seconds: f64,
    /// Largest model folder one UploadModel stream may carry, in bytes (streamed to disk, not
    /// held in memory).
    #[arg(long, env = "W2S_MAX_MODEL_UPLOAD_BYTES", default_value_t = 64 << 30)]
    pub max_model_upload_bytes: u64,
    /// Most DownloadModel streams at once: each stages a whole export on disk (and its files
    /// pass through memory), so more are refused with RESOURCE_EXHAUSTED until one ends.
    #[arg(long, env = "W2S_MAX_DOWNLOADS", default_value_t = 2)]
    pub max_downloads: usize,
    /// Most gRPC connections open at once; further peers wait in the listen backlog.
    #[arg(long, env = "W2S_MAX_CONNECTIONS", default_value_t = 512)]
    pub max_connections: usize,
    /// Seconds a new connection has to send its handshake bytes (the HTTP/2 preface and its
    /// first SETTINGS frame) before it is closed, so sockets that never speak, or speak a byte
    /// at a time, cannot hold the connection permits or use up the descriptors.
    #[arg(long, env = "W2S_FIRST_BYTES_SECONDS", default_value_t = 10.0)]
    pub first_bytes_seconds: f64,
}

/// Per-request work caps, checked before a request is queued (a request beyond one is refused
/// with INVALID_ARGUMENT naming the limit and its flag, so no single request can hold the
/// device for an unbounded time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_request_texts: usize,
    pub max_text_bytes: usize,
    pub max_new_tokens: usize,
    pub max_samples_per_prompt: usize,
    pub max_generated_tokens: usize,
    pub max_upload_bytes: usize,
    pub max_model_upload_bytes: u64,
}

impl From<&ServerConfig> for Limits {
    fn from(c: &ServerConfig) -> Self {
        Self {
            max_request_texts: c.max_request_texts,
            max_text_bytes: c.max_text_bytes,
            max_new_tokens: c.max_new_tokens,
            max_samples_per_prompt: c.max_samples_per_prompt,
            max_generated_tokens: c.max_generated_tokens,
            max_upload_bytes: c.max_upload_bytes,
            max_model_upload_bytes: c.max_model_upload_bytes,
        }
    }
}

impl Limits {
    /// Checks the running size of an upload after another row.
    pub fn check_upload(&self, bytes: usize) -> crate::error::ServiceResult<()> {
        if bytes > self.max_upload_bytes {
            return Err(Self::exceeded(
                "upload bytes",
                bytes,
                self.max_upload_bytes,
                "max-upload-bytes",
            ));
        }
        Ok(())
    }

    /// Checks the longest text of one uploaded dataset row against `--max-text-bytes`.
    pub fn check_row(&self, index: usize, bytes: usize) -> crate::error::ServiceResult<()> {
        if bytes > self.max_text_bytes {
            return Err(Self::exceeded(
                &format!("rows[{index}] bytes"),
                bytes,
                self.max_text_bytes,
                "max-text-bytes",
            ));
        }
        Ok(())
    }

    fn exceeded(field: &str, value: usize, limit: usize, flag: &str) -> crate::error::ServiceError {
        crate::error::ServiceError::invalid(
            field,
            format!("{value} exceeds the server's limit of {limit} (--{flag})"),
        )
    }

    /// Checks the number of texts of a request and the size of each.
    pub fn check_texts<'a>(
        &self,
        field: &str,
        texts: impl ExactSizeIterator<Item = &'a str>,
    ) -> crate::error::ServiceResult<()> {
        if texts.len() > self.max_request_texts {
            return Err(Self::exceeded(
                field,
                texts.len(),
                self.max_request_texts,
                "max-request-texts",
            ));
        }
        for (i, text) in texts.enumerate() {
            if text.len() > self.max_text_bytes {
                return Err(Self::exceeded(
                    &format!("{field}[{i}] bytes"),
                    text.len(),
                    self.max_text_bytes,
                    "max-text-bytes",
                ));
            }
        }
        Ok(())
    }

    /// Checks a generation request: new tokens per sample, samples per prompt, and the total.
    pub fn check_generation(
        &self,
        prompts: usize,
        samples_per_prompt: usize,
        max_new_tokens: usize,
    ) -> crate::error::ServiceResult<()> {
        if max_new_tokens > self.max_new_tokens {
            return Err(Self::exceeded(
                "max_new_tokens",
                max_new_tokens,
                self.max_new_tokens,
                "max-new-tokens",
            ));
        }
        if samples_per_prompt > self.max_samples_per_prompt {
            return Err(Self::exceeded(
                "samples_per_prompt",
                samples_per_prompt,
                self.max_samples_per_prompt,
                "max-samples-per-prompt",
            ));
        }
        let total = prompts
            .saturating_mul(samples_per_prompt.max(1))
            .saturating_mul(max_new_tokens);
        if total > self.max_generated_tokens {
            return Err(Self::exceeded(
                "prompts x samples_per_prompt x max_new_tokens",
                total,
                self.max_generated_tokens,
                "max-generated-tokens",
            ));
        }
        Ok(())
    }
}

impl ServerConfig {
    /// A configuration with defaults, listening on an ephemeral loopback port, with its data
    /// folder under the system temporary directory (unique per call).
    pub fn ephemeral() -> Self {
        let mut config = Self::parse_from(["model-server"]);
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        config.data_dir =
            std::env::temp_dir().join(format!("w2s-embedded-{}-{n}", std::process::id()));
        config
    }

    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.listen.ip().is_loopback() && self.token.is_none() && !self.insecure {
            return Err(format!(
                "refusing to listen on non-loopback address {} without --token (or --insecure)",
                self.listen
            )
            .into());
        }
        if self
            .token
            .as_deref()
            .is_some_and(|t| t.is_empty() || !t.is_ascii())
        {
            return Err("the token must be non-empty printable ASCII".into());
        }
        if !(self.drain_seconds.is_finite() && (0.0..=3600.0).contains(&self.drain_seconds)) {
            return Err(format!(
                "--drain-seconds must be between 0 and 3600, got {}",
                self.drain_seconds
            )
            .into());
        }
        if self.metrics_token && self.token.is_none() {
            return Err("--metrics-token needs --token".into());
        }
        // The gRPC port's rule for the metrics port: off loopback, a token or an explicit
        // --insecure (metrics name every model and job).
        if let Some(metrics) = self.metrics_listen
            && !metrics.ip().is_loopback()
            && !self.metrics_token
            && !self.insecure
        {
            return Err(format!(
                "refusing to serve metrics on non-loopback address {metrics} without \
                 --metrics-token (or --insecure)"
            )
            .into());
        }
        if self.max_connections == 0 {
            return Err("--max-connections must be positive".into());
        }
        if self.max_downloads == 0 {
            return Err("--max-downloads must be positive".into());
        }
        if !(self.slice_ms.is_finite() && (0.1..=60_000.0).contains(&self.slice_ms)) {
            return Err(format!(
                "--slice-ms must be between 0.1 and 60000, got {}",
                self.slice_ms
            )
            .into());
        }
        if !(self.max_pass_ms.is_finite() && (0.0..=600_000.0).contains(&self.max_pass_ms)) {
            return Err(format!(
                "--max-pass-ms must be 0 (off) or up to 600000, got {}",
                self.max_pass_ms
            )
            .into());
        }
        if self.threads > MAX_THREADS {
            return Err(format!(
                "--threads must be at most {MAX_THREADS} (0: the shared pool), got {}",
                self.threads
            )
            .into());
        }
        if !(self.stall_seconds.is_finite() && self.stall_seconds >= 0.0) {
            return Err(format!(
                "--stall-seconds must be 0 (off) or positive, got {}",
                self.stall_seconds
            )
            .into());
        }
        if !(self.first_bytes_seconds.is_finite() && self.first_bytes_seconds > 0.0) {
            return Err(format!(
                "--first-bytes-seconds must be positive, got {}",
                self.first_bytes_seconds
            )
            .into());
        }
        if self.max_message_bytes < 1024 {
            return Err("max_message_bytes must be at least 1024".into());
        }
        if [
            self.max_request_texts,
            self.max_text_bytes,
            self.max_new_tokens,
            self.max_samples_per_prompt,
            self.max_generated_tokens,
            self.max_upload_bytes,
        ]
        .contains(&0)
        {
            return Err(
                "request limits (--max-request-texts and the like) must be positive".into(),
            );
        }
        if self.queue_capacity == 0 || self.max_batch_tokens == 0 || self.max_batch_requests == 0 {
            return Err(
                "queue_capacity, max_batch_tokens and max_batch_requests must be positive".into(),
            );
        }
        let mut names: Vec<&str> = self
            .models
            .iter()
            .chain(&self.presets)
            .map(|m| m.name.as_str())
            .collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("model name `{}` is given twice", w[0]).into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_and_validate() {
        let config = ServerConfig::parse_from([
            "model-server",
            "--listen",
            "127.0.0.1:0",
            "--model",
            "weak=/tmp/a",
            "--preset",
            "strong=tiny-gpt2",
        ]);
        assert_eq!(config.models[0].name, "weak");
        assert_eq!(config.presets[0].value, "tiny-gpt2");
        config.validate().unwrap();
        assert_eq!(config.threads, 0, "the shared pool by default");
        let threads = |n: &str| ServerConfig::parse_from(["model-server", "--threads", n]);
        threads("1").validate().unwrap();
        let too_many = threads("100000").validate().unwrap_err();
        assert!(too_many.0.contains("--threads"), "{too_many}");
    }

    #[test]
    fn non_loopback_and_duplicate_names_are_refused() {
        let config = ServerConfig::parse_from(["model-server", "--listen", "0.0.0.0:1"]);
        assert!(config.validate().unwrap_err().0.contains("non-loopback"));
        let config =
            ServerConfig::parse_from(["model-server", "--listen", "0.0.0.0:1", "--token", "t"]);
        config.validate().unwrap();
        let config =
            ServerConfig::parse_from(["model-server", "--listen", "0.0.0.0:1", "--insecure"]);
        config.validate().unwrap();
        // The metrics port off loopback needs its token too (or --insecure).
        let metrics = |extra: &[&str]| {
            let mut args = vec![
                "model-server",
                "--token",
                "t",
                "--metrics-listen",
                "0.0.0.0:2",
            ];
            args.extend_from_slice(extra);
            ServerConfig::parse_from(args).validate()
        };
        assert!(metrics(&[]).unwrap_err().0.contains("--metrics-token"));
        metrics(&["--metrics-token"]).unwrap();
        metrics(&["--insecure"]).unwrap();
        let config =
            ServerConfig::parse_from(["model-server", "--model", "a=x", "--preset", "a=tiny-opt"]);
        assert!(config.validate().unwrap_err().0.contains("twice"));
        assert!("noequals".parse::<NamedSource>().is_err());
    }

    #[test]
    fn limits_name_the_field_and_the_flag() {
        let limits = Limits::from(&ServerConfig::parse_from(["model-server"]));
        let err = limits
            .check_generation(1, 4294967295, 1)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("samples_per_prompt") && err.contains("--max-samples-per-prompt"),
            "{err}"
        );
        let err = limits
            .check_generation(1000, 16, 1000)
            .unwrap_err()
            .to_string();
        assert!(err.contains("--max-generated-tokens"), "{err}");
        assert!(limits.check_generation(4, 4, 64).is_ok());
        let big = "x".repeat(limits.max_text_bytes + 1);
        let err = limits
            .check_texts("texts", ["ok", big.as_str()].into_iter())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("texts[1] bytes") && err.contains("--max-text-bytes"),
            "{err}"
        );
    }
}
