from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SubmitRequest(_message.Message):
    __slots__ = ("specialist", "run_config", "continue_from")
    class RunConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SPECIALIST_FIELD_NUMBER: _ClassVar[int]
    RUN_CONFIG_FIELD_NUMBER: _ClassVar[int]
    CONTINUE_FROM_FIELD_NUMBER: _ClassVar[int]
    specialist: str
    run_config: _containers.ScalarMap[str, str]
    continue_from: str
    def __init__(self, specialist: _Optional[str] = ..., run_config: _Optional[_Mapping[str, str]] = ..., continue_from: _Optional[str] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class JobRef(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "specialist", "state", "run_id", "run_dir", "created_at", "started_at", "finished_at", "specialist_version", "error", "continue_from", "run_config")
    class RunConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    SPECIALIST_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_DIR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    SPECIALIST_VERSION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CONTINUE_FROM_FIELD_NUMBER: _ClassVar[int]
    RUN_CONFIG_FIELD_NUMBER: _ClassVar[int]
    id: str
    specialist: str
    state: str
    run_id: int
    run_dir: str
    created_at: str
    started_at: str
    finished_at: str
    specialist_version: int
    error: str
    continue_from: str
    run_config: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., specialist: _Optional[str] = ..., state: _Optional[str] = ..., run_id: _Optional[int] = ..., run_dir: _Optional[str] = ..., created_at: _Optional[str] = ..., started_at: _Optional[str] = ..., finished_at: _Optional[str] = ..., specialist_version: _Optional[int] = ..., error: _Optional[str] = ..., continue_from: _Optional[str] = ..., run_config: _Optional[_Mapping[str, str]] = ...) -> None: ...

class JobList(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class RoundEvent(_message.Message):
    __slots__ = ("event", "time", "job_id", "round", "org", "accepted", "detail", "sampled", "summary_json", "json")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ORG_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_JSON_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    event: str
    time: str
    job_id: str
    round: int
    org: str
    accepted: bool
    detail: str
    sampled: int
    summary_json: str
    json: str
    def __init__(self, event: _Optional[str] = ..., time: _Optional[str] = ..., job_id: _Optional[str] = ..., round: _Optional[int] = ..., org: _Optional[str] = ..., accepted: _Optional[bool] = ..., detail: _Optional[str] = ..., sampled: _Optional[int] = ..., summary_json: _Optional[str] = ..., json: _Optional[str] = ...) -> None: ...

class ListSpecialistsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class SpecialistRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class Specialist(_message.Message):
    __slots__ = ("name", "version", "created_at", "job_id", "base_model", "task_spec_json", "task_spec_fingerprint", "metrics_json", "metric", "provenance_json", "epsilon", "secure_aggregation", "adapter_sha256", "parent", "rounds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    TASK_SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    TASK_SPEC_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_JSON_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_SHA256_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    created_at: str
    job_id: str
    base_model: str
    task_spec_json: str
    task_spec_fingerprint: str
    metrics_json: str
    metric: str
    provenance_json: str
    epsilon: float
    secure_aggregation: bool
    adapter_sha256: str
    parent: str
    rounds: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., created_at: _Optional[str] = ..., job_id: _Optional[str] = ..., base_model: _Optional[str] = ..., task_spec_json: _Optional[str] = ..., task_spec_fingerprint: _Optional[str] = ..., metrics_json: _Optional[str] = ..., metric: _Optional[str] = ..., provenance_json: _Optional[str] = ..., epsilon: _Optional[float] = ..., secure_aggregation: _Optional[bool] = ..., adapter_sha256: _Optional[str] = ..., parent: _Optional[str] = ..., rounds: _Optional[int] = ...) -> None: ...

class SpecialistList(_message.Message):
    __slots__ = ("specialists",)
    SPECIALISTS_FIELD_NUMBER: _ClassVar[int]
    specialists: _containers.RepeatedCompositeFieldContainer[Specialist]
    def __init__(self, specialists: _Optional[_Iterable[_Union[Specialist, _Mapping]]] = ...) -> None: ...

class FileChunk(_message.Message):
    __slots__ = ("path", "data", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    data: bytes
    sha256: str
    def __init__(self, path: _Optional[str] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...
