//! The Models service: list, load, unload, export, upload and download models.

use super::*;

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

#[tonic::async_trait]
impl pb::models_server::Models for ModelsService {
    async fn list_models(
        &self,
        _: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        self.0
            .unary("ListModels", |_| async move {
                self.0.worker.list().await.map(|models| {
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
                })
            })
            .await
    }

    #[instrument(skip_all, fields(name = %request.get_ref().name))]
    async fn load_model(
        &self,
        request: Request<pb::LoadModelRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let request = request.into_inner();
        self.0
            .unary("LoadModel", |_| async move {
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
            })
            .await
    }

    async fn unload_model(
        &self,
        request: Request<pb::UnloadModelRequest>,
    ) -> Result<Response<pb::UnloadModelResponse>, Status> {
        self.0
            .unary("UnloadModel", |_| async move {
                self.0
                    .worker
                    .unload(request.into_inner().name)
                    .await
                    .map(|_| pb::UnloadModelResponse {})
            })
            .await
    }

    async fn export_model(
        &self,
        request: Request<pb::ExportModelRequest>,
    ) -> Result<Response<pb::ExportModelResponse>, Status> {
        let request = request.into_inner();
        self.0
            .unary("ExportModel", |_| async move {
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
            })
            .await
    }

    #[instrument(skip_all)]
    async fn upload_model(
        &self,
        request: Request<Streaming<pb::UploadModelRequest>>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        use pb::upload_model_request::Part;
        let mut stream = request.into_inner();
        self.0
            .unary("UploadModel", |_| async move {
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
                    let message =
                        message.map_err(|e| ServiceError::invalid("stream", e.message()))?;
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
                    let _ =
                        tokio::task::spawn_blocking(move || std::fs::remove_dir_all(folder)).await;
                }
                Ok(model_info(loaded?))
            })
            .await
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
