from fedpriv.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_KIND_UNSPECIFIED: _ClassVar[TaskKind]
    TASK_KIND_WAIT: _ClassVar[TaskKind]
    TASK_KIND_TRAIN: _ClassVar[TaskKind]
    TASK_KIND_EVALUATE: _ClassVar[TaskKind]
    TASK_KIND_FINISHED: _ClassVar[TaskKind]

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_NONE: _ClassVar[Compression]
    COMPRESSION_FP16: _ClassVar[Compression]
    COMPRESSION_BF16: _ClassVar[Compression]
    COMPRESSION_INT8: _ClassVar[Compression]
TASK_KIND_UNSPECIFIED: TaskKind
TASK_KIND_WAIT: TaskKind
TASK_KIND_TRAIN: TaskKind
TASK_KIND_EVALUATE: TaskKind
TASK_KIND_FINISHED: TaskKind
COMPRESSION_NONE: Compression
COMPRESSION_FP16: Compression
COMPRESSION_BF16: Compression
COMPRESSION_INT8: Compression

class Scalar(_message.Message):
    __slots__ = ("double_value", "int_value", "string_value", "bool_value")
    DOUBLE_VALUE_FIELD_NUMBER: _ClassVar[int]
    INT_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    double_value: float
    int_value: int
    string_value: str
    bool_value: bool
    def __init__(self, double_value: _Optional[float] = ..., int_value: _Optional[int] = ..., string_value: _Optional[str] = ..., bool_value: _Optional[bool] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("sdk_version", "resources")
    SDK_VERSION_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    sdk_version: str
    resources: Resources
    def __init__(self, sdk_version: _Optional[str] = ..., resources: _Optional[_Union[Resources, _Mapping]] = ...) -> None: ...

class Resources(_message.Message):
    __slots__ = ("device_kind", "device_count", "device_memory_bytes", "step_seconds", "full_steps")
    DEVICE_KIND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_COUNT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FULL_STEPS_FIELD_NUMBER: _ClassVar[int]
    device_kind: str
    device_count: int
    device_memory_bytes: int
    step_seconds: float
    full_steps: int
    def __init__(self, device_kind: _Optional[str] = ..., device_count: _Optional[int] = ..., device_memory_bytes: _Optional[int] = ..., step_seconds: _Optional[float] = ..., full_steps: _Optional[int] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("silo", "federation", "heartbeat_interval_s")
    SILO_FIELD_NUMBER: _ClassVar[int]
    FEDERATION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    silo: str
    federation: str
    heartbeat_interval_s: int
    def __init__(self, silo: _Optional[str] = ..., federation: _Optional[str] = ..., heartbeat_interval_s: _Optional[int] = ...) -> None: ...

class PullTaskRequest(_message.Message):
    __slots__ = ("wait_s",)
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    wait_s: int
    def __init__(self, wait_s: _Optional[int] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "kind", "round", "config", "model", "deadline_unix_s", "secagg", "compression", "stop_reason")
    class ConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Scalar
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Scalar, _Mapping]] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    SECAGG_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    kind: TaskKind
    round: int
    config: _containers.MessageMap[str, Scalar]
    model: _tensor_pb2.TensorHeader
    deadline_unix_s: float
    secagg: SecAggSettings
    compression: Compression
    stop_reason: str
    def __init__(self, task_id: _Optional[str] = ..., kind: _Optional[_Union[TaskKind, str]] = ..., round: _Optional[int] = ..., config: _Optional[_Mapping[str, Scalar]] = ..., model: _Optional[_Union[_tensor_pb2.TensorHeader, _Mapping]] = ..., deadline_unix_s: _Optional[float] = ..., secagg: _Optional[_Union[SecAggSettings, _Mapping]] = ..., compression: _Optional[_Union[Compression, str]] = ..., stop_reason: _Optional[str] = ...) -> None: ...

class SecAggSettings(_message.Message):
    __slots__ = ("session", "threshold", "clip_norm", "scale", "size", "noise_variance", "chunk_bytes", "ring_bits", "degree", "max_dropped")
    SESSION_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    NOISE_VARIANCE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    RING_BITS_FIELD_NUMBER: _ClassVar[int]
    DEGREE_FIELD_NUMBER: _ClassVar[int]
    MAX_DROPPED_FIELD_NUMBER: _ClassVar[int]
    session: str
    threshold: int
    clip_norm: float
    scale: float
    size: int
    noise_variance: float
    chunk_bytes: int
    ring_bits: int
    degree: int
    max_dropped: int
    def __init__(self, session: _Optional[str] = ..., threshold: _Optional[int] = ..., clip_norm: _Optional[float] = ..., scale: _Optional[float] = ..., size: _Optional[int] = ..., noise_variance: _Optional[float] = ..., chunk_bytes: _Optional[int] = ..., ring_bits: _Optional[int] = ..., degree: _Optional[int] = ..., max_dropped: _Optional[int] = ...) -> None: ...

class TaskMessage(_message.Message):
    __slots__ = ("task", "chunk")
    TASK_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    task: Task
    chunk: _tensor_pb2.TensorChunk
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class ResultHeader(_message.Message):
    __slots__ = ("task_id", "round", "kind", "num_examples", "metrics", "update", "declined_reason", "compression", "update_compression", "resources")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Scalar
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Scalar, _Mapping]] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    DECLINED_REASON_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    UPDATE_COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    round: int
    kind: TaskKind
    num_examples: int
    metrics: _containers.MessageMap[str, Scalar]
    update: _tensor_pb2.TensorHeader
    declined_reason: str
    compression: str
    update_compression: Compression
    resources: Resources
    def __init__(self, task_id: _Optional[str] = ..., round: _Optional[int] = ..., kind: _Optional[_Union[TaskKind, str]] = ..., num_examples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, Scalar]] = ..., update: _Optional[_Union[_tensor_pb2.TensorHeader, _Mapping]] = ..., declined_reason: _Optional[str] = ..., compression: _Optional[str] = ..., update_compression: _Optional[_Union[Compression, str]] = ..., resources: _Optional[_Union[Resources, _Mapping]] = ...) -> None: ...

class ResultMessage(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ResultHeader
    chunk: _tensor_pb2.TensorChunk
    def __init__(self, header: _Optional[_Union[ResultHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: _Optional[bool] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ("known", "task_closed")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    TASK_CLOSED_FIELD_NUMBER: _ClassVar[int]
    known: bool
    task_closed: bool
    def __init__(self, known: _Optional[bool] = ..., task_closed: _Optional[bool] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class LeaveReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SecAggRequest(_message.Message):
    __slots__ = ("task_id", "round", "advertise", "share", "roster", "unmask", "graph")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ADVERTISE_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    ROSTER_FIELD_NUMBER: _ClassVar[int]
    UNMASK_FIELD_NUMBER: _ClassVar[int]
    GRAPH_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    round: int
    advertise: AdvertiseKeys
    share: ShareKeys
    roster: RosterRequest
    unmask: UnmaskShares
    graph: GraphSeed
    def __init__(self, task_id: _Optional[str] = ..., round: _Optional[int] = ..., advertise: _Optional[_Union[AdvertiseKeys, _Mapping]] = ..., share: _Optional[_Union[ShareKeys, _Mapping]] = ..., roster: _Optional[_Union[RosterRequest, _Mapping]] = ..., unmask: _Optional[_Union[UnmaskShares, _Mapping]] = ..., graph: _Optional[_Union[GraphSeed, _Mapping]] = ...) -> None: ...

class AdvertiseKeys(_message.Message):
    __slots__ = ("cipher_public_key", "mask_public_key", "graph_commitment")
    CIPHER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    GRAPH_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    cipher_public_key: bytes
    mask_public_key: bytes
    graph_commitment: bytes
    def __init__(self, cipher_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ..., graph_commitment: _Optional[bytes] = ...) -> None: ...

class PeerKeys(_message.Message):
    __slots__ = ("silo", "cipher_public_key", "mask_public_key", "graph_commitment")
    SILO_FIELD_NUMBER: _ClassVar[int]
    CIPHER_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    MASK_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    GRAPH_COMMITMENT_FIELD_NUMBER: _ClassVar[int]
    silo: str
    cipher_public_key: bytes
    mask_public_key: bytes
    graph_commitment: bytes
    def __init__(self, silo: _Optional[str] = ..., cipher_public_key: _Optional[bytes] = ..., mask_public_key: _Optional[bytes] = ..., graph_commitment: _Optional[bytes] = ...) -> None: ...

class GraphSeed(_message.Message):
    __slots__ = ("contribution",)
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    contribution: bytes
    def __init__(self, contribution: _Optional[bytes] = ...) -> None: ...

class GraphContribution(_message.Message):
    __slots__ = ("silo", "contribution")
    SILO_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    silo: str
    contribution: bytes
    def __init__(self, silo: _Optional[str] = ..., contribution: _Optional[bytes] = ...) -> None: ...

class EncryptedShares(_message.Message):
    __slots__ = ("silo", "ciphertext")
    SILO_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    silo: str
    ciphertext: bytes
    def __init__(self, silo: _Optional[str] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class ShareKeys(_message.Message):
    __slots__ = ("shares",)
    SHARES_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShares]
    def __init__(self, shares: _Optional[_Iterable[_Union[EncryptedShares, _Mapping]]] = ...) -> None: ...

class RosterRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RevealedShare(_message.Message):
    __slots__ = ("silo", "x", "y")
    SILO_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    Y_FIELD_NUMBER: _ClassVar[int]
    silo: str
    x: int
    y: bytes
    def __init__(self, silo: _Optional[str] = ..., x: _Optional[int] = ..., y: _Optional[bytes] = ...) -> None: ...

class UnmaskShares(_message.Message):
    __slots__ = ("self_mask", "mask_key")
    SELF_MASK_FIELD_NUMBER: _ClassVar[int]
    MASK_KEY_FIELD_NUMBER: _ClassVar[int]
    self_mask: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    mask_key: _containers.RepeatedCompositeFieldContainer[RevealedShare]
    def __init__(self, self_mask: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ..., mask_key: _Optional[_Iterable[_Union[RevealedShare, _Mapping]]] = ...) -> None: ...

class SecAggReply(_message.Message):
    __slots__ = ("peers", "shares", "survivors", "dropped", "contributions", "neighbours")
    PEERS_FIELD_NUMBER: _ClassVar[int]
    SHARES_FIELD_NUMBER: _ClassVar[int]
    SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    peers: _containers.RepeatedCompositeFieldContainer[PeerKeys]
    shares: _containers.RepeatedCompositeFieldContainer[EncryptedShares]
    survivors: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    contributions: _containers.RepeatedCompositeFieldContainer[GraphContribution]
    neighbours: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, peers: _Optional[_Iterable[_Union[PeerKeys, _Mapping]]] = ..., shares: _Optional[_Iterable[_Union[EncryptedShares, _Mapping]]] = ..., survivors: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ..., contributions: _Optional[_Iterable[_Union[GraphContribution, _Mapping]]] = ..., neighbours: _Optional[_Iterable[str]] = ...) -> None: ...
