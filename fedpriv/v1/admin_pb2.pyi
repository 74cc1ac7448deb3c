from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SiloStatus(_message.Message):
    __slots__ = ("name", "seconds_since_seen", "live", "round_outcome", "device_kind", "device_count", "device_memory_bytes", "step_seconds", "full_steps", "max_steps")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SECONDS_SINCE_SEEN_FIELD_NUMBER: _ClassVar[int]
    LIVE_FIELD_NUMBER: _ClassVar[int]
    ROUND_OUTCOME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_KIND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_COUNT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FULL_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    name: str
    seconds_since_seen: float
    live: bool
    round_outcome: str
    device_kind: str
    device_count: int
    device_memory_bytes: int
    step_seconds: float
    full_steps: int
    max_steps: int
    def __init__(self, name: _Optional[str] = ..., seconds_since_seen: _Optional[float] = ..., live: _Optional[bool] = ..., round_outcome: _Optional[str] = ..., device_kind: _Optional[str] = ..., device_count: _Optional[int] = ..., device_memory_bytes: _Optional[int] = ..., step_seconds: _Optional[float] = ..., full_steps: _Optional[int] = ..., max_steps: _Optional[int] = ...) -> None: ...

class DiscardedUpdate(_message.Message):
    __slots__ = ("round", "silo", "reason")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SILO_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    round: int
    silo: str
    reason: str
    def __init__(self, round: _Optional[int] = ..., silo: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("federation", "state", "round", "num_rounds", "completed_rounds", "min_clients", "silos", "last_round_metrics", "uptime_s", "secure_aggregation", "central_dp", "rounds_without_dp", "discarded_updates")
    class LastRoundMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MIN_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    SILOS_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_METRICS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    SECURE_AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    CENTRAL_DP_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_WITHOUT_DP_FIELD_NUMBER: _ClassVar[int]
    DISCARDED_UPDATES_FIELD_NUMBER: _ClassVar[int]
    federation: str
    state: str
    round: int
    num_rounds: int
    completed_rounds: int
    min_clients: int
    silos: _containers.RepeatedCompositeFieldContainer[SiloStatus]
    last_round_metrics: _containers.ScalarMap[str, float]
    uptime_s: float
    secure_aggregation: bool
    central_dp: bool
    rounds_without_dp: _containers.RepeatedScalarFieldContainer[int]
    discarded_updates: _containers.RepeatedCompositeFieldContainer[DiscardedUpdate]
    def __init__(self, federation: _Optional[str] = ..., state: _Optional[str] = ..., round: _Optional[int] = ..., num_rounds: _Optional[int] = ..., completed_rounds: _Optional[int] = ..., min_clients: _Optional[int] = ..., silos: _Optional[_Iterable[_Union[SiloStatus, _Mapping]]] = ..., last_round_metrics: _Optional[_Mapping[str, float]] = ..., uptime_s: _Optional[float] = ..., secure_aggregation: _Optional[bool] = ..., central_dp: _Optional[bool] = ..., rounds_without_dp: _Optional[_Iterable[int]] = ..., discarded_updates: _Optional[_Iterable[_Union[DiscardedUpdate, _Mapping]]] = ...) -> None: ...
