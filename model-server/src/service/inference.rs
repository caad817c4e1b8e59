//! The Inference service: scoring, log-probs, reward of texts, generation and preference-pair
//! generation, each a request converted by `requests.rs` and answered by the worker.

use super::*;

fn timing(times: StageTimes, started: Instant) -> pb::Timing {
    pb::Timing {
        queue_ns: times.queue.as_nanos() as u64,
        tokenize_ns: times.tokenize.as_nanos() as u64,
        compute_ns: times.compute.as_nanos() as u64,
        total_ns: started.elapsed().as_nanos() as u64,
    }
}

#[tonic::async_trait]
impl pb::inference_server::Inference for InferenceService {
    #[instrument(skip_all, fields(model = %request.get_ref().model))]
    async fn score_pairs(
        &self,
        request: Request<pb::ScorePairsRequest>,
    ) -> Result<Response<pb::ScorePairsResponse>, Status> {
        let request = request.into_inner();
        self.0
            .unary("ScorePairs", |started| async move {
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
            })
            .await
    }

    #[instrument(skip_all, fields(model = %request.get_ref().model))]
    async fn token_logprobs(
        &self,
        request: Request<pb::TokenLogprobsRequest>,
    ) -> Result<Response<pb::TokenLogprobsResponse>, Status> {
        let request = request.into_inner();
        self.0
            .unary("TokenLogprobs", |started| async move {
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
            })
            .await
    }

    async fn score_texts(
        &self,
        request: Request<pb::ScoreTextsRequest>,
    ) -> Result<Response<pb::ScoreTextsResponse>, Status> {
        let request = request.into_inner();
        self.0
            .unary("ScoreTexts", |started| async move {
                let job = crate::requests::texts_job(request, &self.0.limits)?;
                let (rewards, times) = self.0.worker.score_texts(job).await?;
                Ok(pb::ScoreTextsResponse {
                    rewards,
                    timing: Some(timing(times, started)),
                })
            })
            .await
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
        let request = request.into_inner();
        self.0
            .unary("GeneratePairs", |started| async move {
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
            })
            .await
    }
}
