//! The tonic services of `w2s.v1`, one file per service (`models.rs`, `inference.rs`,
//! `datasets.rs`, `training.rs`): translate protobuf messages to worker commands and back,
//! record metrics per RPC, and map errors through [`ServiceError`]. No tensor work happens here.
//! This file holds what they share: their state, the per-RPC bookkeeping, name checks and the
//! stream plumbing.

mod datasets;
mod inference;
mod models;
mod training;

pub use datasets::{MAX_DATASET_NAME_BYTES, MAX_DATASETS_PER_PAGE};
pub use training::job_info;

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use superficial_models::{Architecture, ModelConfig, RewardReadout};
use superficial_training::losses::sigmoid;
use superficial_training::{DEFAULT_SHARDS, Schedule};
use tokio::sync::broadcast;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::instrument;
use w2s_proto::v1 as pb;

use crate::datasets::{DatasetMeta, DatasetStore, Row, RowKind};
use crate::error::{ServiceError, ServiceResult};
use crate::jobs::{
    Hyperparameters, JobEvent, JobPaths, JobSpec, JobState, JobStatus, ObjectiveKind,
};
use crate::metrics::Metrics;
use crate::model_store::ModelStore;
use crate::paths::{check_folder_files, resolve_in_root};
use crate::requests::require;
use crate::worker::{
    GenerationEvent, JobTable, LoadSpec, ModelSource, ModelSummary, StageTimes, WorkerHandle,
};

/// Shared state of the services.
#[derive(Clone)]
pub struct ServiceState {
    pub worker: WorkerHandle,
    pub model_root: PathBuf,
    pub data_dir: PathBuf,
    pub datasets: DatasetStore,
    /// Model folders uploaded by clients and downloads in progress.
    pub models: ModelStore,
    pub jobs: JobTable,
    pub events: broadcast::Sender<JobEvent>,
    pub metrics: Arc<Metrics>,
    pub limits: crate::config::Limits,
    /// One permit per DownloadModel stream that may run at once (`--max-downloads`).
    pub downloads: Arc<tokio::sync::Semaphore>,
    /// The device the models live on (`cpu`, `cuda:N`).
    pub device: String,
    /// Becomes `true` when the server starts shutting down: long-lived streams end then.
    pub closing: tokio::sync::watch::Receiver<bool>,
}

impl ServiceState {
    /// Records the outcome of an RPC and converts the error.
    fn finish<T>(
        &self,
        rpc: &str,
        started: Instant,
        result: ServiceResult<T>,
    ) -> Result<Response<T>, Status> {
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(e) => e.code(),
        };
        self.metrics.observe_request(rpc, code, started.elapsed());
        result.map(Response::new).map_err(Status::from)
    }

    /// Runs one unary RPC: `body` gets the RPC's start (for the Timing it reports); the
    /// outcome and duration are recorded under `rpc`.
    async fn unary<T, F>(
        &self,
        rpc: &str,
        body: impl FnOnce(Instant) -> F,
    ) -> Result<Response<T>, Status>
    where
        F: std::future::Future<Output = ServiceResult<T>>,
    {
        let started = Instant::now();
        let result = body(started).await;
        self.finish(rpc, started, result)
    }

    /// Records a failed RPC and converts the error.
    fn fail(&self, rpc: &str, started: Instant, error: ServiceError) -> Status {
        self.metrics
            .observe_request(rpc, error.code(), started.elapsed());
        Status::from(error)
    }

    fn model_source(
        &self,
        source: Option<pb::load_model_request::Source>,
    ) -> ServiceResult<ModelSource> {
        use pb::load_model_request::Source;
        match source {
            Some(Source::Path(path)) => {
                let folder = resolve_in_root(&self.model_root, &path)?;
                check_folder_files(&self.model_root, &folder, &path)?;
                Ok(ModelSource::Folder(folder))
            }
            Some(Source::Preset(preset)) => {
                if ModelConfig::preset(&preset).is_none() {
                    return Err(ServiceError::invalid(
                        "preset",
                        format!(
                            "unknown preset `{preset}` (known: {})",
                            ModelConfig::PRESETS.join(", ")
                        ),
                    ));
                }
                Ok(ModelSource::Preset(preset))
            }
            Some(Source::Job(id)) => {
                let status = self.job_status(&id)?;
                if status.state != JobState::Succeeded {
                    return Err(ServiceError::FailedPrecondition(format!(
                        "job {id} has not succeeded (state {:?})",
                        status.state
                    )));
                }
                Ok(ModelSource::Job {
                    folder: JobPaths::new(&self.data_dir, &id).model(),
                    id,
                })
            }
            Some(Source::Uploaded(digest)) => {
                let folder = self.models.folder(&digest).ok_or_else(|| {
                    ServiceError::PathNotFound(format!("uploaded:{digest} (upload it first)"))
                })?;
                Ok(ModelSource::Uploaded { digest, folder })
            }
            Some(Source::RandomInit(init)) => {
                ModelConfig::from_json_str(
                    &init.config_json,
                    std::path::Path::new("random_init.config_json"),
                )
                .map_err(|e| ServiceError::invalid("random_init.config_json", e))?;
                if !init.tokenizer_json.is_empty() {
                    superficial_models::TextTokenizer::from_json_str(&init.tokenizer_json)
                        .map_err(|e| ServiceError::invalid("random_init.tokenizer_json", e))?;
                }
                Ok(ModelSource::RandomInit {
                    config_json: init.config_json,
                    tokenizer_json: init.tokenizer_json,
                })
            }
            None => Err(ServiceError::invalid(
                "source",
                "give a path, a preset, a job, an uploaded digest or a random_init",
            )),
        }
    }

    fn job_status(&self, id: &str) -> ServiceResult<JobStatus> {
        self.jobs
            .lock()
            .map_err(|_| ServiceError::Internal("job table poisoned".into()))?
            .get(id)
            .cloned()
            .ok_or_else(|| ServiceError::UnknownJob(id.to_string()))
    }
}

pub struct ModelsService(pub ServiceState);
pub struct InferenceService(pub ServiceState);
pub struct DatasetsService(pub ServiceState);
pub struct TrainingService(pub ServiceState);

/// Names of models are shown in logs and listings: printable ASCII from a safe set, so no name
/// can forge a log line or a path.
fn check_name(field: &str, name: &str) -> ServiceResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:@+=".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ServiceError::invalid(
            field,
            "use 1-200 characters from A-Z a-z 0-9 - _ . : @ + =",
        ))
    }
}

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// Raises its flag when dropped before [`AbandonOnDrop::disarm`]: the request it guards was
/// abandoned by its client.
#[derive(Default)]
struct AbandonOnDrop(Arc<std::sync::atomic::AtomicBool>, bool);

impl AbandonOnDrop {
    fn disarm(mut self) {
        self.1 = true;
    }
}

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        if !self.1 {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// Resolves once the server starts shutting down (or its state is gone).
async fn shutting_down(closing: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        let closed = *closing.borrow_and_update();
        if closed || closing.changed().await.is_err() {
            return;
        }
    }
}

/// A stream fed by a task through a bounded channel.
fn async_stream<T, F, Fut>(body: F) -> EventStream<T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
