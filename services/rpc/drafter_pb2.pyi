from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT32: DType

class Tensor(_message.Message):
    __slots__ = ("data", "dtype", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TreeSettings(_message.Message):
    __slots__ = ("top_k", "depth", "total_tokens", "min_prob", "lookup_tokens", "lookup_alone", "head_context")
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIN_PROB_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOOKUP_ALONE_FIELD_NUMBER: _ClassVar[int]
    HEAD_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    top_k: int
    depth: int
    total_tokens: int
    min_prob: float
    lookup_tokens: int
    lookup_alone: float
    head_context: int
    def __init__(self, top_k: _Optional[int] = ..., depth: _Optional[int] = ..., total_tokens: _Optional[int] = ..., min_prob: _Optional[float] = ..., lookup_tokens: _Optional[int] = ..., lookup_alone: _Optional[float] = ..., head_context: _Optional[int] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("head", "head_variant", "target", "hidden_size", "vocab_size", "draft_vocab_size", "tree", "specdec_version", "protocol_version", "max_sessions", "active_sessions", "feature_dtypes")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    HEAD_VARIANT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    DRAFT_VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    SPECDEC_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_DTYPES_FIELD_NUMBER: _ClassVar[int]
    head: str
    head_variant: str
    target: str
    hidden_size: int
    vocab_size: int
    draft_vocab_size: int
    tree: TreeSettings
    specdec_version: str
    protocol_version: str
    max_sessions: int
    active_sessions: int
    feature_dtypes: _containers.RepeatedScalarFieldContainer[DType]
    def __init__(self, head: _Optional[str] = ..., head_variant: _Optional[str] = ..., target: _Optional[str] = ..., hidden_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., draft_vocab_size: _Optional[int] = ..., tree: _Optional[_Union[TreeSettings, _Mapping]] = ..., specdec_version: _Optional[str] = ..., protocol_version: _Optional[str] = ..., max_sessions: _Optional[int] = ..., active_sessions: _Optional[int] = ..., feature_dtypes: _Optional[_Iterable[_Union[DType, str]]] = ...) -> None: ...

class Open(_message.Message):
    __slots__ = ("token_ids", "features")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    features: Tensor
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., features: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Extend(_message.Message):
    __slots__ = ("token_ids", "features")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    features: Tensor
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., features: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Propose(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("open", "extend", "propose")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    EXTEND_FIELD_NUMBER: _ClassVar[int]
    PROPOSE_FIELD_NUMBER: _ClassVar[int]
    open: Open
    extend: Extend
    propose: Propose
    def __init__(self, open: _Optional[_Union[Open, _Mapping]] = ..., extend: _Optional[_Union[Extend, _Mapping]] = ..., propose: _Optional[_Union[Propose, _Mapping]] = ...) -> None: ...

class Tree(_message.Message):
    __slots__ = ("round", "tokens", "parents", "draft_seconds", "scores")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    round: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    parents: _containers.RepeatedScalarFieldContainer[int]
    draft_seconds: float
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, round: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., parents: _Optional[_Iterable[int]] = ..., draft_seconds: _Optional[float] = ..., scores: _Optional[_Iterable[float]] = ...) -> None: ...

class SessionResponse(_message.Message):
    __slots__ = ("tree",)
    TREE_FIELD_NUMBER: _ClassVar[int]
    tree: Tree
    def __init__(self, tree: _Optional[_Union[Tree, _Mapping]] = ...) -> None: ...
