from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Architecture(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARCHITECTURE_UNSPECIFIED: _ClassVar[Architecture]
    ARCHITECTURE_GPT2: _ClassVar[Architecture]
    ARCHITECTURE_OPT: _ClassVar[Architecture]

class RewardReadout(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REWARD_READOUT_LAST_TOKEN: _ClassVar[RewardReadout]
    REWARD_READOUT_LAST_TOKEN_AND_MEAN_LOGPROB: _ClassVar[RewardReadout]

class PairScoring(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAIR_SCORING_UNSPECIFIED: _ClassVar[PairScoring]
    PAIR_SCORING_REWARD: _ClassVar[PairScoring]
    PAIR_SCORING_MEAN_LOGPROB: _ClassVar[PairScoring]
    PAIR_SCORING_SUM_LOGPROB: _ClassVar[PairScoring]
    PAIR_SCORING_DPO: _ClassVar[PairScoring]

class JudgeKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JUDGE_KIND_UNSPECIFIED: _ClassVar[JudgeKind]
    JUDGE_KIND_REWARD: _ClassVar[JudgeKind]
    JUDGE_KIND_MEAN_LOGPROB: _ClassVar[JudgeKind]
    JUDGE_KIND_SUM_LOGPROB: _ClassVar[JudgeKind]

class RowKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROW_KIND_UNSPECIFIED: _ClassVar[RowKind]
    ROW_KIND_PAIRS: _ClassVar[RowKind]
    ROW_KIND_TEXTS: _ClassVar[RowKind]
    ROW_KIND_PROMPTS: _ClassVar[RowKind]

class ObjectiveKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OBJECTIVE_KIND_UNSPECIFIED: _ClassVar[ObjectiveKind]
    OBJECTIVE_KIND_CAUSAL_LM: _ClassVar[ObjectiveKind]
    OBJECTIVE_KIND_REWARD: _ClassVar[ObjectiveKind]
    OBJECTIVE_KIND_SFT: _ClassVar[ObjectiveKind]
    OBJECTIVE_KIND_SIMPO: _ClassVar[ObjectiveKind]
    OBJECTIVE_KIND_DPO: _ClassVar[ObjectiveKind]
    OBJECTIVE_KIND_IPO: _ClassVar[ObjectiveKind]

class LrSchedule(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LR_SCHEDULE_UNSPECIFIED: _ClassVar[LrSchedule]
    LR_SCHEDULE_CONSTANT: _ClassVar[LrSchedule]
    LR_SCHEDULE_COSINE_TO_ZERO: _ClassVar[LrSchedule]
    LR_SCHEDULE_WARMUP_CONSTANT: _ClassVar[LrSchedule]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
ARCHITECTURE_UNSPECIFIED: Architecture
ARCHITECTURE_GPT2: Architecture
ARCHITECTURE_OPT: Architecture
REWARD_READOUT_LAST_TOKEN: RewardReadout
REWARD_READOUT_LAST_TOKEN_AND_MEAN_LOGPROB: RewardReadout
PAIR_SCORING_UNSPECIFIED: PairScoring
PAIR_SCORING_REWARD: PairScoring
PAIR_SCORING_MEAN_LOGPROB: PairScoring
PAIR_SCORING_SUM_LOGPROB: PairScoring
PAIR_SCORING_DPO: PairScoring
JUDGE_KIND_UNSPECIFIED: JudgeKind
JUDGE_KIND_REWARD: JudgeKind
JUDGE_KIND_MEAN_LOGPROB: JudgeKind
JUDGE_KIND_SUM_LOGPROB: JudgeKind
ROW_KIND_UNSPECIFIED: RowKind
ROW_KIND_PAIRS: RowKind
ROW_KIND_TEXTS: RowKind
ROW_KIND_PROMPTS: RowKind
OBJECTIVE_KIND_UNSPECIFIED: ObjectiveKind
OBJECTIVE_KIND_CAUSAL_LM: ObjectiveKind
OBJECTIVE_KIND_REWARD: ObjectiveKind
OBJECTIVE_KIND_SFT: ObjectiveKind
OBJECTIVE_KIND_SIMPO: ObjectiveKind
OBJECTIVE_KIND_DPO: ObjectiveKind
OBJECTIVE_KIND_IPO: ObjectiveKind
LR_SCHEDULE_UNSPECIFIED: LrSchedule
LR_SCHEDULE_CONSTANT: LrSchedule
LR_SCHEDULE_COSINE_TO_ZERO: LrSchedule
LR_SCHEDULE_WARMUP_CONSTANT: LrSchedule
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class ModelInfo(_message.Message):
    __slots__ = ("name", "architecture", "role", "parameter_count", "dtype", "device", "source", "content_hash", "has_reward_head", "max_positions", "vocab_size", "memory_bytes", "reward_readout")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    HAS_REWARD_HEAD_FIELD_NUMBER: _ClassVar[int]
    MAX_POSITIONS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    REWARD_READOUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    architecture: Architecture
    role: str
    parameter_count: int
    dtype: str
    device: str
    source: str
    content_hash: str
    has_reward_head: bool
    max_positions: int
    vocab_size: int
    memory_bytes: int
    reward_readout: RewardReadout
    def __init__(self, name: _Optional[str] = ..., architecture: _Optional[_Union[Architecture, str]] = ..., role: _Optional[str] = ..., parameter_count: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., source: _Optional[str] = ..., content_hash: _Optional[str] = ..., has_reward_head: bool = ..., max_positions: _Optional[int] = ..., vocab_size: _Optional[int] = ..., memory_bytes: _Optional[int] = ..., reward_readout: _Optional[_Union[RewardReadout, str]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "server")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SERVER_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    server: ServerInfo
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., server: _Optional[_Union[ServerInfo, _Mapping]] = ...) -> None: ...

class ServerInfo(_message.Message):
    __slots__ = ("device", "memory_total_bytes", "memory_available_bytes", "resident_model_bytes", "version")
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_MODEL_BYTES_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    device: str
    memory_total_bytes: int
    memory_available_bytes: int
    resident_model_bytes: int
    version: str
    def __init__(self, device: _Optional[str] = ..., memory_total_bytes: _Optional[int] = ..., memory_available_bytes: _Optional[int] = ..., resident_model_bytes: _Optional[int] = ..., version: _Optional[str] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("name", "path", "preset", "job", "uploaded", "random_init", "role", "reward_head", "seed", "reward_readout")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    UPLOADED_FIELD_NUMBER: _ClassVar[int]
    RANDOM_INIT_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    REWARD_HEAD_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REWARD_READOUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    preset: str
    job: str
    uploaded: str
    random_init: RandomInit
    role: str
    reward_head: bool
    seed: int
    reward_readout: RewardReadout
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., preset: _Optional[str] = ..., job: _Optional[str] = ..., uploaded: _Optional[str] = ..., random_init: _Optional[_Union[RandomInit, _Mapping]] = ..., role: _Optional[str] = ..., reward_head: bool = ..., seed: _Optional[int] = ..., reward_readout: _Optional[_Union[RewardReadout, str]] = ...) -> None: ...

class RandomInit(_message.Message):
    __slots__ = ("config_json", "tokenizer_json")
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_JSON_FIELD_NUMBER: _ClassVar[int]
    config_json: str
    tokenizer_json: str
    def __init__(self, config_json: _Optional[str] = ..., tokenizer_json: _Optional[str] = ...) -> None: ...

class ModelFile(_message.Message):
    __slots__ = ("name", "size", "sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    sha256: str
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class UploadModelHeader(_message.Message):
    __slots__ = ("load", "files")
    LOAD_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    load: LoadModelRequest
    files: _containers.RepeatedCompositeFieldContainer[ModelFile]
    def __init__(self, load: _Optional[_Union[LoadModelRequest, _Mapping]] = ..., files: _Optional[_Iterable[_Union[ModelFile, _Mapping]]] = ...) -> None: ...

class UploadModelRequest(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: UploadModelHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[UploadModelHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class DownloadModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DownloadModelResponse(_message.Message):
    __slots__ = ("file", "data")
    FILE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    file: ModelFile
    data: bytes
    def __init__(self, file: _Optional[_Union[ModelFile, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExportModelRequest(_message.Message):
    __slots__ = ("name", "path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class ExportModelResponse(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_ns", "tokenize_ns", "compute_ns", "total_ns")
    QUEUE_NS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZE_NS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_NS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NS_FIELD_NUMBER: _ClassVar[int]
    queue_ns: int
    tokenize_ns: int
    compute_ns: int
    total_ns: int
    def __init__(self, queue_ns: _Optional[int] = ..., tokenize_ns: _Optional[int] = ..., compute_ns: _Optional[int] = ..., total_ns: _Optional[int] = ...) -> None: ...

class PreferencePair(_message.Message):
    __slots__ = ("prompt", "chosen", "rejected")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    chosen: str
    rejected: str
    def __init__(self, prompt: _Optional[str] = ..., chosen: _Optional[str] = ..., rejected: _Optional[str] = ...) -> None: ...

class ScorePairsRequest(_message.Message):
    __slots__ = ("model", "pairs", "scoring", "max_ctx", "reference_model")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    SCORING_FIELD_NUMBER: _ClassVar[int]
    MAX_CTX_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    pairs: _containers.RepeatedCompositeFieldContainer[PreferencePair]
    scoring: PairScoring
    max_ctx: int
    reference_model: str
    def __init__(self, model: _Optional[str] = ..., pairs: _Optional[_Iterable[_Union[PreferencePair, _Mapping]]] = ..., scoring: _Optional[_Union[PairScoring, str]] = ..., max_ctx: _Optional[int] = ..., reference_model: _Optional[str] = ...) -> None: ...

class PairScore(_message.Message):
    __slots__ = ("chosen", "rejected", "margin", "p_chosen")
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FIELD_NUMBER: _ClassVar[int]
    P_CHOSEN_FIELD_NUMBER: _ClassVar[int]
    chosen: float
    rejected: float
    margin: float
    p_chosen: float
    def __init__(self, chosen: _Optional[float] = ..., rejected: _Optional[float] = ..., margin: _Optional[float] = ..., p_chosen: _Optional[float] = ...) -> None: ...

class ScorePairsResponse(_message.Message):
    __slots__ = ("scores", "timing")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[PairScore]
    timing: Timing
    def __init__(self, scores: _Optional[_Iterable[_Union[PairScore, _Mapping]]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class TokenLogprobsRequest(_message.Message):
    __slots__ = ("model", "texts", "split_dialogue", "max_ctx", "truncate")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    SPLIT_DIALOGUE_FIELD_NUMBER: _ClassVar[int]
    MAX_CTX_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    model: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    split_dialogue: bool
    max_ctx: int
    truncate: bool
    def __init__(self, model: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ..., split_dialogue: bool = ..., max_ctx: _Optional[int] = ..., truncate: bool = ...) -> None: ...

class SequenceLogprobs(_message.Message):
    __slots__ = ("token_ids", "logprobs", "response_mask", "truncated")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_MASK_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    response_mask: _containers.RepeatedScalarFieldContainer[bool]
    truncated: bool
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., response_mask: _Optional[_Iterable[bool]] = ..., truncated: bool = ...) -> None: ...

class TokenLogprobsResponse(_message.Message):
    __slots__ = ("sequences", "timing")
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[SequenceLogprobs]
    timing: Timing
    def __init__(self, sequences: _Optional[_Iterable[_Union[SequenceLogprobs, _Mapping]]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class ScoreTextsRequest(_message.Message):
    __slots__ = ("model", "texts", "max_ctx")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    MAX_CTX_FIELD_NUMBER: _ClassVar[int]
    model: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    max_ctx: int
    def __init__(self, model: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ..., max_ctx: _Optional[int] = ...) -> None: ...

class ScoreTextsResponse(_message.Message):
    __slots__ = ("rewards", "timing")
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    rewards: _containers.RepeatedScalarFieldContainer[float]
    timing: Timing
    def __init__(self, rewards: _Optional[_Iterable[float]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "prompt", "max_new_tokens", "sampling", "stop_at_eos")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOP_AT_EOS_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    max_new_tokens: int
    sampling: SamplingParams
    stop_at_eos: bool
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., stop_at_eos: bool = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("token", "done")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    token: GeneratedToken
    done: GenerationDone
    def __init__(self, token: _Optional[_Union[GeneratedToken, _Mapping]] = ..., done: _Optional[_Union[GenerationDone, _Mapping]] = ...) -> None: ...

class GeneratedToken(_message.Message):
    __slots__ = ("id", "text")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    id: int
    text: str
    def __init__(self, id: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class GenerationDone(_message.Message):
    __slots__ = ("token_ids", "text", "timing")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    timing: Timing
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class GeneratePairsRequest(_message.Message):
    __slots__ = ("policy", "judge", "judge_kind", "prompts", "samples_per_prompt", "max_new_tokens", "sampling", "keep_prompt_end")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    JUDGE_FIELD_NUMBER: _ClassVar[int]
    JUDGE_KIND_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    KEEP_PROMPT_END_FIELD_NUMBER: _ClassVar[int]
    policy: str
    judge: str
    judge_kind: JudgeKind
    prompts: _containers.RepeatedScalarFieldContainer[str]
    samples_per_prompt: int
    max_new_tokens: int
    sampling: SamplingParams
    keep_prompt_end: bool
    def __init__(self, policy: _Optional[str] = ..., judge: _Optional[str] = ..., judge_kind: _Optional[_Union[JudgeKind, str]] = ..., prompts: _Optional[_Iterable[str]] = ..., samples_per_prompt: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., keep_prompt_end: bool = ...) -> None: ...

class GeneratedPair(_message.Message):
    __slots__ = ("prompt_index", "prompt", "chosen", "rejected", "chosen_score", "rejected_score", "soft_label")
    PROMPT_INDEX_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_SCORE_FIELD_NUMBER: _ClassVar[int]
    REJECTED_SCORE_FIELD_NUMBER: _ClassVar[int]
    SOFT_LABEL_FIELD_NUMBER: _ClassVar[int]
    prompt_index: int
    prompt: str
    chosen: str
    rejected: str
    chosen_score: float
    rejected_score: float
    soft_label: float
    def __init__(self, prompt_index: _Optional[int] = ..., prompt: _Optional[str] = ..., chosen: _Optional[str] = ..., rejected: _Optional[str] = ..., chosen_score: _Optional[float] = ..., rejected_score: _Optional[float] = ..., soft_label: _Optional[float] = ...) -> None: ...

class GeneratePairsResponse(_message.Message):
    __slots__ = ("pairs", "timing")
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    pairs: _containers.RepeatedCompositeFieldContainer[GeneratedPair]
    timing: Timing
    def __init__(self, pairs: _Optional[_Iterable[_Union[GeneratedPair, _Mapping]]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ...) -> None: ...

class PairRow(_message.Message):
    __slots__ = ("prompt", "chosen", "rejected", "label", "chosen_is_human_choice", "conflict_prefers_chosen")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_IS_HUMAN_CHOICE_FIELD_NUMBER: _ClassVar[int]
    CONFLICT_PREFERS_CHOSEN_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    chosen: str
    rejected: str
    label: float
    chosen_is_human_choice: bool
    conflict_prefers_chosen: bool
    def __init__(self, prompt: _Optional[str] = ..., chosen: _Optional[str] = ..., rejected: _Optional[str] = ..., label: _Optional[float] = ..., chosen_is_human_choice: bool = ..., conflict_prefers_chosen: bool = ...) -> None: ...

class TextRow(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...

class PromptRow(_message.Message):
    __slots__ = ("prompt",)
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    def __init__(self, prompt: _Optional[str] = ...) -> None: ...

class UploadDatasetRequest(_message.Message):
    __slots__ = ("header", "pair", "text", "prompt")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAIR_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    header: DatasetHeader
    pair: PairRow
    text: TextRow
    prompt: PromptRow
    def __init__(self, header: _Optional[_Union[DatasetHeader, _Mapping]] = ..., pair: _Optional[_Union[PairRow, _Mapping]] = ..., text: _Optional[_Union[TextRow, _Mapping]] = ..., prompt: _Optional[_Union[PromptRow, _Mapping]] = ...) -> None: ...

class DatasetHeader(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DatasetInfo(_message.Message):
    __slots__ = ("id", "name", "kind", "rows", "content_hash")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    kind: RowKind
    rows: int
    content_hash: str
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., kind: _Optional[_Union[RowKind, str]] = ..., rows: _Optional[int] = ..., content_hash: _Optional[str] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets", "next_page_token")
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetInfo]
    next_page_token: str
    def __init__(self, datasets: _Optional[_Iterable[_Union[DatasetInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class TrainingHyperparameters(_message.Message):
    __slots__ = ("lr", "batch_size", "minibatch_size", "epochs", "schedule", "warmup_frac", "weight_decay", "max_grad_norm", "max_ctx", "seed", "shuffle", "beta", "gamma", "conflict_alpha", "orient_slots", "checkpoint_every", "shards")
    LR_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MINIBATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_FRAC_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    MAX_CTX_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SHUFFLE_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    CONFLICT_ALPHA_FIELD_NUMBER: _ClassVar[int]
    ORIENT_SLOTS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    lr: float
    batch_size: int
    minibatch_size: int
    epochs: int
    schedule: LrSchedule
    warmup_frac: float
    weight_decay: float
    max_grad_norm: float
    max_ctx: int
    seed: int
    shuffle: bool
    beta: float
    gamma: float
    conflict_alpha: float
    orient_slots: bool
    checkpoint_every: int
    shards: int
    def __init__(self, lr: _Optional[float] = ..., batch_size: _Optional[int] = ..., minibatch_size: _Optional[int] = ..., epochs: _Optional[int] = ..., schedule: _Optional[_Union[LrSchedule, str]] = ..., warmup_frac: _Optional[float] = ..., weight_decay: _Optional[float] = ..., max_grad_norm: _Optional[float] = ..., max_ctx: _Optional[int] = ..., seed: _Optional[int] = ..., shuffle: bool = ..., beta: _Optional[float] = ..., gamma: _Optional[float] = ..., conflict_alpha: _Optional[float] = ..., orient_slots: bool = ..., checkpoint_every: _Optional[int] = ..., shards: _Optional[int] = ...) -> None: ...

class StartJobRequest(_message.Message):
    __slots__ = ("objective", "base_model", "dataset_ids", "hyperparameters", "output_model")
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    DATASET_IDS_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_MODEL_FIELD_NUMBER: _ClassVar[int]
    objective: ObjectiveKind
    base_model: str
    dataset_ids: _containers.RepeatedScalarFieldContainer[str]
    hyperparameters: TrainingHyperparameters
    output_model: str
    def __init__(self, objective: _Optional[_Union[ObjectiveKind, str]] = ..., base_model: _Optional[str] = ..., dataset_ids: _Optional[_Iterable[str]] = ..., hyperparameters: _Optional[_Union[TrainingHyperparameters, _Mapping]] = ..., output_model: _Optional[str] = ...) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("id", "state", "objective", "base_model", "output_model", "step", "total_steps", "error", "final_metrics")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_MODEL_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FINAL_METRICS_FIELD_NUMBER: _ClassVar[int]
    id: str
    state: JobState
    objective: ObjectiveKind
    base_model: str
    output_model: str
    step: int
    total_steps: int
    error: str
    final_metrics: JobMetrics
    def __init__(self, id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., objective: _Optional[_Union[ObjectiveKind, str]] = ..., base_model: _Optional[str] = ..., output_model: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., error: _Optional[str] = ..., final_metrics: _Optional[_Union[JobMetrics, _Mapping]] = ...) -> None: ...

class JobMetrics(_message.Message):
    __slots__ = ("loss", "accuracy", "has_accuracy")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    HAS_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    loss: float
    accuracy: float
    has_accuracy: bool
    def __init__(self, loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., has_accuracy: bool = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job", "step")
    JOB_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    job: JobInfo
    step: StepEvent
    def __init__(self, job: _Optional[_Union[JobInfo, _Mapping]] = ..., step: _Optional[_Union[StepEvent, _Mapping]] = ...) -> None: ...

class StepEvent(_message.Message):
    __slots__ = ("step", "total_steps", "loss", "learning_rate", "grad_norm", "accuracy", "tokens_per_second", "eta_seconds")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    loss: float
    learning_rate: float
    grad_norm: float
    accuracy: float
    tokens_per_second: float
    eta_seconds: float
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., loss: _Optional[float] = ..., learning_rate: _Optional[float] = ..., grad_norm: _Optional[float] = ..., accuracy: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., eta_seconds: _Optional[float] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteJobResponse(_message.Message):
    __slots__ = ("freed_bytes",)
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    freed_bytes: int
    def __init__(self, freed_bytes: _Optional[int] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobInfo]
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobInfo, _Mapping]]] = ...) -> None: ...
