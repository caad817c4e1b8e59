//! The Rust client library of `w2s.v1`, used by `trainer` and `eval-client`: connect to a
//! running server by URL (optionally with a bearer token and TLS), or start one in-process on a
//! loopback ephemeral port ("embedded").

use std::path::{Path, PathBuf};

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use w2s_proto::v1 as pb;
use w2s_proto::v1::datasets_client::DatasetsClient;
use w2s_proto::v1::inference_client::InferenceClient;
use w2s_proto::v1::models_client::ModelsClient;
use w2s_proto::v1::training_client::TrainingClient;

use crate::auth::AddBearer;
use crate::config::ServerConfig;
use crate::server::{RunningServer, StartError};

/// Errors of the client library.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("invalid client settings: {0}")]
    Settings(String),
    #[error("{}: {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
    #[error("embedded server: {0}")]
    Embedded(Box<StartError>),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("download of `{model}`: {reason}")]
    Download { model: String, reason: String },
    #[error(
        "{call}: the connection failed {attempts} times over ~{waited_seconds} s (last: {last}); \
         the server may be down or restarting. Finished work is kept: rerunning the same \
         command resumes where it left off"
    )]
    Unreachable {
        call: String,
        attempts: usize,
        waited_seconds: u64,
        last: String,
    },
    #[error(
        "following job {id}: the watch failed {attempts} times (last: {last}); the job keeps \
         running on the server, and rerunning the same command resumes where it left off"
    )]
    JobFollow {
        id: String,
        attempts: usize,
        last: String,
    },
}

impl From<StartError> for ClientError {
    fn from(e: StartError) -> Self {
        ClientError::Embedded(Box::new(e))
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
    move |source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How to reach a server.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// Bearer token sent with every call.
    pub token: Option<String>,
    /// PEM CA certificate to trust for `https://` URLs.
    pub tls_ca: Option<PathBuf>,
    /// Name expected in the server certificate (defaults to the URL's host).
    pub tls_domain: Option<String>,
}

type AuthChannel = InterceptedService<Channel, AddBearer>;

/// A connection to a model server.
#[derive(Clone)]
pub struct W2sClient {
    pub models: ModelsClient<AuthChannel>,
    pub inference: InferenceClient<AuthChannel>,
    pub datasets: DatasetsClient<AuthChannel>,
    pub training: TrainingClient<AuthChannel>,
}

/// Largest message the client sends or accepts.
const CLIENT_MESSAGE_LIMIT: usize = 256 * 1024 * 1024;

impl W2sClient {
    /// Connects to `url` (e.g. `http://127.0.0.1:50051`) without token or TLS.
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        Self::connect_with(url, &ClientOptions::default()).await
    }

    /// Connects with a token and/or TLS settings.
    pub async fn connect_with(url: &str, options: &ClientOptions) -> Result<Self, ClientError> {
        // tonic reads `127.0.0.1:50051` as a URL of scheme `127.0.0.1` and fails only when
        // connecting, which a caller that retries would retry for its whole wait.
        if !url.contains("://") {
            return Err(ClientError::Settings(format!(
                "server URL `{url}` has no scheme: use http://{url} (or https://{url} with TLS)"
            )));
        }
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|_| ClientError::Settings(format!("invalid server URL `{url}`")))?;
        if let Some(ca) = &options.tls_ca {
            let pem = std::fs::read(ca)
                .map_err(|e| ClientError::Settings(format!("{}: {e}", ca.display())))?;
            let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
            if let Some(domain) = &options.tls_domain {
                tls = tls.domain_name(domain.clone());
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| ClientError::Settings(format!("TLS: {e}")))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                url: url.to_string(),
                source,
            })?;
        let auth = AddBearer::new(options.token.as_deref())
            .map_err(|e| ClientError::Settings(e.to_string()))?;
        let limit = CLIENT_MESSAGE_LIMIT;
        Ok(Self {
            models: ModelsClient::with_interceptor(channel.clone(), auth.clone())
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            inference: InferenceClient::with_interceptor(channel.clone(), auth.clone())
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            datasets: DatasetsClient::with_interceptor(channel.clone(), auth.clone())
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            training: TrainingClient::with_interceptor(channel, auth)
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
        })
    }

    async fn list(&self) -> Result<pb::ListModelsResponse, ClientError> {
        let request = pb::ListModelsRequest {};
        Ok(self.models.clone().list_models(request).await?.into_inner())
    }

    pub async fn list_models(&self) -> Result<Vec<pb::ModelInfo>, ClientError> {
        Ok(self.list().await?.models)
    }

    /// The server's device and memory (see `ServerInfo`).
    pub async fn server_info(&self) -> Result<pb::ServerInfo, ClientError> {
        Ok(self.list().await?.server.unwrap_or_default())
    }

    pub async fn load_model(
        &self,
        request: pb::LoadModelRequest,
    ) -> Result<pb::ModelInfo, ClientError> {
        Ok(self.models.clone().load_model(request).await?.into_inner())
    }

    /// Token log-probs; retried on a broken connection (see [`retry_transient`]).
    pub async fn token_logprobs(
        &self,
        request: pb::TokenLogprobsRequest,
    ) -> Result<pb::TokenLogprobsResponse, ClientError> {
        retry_transient("TokenLogprobs", || async {
            Ok(self
                .inference
                .clone()
                .token_logprobs(request.clone())
                .await?
                .into_inner())
        })
        .await
    }

    /// Pair scores; retried on a broken connection (see [`retry_transient`]).
    pub async fn score_pairs(
        &self,
        request: pb::ScorePairsRequest,
    ) -> Result<pb::ScorePairsResponse, ClientError> {
        retry_transient("ScorePairs", || async {
            Ok(self
                .inference
                .clone()
                .score_pairs(request.clone())
                .await?
                .into_inner())
        })
        .await
    }

    /// Preference pairs from a policy's samples ranked by a judge; retried on a broken
    /// connection (sampling is seeded, so a repeat gives the same pairs).
    pub async fn generate_pairs(
        &self,
        request: pb::GeneratePairsRequest,
    ) -> Result<Vec<pb::GeneratedPair>, ClientError> {
        retry_transient("GeneratePairs", || async {
            Ok(self
                .inference
                .clone()
                .generate_pairs(request.clone())
                .await?
                .into_inner()
                .pairs)
        })
        .await
    }

    /// A whole continuation of `request.prompt` (the stream's last message); retried on a
    /// broken connection.
    pub async fn generate_text(&self, request: pb::GenerateRequest) -> Result<String, ClientError> {
        retry_transient("Generate", || async {
            let mut stream = self
                .inference
                .clone()
                .generate(request.clone())
                .await?
                .into_inner();
            while let Some(message) = stream.message().await? {
                if let Some(pb::generate_response::Event::Done(done)) = message.event {
                    return Ok(done.text);
                }
            }
            Err(ClientError::Rpc(tonic::Status::unavailable(
                "the generation stream ended before its last message",
            )))
        })
        .await
    }

    /// Uploads rows as one dataset (streamed in order after a header); retried on a broken
    /// connection (datasets are stored by content, so a repeat is harmless).
    pub async fn upload_dataset(
        &self,
        name: &str,
        rows: Vec<pb::upload_dataset_request::Item>,
    ) -> Result<pb::DatasetInfo, ClientError> {
        retry_transient("UploadDataset", || {
            self.upload_dataset_once(name, rows.clone())
        })
        .await
    }

    async fn upload_dataset_once(
        &self,
        name: &str,
        rows: Vec<pb::upload_dataset_request::Item>,
    ) -> Result<pb::DatasetInfo, ClientError> {
        let mut messages = vec![pb::UploadDatasetRequest {
            item: Some(pb::upload_dataset_request::Item::Header(
                pb::DatasetHeader {
                    name: name.to_string(),
                },
            )),
        }];
        messages.extend(
            rows.into_iter()
                .map(|item| pb::UploadDatasetRequest { item: Some(item) }),
        );
        let stream = tokio_stream::iter(messages);
        Ok(self
            .datasets
            .clone()
            .upload_dataset(stream)
            .await?
            .into_inner())
    }

    /// Loads the HF folder `dir` (on this machine) on the server as `load.name`: by its digest
    /// when the server already holds an identical upload, else by streaming the files (1 MiB
    /// messages, read lazily; the server checks sizes and SHA-256 and commits atomically).
    /// `load.source` is ignored. Works the same against a server on another machine. Retried
    /// on a broken connection (uploads are stored by content, so a repeat is harmless).
    pub async fn upload_model(
        &self,
        load: pb::LoadModelRequest,
        dir: &Path,
    ) -> Result<pb::ModelInfo, ClientError> {
        retry_transient("UploadModel", || self.upload_model_once(load.clone(), dir)).await
    }

    async fn upload_model_once(
        &self,
        mut load: pb::LoadModelRequest,
        dir: &Path,
    ) -> Result<pb::ModelInfo, ClientError> {
        let described = dir.to_path_buf();
        let files =
            tokio::task::spawn_blocking(move || crate::model_store::describe_folder(&described))
                .await
                .map_err(|e| ClientError::Settings(e.to_string()))?
                .map_err(io_error(dir))?;
        let digest = crate::model_store::folder_digest(&files);
        load.source = Some(pb::load_model_request::Source::Uploaded(digest));
        match self.models.clone().load_model(load.clone()).await {
            Ok(info) => return Ok(info.into_inner()),
            Err(status) if status.code() == tonic::Code::NotFound => {}
            Err(status) => return Err(status.into()),
        }
        load.source = None;
        let header = pb::UploadModelRequest {
            part: Some(pb::upload_model_request::Part::Header(
                pb::UploadModelHeader {
                    load: Some(load),
                    files: files.clone(),
                },
            )),
        };
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(&f.name)).collect();
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        let reader = tokio::task::spawn_blocking(move || -> Result<(), ClientError> {
            use std::io::Read;
            if sender.blocking_send(header).is_err() {
                return Ok(());
            }
            for path in paths {
                let mut file = std::fs::File::open(&path).map_err(io_error(&path))?;
                loop {
                    let mut chunk = vec![0u8; crate::model_store::CHUNK_BYTES];
                    let n = file.read(&mut chunk).map_err(io_error(&path))?;
                    if n == 0 {
                        break;
                    }
                    chunk.truncate(n);
                    let message = pb::UploadModelRequest {
                        part: Some(pb::upload_model_request::Part::Data(chunk)),
                    };
                    if sender.blocking_send(message).is_err() {
                        return Ok(()); // the call failed; its status says why
                    }
                }
            }
            Ok(())
        });
        let uploaded = self
            .models
            .clone()
            .upload_model(tokio_stream::wrappers::ReceiverStream::new(receiver))
            .await;
        reader
            .await
            .map_err(|e| ClientError::Settings(e.to_string()))??;
        Ok(uploaded?.into_inner())
    }

    /// Writes the resident model `name` as an HF folder at `dir` on this machine (which must
    /// not exist yet): the files are written into a temporary sibling, each checked against the
    /// size and SHA-256 the server announced, then renamed into place together.
    pub async fn download_model(&self, name: &str, dir: &Path) -> Result<(), ClientError> {
        use pb::download_model_response::Part;
        use sha2::Digest;
        use std::io::Write;
        if dir.exists() {
            return Err(ClientError::Download {
                model: name.into(),
                reason: format!(
                    "{} exists; downloads only go into a new folder",
                    dir.display()
                ),
            });
        }
        let partial = dir.with_file_name(format!(
            ".{}.partial-{}",
            dir.file_name().and_then(|n| n.to_str()).unwrap_or("model"),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&partial);
        std::fs::create_dir_all(&partial).map_err(io_error(&partial))?;
        let cleanup = RemoveOnDrop(partial.clone());
        let mut stream = self
            .models
            .clone()
            .download_model(pb::DownloadModelRequest { name: name.into() })
            .await?
            .into_inner();
        let failed = |reason: String| ClientError::Download {
            model: name.into(),
            reason,
        };
        let mut current: Option<IncomingFile> = None;
        let finish = |current: Option<IncomingFile>| -> Result<(), ClientError> {
            let Some(IncomingFile {
                file,
                writer,
                hasher,
                written,
            }) = current
            else {
                return Ok(());
            };
            let path = partial.join(&file.name);
            writer
                .into_inner()
                .map_err(|e| e.into_error())
                .and_then(|f| f.sync_all())
                .map_err(io_error(&path))?;
            let digest = crate::model_store::hex(&hasher.finalize());
            if written != file.size || digest != file.sha256 {
                return Err(failed(format!(
                    "`{}` arrived with {written} bytes and SHA-256 {digest}; the server announced {} bytes and {}",
                    file.name, file.size, file.sha256
                )));
            }
            Ok(())
        };
        while let Some(message) = stream.message().await? {
            match message.part {
                Some(Part::File(file)) => {
                    finish(current.take())?;
                    if !crate::model_store::is_plain_file_name(&file.name) {
                        return Err(failed(format!("refusing the file name `{}`", file.name)));
                    }
                    let path = partial.join(&file.name);
                    let writer = std::fs::File::create(&path).map_err(io_error(&path))?;
                    current = Some(IncomingFile {
                        file,
                        writer: std::io::BufWriter::new(writer),
                        hasher: sha2::Sha256::new(),
                        written: 0,
                    });
                }
                Some(Part::Data(bytes)) => {
                    let Some(IncomingFile {
                        file,
                        writer,
                        hasher,
                        written,
                    }) = &mut current
                    else {
                        return Err(failed("data before any file header".into()));
                    };
                    writer
                        .write_all(&bytes)
                        .map_err(io_error(&partial.join(&file.name)))?;
                    hasher.update(&bytes);
                    *written += bytes.len() as u64;
                }
                None => return Err(failed("an empty message".into())),
            }
        }
        finish(current.take())?;
        if !partial.join("config.json").is_file() {
            return Err(failed("the stream carried no config.json".into()));
        }
        std::fs::rename(&partial, dir).map_err(io_error(dir))?;
        std::mem::forget(cleanup);
        Ok(())
    }

    /// Drops a resident model; a model that is not there is no error.
    pub async fn unload_if_present(&self, name: &str) -> Result<(), ClientError> {
        let request = pb::UnloadModelRequest { name: name.into() };
        match self.models.clone().unload_model(request).await {
            Ok(_) => Ok(()),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(()),
            Err(status) => Err(status.into()),
        }
    }

    /// Removes a finished job and its folder from the server; a job the server does not know
    /// (already deleted, or never there) is no error. Returns the bytes freed.
    pub async fn delete_job_if_present(&self, id: &str) -> Result<u64, ClientError> {
        let request = pb::DeleteJobRequest { id: id.into() };
        match self.training.clone().delete_job(request).await {
            Ok(response) => Ok(response.into_inner().freed_bytes),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(0),
            Err(status) => Err(status.into()),
        }
    }

    /// Each pair's margin (chosen − rejected) under `scoring`, in order, sent `chunk` pairs
    /// per ScorePairs request.
    pub async fn pair_margins(
        &self,
        model: &str,
        pairs: &[pb::PreferencePair],
        scoring: pb::PairScoring,
        max_ctx: u32,
        chunk: usize,
    ) -> Result<Vec<f64>, ClientError> {
        let mut margins = Vec::with_capacity(pairs.len());
        for part in pairs.chunks(chunk.max(1)) {
            let response = self
                .score_pairs(pb::ScorePairsRequest {
                    model: model.into(),
                    pairs: part.to_vec(),
                    scoring: scoring as i32,
                    max_ctx,
                    ..Default::default()
                })
                .await?;
            margins.extend(response.scores.iter().map(|s| s.margin));
        }
        Ok(margins)
    }

    /// Picks up the job `previous` (an id recorded by an earlier attempt) when this server
    /// still knows it, else starts `request` anew.
    pub async fn resume_or_start_job(
        &self,
        request: pb::StartJobRequest,
        previous: Option<&str>,
    ) -> Result<JobStart, ClientError> {
        if let Some(id) = previous {
            let known = self
                .training
                .clone()
                .list_jobs(pb::ListJobsRequest {})
                .await?
                .into_inner()
                .jobs;
            if let Some(job) = known.into_iter().find(|j| j.id == id) {
                if job.state == pb::JobState::Succeeded as i32 {
                    return Ok(JobStart::Finished(job));
                }
                if job.state == pb::JobState::Queued as i32
                    || job.state == pb::JobState::Running as i32
                {
                    return Ok(JobStart::Resumed(job));
                }
            }
        }
        let job = self.training.clone().start_job(request).await?.into_inner();
        Ok(JobStart::Started(job))
    }

    /// Starts a job and follows it to its end, calling `on_event` for each event; returns the
    /// final job state.
    pub async fn run_job(
        &self,
        request: pb::StartJobRequest,
        mut on_event: impl FnMut(&pb::JobEvent),
    ) -> Result<pb::JobInfo, ClientError> {
        let job = self.training.clone().start_job(request).await?.into_inner();
        self.follow_job(&job.id, &mut on_event).await
    }

    /// Follows an existing job to its end. The job runs on the server whatever happens to the
    /// watch, so a watch that breaks (a dropped connection, a restarting server) or ends before
    /// the job does is opened again, after 1, 2, 4 and 8 s (long enough for a server restart,
    /// short enough that a study's pool moves the run of a dead server soon); events seen
    /// before may be reported again. Gives up after that with [`ClientError::JobFollow`].
    pub async fn follow_job(
        &self,
        id: &str,
        on_event: &mut impl FnMut(&pb::JobEvent),
    ) -> Result<pb::JobInfo, ClientError> {
        let mut last: Option<pb::JobInfo> = None;
        let mut failures = 0;
        loop {
            let why = match self.watch_once(id, on_event, &mut last).await {
                Ok(()) => match &last {
                    Some(job) if is_terminal(job) => return Ok(job.clone()),
                    _ => "the watch ended before the job did".to_string(),
                },
                Err(ClientError::Rpc(status)) if is_transient(&status) => {
                    format!("{}: {}", status.code(), status.message())
                }
                Err(e) => return Err(e),
            };
            let Some(&wait) = RETRY_BACKOFF_SECONDS.get(failures) else {
                return Err(ClientError::JobFollow {
                    id: id.to_string(),
                    attempts: failures + 1,
                    last: why,
                });
            };
            failures += 1;
            tracing::warn!("following job {id}: {why}; watching again in {wait} s");
            tokio::time::sleep(std::time::Duration::from_secs(wait)).await;
        }
    }

    /// One watch of job `id`, recording its latest state in `last`.
    async fn watch_once(
        &self,
        id: &str,
        on_event: &mut impl FnMut(&pb::JobEvent),
        last: &mut Option<pb::JobInfo>,
    ) -> Result<(), ClientError> {
        let mut stream = self
            .training
            .clone()
            .watch_job(pb::WatchJobRequest { id: id.to_string() })
            .await?
            .into_inner();
        while let Some(event) = stream.message().await? {
            on_event(&event);
            if let Some(job) = &event.job {
                *last = Some(job.clone());
            }
        }
        Ok(())
    }
}

/// Waits between attempts of a call whose connection broke: long enough for a server restart,
/// short enough that a study's pool moves the work of a dead server soon.
const RETRY_BACKOFF_SECONDS: [u64; 4] = [1, 2, 4, 8];

/// Runs `call` again after 1, 2, 4 and 8 s while it fails with a connection error (a server
/// going away, a stream broken in transit); any other error, or success, ends it at once. Only
/// for calls that are safe to repeat: reads, and uploads stored by content.
pub async fn retry_transient<T, F, Fut>(what: &str, call: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    retry_with_backoff(what, &RETRY_BACKOFF_SECONDS, call).await
}

async fn retry_with_backoff<T, F, Fut>(
    what: &str,
    backoff_seconds: &[u64],
    mut call: F,
) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut failures = 0;
    loop {
        match call().await {
            Err(ClientError::Rpc(status)) if is_transient(&status) => {
                let last = format!("{}: {}", status.code(), status.message());
                let Some(&wait) = backoff_seconds.get(failures) else {
                    return Err(ClientError::Unreachable {
                        call: what.to_string(),
                        attempts: failures + 1,
                        waited_seconds: backoff_seconds.iter().sum(),
                        last,
                    });
                };
                failures += 1;
                tracing::warn!("{what}: {last}; trying again in {wait} s");
                tokio::time::sleep(std::time::Duration::from_secs(wait)).await;
            }
            other => return other,
        }
    }
}

/// A job that has ended (succeeded, failed or been cancelled).
fn is_terminal(job: &pb::JobInfo) -> bool {
    [
        pb::JobState::Succeeded,
        pb::JobState::Failed,
        pb::JobState::Cancelled,
    ]
    .iter()
    .any(|s| *s as i32 == job.state)
}

/// Errors of the connection rather than of the request: a server going away, a stream broken
/// in transit (hyper reports those as UNKNOWN or as INTERNAL "h2 protocol error").
fn is_transient(status: &tonic::Status) -> bool {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown => true,
        tonic::Code::Internal => {
            let message = status.message();
            message.contains("h2 protocol error") || message.contains("broken pipe")
        }
        _ => false,
    }
}

/// What [`W2sClient::resume_or_start_job`] found.
#[derive(Debug, Clone)]
pub enum JobStart {
    /// The earlier job has already succeeded: its model can be loaded (`LoadModel` `job`).
    Finished(pb::JobInfo),
    /// The earlier job is queued or running (e.g. resumed after a server restart): follow it.
    Resumed(pb::JobInfo),
    /// A new job (the server did not know the earlier one, or it had failed).
    Started(pb::JobInfo),
}

/// A file of a download being written: what the server announced, and what has arrived.
struct IncomingFile {
    file: pb::ModelFile,
    writer: std::io::BufWriter<std::fs::File>,
    hasher: sha2::Sha256,
    written: u64,
}

/// Removes a temporary folder unless forgotten.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Either a connection to an external server or an in-process one that this value owns.
pub struct Session {
    pub client: W2sClient,
    embedded: Option<RunningServer>,
}

impl Session {
    /// Connects to `server` when given; otherwise starts an embedded server with `config`
    /// (its listen address is forced to an ephemeral loopback port).
    pub async fn open(server: Option<&str>, config: ServerConfig) -> Result<Self, ClientError> {
        Self::open_with(server, &ClientOptions::default(), config).await
    }

    /// As [`Session::open`], with token/TLS settings for an external server.
    pub async fn open_with(
        server: Option<&str>,
        options: &ClientOptions,
        config: ServerConfig,
    ) -> Result<Self, ClientError> {
        match server {
            Some(url) => Ok(Self {
                client: W2sClient::connect_with(url, options).await?,
                embedded: None,
            }),
            None => {
                let mut config = config;
                config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
                config.token = None;
                config.tls_cert = None;
                config.tls_key = None;
                let running = RunningServer::start(config).await?;
                let client = W2sClient::connect(&running.url()).await?;
                Ok(Self {
                    client,
                    embedded: Some(running),
                })
            }
        }
    }

    /// Whether this session runs its own server.
    pub fn is_embedded(&self) -> bool {
        self.embedded.is_some()
    }

    /// Stops the embedded server, if any.
    pub async fn close(self) -> Result<(), ClientError> {
        if let Some(server) = self.embedded {
            server.shutdown().await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connection_errors_are_retried_and_request_errors_are_not() {
        let attempts = std::cell::Cell::new(0);
        let flaky = || async {
            attempts.set(attempts.get() + 1);
            if attempts.get() < 3 {
                Err(ClientError::Rpc(tonic::Status::unavailable(
                    "connection reset",
                )))
            } else {
                Ok(attempts.get())
            }
        };
        assert_eq!(
            retry_with_backoff("flaky", &[0, 0, 0], flaky)
                .await
                .unwrap(),
            3
        );

        attempts.set(0);
        let refused = || async {
            attempts.set(attempts.get() + 1);
            Err::<(), _>(ClientError::Rpc(tonic::Status::invalid_argument(
                "bad pair",
            )))
        };
        assert!(
            retry_with_backoff("refused", &[0, 0], refused)
                .await
                .is_err()
        );
        assert_eq!(attempts.get(), 1);

        attempts.set(0);
        let down = || async {
            attempts.set(attempts.get() + 1);
            Err::<(), _>(ClientError::Rpc(tonic::Status::internal(
                "h2 protocol error: broken pipe",
            )))
        };
        let err = retry_with_backoff("ScorePairs", &[0, 0], down)
            .await
            .unwrap_err();
        assert_eq!(attempts.get(), 3);
        let message = err.to_string();
        assert!(
            message.starts_with("ScorePairs: the connection failed 3 times"),
            "{message}"
        );
        assert!(
            message.contains("rerunning the same command resumes"),
            "{message}"
        );
    }
}
