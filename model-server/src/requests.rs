//! The Inference service's protobuf requests turned into worker jobs, with every field and
//! request-limit check on the way: pure functions of a request and the [`Limits`], so each
//! rule is unit-tested without a server. `service/inference.rs` calls one per RPC and only adds timing,
//! metrics and the reply.

use superficial_models::generation::SamplingConfig;
use w2s_proto::v1 as pb;

use crate::config::Limits;
use crate::error::{ServiceError, ServiceResult};
use crate::worker::{
    GenerateJob, JudgeKind, LogprobsJob, Pair, PairScoring, PairsJob, ScoreJob, TextsJob,
};

/// A required string field.
pub(crate) fn require(field: &str, value: &str) -> ServiceResult<()> {
    if value.is_empty() {
        Err(ServiceError::invalid(field, "must not be empty"))
    } else {
        Ok(())
    }
}

/// Sampling settings, range-checked: temperature finite and ≥ 0 (0 = greedy), top_p in [0, 1]
/// (0 = no limit).
fn sampling(params: Option<pb::SamplingParams>) -> ServiceResult<SamplingConfig> {
    let p = params.unwrap_or_default();
    if !(p.temperature.is_finite() && p.temperature >= 0.0) {
        return Err(ServiceError::invalid(
            "sampling.temperature",
            format!("{} is not a finite number ≥ 0", p.temperature),
        ));
    }
    if !(0.0..=1.0).contains(&p.top_p) {
        return Err(ServiceError::invalid(
            "sampling.top_p",
            format!("{} is outside [0, 1] (0 = no limit)", p.top_p),
        ));
    }
    let config = SamplingConfig {
        temperature: p.temperature,
        top_k: p.top_k as usize,
        top_p: if p.top_p == 0.0 { 1.0 } else { p.top_p },
        seed: p.seed,
    };
    config
        .validate()
        .map_err(|e| ServiceError::invalid("sampling", e))?;
    Ok(config)
}

/// ScorePairs: a model, a known scoring (DPO names its reference), pairs within the limits.
pub fn score_job(request: pb::ScorePairsRequest, limits: &Limits) -> ServiceResult<ScoreJob> {
    require("model", &request.model)?;
    let scoring = match pb::PairScoring::try_from(request.scoring) {
        Ok(pb::PairScoring::Reward) => PairScoring::Reward,
        Ok(pb::PairScoring::MeanLogprob) => PairScoring::MeanLogprob,
        Ok(pb::PairScoring::SumLogprob) => PairScoring::SumLogprob,
        Ok(pb::PairScoring::Dpo) => {
            require("reference_model", &request.reference_model)?;
            PairScoring::Dpo {
                reference: request.reference_model.clone(),
            }
        }
        _ => {
            return Err(ServiceError::invalid(
                "scoring",
                "choose PAIR_SCORING_REWARD, _MEAN_LOGPROB, _SUM_LOGPROB or _DPO",
            ));
        }
    };
    if request.pairs.is_empty() {
        return Err(ServiceError::invalid("pairs", "must not be empty"));
    }
    // Each side of a pair is a text: the count and every size are checked.
    let pairs = &request.pairs;
    limits.check_texts("pairs.chosen", pairs.iter().map(|p| p.chosen.as_str()))?;
    limits.check_texts("pairs.rejected", pairs.iter().map(|p| p.rejected.as_str()))?;
    limits.check_texts("pairs.prompt", pairs.iter().map(|p| p.prompt.as_str()))?;
    Ok(ScoreJob {
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
    })
}

/// TokenLogprobs: a model and texts within the limits.
pub fn logprobs_job(
    request: pb::TokenLogprobsRequest,
    limits: &Limits,
) -> ServiceResult<LogprobsJob> {
    require("model", &request.model)?;
    if request.texts.is_empty() {
        return Err(ServiceError::invalid("texts", "must not be empty"));
    }
    limits.check_texts("texts", request.texts.iter().map(String::as_str))?;
    Ok(LogprobsJob {
        model: request.model,
        texts: request.texts,
        split_dialogue: request.split_dialogue,
        max_ctx: request.max_ctx as usize,
        truncate: request.truncate,
    })
}

/// ScoreTexts: a model and texts within the limits.
pub fn texts_job(request: pb::ScoreTextsRequest, limits: &Limits) -> ServiceResult<TextsJob> {
    require("model", &request.model)?;
    if request.texts.is_empty() {
        return Err(ServiceError::invalid("texts", "must not be empty"));
    }
    limits.check_texts("texts", request.texts.iter().map(String::as_str))?;
    Ok(TextsJob {
        model: request.model,
        texts: request.texts,
        max_ctx: request.max_ctx as usize,
    })
}

/// Generate: a model, a prompt and a token count within the limits, valid sampling.
pub fn generate_job(request: pb::GenerateRequest, limits: &Limits) -> ServiceResult<GenerateJob> {
    require("model", &request.model)?;
    require("prompt", &request.prompt)?;
    if request.max_new_tokens == 0 {
        return Err(ServiceError::invalid("max_new_tokens", "must be positive"));
    }
    limits.check_texts("prompt", std::iter::once(request.prompt.as_str()))?;
    limits.check_generation(1, 1, request.max_new_tokens as usize)?;
    Ok(GenerateJob {
        sampling: sampling(request.sampling)?,
        model: request.model,
        prompt: request.prompt,
        max_new_tokens: request.max_new_tokens as usize,
        stop_at_eos: request.stop_at_eos.unwrap_or(true),
    })
}

/// GeneratePairs: a policy, a judge of a known kind, prompts and a generation size within the
/// limits, valid sampling.
pub fn pairs_job(request: pb::GeneratePairsRequest, limits: &Limits) -> ServiceResult<PairsJob> {
    require("policy", &request.policy)?;
    require("judge", &request.judge)?;
    if request.prompts.is_empty() {
        return Err(ServiceError::invalid("prompts", "must not be empty"));
    }
    if request.max_new_tokens == 0 {
        return Err(ServiceError::invalid("max_new_tokens", "must be positive"));
    }
    limits.check_texts("prompts", request.prompts.iter().map(String::as_str))?;
    limits.check_generation(
        request.prompts.len(),
        request.samples_per_prompt as usize,
        request.max_new_tokens as usize,
    )?;
    let judge_kind = match pb::JudgeKind::try_from(request.judge_kind) {
        Ok(pb::JudgeKind::Reward) => JudgeKind::Reward,
        Ok(pb::JudgeKind::MeanLogprob) => JudgeKind::MeanLogprob,
        Ok(pb::JudgeKind::SumLogprob) => JudgeKind::SumLogprob,
        _ => {
            return Err(ServiceError::invalid(
                "judge_kind",
                "choose JUDGE_KIND_REWARD, _MEAN_LOGPROB or _SUM_LOGPROB",
            ));
        }
    };
    Ok(PairsJob {
        sampling: sampling(request.sampling)?,
        policy: request.policy,
        judge: request.judge,
        judge_kind,
        prompts: request.prompts,
        samples_per_prompt: request.samples_per_prompt as usize,
        max_new_tokens: request.max_new_tokens as usize,
        keep_prompt_end: request.keep_prompt_end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_request_texts: 4,
            max_text_bytes: 16,
            max_new_tokens: 10,
            max_samples_per_prompt: 3,
            max_generated_tokens: 40,
            max_upload_bytes: 1 << 20,
            max_model_upload_bytes: 1 << 20,
        }
    }

    /// The field an INVALID_ARGUMENT or RESOURCE_EXHAUSTED error names.
    fn field_of(error: ServiceError) -> String {
        error.to_string()
    }

    fn pair(side: &str) -> pb::PreferencePair {
        pb::PreferencePair {
            prompt: "q".into(),
            chosen: side.into(),
            rejected: "no".into(),
        }
    }

    fn score(pairs: Vec<pb::PreferencePair>, scoring: pb::PairScoring) -> pb::ScorePairsRequest {
        pb::ScorePairsRequest {
            model: "m".into(),
            pairs,
            scoring: scoring as i32,
            ..Default::default()
        }
    }

    #[test]
    fn score_pairs_checks_model_scoring_reference_count_and_sizes() {
        let ok = score_job(score(vec![pair("yes")], pb::PairScoring::Reward), &limits()).unwrap();
        assert_eq!((ok.pairs.len(), ok.scoring), (1, PairScoring::Reward));
        let mut no_model = score(vec![pair("yes")], pb::PairScoring::Reward);
        no_model.model.clear();
        assert!(field_of(score_job(no_model, &limits()).unwrap_err()).contains("model"));
        let unspecified = score(vec![pair("yes")], pb::PairScoring::Unspecified);
        assert!(field_of(score_job(unspecified, &limits()).unwrap_err()).contains("scoring"));
        let dpo = score(vec![pair("yes")], pb::PairScoring::Dpo);
        assert!(field_of(score_job(dpo, &limits()).unwrap_err()).contains("reference_model"));
        let empty = score(vec![], pb::PairScoring::Reward);
        assert!(field_of(score_job(empty, &limits()).unwrap_err()).contains("pairs"));
        let too_many = score(vec![pair("yes"); 5], pb::PairScoring::Reward);
        let error = score_job(too_many, &limits()).unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument, "{error}");
        assert!(error.to_string().contains("pairs.chosen"), "{error}");
        let too_long = score(vec![pair(&"x".repeat(17))], pb::PairScoring::Reward);
        let error = score_job(too_long, &limits()).unwrap_err();
        assert!(error.to_string().contains("pairs.chosen"), "{error}");
    }

    #[test]
    fn texts_and_logprobs_check_model_count_and_sizes() {
        let texts = |model: &str, texts: Vec<String>| pb::ScoreTextsRequest {
            model: model.into(),
            texts,
            ..Default::default()
        };
        assert_eq!(
            texts_job(texts("m", vec!["a".into()]), &limits())
                .unwrap()
                .texts
                .len(),
            1
        );
        assert!(texts_job(texts("", vec!["a".into()]), &limits()).is_err());
        assert!(texts_job(texts("m", vec![]), &limits()).is_err());
        assert!(texts_job(texts("m", vec!["a".repeat(17)]), &limits()).is_err());
        let logprobs = |texts: Vec<String>| pb::TokenLogprobsRequest {
            model: "m".into(),
            texts,
            truncate: true,
            ..Default::default()
        };
        assert!(
            logprobs_job(logprobs(vec!["a".into()]), &limits())
                .unwrap()
                .truncate
        );
        assert!(logprobs_job(logprobs(vec![]), &limits()).is_err());
        assert!(logprobs_job(logprobs(vec!["a".into(); 5]), &limits()).is_err());
    }

    #[test]
    fn generation_checks_tokens_samples_totals_and_sampling() {
        let generate = |max_new_tokens: u32, temperature: f64| pb::GenerateRequest {
            model: "m".into(),
            prompt: "hi".into(),
            max_new_tokens,
            sampling: Some(pb::SamplingParams {
                temperature,
                ..Default::default()
            }),
            ..Default::default()
        };
        let job = generate_job(generate(5, 0.0), &limits()).unwrap();
        assert!(job.stop_at_eos && job.max_new_tokens == 5);
        assert!(generate_job(generate(0, 0.0), &limits()).is_err());
        let over = generate_job(generate(11, 0.0), &limits()).unwrap_err();
        assert_eq!(over.code(), tonic::Code::InvalidArgument, "{over}");
        assert!(over.to_string().contains("--max-new-tokens"), "{over}");
        let hot = generate_job(generate(5, f64::NAN), &limits()).unwrap_err();
        assert!(hot.to_string().contains("sampling.temperature"), "{hot}");

        let pairs = |prompts: usize, samples: u32, tokens: u32, judge: pb::JudgeKind| {
            pb::GeneratePairsRequest {
                policy: "p".into(),
                judge: "j".into(),
                judge_kind: judge as i32,
                prompts: vec!["q".into(); prompts],
                samples_per_prompt: samples,
                max_new_tokens: tokens,
                ..Default::default()
            }
        };
        let job = pairs_job(pairs(2, 2, 10, pb::JudgeKind::Reward), &limits()).unwrap();
        assert_eq!((job.prompts.len(), job.judge_kind), (2, JudgeKind::Reward));
        // 2 × 3 × 10 = 60 generated tokens against a limit of 40.
        let total = pairs_job(pairs(2, 3, 10, pb::JudgeKind::Reward), &limits()).unwrap_err();
        assert!(
            total.to_string().contains("max-generated-tokens"),
            "{total}"
        );
        let samples = pairs_job(pairs(1, 4, 1, pb::JudgeKind::Reward), &limits()).unwrap_err();
        assert!(
            samples.to_string().contains("samples_per_prompt"),
            "{samples}"
        );
        let judge = pairs_job(pairs(1, 2, 1, pb::JudgeKind::Unspecified), &limits()).unwrap_err();
        assert!(judge.to_string().contains("judge_kind"), "{judge}");
        assert!(pairs_job(pairs(0, 2, 1, pb::JudgeKind::Reward), &limits()).is_err());
    }
}
