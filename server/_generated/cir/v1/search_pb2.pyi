from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SearchMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEARCH_MODE_UNSPECIFIED: _ClassVar[SearchMode]
    SEARCH_MODE_AUTO: _ClassVar[SearchMode]
    SEARCH_MODE_EXACT: _ClassVar[SearchMode]
    SEARCH_MODE_FAST: _ClassVar[SearchMode]

class ImageKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_KIND_UNSPECIFIED: _ClassVar[ImageKind]
    IMAGE_KIND_THUMBNAIL: _ClassVar[ImageKind]
    IMAGE_KIND_ORIGINAL: _ClassVar[ImageKind]
SEARCH_MODE_UNSPECIFIED: SearchMode
SEARCH_MODE_AUTO: SearchMode
SEARCH_MODE_EXACT: SearchMode
SEARCH_MODE_FAST: SearchMode
IMAGE_KIND_UNSPECIFIED: ImageKind
IMAGE_KIND_THUMBNAIL: ImageKind
IMAGE_KIND_ORIGINAL: ImageKind

class SearchRequest(_message.Message):
    __slots__ = ("reference_image", "reference_id", "text", "top_k", "offset", "filter", "filter_json", "mode", "include_payload", "rerank_k")
    REFERENCE_IMAGE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    FILTER_JSON_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    RERANK_K_FIELD_NUMBER: _ClassVar[int]
    reference_image: bytes
    reference_id: str
    text: str
    top_k: int
    offset: int
    filter: _struct_pb2.Struct
    filter_json: str
    mode: SearchMode
    include_payload: bool
    rerank_k: int
    def __init__(self, reference_image: _Optional[bytes] = ..., reference_id: _Optional[str] = ..., text: _Optional[str] = ..., top_k: _Optional[int] = ..., offset: _Optional[int] = ..., filter: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., filter_json: _Optional[str] = ..., mode: _Optional[_Union[SearchMode, str]] = ..., include_payload: _Optional[bool] = ..., rerank_k: _Optional[int] = ...) -> None: ...

class SearchHit(_message.Message):
    __slots__ = ("id", "score", "rank", "payload", "user_id", "first_stage_score", "reranked")
    ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_STAGE_SCORE_FIELD_NUMBER: _ClassVar[int]
    RERANKED_FIELD_NUMBER: _ClassVar[int]
    id: str
    score: float
    rank: int
    payload: _struct_pb2.Struct
    user_id: str
    first_stage_score: float
    reranked: bool
    def __init__(self, id: _Optional[str] = ..., score: _Optional[float] = ..., rank: _Optional[int] = ..., payload: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., user_id: _Optional[str] = ..., first_stage_score: _Optional[float] = ..., reranked: _Optional[bool] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "decode_ms", "reference_ms", "encode_ms", "search_ms", "total_ms", "batch_size", "reference_cached", "rerank_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    SEARCH_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_CACHED_FIELD_NUMBER: _ClassVar[int]
    RERANK_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    decode_ms: float
    reference_ms: float
    encode_ms: float
    search_ms: float
    total_ms: float
    batch_size: int
    reference_cached: bool
    rerank_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., reference_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ..., search_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., batch_size: _Optional[int] = ..., reference_cached: _Optional[bool] = ..., rerank_ms: _Optional[float] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("results", "index_version", "encoder_fingerprint", "timings", "request_id", "rerank_k", "reranker_fingerprint", "searched_mode", "mode_note")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RERANK_K_FIELD_NUMBER: _ClassVar[int]
    RERANKER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SEARCHED_MODE_FIELD_NUMBER: _ClassVar[int]
    MODE_NOTE_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SearchHit]
    index_version: str
    encoder_fingerprint: str
    timings: Timings
    request_id: str
    rerank_k: int
    reranker_fingerprint: str
    searched_mode: SearchMode
    mode_note: str
    def __init__(self, results: _Optional[_Iterable[_Union[SearchHit, _Mapping]]] = ..., index_version: _Optional[str] = ..., encoder_fingerprint: _Optional[str] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., request_id: _Optional[str] = ..., rerank_k: _Optional[int] = ..., reranker_fingerprint: _Optional[str] = ..., searched_mode: _Optional[_Union[SearchMode, str]] = ..., mode_note: _Optional[str] = ...) -> None: ...

class SearchBatchRequest(_message.Message):
    __slots__ = ("queries",)
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    queries: _containers.RepeatedCompositeFieldContainer[SearchRequest]
    def __init__(self, queries: _Optional[_Iterable[_Union[SearchRequest, _Mapping]]] = ...) -> None: ...

class SearchBatchResponse(_message.Message):
    __slots__ = ("responses",)
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    responses: _containers.RepeatedCompositeFieldContainer[SearchResponse]
    def __init__(self, responses: _Optional[_Iterable[_Union[SearchResponse, _Mapping]]] = ...) -> None: ...

class GetImageRequest(_message.Message):
    __slots__ = ("id", "kind")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: ImageKind
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[_Union[ImageKind, str]] = ...) -> None: ...

class GetImageResponse(_message.Message):
    __slots__ = ("id", "data", "mime_type", "width", "height")
    ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    id: str
    data: bytes
    mime_type: str
    width: int
    height: int
    def __init__(self, id: _Optional[str] = ..., data: _Optional[bytes] = ..., mime_type: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("preset", "fingerprint", "dim", "num_queries", "image_size", "max_text_tokens", "device", "dtype")
    PRESET_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    NUM_QUERIES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    preset: str
    fingerprint: str
    dim: int
    num_queries: int
    image_size: int
    max_text_tokens: int
    device: str
    dtype: str
    def __init__(self, preset: _Optional[str] = ..., fingerprint: _Optional[str] = ..., dim: _Optional[int] = ..., num_queries: _Optional[int] = ..., image_size: _Optional[int] = ..., max_text_tokens: _Optional[int] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ...) -> None: ...

class IndexInfo(_message.Message):
    __slots__ = ("name", "backend", "version", "count", "filterable_fields", "encoder_fingerprint")
    class FilterableFieldsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    FILTERABLE_FIELDS_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    name: str
    backend: str
    version: str
    count: int
    filterable_fields: _containers.ScalarMap[str, str]
    encoder_fingerprint: str
    def __init__(self, name: _Optional[str] = ..., backend: _Optional[str] = ..., version: _Optional[str] = ..., count: _Optional[int] = ..., filterable_fields: _Optional[_Mapping[str, str]] = ..., encoder_fingerprint: _Optional[str] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_top_k", "max_offset", "max_text_chars", "max_image_bytes", "max_image_pixels", "max_batch_queries", "max_message_bytes", "max_page_size", "max_rerank_k")
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_OFFSET_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_QUERIES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_RERANK_K_FIELD_NUMBER: _ClassVar[int]
    max_top_k: int
    max_offset: int
    max_text_chars: int
    max_image_bytes: int
    max_image_pixels: int
    max_batch_queries: int
    max_message_bytes: int
    max_page_size: int
    max_rerank_k: int
    def __init__(self, max_top_k: _Optional[int] = ..., max_offset: _Optional[int] = ..., max_text_chars: _Optional[int] = ..., max_image_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_batch_queries: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_page_size: _Optional[int] = ..., max_rerank_k: _Optional[int] = ...) -> None: ...

class RerankerInfo(_message.Message):
    __slots__ = ("loaded", "fingerprint", "features", "default_rerank_k")
    LOADED_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_RERANK_K_FIELD_NUMBER: _ClassVar[int]
    loaded: bool
    fingerprint: str
    features: str
    default_rerank_k: int
    def __init__(self, loaded: _Optional[bool] = ..., fingerprint: _Optional[str] = ..., features: _Optional[str] = ..., default_rerank_k: _Optional[int] = ...) -> None: ...

class RecallGuardInfo(_message.Message):
    __slots__ = ("enabled", "sample_rate", "recall_target", "recall", "recall_lower_bound", "samples", "min_samples", "fast_l", "fast_l_source", "heldout_recall", "last_action", "reservoir_size", "reservoir_file")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    RECALL_TARGET_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    RECALL_LOWER_BOUND_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MIN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    FAST_L_FIELD_NUMBER: _ClassVar[int]
    FAST_L_SOURCE_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_RECALL_FIELD_NUMBER: _ClassVar[int]
    LAST_ACTION_FIELD_NUMBER: _ClassVar[int]
    RESERVOIR_SIZE_FIELD_NUMBER: _ClassVar[int]
    RESERVOIR_FILE_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    sample_rate: float
    recall_target: float
    recall: float
    recall_lower_bound: float
    samples: int
    min_samples: int
    fast_l: int
    fast_l_source: str
    heldout_recall: float
    last_action: str
    reservoir_size: int
    reservoir_file: str
    def __init__(self, enabled: _Optional[bool] = ..., sample_rate: _Optional[float] = ..., recall_target: _Optional[float] = ..., recall: _Optional[float] = ..., recall_lower_bound: _Optional[float] = ..., samples: _Optional[int] = ..., min_samples: _Optional[int] = ..., fast_l: _Optional[int] = ..., fast_l_source: _Optional[str] = ..., heldout_recall: _Optional[float] = ..., last_action: _Optional[str] = ..., reservoir_size: _Optional[int] = ..., reservoir_file: _Optional[str] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model", "index", "limits", "server_version", "max_batch", "max_wait_ms", "reranker", "recall_guard")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    RERANKER_FIELD_NUMBER: _ClassVar[int]
    RECALL_GUARD_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    index: IndexInfo
    limits: Limits
    server_version: str
    max_batch: int
    max_wait_ms: float
    reranker: RerankerInfo
    recall_guard: RecallGuardInfo
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ..., index: _Optional[_Union[IndexInfo, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., server_version: _Optional[str] = ..., max_batch: _Optional[int] = ..., max_wait_ms: _Optional[float] = ..., reranker: _Optional[_Union[RerankerInfo, _Mapping]] = ..., recall_guard: _Optional[_Union[RecallGuardInfo, _Mapping]] = ...) -> None: ...

class EncodeQueryRequest(_message.Message):
    __slots__ = ("reference_image", "reference_id", "text")
    REFERENCE_IMAGE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    reference_image: bytes
    reference_id: str
    text: str
    def __init__(self, reference_image: _Optional[bytes] = ..., reference_id: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class EncodeQueryResponse(_message.Message):
    __slots__ = ("vector", "dim", "encoder_fingerprint", "timings")
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    ENCODER_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    vector: _containers.RepeatedScalarFieldContainer[float]
    dim: int
    encoder_fingerprint: str
    timings: Timings
    def __init__(self, vector: _Optional[_Iterable[float]] = ..., dim: _Optional[int] = ..., encoder_fingerprint: _Optional[str] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class ListImagesRequest(_message.Message):
    __slots__ = ("page_size", "offset", "random_seed", "include_payload")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    RANDOM_SEED_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    offset: int
    random_seed: int
    include_payload: bool
    def __init__(self, page_size: _Optional[int] = ..., offset: _Optional[int] = ..., random_seed: _Optional[int] = ..., include_payload: _Optional[bool] = ...) -> None: ...

class ImageSummary(_message.Message):
    __slots__ = ("id", "payload")
    ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    id: str
    payload: _struct_pb2.Struct
    def __init__(self, id: _Optional[str] = ..., payload: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ListImagesResponse(_message.Message):
    __slots__ = ("items", "next_offset", "total", "index_version")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    NEXT_OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    INDEX_VERSION_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ImageSummary]
    next_offset: int
    total: int
    index_version: str
    def __init__(self, items: _Optional[_Iterable[_Union[ImageSummary, _Mapping]]] = ..., next_offset: _Optional[int] = ..., total: _Optional[int] = ..., index_version: _Optional[str] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("reference_image", "reference_id", "text", "candidate_id")
    REFERENCE_IMAGE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_ID_FIELD_NUMBER: _ClassVar[int]
    reference_image: bytes
    reference_id: str
    text: str
    candidate_id: str
    def __init__(self, reference_image: _Optional[bytes] = ..., reference_id: _Optional[str] = ..., text: _Optional[str] = ..., candidate_id: _Optional[str] = ...) -> None: ...

class Heatmap(_message.Message):
    __slots__ = ("rows", "cols", "values", "png")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    rows: int
    cols: int
    values: _containers.RepeatedScalarFieldContainer[float]
    png: bytes
    def __init__(self, rows: _Optional[int] = ..., cols: _Optional[int] = ..., values: _Optional[_Iterable[float]] = ..., png: _Optional[bytes] = ...) -> None: ...

class WordScore(_message.Message):
    __slots__ = ("word", "score")
    WORD_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    word: str
    score: float
    def __init__(self, word: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("score", "candidate_map", "reference_map", "words")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_MAP_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_MAP_FIELD_NUMBER: _ClassVar[int]
    WORDS_FIELD_NUMBER: _ClassVar[int]
    score: float
    candidate_map: Heatmap
    reference_map: Heatmap
    words: _containers.RepeatedCompositeFieldContainer[WordScore]
    def __init__(self, score: _Optional[float] = ..., candidate_map: _Optional[_Union[Heatmap, _Mapping]] = ..., reference_map: _Optional[_Union[Heatmap, _Mapping]] = ..., words: _Optional[_Iterable[_Union[WordScore, _Mapping]]] = ...) -> None: ...
