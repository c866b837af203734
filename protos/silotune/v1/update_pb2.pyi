from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Encoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENCODING_UNSPECIFIED: _ClassVar[Encoding]
    FP32: _ClassVar[Encoding]
    FP16: _ClassVar[Encoding]
    INT8: _ClassVar[Encoding]
    Q4: _ClassVar[Encoding]
    Q8: _ClassVar[Encoding]

class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KIND_UNSPECIFIED: _ClassVar[Kind]
    GLOBAL: _ClassVar[Kind]
    UPDATE: _ClassVar[Kind]
ENCODING_UNSPECIFIED: Encoding
FP32: Encoding
FP16: Encoding
INT8: Encoding
Q4: Encoding
Q8: Encoding
KIND_UNSPECIFIED: Kind
GLOBAL: Kind
UPDATE: Kind

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype", "encoding", "scale", "offset", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    encoding: Encoding
    scale: float
    offset: int
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., encoding: _Optional[_Union[Encoding, str]] = ..., scale: _Optional[float] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class AdapterConfig(_message.Message):
    __slots__ = ("rank", "alpha", "target_modules", "dropout")
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    rank: int
    alpha: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    dropout: float
    def __init__(self, rank: _Optional[int] = ..., alpha: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., dropout: _Optional[float] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("protocol_version", "kind", "job_id", "round", "base_model_fingerprint", "adapter", "tensors", "num_examples", "metrics", "global_digest", "base_digest")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    BASE_DIGEST_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    kind: Kind
    job_id: str
    round: int
    base_model_fingerprint: str
    adapter: AdapterConfig
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    num_examples: int
    metrics: _containers.ScalarMap[str, float]
    global_digest: str
    base_digest: str
    def __init__(self, protocol_version: _Optional[int] = ..., kind: _Optional[_Union[Kind, str]] = ..., job_id: _Optional[str] = ..., round: _Optional[int] = ..., base_model_fingerprint: _Optional[str] = ..., adapter: _Optional[_Union[AdapterConfig, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., global_digest: _Optional[str] = ..., base_digest: _Optional[str] = ...) -> None: ...
