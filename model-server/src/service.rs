//! The tonic services of `w2s.v1`: translate protobuf messages to worker jobs and back. No
//! tensor work happens here.

use std::path::PathBuf;
use std::time::Instant;

use superficial_models::{Architecture, ModelConfig};
use tonic::{Request, Response, Status};
use tracing::instrument;
use w2s_proto::v1 as pb;

use crate::error::ServiceError;
use crate::paths::resolve_in_root;
use crate::worker::{
    LoadSpec, LogprobsJob, ModelSource, ModelSummary, Pair, PairScoring, ScoreJob, StageTimes,
    WorkerHandle,
};

/// Shared state of the services.
#[derive(Clone)]
pub struct ServiceState {
    pub worker: WorkerHandle,
    pub model_root: PathBuf,
}

pub struct ModelsService(pub ServiceState);
pub struct InferenceService(pub ServiceState);

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
        source: summary.source,
        content_hash: summary.content_hash,
        has_reward_head: summary.has_reward_head,
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

fn require_model(model: &str) -> Result<(), ServiceError> {
    if model.is_empty() {
        Err(ServiceError::invalid("model", "must name a loaded model"))
    } else {
        Ok(())
    }
}

#[tonic::async_trait]
impl pb::models_server::Models for ModelsService {
    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let models = self.0.worker.list().await?;
        Ok(Response::new(pb::ListModelsResponse {
            models: models.into_iter().map(model_info).collect(),
        }))
    }

    #[instrument(skip_all, fields(name = %request.get_ref().name))]
    async fn load_model(
        &self,
        request: Request<pb::LoadModelRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let request = request.into_inner();
        let source = match request.source {
            Some(pb::load_model_request::Source::Path(path)) => {
                ModelSource::Folder(resolve_in_root(&self.0.model_root, &path)?)
            }
            Some(pb::load_model_request::Source::Preset(preset)) => {
                if ModelConfig::preset(&preset).is_none() {
                    return Err(ServiceError::invalid(
                        "preset",
                        format!(
                            "unknown preset `{preset}` (known: {})",
                            ModelConfig::PRESETS.join(", ")
                        ),
                    )
                    .into());
                }
                ModelSource::Preset(preset)
            }
            None => return Err(ServiceError::invalid("source", "give a path or a preset").into()),
        };
        let summary = self
            .0
            .worker
            .load(LoadSpec {
                name: request.name,
                source,
                role: request.role,
                reward_head: request.reward_head,
                seed: request.seed,
            })
            .await?;
        Ok(Response::new(model_info(summary)))
    }

    async fn unload_model(
        &self,
        request: Request<pb::UnloadModelRequest>,
    ) -> Result<Response<pb::UnloadModelResponse>, Status> {
        self.0.worker.unload(request.into_inner().name).await?;
        Ok(Response::new(pb::UnloadModelResponse {}))
    }
}

#[tonic::async_trait]
impl pb::inference_server::Inference for InferenceService {
    #[instrument(skip_all, fields(model = %request.get_ref().model))]
    async fn score_pairs(
        &self,
        request: Request<pb::ScorePairsRequest>,
    ) -> Result<Response<pb::ScorePairsResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        require_model(&request.model)?;
        let scoring = match pb::PairScoring::try_from(request.scoring) {
            Ok(pb::PairScoring::Reward) => PairScoring::Reward,
            Ok(pb::PairScoring::MeanLogprob) => PairScoring::MeanLogprob,
            Ok(pb::PairScoring::SumLogprob) => PairScoring::SumLogprob,
            _ => {
                return Err(ServiceError::invalid(
                    "scoring",
                    "choose PAIR_SCORING_REWARD, _MEAN_LOGPROB or _SUM_LOGPROB",
                )
                .into());
            }
        };
        if request.pairs.is_empty() {
            return Err(ServiceError::invalid("pairs", "must not be empty").into());
        }
        let job = ScoreJob {
            model: request.model,
            pairs: request
                .pairs
                .into_iter()
                .map(|p| Pair {
                    prompt: p.prompt,
                    chosen: p.chosen,
                    rejected: p.rejected,
                })
                .collect(),
            scoring,
            max_ctx: request.max_ctx as usize,
        };
        let (scores, times) = self.0.worker.score(job).await?;
        Ok(Response::new(pb::ScorePairsResponse {
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
        }))
    }

    #[instrument(skip_all, fields(model = %request.get_ref().model))]
    async fn token_logprobs(
        &self,
        request: Request<pb::TokenLogprobsRequest>,
    ) -> Result<Response<pb::TokenLogprobsResponse>, Status> {
        let started = Instant::now();
        let request = request.into_inner();
        require_model(&request.model)?;
        if request.texts.is_empty() {
            return Err(ServiceError::invalid("texts", "must not be empty").into());
        }
        let job = LogprobsJob {
            model: request.model,
            texts: request.texts,
            split_dialogue: request.split_dialogue,
            max_ctx: request.max_ctx as usize,
            truncate: request.truncate,
        };
        let (sequences, times) = self.0.worker.logprobs(job).await?;
        Ok(Response::new(pb::TokenLogprobsResponse {
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
        }))
    }
}

/// Numerically stable logistic function.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}
