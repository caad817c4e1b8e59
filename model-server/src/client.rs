//! The Rust client library of `w2s.v1`, used by `trainer` and `eval-client`: connect to a
//! running server by URL, or start one in-process on a loopback ephemeral port ("embedded").

use tonic::transport::{Channel, Endpoint};
use w2s_proto::v1 as pb;
use w2s_proto::v1::inference_client::InferenceClient;
use w2s_proto::v1::models_client::ModelsClient;

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
    #[error("invalid server URL `{0}`")]
    Url(String),
    #[error("{}: {}", .0.code(), .0.message())]
    Rpc(#[from] tonic::Status),
    #[error("embedded server: {0}")]
    Embedded(#[from] StartError),
}

/// A connection to a model server.
#[derive(Clone)]
pub struct W2sClient {
    pub models: ModelsClient<Channel>,
    pub inference: InferenceClient<Channel>,
    max_message_bytes: usize,
}

impl W2sClient {
    /// Connects to `url` (e.g. `http://127.0.0.1:50051`).
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|_| ClientError::Url(url.to_string()))?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                url: url.to_string(),
                source,
            })?;
        let limit = 256 * 1024 * 1024;
        Ok(Self {
            models: ModelsClient::new(channel.clone())
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            inference: InferenceClient::new(channel)
                .max_decoding_message_size(limit)
                .max_encoding_message_size(limit),
            max_message_bytes: limit,
        })
    }

    /// The largest message this client sends or accepts.
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    pub async fn list_models(&self) -> Result<Vec<pb::ModelInfo>, ClientError> {
        let response = self
            .models
            .clone()
            .list_models(pb::ListModelsRequest {})
            .await?;
        Ok(response.into_inner().models)
    }

    pub async fn load_model(
        &self,
        request: pb::LoadModelRequest,
    ) -> Result<pb::ModelInfo, ClientError> {
        Ok(self.models.clone().load_model(request).await?.into_inner())
    }

    pub async fn token_logprobs(
        &self,
        request: pb::TokenLogprobsRequest,
    ) -> Result<pb::TokenLogprobsResponse, ClientError> {
        Ok(self
            .inference
            .clone()
            .token_logprobs(request)
            .await?
            .into_inner())
    }

    pub async fn score_pairs(
        &self,
        request: pb::ScorePairsRequest,
    ) -> Result<pb::ScorePairsResponse, ClientError> {
        Ok(self
            .inference
            .clone()
            .score_pairs(request)
            .await?
            .into_inner())
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
        match server {
            Some(url) => Ok(Self {
                client: W2sClient::connect(url).await?,
                embedded: None,
            }),
            None => {
                let mut config = config;
                config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
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
