"""Hypothesis strategies that mutate valid Fleet messages into hostile ones.

Hypothesis draws a :class:`Plan` from a strategy that never looks at the live
federation: which operations, and pools of integers, 64-bit sizes, floats, text
and bytes. The functions here then apply the plan to a valid input (serialised
messages, as the SDK sends them), taking indexes modulo the input's actual
lengths, and return ``(label, messages)``: what was done, for the findings, and
the bytes to send. (Drawing from the live state instead would make hypothesis
see a different data shape for the same choices, and refuse.) Mutations work at three levels:
the stream (truncate, drop, duplicate, reorder, insert), the fields of a parsed
message (task ids, rounds, kinds, weights, huge shapes, metrics) and the raw
bytes (random bytes, bit flips, cuts, trailing junk), which produce messages no
parser accepts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from hypothesis import strategies as st

from fedpriv.v1 import fleet_pb2, tensor_pb2
from fedpriv.wire.frames import chunk_frame

U64 = st.one_of(
    st.sampled_from([0, 1, 2, 7, 2**31 - 1, 2**32, 2**40, 2**53 + 1, 2**63, 2**64 - 1]),
    st.integers(0, 2**64 - 1),
)
U32 = st.one_of(st.sampled_from([0, 1, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
SPECIAL_FLOATS = st.sampled_from(
    [float("nan"), float("inf"), -float("inf"), 1e30, 3e38, -3e38, 1e6, 1e6 + 1, -0.0, 1e-45]
)
FLOAT32 = st.one_of(SPECIAL_FLOATS, st.floats(width=32, allow_nan=True, allow_infinity=True))
TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "none", "fp16", "bf16", "int8", "x" * 5000, "\x00", "é" * 300]),
)


STREAM_OPS = (
    "truncate",
    "drop",
    "duplicate",
    "swap",
    "shuffle",
    "insert_junk",
    "bytes",
    "header",
    "header",
    "chunk",
    "chunk",
    "second_header",
    "chunk_first",
    "past_round",
    "empty",
)


class Plan:
    """Values drawn by hypothesis, handed out in order (cycling) to the mutations."""

    def __init__(self, drawn: dict[str, list[Any]]) -> None:
        self._pools = drawn
        self._next = dict.fromkeys(drawn, 0)

    def _take(self, pool: str) -> Any:
        values = self._pools[pool]
        position = self._next[pool]
        self._next[pool] = position + 1
        return values[position % len(values)]

    @property
    def ops(self) -> list[str]:
        return list(self._pools["ops"])

    def below(self, n: int) -> int:
        """An integer in [0, n) (0 when n is 0)."""
        return int(self._take("ints")) % n if n > 0 else 0

    def between(self, low: int, high: int) -> int:
        return low + self.below(high - low + 1)

    def pick(self, values: Sequence[Any]) -> Any:
        return values[self.below(len(values))]

    def flag(self) -> bool:
        return self.below(2) == 1

    def u64(self) -> int:
        return int(self._take("u64"))

    def u32(self) -> int:
        return int(self._take("u64")) % 2**32

    def float(self) -> float:
        return float(self._take("floats"))

    def text(self) -> str:
        return str(self._take("texts"))

    def blob(self) -> bytes:
        return bytes(self._take("blobs"))


def plans(ops: Sequence[str] = STREAM_OPS) -> st.SearchStrategy[Plan]:
    """Plans whose shape never depends on anything but hypothesis's choices."""
    return st.fixed_dictionaries(
        {
            "ops": st.lists(st.sampled_from(list(ops)), min_size=1, max_size=3),
            "ints": st.lists(st.integers(0, 2**32), min_size=24, max_size=24),
            "u64": st.lists(U64, min_size=4, max_size=4),
            "floats": st.lists(FLOAT32, min_size=8, max_size=8),
            "texts": st.lists(TEXT, min_size=3, max_size=3),
            "blobs": st.lists(st.binary(max_size=96), min_size=3, max_size=3),
        }
    ).map(Plan)


def mutate_bytes(plan: Plan, message: bytes) -> tuple[str, bytes]:
    """Random bytes, bit flips, a cut or trailing junk: often no longer a parsable message."""
    how = plan.pick(["random", "flip", "cut", "junk", "varint"])
    if how == "random" or not message:
        return "random bytes", plan.blob()
    data = bytearray(message)
    if how == "flip":
        for _ in range(plan.between(1, 4)):
            data[plan.below(len(data))] ^= 1 << plan.below(8)
        return "bit flips", bytes(data)
    if how == "cut":
        return "cut message", bytes(data[: plan.below(len(data))])
    if how == "varint":
        # A length or tag that runs past the end: the parser must not read beyond it.
        data[plan.below(len(data))] = 0xFF
        return "overlong varint", bytes(data)
    return "trailing junk", bytes(data) + (plan.blob() or b"\x00")


def _tensor_header(plan: Plan, header: tensor_pb2.TensorHeader) -> str:
    """Huge or odd shapes, dtypes, names, sizes: a header no model has."""
    how = plan.pick(["huge_shape", "dims", "dtype", "name", "payload", "chunk", "extra", "none"])
    tensors = header.tensors
    if how == "huge_shape" and tensors:
        spec = tensors[plan.below(len(tensors))]
        del spec.shape[:]
        spec.shape.extend(plan.u64() for _ in range(plan.between(1, 4)))
        if plan.flag():  # a consistent payload size, so the layout check runs
            size = 4
            for dim in spec.shape:
                size *= dim
            header.payload_bytes = min(size, 2**64 - 1)
        return "huge shape"
    if how == "dims" and tensors:
        del tensors[0].shape[:]
        tensors[0].shape.extend([1] * plan.below(65))
        return "many dimensions"
    if how == "dtype" and tensors:
        tensors[plan.below(len(tensors))].dtype = plan.below(201)
        return "dtype"
    if how == "name" and tensors:
        tensors[plan.below(len(tensors))].name = plan.text()
        return "tensor name"
    if how == "payload":
        header.payload_bytes = plan.u64()
        return "payload_bytes"
    if how == "chunk":
        header.chunk_bytes = plan.u32()
        return "chunk_bytes"
    if how == "extra":
        for _ in range(plan.between(1, 3)):
            header.tensors.add(name=plan.text(), dtype=plan.below(11), shape=[3])
        return "extra tensors"
    header.Clear()
    return "empty tensor header"


def mutate_result_header(
    plan: Plan, message: bytes, *, task_ids: Sequence[str]
) -> tuple[str, bytes]:
    """One field of a ResultHeader changed: ids, round, kind, weight, metrics, tensors."""
    parsed = fleet_pb2.ResultMessage.FromString(message)
    header = parsed.header
    how = plan.pick(
        [
            "task_id",
            "round",
            "kind",
            "num_examples",
            "metrics",
            "update",
            "drop_update",
            "compression",
            "declined",
        ]
    )
    if how == "task_id":
        header.task_id = plan.pick([*task_ids, plan.text()])
    elif how == "round":
        header.round = plan.u64()
    elif how == "kind":
        header.kind = plan.pick([0, 1, 2, 3, 4, 5, 99, 2**31 - 1, -1])
    elif how == "num_examples":
        header.num_examples = plan.u64()
    elif how == "metrics":
        for _ in range(plan.between(1, 4)):
            scalar = header.metrics[plan.text()]
            kind = plan.pick(["double", "int", "string", "bool", "unset"])
            if kind == "double":
                scalar.double_value = plan.float()
            elif kind == "int":
                scalar.int_value = plan.u64() - 2**63
            elif kind == "string":
                scalar.string_value = plan.text()
            elif kind == "bool":
                scalar.bool_value = plan.flag()
        if plan.flag():
            for k in range(plan.below(300)):
                header.metrics[f"m{k}"].int_value = k
    elif how == "update":
        how = _tensor_header(plan, header.update)
    elif how == "drop_update":
        header.ClearField("update")
    elif how == "compression":
        if plan.flag():  # the deprecated name (field 8)
            header.compression = plan.pick(["fp16", "bf16", "int8", "none", plan.text()])
        else:  # the typed field 9, known values and ones from a newer protocol
            header.update_compression = plan.pick([0, 1, 2, 3, plan.below(1 << 20)])
    else:
        header.declined_reason = plan.text()
    return f"header {how}", parsed.SerializeToString()


def mutate_chunk(plan: Plan, message: bytes) -> tuple[str, bytes]:
    """A chunk with another offset, length or values (NaN, infinities, huge, random)."""
    chunk = fleet_pb2.ResultMessage.FromString(message).chunk
    offset, data = chunk.offset, bytes(chunk.data)
    how = plan.pick(["offset", "longer", "shorter", "values", "values", "empty", "misaligned"])
    if how == "offset":
        offset = plan.u64() if plan.flag() else max(0, offset + plan.between(-16, 16))
    elif how == "longer":
        data += bytes(plan.pick([4, 8, 256, 4096, 65536]))
    elif how == "shorter" and data:
        data = data[: plan.below(len(data))]
    elif how == "values" and len(data) >= 4:
        whole = len(data) // 4 * 4  # a chunk cut short earlier may end mid-value
        values = np.frombuffer(data[:whole], "<f4").copy()
        for _ in range(plan.between(1, 8)):
            values[plan.below(len(values))] = np.float32(plan.float())
        data = values.tobytes() + data[whole:]
    elif how == "empty":
        data = b""
    else:
        data = data[1:] + b"\x00" if data else b"\x00"
        offset += 1
    return f"chunk {how}", chunk_frame(offset, (data,), len(data))


def mutate_stream(
    plan: Plan,
    valid: Sequence[bytes],
    *,
    task_ids: Sequence[str],
    past: Sequence[Sequence[bytes]],
) -> tuple[str, list[bytes]]:
    """The plan's one to three mutations of a valid result stream (header, then chunks)."""
    messages = list(valid)
    labels = []
    for how in plan.ops:
        i = plan.below(len(messages))
        if how == "truncate" and messages:
            messages = messages[: plan.below(len(messages))]
        elif how == "drop" and messages:
            del messages[i]
        elif how == "duplicate" and messages:
            messages.insert(plan.below(len(messages) + 1), messages[i])
        elif how == "swap" and messages:
            j = plan.below(len(messages))
            messages[i], messages[j] = messages[j], messages[i]
        elif how == "shuffle":
            order = sorted(range(len(messages)), key=lambda _: plan.below(1 << 30))
            messages = [messages[k] for k in order]
        elif how == "insert_junk":
            messages.insert(plan.below(len(messages) + 1), plan.blob() or b"\xff")
        elif how == "bytes" and messages:
            how, messages[i] = mutate_bytes(plan, messages[i])
        elif how == "header" and messages and _is_header(messages[0]):
            how, messages[0] = mutate_result_header(plan, messages[0], task_ids=task_ids)
        elif how == "chunk":
            chunks = [k for k, m in enumerate(messages) if _is_chunk(m)]
            if chunks:
                k = plan.pick(chunks)
                how, messages[k] = mutate_chunk(plan, messages[k])
        elif how == "second_header" and messages:
            messages.insert(1 + plan.below(len(messages)), valid[0])
        elif how == "chunk_first" and len(messages) > 1:
            messages.append(messages.pop(0))
        elif how == "past_round" and past:
            messages = list(plan.pick(past))
        elif how == "empty":
            messages = []
        labels.append(how)
    return "+".join(labels), messages


def _parse(message: bytes) -> fleet_pb2.ResultMessage | None:
    try:
        return fleet_pb2.ResultMessage.FromString(message)
    except Exception:  # not a message at all
        return None


def _is_header(message: bytes) -> bool:
    parsed = _parse(message)
    return parsed is not None and parsed.WhichOneof("part") == "header"


def _is_chunk(message: bytes) -> bool:
    parsed = _parse(message)
    return parsed is not None and parsed.WhichOneof("part") == "chunk"


def valid_unary(rpc: str, *, task_id: str, round: int) -> bytes:
    """A valid request of a unary RPC (or PullTask's), as the SDK sends it."""
    if rpc == "Join":
        return fleet_pb2.JoinRequest(sdk_version="0.1.0").SerializeToString()
    if rpc == "PullTask":
        return fleet_pb2.PullTaskRequest(wait_s=1).SerializeToString()
    if rpc == "Heartbeat":
        return fleet_pb2.HeartbeatRequest().SerializeToString()
    if rpc == "Leave":
        return fleet_pb2.LeaveRequest(reason="done").SerializeToString()
    if rpc == "Status":
        return b""
    return fleet_pb2.SecAggRequest(
        task_id=task_id,
        round=round,
        advertise=fleet_pb2.AdvertiseKeys(cipher_public_key=bytes(32), mask_public_key=bytes(32)),
    ).SerializeToString()


def mutate_unary(
    plan: Plan, rpc: str, valid: bytes, *, task_ids: Sequence[str]
) -> tuple[str, bytes]:
    """A field-level or byte-level mutation of a unary request."""
    if plan.flag():
        return mutate_bytes(plan, valid)
    if rpc == "Join":
        return "sdk_version", fleet_pb2.JoinRequest(sdk_version=plan.text()).SerializeToString()
    if rpc == "PullTask":
        # The caller holds an open task, so it gets the task at once whatever it asks.
        return "wait_s", fleet_pb2.PullTaskRequest(wait_s=plan.u32()).SerializeToString()
    if rpc == "Leave":
        return "reason", fleet_pb2.LeaveRequest(reason=plan.text()).SerializeToString()
    if rpc == "SecAgg":
        request = fleet_pb2.SecAggRequest(
            task_id=plan.pick([*task_ids, plan.text()]), round=plan.u64()
        )
        step = plan.pick(["advertise", "share", "roster", "unmask", "none"])
        if step == "advertise":
            request.advertise.cipher_public_key = plan.blob()
            request.advertise.mask_public_key = plan.blob()
        elif step == "share":
            for _ in range(plan.below(5)):
                request.share.shares.add(silo=plan.text(), ciphertext=plan.blob())
        elif step == "roster":
            request.roster.SetInParent()
        elif step == "unmask":
            for _ in range(plan.below(5)):
                request.unmask.self_mask.add(silo=plan.text(), x=plan.u32(), y=plan.blob())
        return f"secagg {step}", request.SerializeToString()
    # Heartbeat and Status carry no fields: unknown fields must be skipped.
    return "unknown fields", valid + b"\x08\x01" + b"\x12\x03abc"
