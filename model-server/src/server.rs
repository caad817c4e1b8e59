//! Assembling and running the gRPC server: device worker, start-up models, job recovery,
//! health, reflection, authentication, TLS, metrics, graceful shutdown. [`RunningServer`] is
//! also the in-process ("embedded") mode of the clients.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tracing::{info, warn};
use w2s_proto::v1::datasets_server::DatasetsServer;
use w2s_proto::v1::inference_server::InferenceServer;
use w2s_proto::v1::models_server::ModelsServer;
use w2s_proto::v1::training_server::TrainingServer;

use crate::auth::RequireBearer;
use crate::config::{ConfigError, ServerConfig};
use crate::connections::{ConnectionLimits, guarded_incoming};
use crate::datasets::DatasetStore;
use crate::jobs::{JobPaths, JobSpec, JobStatus, read_json};
use crate::metrics::{self, Metrics};
use crate::model_store::ModelStore;
use crate::service::{
    DatasetsService, InferenceService, ModelsService, ServiceState, TrainingService,
};
use crate::worker::{JobTable, LoadSpec, ModelSource, WorkerConfig, WorkerHandle, parse_device};

/// Errors of starting a server.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot prepare the data folder {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the data folder {path} is in use by another server (it holds {path}/.lock); give each \
         server its own data folder"
    )]
    DataDirInUse { path: std::path::PathBuf },
    #[error("cannot start the device worker: {0}")]
    Worker(std::io::Error),
    #[error("cannot load start-up model `{name}`: {source}")]
    Load {
        name: String,
        source: crate::error::ServiceError,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("reflection service: {0}")]
    Reflection(String),
    #[error("server stopped with an error: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// A server running on the current tokio runtime.
pub struct RunningServer {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    shutdown: Option<oneshot::Sender<()>>,
    /// Tells long-lived streams that the server is closing.
    closing: tokio::sync::watch::Sender<bool>,
    /// The longest wait for in-flight requests at shutdown.
    drain: Duration,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
    metrics_task: Option<JoinHandle<()>>,
    watchdog: Option<JoinHandle<()>>,
    state: ServiceState,
    /// Held while the server runs: a second server on the same data folder would share its
    /// jobs, models and datasets and overwrite their files.
    _data_dir_lock: std::fs::File,
}

impl RunningServer {
    /// Binds, loads the start-up models, re-queues unfinished jobs, and starts serving.
    /// Returns once the server accepts connections and reports SERVING.
    pub async fn start(config: ServerConfig) -> Result<Self, StartError> {
        config.validate().map_err(StartError::Config)?;
        let device = parse_device(&config.device).map_err(StartError::Config)?;
        let device_label = crate::worker::device_name(&device);
        let data_dir_error = |path: &std::path::Path| {
            let path = path.to_path_buf();
            move |source| StartError::DataDir { path, source }
        };
        std::fs::create_dir_all(&config.data_dir).map_err(data_dir_error(&config.data_dir))?;
        let data_dir_lock = lock_data_dir(&config.data_dir)?;
        crate::error::keep_private(&config.model_root, "");
        crate::error::keep_private(&config.data_dir, "<data-dir>");
        let datasets =
            DatasetStore::new(&config.data_dir).map_err(data_dir_error(&config.data_dir))?;
        let metrics = Arc::new(Metrics::default());
        let jobs: JobTable = Arc::new(Mutex::new(Default::default()));
        let (events, _) = broadcast::channel(1024);
        let worker = WorkerHandle::spawn(
            worker_config(&config, device),
            jobs.clone(),
            events.clone(),
            metrics.clone(),
        )
        .map_err(StartError::Worker)?;

        let listener = bind(config.listen).await?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let connection_limits = ConnectionLimits {
            max_connections: config.max_connections,
            first_bytes_within: Duration::from_secs_f64(config.first_bytes_seconds),
        };
        let (metrics_addr, metrics_task) =
            serve_metrics(&config, &metrics, connection_limits).await?;

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_not_serving::<InferenceServer<InferenceService>>()
            .await;
        let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
        let state = ServiceState {
            worker: worker.clone(),
            model_root: config.model_root.clone(),
            data_dir: config.data_dir.clone(),
            datasets,
            models: ModelStore::open(&config.data_dir)
                .map_err(data_dir_error(&config.data_dir.join("models")))?,
            jobs: jobs.clone(),
            events,
            metrics: metrics.clone(),
            limits: crate::config::Limits::from(&config),
            downloads: Arc::new(tokio::sync::Semaphore::new(config.max_downloads)),
            device: device_label,
            closing: closing_rx,
        };
        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let task = serve_grpc(
            &config,
            &state,
            health_service,
            (listener, connection_limits),
            async {
                let _ = shutdown_rx.await;
            },
        )?;

        // Start-up models load after the port is bound, so health checks see NOT_SERVING
        // until they are resident.
        load_startup_models(&config, &worker).await?;
        recover_jobs(&config, &state).await;
        set_serving(&health_reporter).await;
        let watchdog = (config.stall_seconds > 0.0).then(|| {
            tokio::spawn(health_watchdog(
                health_reporter.clone(),
                worker.heartbeat(),
                Duration::from_secs_f64(config.stall_seconds),
            ))
        });
        info!(%addr, "model-server listening on {addr}");
        Ok(Self {
            watchdog,
            addr,
            metrics_addr,
            shutdown: Some(shutdown_tx),
            closing: closing_tx,
            drain: Duration::from_secs_f64(config.drain_seconds),
            task,
            metrics_task,
            state,
            _data_dir_lock: data_dir_lock,
        })
    }

    /// The bound address (the real port when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound metrics address, when metrics are served.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The server's metrics registry.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.state.metrics.clone()
    }

    /// `http://ADDR`, for clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Graceful shutdown with a bounded drain: stop accepting, end open WatchJob streams
    /// (UNAVAILABLE), let other in-flight requests finish for up to `--drain-seconds`, then
    /// cut off what remains, checkpoint the running training job and stop the worker.
    pub async fn shutdown(mut self) -> Result<(), StartError> {
        let _ = self.closing.send(true);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let served = match tokio::time::timeout(self.drain, &mut self.task).await {
            Ok(served) => served,
            Err(_) => {
                warn!(
                    "requests still in flight after the {:.1} s drain: cut off",
                    self.drain.as_secs_f64()
                );
                self.task.abort();
                Ok(Ok(()))
            }
        };
        if let Err(e) = self.state.worker.shutdown().await {
            warn!("worker shutdown: {e}");
        }
        for task in [self.metrics_task.take(), self.watchdog.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
        match served {
            Ok(result) => Ok(result?),
            Err(join) => Err(StartError::Config(
                format!("server task failed: {join}").into(),
            )),
        }
    }

    /// Serves until `signal` resolves, then shuts down gracefully.
    pub async fn serve_until(
        self,
        signal: impl std::future::Future<Output = ()>,
    ) -> Result<(), StartError> {
        signal.await;
        info!("shutting down");
        self.shutdown().await
    }
}

/// Opens (creating) `path` and takes its exclusive lock, held until the file is dropped;
/// `None` while another holder (a process, or another server in this one) has it.
pub fn hold_lock_file(path: &std::path::Path) -> std::io::Result<Option<std::fs::File>> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Takes the data folder's lock file (`.lock`), or says that another server holds it.
fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File, StartError> {
    let path = dir.join(".lock");
    match hold_lock_file(&path) {
        Ok(Some(file)) => Ok(file),
        Ok(None) => Err(StartError::DataDirInUse {
            path: dir.to_path_buf(),
        }),
        Err(source) => Err(StartError::DataDir { path, source }),
    }
}

/// The device worker's settings from the server's.
fn worker_config(config: &ServerConfig, device: superficial_models::Device) -> WorkerConfig {
    WorkerConfig {
        device,
        dtype: superficial_models::DType::F32,
        queue_capacity: config.queue_capacity,
        max_batch_tokens: config.max_batch_tokens,
        max_batch_requests: config.max_batch_requests,
        data_dir: config.data_dir.clone(),
        checkpoint_every: config.checkpoint_every,
        slice: Duration::from_secs_f64(config.slice_ms / 1000.0),
        max_pass: (config.max_pass_ms > 0.0)
            .then(|| Duration::from_secs_f64(config.max_pass_ms / 1000.0)),
        threads: config.threads,
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

/// The metrics endpoint, when `--metrics-listen` asks for one: its bound address and task.
async fn serve_metrics(
    config: &ServerConfig,
    metrics: &Arc<Metrics>,
    limits: ConnectionLimits,
) -> Result<(Option<SocketAddr>, Option<JoinHandle<()>>), StartError> {
    let Some(addr) = config.metrics_listen else {
        return Ok((None, None));
    };
    let listener = metrics::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let bound = listener.local_addr().ok();
    let token = config.metrics_token.then(|| config.token.clone()).flatten();
    let task = tokio::spawn(metrics::serve(listener, metrics.clone(), limits, token));
    Ok((bound, Some(task)))
}

/// The gRPC server task: the four services behind the bearer check, health, reflection, message
/// limits, keepalives and TLS, accepting on the listener under its connection limits until
/// `shutdown` resolves.
fn serve_grpc(
    config: &ServerConfig,
    state: &ServiceState,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    (listener, limits): (TcpListener, ConnectionLimits),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<JoinHandle<Result<(), tonic::transport::Error>>, StartError> {
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(w2s_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = reflection_builder()
        .build_v1()
        .map_err(|e| StartError::Reflection(e.to_string()))?;
    // grpcurl, Postman and grpcui still ask v1alpha first.
    let reflection_v1alpha = reflection_builder()
        .build_v1alpha()
        .map_err(|e| StartError::Reflection(e.to_string()))?;
    let limit = config.max_message_bytes;
    let auth = RequireBearer::new(config.token.as_deref());
    let models = ModelsServer::new(ModelsService(state.clone()))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let inference = InferenceServer::new(InferenceService(state.clone()))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let datasets = DatasetsServer::new(DatasetsService(state.clone()))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);
    let training = TrainingServer::new(TrainingService(state.clone()))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(limit);

    // Dead peers (half-open TCP, a client that vanished mid-stream) are found by HTTP/2
    // pings and TCP keepalive instead of holding a descriptor forever.
    let mut builder = Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .tcp_keepalive(Some(std::time::Duration::from_secs(60)));
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| StartError::Tls(format!("{}: {e}", p.display())))
        };
        let identity = Identity::from_pem(read(cert)?, read(key)?);
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(identity))
            .map_err(|e| StartError::Tls(e.to_string()))?;
    }
    Ok(tokio::spawn(
        builder
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(InterceptedService::new(models, auth.clone()))
            .add_service(InterceptedService::new(inference, auth.clone()))
            .add_service(InterceptedService::new(datasets, auth.clone()))
            .add_service(InterceptedService::new(training, auth))
            .serve_with_incoming_shutdown(guarded_incoming(listener, limits), shutdown),
    ))
}

/// Loads `--model` folders and `--preset`s onto the worker, in that order.
async fn load_startup_models(
    config: &ServerConfig,
    worker: &WorkerHandle,
) -> Result<(), StartError> {
    let startup = config
        .models
        .iter()
        .map(|m| (m, ModelSource::Folder(m.value.clone().into())))
        .chain(
            config
                .presets
                .iter()
                .map(|p| (p, ModelSource::Preset(p.value.clone()))),
        );
    for (named, source) in startup {
        worker
            .load(LoadSpec {
                name: named.name.clone(),
                source,
                role: String::new(),
                reward_head: false,
                reward_readout: superficial_models::RewardReadout::LastToken,
                seed: config.seed,
            })
            .await
            .map_err(|source| StartError::Load {
                name: named.name.clone(),
                source,
            })?;
    }
    Ok(())
}

async fn set_serving(reporter: &tonic_health::server::HealthReporter) {
    reporter
        .set_serving::<InferenceServer<InferenceService>>()
        .await;
    reporter.set_serving::<ModelsServer<ModelsService>>().await;
    reporter
        .set_serving::<DatasetsServer<DatasetsService>>()
        .await;
    reporter
        .set_serving::<TrainingServer<TrainingService>>()
        .await;
}

/// Reports NOT_SERVING (every service and the server as a whole) while the device loop has
/// work but has made no progress for `stall`, and SERVING again once it moves. With work
/// sliced into single forward passes, a stall that long means a stuck device or a step far
/// beyond what the machine can do; load balancers then route around the server.
async fn health_watchdog(
    reporter: tonic_health::server::HealthReporter,
    heartbeat: Arc<crate::worker::Heartbeat>,
    stall: Duration,
) {
    use tonic::server::NamedService;
    const SERVICES: [&str; 5] = [
        "",
        <InferenceServer<InferenceService> as NamedService>::NAME,
        <ModelsServer<ModelsService> as NamedService>::NAME,
        <DatasetsServer<DatasetsService> as NamedService>::NAME,
        <TrainingServer<TrainingService> as NamedService>::NAME,
    ];
    let mut interval = tokio::time::interval(Duration::from_millis(250).min(stall / 4));
    let mut stalled = false;
    loop {
        interval.tick().await;
        let now_stalled = heartbeat.stalled_for() >= stall;
        if now_stalled == stalled {
            continue;
        }
        stalled = now_stalled;
        let status = if stalled {
            warn!(
                "device loop has made no progress for {:.1} s: health NOT_SERVING",
                heartbeat.stalled_for().as_secs_f64()
            );
            tonic_health::ServingStatus::NotServing
        } else {
            info!("device loop is making progress again: health SERVING");
            tonic_health::ServingStatus::Serving
        };
        for service in SERVICES {
            reporter.set_service_status(service, status).await;
        }
    }
}

/// Removes what a killed or disk-full writer left in a job folder: the temporary checkpoint
/// (`checkpoint.tmp`; a `checkpoint.old` is kept, it is the fallback `load` reads), half-written
/// JSON (`*.json.tmp`) and an export's temporary folder (`.model.partial*`).
fn sweep_job_leftovers(paths: &JobPaths) {
    let Ok(entries) = std::fs::read_dir(&paths.dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let leftover =
            name == "checkpoint.tmp" || name.ends_with(".json.tmp") || name.contains(".partial");
        if leftover {
            let path = entry.path();
            let _ = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
}

/// Loads every job's state from the data folder; unfinished jobs are queued again and resume
/// from their last checkpoint.
async fn recover_jobs(config: &ServerConfig, state: &ServiceState) {
    let Ok(entries) = std::fs::read_dir(config.data_dir.join("jobs")) else {
        return;
    };
    let mut unfinished = Vec::new();
    for entry in entries.flatten() {
        let Some(id) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if id.starts_with(crate::jobs::DELETED_JOB_PREFIX) {
            // A DeleteJob the server did not finish: the job was already out of the listing.
            let _ = std::fs::remove_dir_all(entry.path());
            continue;
        }
        if id.starts_with('.') {
            continue; // quarantined earlier
        }
        let paths = JobPaths::new(&config.data_dir, &id);
        sweep_job_leftovers(&paths);
        let (Ok(spec), Ok(status)) = (
            read_json::<JobSpec>(&paths.spec()),
            read_json::<JobStatus>(&paths.state()),
        ) else {
            // Neither listed nor resumed, kept for inspection; the id is free again.
            let aside = paths.dir.with_file_name(format!(".broken-{id}"));
            warn!(job = %id, "job folder without readable spec.json/state.json: set aside as {}", aside.display());
            let _ = std::fs::remove_dir_all(&aside);
            let _ = std::fs::rename(&paths.dir, &aside);
            continue;
        };
        if let Ok(mut table) = state.jobs.lock() {
            table.insert(id.clone(), status.clone());
        }
        if !status.state.is_terminal() {
            unfinished.push(spec);
        }
    }
    unfinished.sort_by(|a, b| a.id.cmp(&b.id));
    for spec in unfinished {
        let id = spec.id.clone();
        let rows = spec
            .dataset_ids
            .iter()
            .map(|d| state.datasets.rows(d).map(|(_, rows)| rows))
            .collect::<Result<Vec<_>, _>>();
        let result = match rows {
            Ok(rows) => state
                .worker
                .start_job(spec, rows.concat())
                .await
                .map(|_| ()),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => info!(job = %id, "re-queued unfinished job"),
            Err(e) => warn!(job = %id, "cannot resume job: {e}"),
        }
    }
}
