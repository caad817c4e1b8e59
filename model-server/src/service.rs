//! The tonic services of `w2s.v1`: translate protobuf messages to worker commands and back,
//! record metrics per RPC, and map errors through [`ServiceError`]. No tensor work happens here.

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

fn readout_to_proto(readout: RewardReadout) -> pb::RewardReadout {
    match readout {
        RewardReadout::LastToken => pb::RewardReadout::LastToken,
        RewardReadout::LastTokenAndMeanLogprob => pb::RewardReadout::LastTokenAndMeanLogprob,
    }
}

fn readout_from_proto(value: i32) -> ServiceResult<RewardReadout> {
    match pb::RewardReadout::try_from(value) {
        Ok(pb::RewardReadout::LastToken) => Ok(RewardReadout::LastToken),
        Ok(pb::RewardReadout::LastTokenAndMeanLogprob) => {
            Ok(RewardReadout::LastTokenAndMeanLogprob)
        }
        Err(_) => Err(ServiceError::invalid(
            "reward_readout",
            format!("unknown reward read-out {value}"),
        )),
    }
}

fn model_info(summary: ModelSummary) -> pb::ModelInfo {
    let architecture = match summary.config.architecture() {
        Architecture::Gpt2 => pb::Architecture::Gpt2,
        Architecture::Opt => pb::Architecture::Opt,
    };
    pb::ModelInfo {
        name: summary.name,
        architecture: architecture as i32,
        role: summary.role,
        parameter_count: summary.parameter_count,
        dtype: summary.dtype,
        device: summary.device,
        source: summary.source.to_string(),
        content_hash: summary.content_hash,
        has_reward_head: summary.has_reward_head,
        reward_readout: readout_to_proto(summary.reward_readout) as i32,
        max_positions: summary.config.max_positions() as u32,
        vocab_size: summary.config.vocab_size() as u32,
        memory_bytes: summary.memory_bytes,
    }
}

fn timing(times: StageTimes, started: Instant) -> pb::Timing {
    pb::Timing {
        queue_ns: times.queue.as_nanos() as u64,
        tokenize_ns: times.tokenize.as_nanos() as u64,
        compute_ns: times.compute.as_nanos() as u64,
        total_ns: started.elapsed().as_nanos() as u64,
    }
}

#[tonic::async_trait]
impl pb::models_server::Models for ModelsService {
    async fn list_models(
        &self,
        _: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let started = Instant::now();
        let result = self.0.worker.list().await.map(|models| {
            let (memory_total_bytes, memory_available_bytes) = if self.0.device == "cpu" {
                crate::resources::host_memory().unwrap_or((0, 0))
            } else {
                (0, 0)
            };
            pb::ListModelsResponse {
                server: Some(pb::ServerInfo {
                    device: self.0.device.clone(),
                    memory_total_bytes,
                    memory_available_bytes,
                    resident_model_bytes: models.iter().map(|m| m.memory_bytes).sum(),
                    version: env!("CARGO_PKG_VERSION").into(),
                }),
                models: models.into_iter().map(model_info).collect(),
            }
        });
        self.0.finish("ListModels", started, result)
    }

    #[instrument(skip_all, fields(name = %request.get_ref().name))]
    async fn load_model(
        &self,
        request: Request<pb::LoadModelRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let result = async {
            check_name("name", &request.name)?;
            let source = self.0.model_source(request.source)?;
            let summary = self
                .0
                .worker
                .load(LoadSpec {
                    name: request.name,
                    source,
                    role: request.role,
                    reward_head: request.reward_head,
                    reward_readout: readout_from_proto(request.reward_readout)?,
                    seed: request.seed,
                })
                .await?;
            Ok(model_info(summary))
        }
        .await;
        self.0.finish("LoadModel", started, result)
    }

    async fn unload_model(
        &self,
        request: Request<pb::UnloadModelRequest>,
    ) -> Result<Response<pb::UnloadModelResponse>, Status> {
        let started = Instant::now();
        let result = self
            .0
            .worker
            .unload(request.into_inner().name)
            .await
            .map(|_| pb::UnloadModelResponse {});
        self.0.finish("UnloadModel", started, result)
    }

    async fn export_model(
        &self,
        request: Request<pb::ExportModelRequest>,
    ) -> Result<Response<pb::ExportModelResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let result = async {
            require("name", &request.name)?;
            require("path", &request.path)?;
            let dir = confine_new_path(&self.0.model_root, &request.path)?;
            refuse_server_data(&self.0.data_dir, &dir)?;
            superficial_training::export::check_destination(&dir)
                .map_err(|e| ServiceError::FailedPrecondition(e.to_string()))?;
            self.0.worker.export(request.name, dir.clone()).await?;
            Ok(pb::ExportModelResponse {
                path: dir.display().to_string(),
            })
        }
        .await;
        self.0.finish("ExportModel", started, result)
    }

    #[instrument(skip_all)]
    async fn upload_model(
        &self,
        request: Request<Streaming<pb::UploadModelRequest>>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        use pb::upload_model_request::Part;
        let started = Instant::now();
        let mut stream = request.into_inner();
        let result = async {
            let header = match stream.next().await {
                Some(Ok(pb::UploadModelRequest {
                    part: Some(Part::Header(header)),
                })) => header,
                Some(Err(e)) => return Err(ServiceError::invalid("stream", e.message())),
                _ => {
                    return Err(ServiceError::invalid(
                        "header",
                        "the first message must be the header",
                    ));
                }
            };
            let load = header.load.unwrap_or_default();
            check_name("load.name", &load.name)?;
            if load.source.is_some() {
                return Err(ServiceError::invalid(
                    "load.source",
                    "must be unset (the upload is the source)",
                ));
            }
            // Written as it arrives (bounded memory); dropped — and removed — on any error or
            // when the client goes away, since tonic then drops this future.
            let mut upload = self
                .0
                .models
                .begin(header.files, self.0.limits.max_model_upload_bytes)?;
            while let Some(message) = stream.next().await {
                let message = message.map_err(|e| ServiceError::invalid("stream", e.message()))?;
                match message.part {
                    Some(Part::Data(bytes)) => {
                        upload = tokio::task::spawn_blocking(move || {
                            upload.write(&bytes).map(|()| upload)
                        })
                        .await
                        .map_err(|e| ServiceError::Internal(e.to_string()))??;
                    }
                    _ => {
                        return Err(ServiceError::invalid(
                            "header",
                            "only the first message may be a header",
                        ));
                    }
                }
            }
            let digest = upload.digest().to_string();
            let reward_readout = readout_from_proto(load.reward_readout)?;
            let committed = tokio::task::spawn_blocking(move || upload.commit_new())
                .await
                .map_err(|e| ServiceError::Internal(e.to_string()))??;
            let loaded = self
                .0
                .worker
                .load(LoadSpec {
                    name: load.name,
                    source: ModelSource::Uploaded {
                        digest,
                        folder: committed.folder.clone(),
                    },
                    role: load.role,
                    reward_head: load.reward_head,
                    reward_readout,
                    seed: load.seed,
                })
                .await;
            if loaded.is_err() && committed.created {
                // A folder that cannot be loaded is of no use to a later LoadModel either.
                let folder = committed.folder;
                let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(folder)).await;
            }
            Ok(model_info(loaded?))
        }
        .await;
        self.0.finish("UploadModel", started, result)
    }

    type DownloadModelStream = EventStream<pb::DownloadModelResponse>;

    #[instrument(skip_all, fields(name = %request.get_ref().name))]
    async fn download_model(
        &self,
        request: Request<pb::DownloadModelRequest>,
    ) -> Result<Response<Self::DownloadModelStream>, Status> {
        let started = Instant::now();
        let name = request.into_inner().name;
        let prepared = async {
            require("name", &name)?;
            // Held by the stream until it ends or its client leaves.
            let permit = self.0.downloads.clone().try_acquire_owned().map_err(|_| {
                ServiceError::ResourceExhausted(
                    "the server's downloads are all in use (--max-downloads); retry when one \
                     ends"
                        .into(),
                )
            })?;
            let folder = self.0.models.download_folder();
            self.0.worker.export(name.clone(), folder.0.clone()).await?;
            let dir = folder.0.clone();
            let files =
                tokio::task::spawn_blocking(move || crate::model_store::describe_folder(&dir))
                    .await
                    .map_err(|e| ServiceError::Internal(e.to_string()))?
                    .map_err(|e| {
                        ServiceError::Internal(format!("reading the export of {name}: {e}"))
                    })?;
            Ok((folder, files, permit))
        }
        .await;
        let (folder, files, permit) = match prepared {
            Ok(prepared) => prepared,
            Err(e) => return Err(self.0.fail("DownloadModel", started, e)),
        };
        self.0
            .metrics
            .observe_request("DownloadModel", tonic::Code::Ok, started.elapsed());
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        // A blocking reader feeds the stream; it stops (and the export is removed) when the
        // client goes away, because sending then fails.
        tokio::task::spawn_blocking(move || {
            use pb::download_model_response::Part;
            use std::io::Read;
            for file in files {
                let path = folder.0.join(&file.name);
                let message = |part| Ok(pb::DownloadModelResponse { part: Some(part) });
                if sender.blocking_send(message(Part::File(file))).is_err() {
                    return;
                }
                let mut reader = match std::fs::File::open(&path) {
                    Ok(reader) => reader,
                    Err(e) => {
                        let status = Status::internal(format!("{}: {e}", path.display()));
                        let _ = sender.blocking_send(Err(status));
                        return;
                    }
                };
                loop {
                    let mut chunk = vec![0u8; crate::model_store::CHUNK_BYTES];
                    match reader.read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => {
                            chunk.truncate(n);
                            if sender.blocking_send(message(Part::Data(chunk))).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let status = Status::internal(format!("{}: {e}", path.display()));
                            let _ = sender.blocking_send(Err(status));
                            return;
                        }
                    }
                }
            }
        });
        // The stream holds the download's permit until it ends or its client goes away.
        let stream = tokio_stream::wrappers::ReceiverStream::new(receiver).map(move |message| {
            let _held = &permit;
            message
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

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

/// An export may not replace the server's data folder or a folder holding it, nor land in the
/// folders the server manages there (datasets, jobs).
fn refuse_server_data(data_dir: &std::path::Path, dir: &std::path::Path) -> ServiceResult<()> {
    let data = data_dir
        .canonicalize()
        .unwrap_or_else(|_| data_dir.to_path_buf());
    let parent = dir
        .parent()
        .and_then(|p| p.canonicalize().ok())
        .unwrap_or_default();
    let target = parent.join(dir.file_name().unwrap_or_default());
    let managed = ["datasets", "jobs"]
        .iter()
        .any(|sub| target.starts_with(data.join(sub)));
    if managed || data.starts_with(&target) {
        return Err(ServiceError::FailedPrecondition(format!(
            "{}: exports may not go over the server's data folder {} or into its datasets/jobs",
            dir.display(),
            data.display()
        )));
    }
    Ok(())
}

/// A destination that may not exist yet: its parent must resolve inside the root.
fn confine_new_path(root: &std::path::Path, requested: &str) -> ServiceResult<PathBuf> {
    let path = std::path::Path::new(requested);
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| *n != "..")
        .ok_or_else(|| ServiceError::invalid("path", "must end in a folder name"))?;
    if requested.contains('\0') {
        return Err(ServiceError::invalid("path", "contains a NUL byte"));
    }
    // The file system's own limits (NAME_MAX, PATH_MAX), refused here rather than failing
    // half-way through the export.
    if name.len() > 255 || requested.len() > 4096 {
        return Err(ServiceError::invalid(
            "path",
            "folder names are at most 255 bytes and paths at most 4096",
        ));
    }
    let parent = path
        .parent()
        .map(|p| p.to_string_lossy().to_string())
        .unwrap_or_default();
    let parent = if parent.is_empty() {
        ".".to_string()
    } else {
        parent
    };
    Ok(resolve_in_root(root, &parent)?.join(name))
}

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::inference_server::Inference for InferenceService {
    #[instrument(skip_all, fields(model = %request.get_ref().model))]
    async fn score_pairs(
        &self,
        request: Request<pb::ScorePairsRequest>,
    ) -> Result<Response<pb::ScorePairsResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let result = async {
            let job = crate::requests::score_job(request, &self.0.limits)?;
            let (scores, times) = self.0.worker.score(job).await?;
            Ok(pb::ScorePairsResponse {
                scores: scores
                    .into_iter()
                    .map(|s| {
                        let margin = s.chosen - s.rejected;
                        pb::PairScore {
                            chosen: s.chosen,
                            rejected: s.rejected,
                            margin,
                            p_chosen: sigmoid(margin),
                        }
                    })
                    .collect(),
                timing: Some(timing(times, started)),
            })
        }
        .await;
        self.0.finish("ScorePairs", started, result)
    }

    #[instrument(skip_all, fields(model = %request.get_ref().model))]
    async fn token_logprobs(
        &self,
        request: Request<pb::TokenLogprobsRequest>,
    ) -> Result<Response<pb::TokenLogprobsResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let result = async {
            let job = crate::requests::logprobs_job(request, &self.0.limits)?;
            let (sequences, times) = self.0.worker.logprobs(job).await?;
            Ok(pb::TokenLogprobsResponse {
                sequences: sequences
                    .into_iter()
                    .map(|s| pb::SequenceLogprobs {
                        token_ids: s.token_ids,
                        logprobs: s.logprobs,
                        response_mask: s.response_mask,
                        truncated: s.truncated,
                    })
                    .collect(),
                timing: Some(timing(times, started)),
            })
        }
        .await;
        self.0.finish("TokenLogprobs", started, result)
    }

    async fn score_texts(
        &self,
        request: Request<pb::ScoreTextsRequest>,
    ) -> Result<Response<pb::ScoreTextsResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let result = async {
            let job = crate::requests::texts_job(request, &self.0.limits)?;
            let (rewards, times) = self.0.worker.score_texts(job).await?;
            Ok(pb::ScoreTextsResponse {
                rewards,
                timing: Some(timing(times, started)),
            })
        }
        .await;
        self.0.finish("ScoreTexts", started, result)
    }

    type GenerateStream = EventStream<pb::GenerateResponse>;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let opened = async {
            let job = crate::requests::generate_job(request, &self.0.limits)?;
            self.0.worker.generate(job).await
        }
        .await;
        let receiver = match opened {
            Ok(r) => r,
            Err(e) => return Err(self.0.fail("Generate", started, e)),
        };
        let metrics = self.0.metrics.clone();
        let stream =
            tokio_stream::wrappers::ReceiverStream::new(receiver).map(move |event| match event {
                Ok(GenerationEvent::Token { id, text }) => Ok(pb::GenerateResponse {
                    event: Some(pb::generate_response::Event::Token(pb::GeneratedToken {
                        id,
                        text,
                    })),
                }),
                Ok(GenerationEvent::Done {
                    token_ids,
                    text,
                    times,
                }) => {
                    metrics.observe_request("Generate", tonic::Code::Ok, started.elapsed());
                    Ok(pb::GenerateResponse {
                        event: Some(pb::generate_response::Event::Done(pb::GenerationDone {
                            token_ids,
                            text,
                            timing: Some(timing(times, started)),
                        })),
                    })
                }
                Err(e) => {
                    metrics.observe_request("Generate", e.code(), started.elapsed());
                    Err(Status::from(e))
                }
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn generate_pairs(
        &self,
        request: Request<pb::GeneratePairsRequest>,
    ) -> Result<Response<pb::GeneratePairsResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let result = async {
            let job = crate::requests::pairs_job(request, &self.0.limits)?;
            let (pairs, times) = self.0.worker.generate_pairs(job).await?;
            Ok(pb::GeneratePairsResponse {
                pairs: pairs
                    .into_iter()
                    .map(|p| pb::GeneratedPair {
                        prompt_index: p.prompt_index as u32,
                        prompt: p.prompt,
                        chosen: p.chosen,
                        rejected: p.rejected,
                        chosen_score: p.chosen_score,
                        rejected_score: p.rejected_score,
                        soft_label: sigmoid(p.chosen_score - p.rejected_score),
                    })
                    .collect(),
                timing: Some(timing(times, started)),
            })
        }
        .await;
        self.0.finish("GeneratePairs", started, result)
    }
}

#[tonic::async_trait]
impl pb::datasets_server::Datasets for DatasetsService {
    async fn upload_dataset(
        &self,
        request: Request<Streaming<pb::UploadDatasetRequest>>,
    ) -> Result<Response<pb::DatasetInfo>, Status> {
        let started = Instant::now();
        let mut stream = request.into_inner();
        let result = async {
            // Rows are validated and written to disk in batches of about this many bytes, so
            // an upload holds little memory however large it is.
            const BATCH_BYTES: usize = 4 << 20;
            let mut name = String::new();
            let mut seen_header = false;
            let mut upload = None;
            let mut batch: Vec<Row> = Vec::new();
            let (mut batch_bytes, mut bytes, mut index) = (0usize, 0usize, 0usize);
            let store = self.0.datasets.clone();
            // Writes the batch on a blocking thread and hands the upload back.
            let flush =
                |upload: Option<crate::datasets::DatasetUpload>, batch: Vec<Row>, name: String| {
                    let store = store.clone();
                    async move {
                        tokio::task::spawn_blocking(move || {
                            let mut upload = match upload {
                                Some(upload) => upload,
                                None => store.begin(&name)?,
                            };
                            for row in &batch {
                                upload.push(row)?;
                            }
                            Ok::<_, ServiceError>(upload)
                        })
                        .await
                        .map_err(|e| ServiceError::Internal(e.to_string()))?
                    }
                };
            while let Some(message) = stream.next().await {
                let message = message.map_err(|e| ServiceError::invalid("stream", e.message()))?;
                use pb::upload_dataset_request::Item;
                let size = match &message.item {
                    Some(Item::Pair(p)) => p.prompt.len() + p.chosen.len() + p.rejected.len(),
                    Some(Item::Text(t)) => t.text.len(),
                    Some(Item::Prompt(p)) => p.prompt.len(),
                    Some(Item::Header(h)) => h.name.len(),
                    None => 0,
                };
                bytes += size;
                self.0.limits.check_upload(bytes)?;
                let longest_text = match &message.item {
                    Some(Item::Pair(p)) => p.prompt.len().max(p.chosen.len()).max(p.rejected.len()),
                    Some(Item::Text(t)) => t.text.len(),
                    Some(Item::Prompt(p)) => p.prompt.len(),
                    Some(Item::Header(_)) | None => 0,
                };
                self.0.limits.check_row(index, longest_text)?;
                let row = match message.item {
                    Some(Item::Header(header)) if !seen_header => {
                        check_dataset_name(&header.name)?;
                        name = header.name;
                        seen_header = true;
                        continue;
                    }
                    Some(Item::Header(_)) => {
                        return Err(ServiceError::invalid(
                            "header",
                            "only the first message may be a header",
                        ));
                    }
                    Some(_) if !seen_header => {
                        return Err(ServiceError::invalid(
                            "header",
                            "an upload starts with its header (the dataset's name)",
                        ));
                    }
                    Some(Item::Pair(p)) => Row::Pair {
                        prompt: p.prompt,
                        chosen: p.chosen,
                        rejected: p.rejected,
                        label: p.label.unwrap_or(1.0),
                        chosen_is_human_choice: p.chosen_is_human_choice.unwrap_or(true),
                        conflict_prefers_chosen: p.conflict_prefers_chosen,
                    },
                    Some(Item::Text(t)) => Row::Text { text: t.text },
                    Some(Item::Prompt(p)) => Row::Prompt { prompt: p.prompt },
                    None => {
                        return Err(ServiceError::invalid(
                            format!("rows[{index}]"),
                            "empty message",
                        ));
                    }
                };
                index += 1;
                batch.push(row);
                batch_bytes += size;
                if batch_bytes >= BATCH_BYTES {
                    upload = Some(flush(upload, std::mem::take(&mut batch), name.clone()).await?);
                    batch_bytes = 0;
                }
            }
            if upload.is_none() && batch.is_empty() {
                return Err(ServiceError::invalid(
                    "rows",
                    "a dataset needs at least one row",
                ));
            }
            let upload = flush(upload, batch, name).await?;
            // The client may go (cancel, deadline) while the rows are committed: tonic then
            // drops this future, the guard raises the flag, and the store discards its work
            // instead of committing a dataset nobody was told about.
            let abandoned = AbandonOnDrop::default();
            let flag = abandoned.0.clone();
            let meta = tokio::task::spawn_blocking(move || upload.commit(&flag))
                .await
                .map_err(|e| ServiceError::Internal(e.to_string()))??;
            abandoned.disarm();
            Ok(dataset_info(meta))
        }
        .await;
        self.0.finish("UploadDataset", started, result)
    }

    async fn list_datasets(
        &self,
        request: Request<pb::ListDatasetsRequest>,
    ) -> Result<Response<pb::ListDatasetsResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let store = self.0.datasets.clone();
        let page_size = match request.page_size {
            0 => MAX_DATASETS_PER_PAGE,
            n => (n as usize).min(MAX_DATASETS_PER_PAGE),
        };
        let result = tokio::task::spawn_blocking(move || store.list())
            .await
            .map_err(|e| ServiceError::Internal(e.to_string()))
            .and_then(|r| r)
            .map(|list| {
                // Ids are sorted: a page starts after the token (the last id of the page
                // before), so pages stay stable while datasets are added.
                let mut rest = list
                    .into_iter()
                    .filter(|meta| meta.id.as_str() > request.page_token.as_str())
                    .peekable();
                let datasets: Vec<pb::DatasetInfo> =
                    rest.by_ref().take(page_size).map(dataset_info).collect();
                let next_page_token = match (rest.peek(), datasets.last()) {
                    (Some(_), Some(last)) => last.id.clone(),
                    _ => String::new(),
                };
                pb::ListDatasetsResponse {
                    datasets,
                    next_page_token,
                }
            });
        self.0.finish("ListDatasets", started, result)
    }
}

/// Datasets per ListDatasets page at most: with names of at most `MAX_DATASET_NAME_BYTES`, a
/// page stays far below the message limit.
pub const MAX_DATASETS_PER_PAGE: usize = 1000;
/// Longest dataset name (bytes) an upload may give.
pub const MAX_DATASET_NAME_BYTES: usize = 256;

/// Dataset names are free-form labels for listings, bounded in length and without control
/// characters (so a name cannot bloat every listing or forge a log line).
fn check_dataset_name(name: &str) -> ServiceResult<()> {
    if name.len() > MAX_DATASET_NAME_BYTES {
        return Err(ServiceError::invalid(
            "header.name",
            format!(
                "{} bytes; a dataset name has at most {MAX_DATASET_NAME_BYTES}",
                name.len()
            ),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(ServiceError::invalid(
            "header.name",
            "control characters are not allowed",
        ));
    }
    Ok(())
}

fn dataset_info(meta: DatasetMeta) -> pb::DatasetInfo {
    // Names stored before names were bounded are cut for listings.
    let mut name = meta.name;
    if name.len() > MAX_DATASET_NAME_BYTES {
        let mut end = MAX_DATASET_NAME_BYTES;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    pb::DatasetInfo {
        id: meta.id,
        name,
        kind: match meta.kind {
            RowKind::Pairs => pb::RowKind::Pairs,
            RowKind::Texts => pb::RowKind::Texts,
            RowKind::Prompts => pb::RowKind::Prompts,
        } as i32,
        rows: meta.rows,
        content_hash: meta.content_hash,
    }
}

/// Protobuf view of a job.
pub fn job_info(status: &JobStatus) -> pb::JobInfo {
    pb::JobInfo {
        id: status.id.clone(),
        state: match status.state {
            JobState::Queued => pb::JobState::Queued,
            JobState::Running => pb::JobState::Running,
            JobState::Succeeded => pb::JobState::Succeeded,
            JobState::Failed => pb::JobState::Failed,
            JobState::Cancelled => pb::JobState::Cancelled,
        } as i32,
        objective: objective_to_pb(status.objective) as i32,
        base_model: status.base_model.clone(),
        output_model: status.output_model.clone(),
        step: status.step as u64,
        total_steps: status.total_steps as u64,
        error: status.error.clone().unwrap_or_default(),
        final_metrics: status.final_loss.map(|loss| pb::JobMetrics {
            loss,
            accuracy: status.final_accuracy.unwrap_or(0.0),
            has_accuracy: status.final_accuracy.is_some(),
        }),
    }
}

fn job_event(event: &JobEvent) -> pb::JobEvent {
    pb::JobEvent {
        job: Some(job_info(&event.status)),
        step: event.step.as_ref().map(|s| pb::StepEvent {
            step: s.metrics.step as u64,
            total_steps: s.metrics.total_steps as u64,
            loss: s.metrics.loss,
            learning_rate: s.metrics.lr,
            grad_norm: s.metrics.grad_norm,
            accuracy: s.metrics.accuracy,
            tokens_per_second: s.tokens_per_second,
            eta_seconds: s.eta_seconds,
        }),
    }
}

/// The protobuf name of an objective (the one mapping between the two enums, with
/// [`objective_from_pb`]).
fn objective_to_pb(kind: ObjectiveKind) -> pb::ObjectiveKind {
    match kind {
        ObjectiveKind::CausalLm => pb::ObjectiveKind::CausalLm,
        ObjectiveKind::Reward => pb::ObjectiveKind::Reward,
        ObjectiveKind::Sft => pb::ObjectiveKind::Sft,
        ObjectiveKind::Simpo => pb::ObjectiveKind::Simpo,
        ObjectiveKind::Dpo => pb::ObjectiveKind::Dpo,
    }
}

/// The objective a StartJob request names; UNSPECIFIED or an unknown value is the client's error.
fn objective_from_pb(value: i32) -> ServiceResult<ObjectiveKind> {
    ObjectiveKind::ALL
        .into_iter()
        .find(|&kind| objective_to_pb(kind) as i32 == value)
        .ok_or_else(|| ServiceError::invalid("objective", "choose an OBJECTIVE_KIND"))
}

/// A readable, unique job id.
fn new_job_id(objective: ObjectiveKind, output: &str) -> String {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let clean: String = output
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    format!(
        "job-{}-{clean}-{:x}",
        format!("{objective:?}").to_lowercase(),
        stamp & 0xffff_ffff_ffff
    )
}

#[tonic::async_trait]
impl pb::training_server::Training for TrainingService {
    async fn start_job(
        &self,
        request: Request<pb::StartJobRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        let result = async {
            let objective = objective_from_pb(request.objective)?;
            require("base_model", &request.base_model)?;
            check_name("output_model", &request.output_model)?;
            let h = request
                .hyperparameters
                .ok_or_else(|| ServiceError::invalid("hyperparameters", "required"))?;
            for (field, value) in [
                ("hyperparameters.beta", h.beta),
                ("hyperparameters.gamma", h.gamma),
                ("hyperparameters.conflict_alpha", h.conflict_alpha),
                ("hyperparameters.max_grad_norm", h.max_grad_norm),
                ("hyperparameters.weight_decay", h.weight_decay),
            ] {
                if !(value.is_finite() && value >= 0.0) {
                    return Err(ServiceError::invalid(
                        field,
                        "must be a finite number ≥ 0 (0 = default/off)",
                    ));
                }
            }
            let busy = self.0.jobs.lock().ok().and_then(|jobs| {
                jobs.values()
                    .find(|j| {
                        j.output_model == request.output_model
                            && matches!(j.state, JobState::Queued | JobState::Running)
                    })
                    .map(|j| j.id.clone())
            });
            if let Some(id) = busy {
                return Err(ServiceError::AlreadyLoaded(format!(
                    "{} (the output of running job {id})",
                    request.output_model
                )));
            }
            let schedule = match pb::LrSchedule::try_from(h.schedule) {
                Ok(pb::LrSchedule::Constant) => Schedule::Constant,
                Ok(pb::LrSchedule::CosineToZero) => Schedule::CosineToZero,
                Ok(pb::LrSchedule::WarmupConstant) => Schedule::LinearWarmupConstant {
                    warmup_frac: h.warmup_frac.unwrap_or(0.1),
                },
                _ => {
                    return Err(ServiceError::invalid(
                        "hyperparameters.schedule",
                        "choose an LR_SCHEDULE",
                    ));
                }
            };
            let models = self.0.worker.list().await?;
            let base = models
                .iter()
                .find(|m| m.name == request.base_model)
                .ok_or_else(|| ServiceError::UnknownModel(request.base_model.clone()))?;
            if models.iter().any(|m| m.name == request.output_model) {
                return Err(ServiceError::AlreadyLoaded(request.output_model.clone()));
            }
            let positive = |x: f64| (x > 0.0).then_some(x);
            let spec = JobSpec {
                id: new_job_id(objective, &request.output_model),
                objective,
                base_model: base.name.clone(),
                base_source: base.source.clone(),
                base_reward_head: base.reward_head_requested || objective.needs_reward_head(),
                base_reward_readout: base.reward_readout_requested,
                base_seed: base.seed,
                dataset_ids: request.dataset_ids.clone(),
                hyper: Hyperparameters {
                    lr: h.lr,
                    batch_size: h.batch_size as usize,
                    minibatch_size: if h.minibatch_size == 0 {
                        h.batch_size as usize
                    } else {
                        h.minibatch_size as usize
                    },
                    epochs: h.epochs.max(1) as usize,
                    schedule,
                    weight_decay: h.weight_decay,
                    max_grad_norm: positive(h.max_grad_norm),
                    max_ctx: if h.max_ctx == 0 {
                        base.config.max_positions()
                    } else {
                        h.max_ctx as usize
                    },
                    seed: h.seed,
                    shuffle: h.shuffle,
                    beta: positive(h.beta),
                    gamma: positive(h.gamma),
                    conflict_alpha: positive(h.conflict_alpha),
                    orient_slots: h.orient_slots,
                    checkpoint_every: h.checkpoint_every as usize,
                    shards: if h.shards == 0 {
                        DEFAULT_SHARDS
                    } else {
                        h.shards as usize
                    },
                },
                output_model: request.output_model,
            };
            spec.validate()?;
            let store = self.0.datasets.clone();
            let ids = spec.dataset_ids.clone();
            let rows = tokio::task::spawn_blocking(move || -> ServiceResult<Vec<Row>> {
                let mut rows = Vec::new();
                for id in &ids {
                    rows.extend(store.rows(id)?.1);
                }
                Ok(rows)
            })
            .await
            .map_err(|e| ServiceError::Internal(e.to_string()))??;
            spec.validate_rows(&rows)?;
            let status = self.0.worker.start_job(spec, rows).await?;
            Ok(job_info(&status))
        }
        .await;
        self.0.finish("StartJob", started, result)
    }

    type WatchJobStream = EventStream<pb::JobEvent>;

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let started = Instant::now();
        let id = request.into_inner().id;
        // Subscribe before reading the state so that no event falls between the two.
        let mut events = self.0.events.subscribe();
        let current = match self.0.job_status(&id) {
            Ok(s) => s,
            Err(e) => return Err(self.0.fail("WatchJob", started, e)),
        };
        self.0
            .metrics
            .observe_request("WatchJob", tonic::Code::Ok, started.elapsed());
        let mut closing = self.0.closing.clone();
        let stream = async_stream(move |tx| async move {
            let first = JobEvent {
                status: current.clone(),
                step: None,
            };
            if tx.send(Ok(job_event(&first))).await.is_err() || current.state.is_terminal() {
                return;
            }
            loop {
                let received = tokio::select! {
                    received = events.recv() => received,
                    // A watch outlives any drain: end it so shutdown need not wait for the job.
                    _ = shutting_down(&mut closing) => {
                        let _ = tx
                            .send(Err(Status::unavailable("server is shutting down")))
                            .await;
                        return;
                    }
                };
                match received {
                    Ok(event) if event.status.id == id => {
                        let terminal = event.status.state.is_terminal();
                        if tx.send(Ok(job_event(&event))).await.is_err() || terminal {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => {
                        let _ = tx
                            .send(Err(Status::unavailable("server is shutting down")))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::JobInfo>, Status> {
        let started = Instant::now();
        let id = request.into_inner().id;
        let result = async {
            self.0.job_status(&id)?;
            Ok(job_info(&self.0.worker.cancel_job(id).await?))
        }
        .await;
        self.0.finish("CancelJob", started, result)
    }

    async fn delete_job(
        &self,
        request: Request<pb::DeleteJobRequest>,
    ) -> Result<Response<pb::DeleteJobResponse>, Status> {
        let started = Instant::now();
        let id = request.into_inner().id;
        let result = async {
            require("id", &id)?;
            {
                let mut table = self
                    .0
                    .jobs
                    .lock()
                    .map_err(|_| ServiceError::Internal("job table poisoned".into()))?;
                let state = table
                    .get(&id)
                    .map(|status| status.state)
                    .ok_or_else(|| ServiceError::UnknownJob(id.clone()))?;
                if !state.is_terminal() {
                    return Err(ServiceError::FailedPrecondition(format!(
                        "job {id} is {state:?}; cancel it before deleting it"
                    )));
                }
                // Out of the table before the folder goes: a LoadModel of it now answers
                // NOT_FOUND instead of meeting a half-removed folder.
                table.remove(&id);
            }
            let dir = JobPaths::new(&self.0.data_dir, &id).dir;
            let freed = tokio::task::spawn_blocking(move || crate::jobs::remove_job_folder(&dir))
                .await
                .map_err(|e| ServiceError::Internal(e.to_string()))?
                .map_err(|e| ServiceError::Internal(format!("removing job {id}: {e}")))?;
            Ok(pb::DeleteJobResponse { freed_bytes: freed })
        }
        .await;
        self.0.finish("DeleteJob", started, result)
    }

    async fn list_jobs(
        &self,
        _: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let started = Instant::now();
        let result = self
            .0
            .jobs
            .lock()
            .map_err(|_| ServiceError::Internal("job table poisoned".into()))
            .map(|table| pb::ListJobsResponse {
                jobs: table.values().map(job_info).collect(),
            });
        self.0.finish("ListJobs", started, result)
    }
}

/// A stream fed by a task through a bounded channel.
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
