//! Assembling and running the gRPC server: worker thread, start-up models, health, reflection,
//! graceful shutdown. [`RunningServer`] is also the in-process ("embedded") mode of the clients.

use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tracing::info;
use w2s_proto::v1::inference_server::InferenceServer;
use w2s_proto::v1::models_server::ModelsServer;

use crate::config::ServerConfig;
use crate::service::{InferenceService, ModelsService, ServiceState};
use crate::worker::{LoadSpec, ModelSource, WorkerConfig, WorkerHandle, parse_device};

/// Errors of starting a server.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the device worker: {0}")]
    Worker(std::io::Error),
    #[error("cannot load start-up model `{name}`: {source}")]
    Load {
        name: String,
        source: crate::error::ServiceError,
    },
    #[error("reflection service: {0}")]
    Reflection(String),
    #[error("server stopped with an error: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// A server running on the current tokio runtime.
pub struct RunningServer {
    addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningServer {
    /// Binds, loads the start-up models, and starts serving. Returns once the server accepts
    /// connections and reports SERVING.
    pub async fn start(config: ServerConfig) -> Result<Self, StartError> {
        config.validate().map_err(StartError::Config)?;
        let device = parse_device(&config.device).map_err(StartError::Config)?;
        let worker = WorkerHandle::spawn(WorkerConfig {
            device,
            dtype: superficial_models::DType::F32,
            queue_capacity: config.queue_capacity,
            max_batch_tokens: config.max_batch_tokens,
        })
        .map_err(StartError::Worker)?;

        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;

        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        health_reporter
            .set_not_serving::<InferenceServer<InferenceService>>()
            .await;
        let state = ServiceState {
            worker: worker.clone(),
            model_root: config.model_root.clone(),
        };
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(w2s_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| StartError::Reflection(e.to_string()))?;
        let limit = config.max_message_bytes;
        let models = ModelsServer::new(ModelsService(state.clone()))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);
        let inference = InferenceServer::new(InferenceService(state))
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit);

        let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(
            Server::builder()
                .add_service(health_service)
                .add_service(reflection)
                .add_service(models)
                .add_service(inference)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = shutdown_rx.await;
                }),
        );

        // Start-up models load after the port is bound, so health checks see NOT_SERVING
        // until they are resident.
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
                    seed: config.seed,
                })
                .await
                .map_err(|source| StartError::Load {
                    name: named.name.clone(),
                    source,
                })?;
        }
        health_reporter
            .set_serving::<InferenceServer<InferenceService>>()
            .await;
        health_reporter
            .set_serving::<ModelsServer<ModelsService>>()
            .await;
        info!(%addr, "model-server listening on {addr}");
        Ok(Self {
            addr,
            shutdown: Some(shutdown_tx),
            task,
        })
    }

    /// The bound address (the real port when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, for clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting connections, lets in-flight requests finish, and waits.
    pub async fn shutdown(mut self) -> Result<(), StartError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.task.await {
            Ok(result) => Ok(result?),
            Err(join) => Err(StartError::Config(format!("server task failed: {join}"))),
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
