"""Checking a task from the coordinator before the silo acts on it.

A silo trusts its coordinator with a model, never with its process. Every field
of a TRAIN or EVALUATE task is checked the way the coordinator checks an upload
(:mod:`fedpriv.coordinator.upload`): a known kind, a task id and round, sane
config values and deadline, a well-formed model header within this silo's
limits (and matching the silo's own model when the client declares one), then
chunks in order, of the right length, complete and without extras, and a model
with no NaN or infinite value. Problems are collected and raised once as
:class:`~fedpriv.errors.TaskRejected`; the runtime declines the task with that
reason and takes the next one.

Nothing model-sized is allocated before the header has passed every check, and
the buffer is taken only when the first chunk arrives: a header alone, however
large it claims the model is, costs the silo nothing.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from fedpriv._types import Scalar
from fedpriv.client.messages import ClientStats
from fedpriv.errors import ConfigError, TaskRejected
from fedpriv.secagg import graph
from fedpriv.secagg.ring import RingCodec
from fedpriv.secagg.settings import SecAggSettings, settings_from_proto
from fedpriv.v1 import fleet_pb2
from fedpriv.wire import (
    Compression,
    DType,
    TensorLayout,
    bfloat16_to_float32,
    layout_from_proto,
    scalars_from_proto,
)
from fedpriv.wire.frames import chunk_of

__all__ = [
    "DEFAULT_MAX_MODEL_BYTES",
    "ModelOwner",
    "TaskLimits",
    "ValidatedTask",
    "receive_task",
]

logger = logging.getLogger(__name__)

# A silo holds about three copies of the model while it trains (the received
# payload, the client's own weights, the update it streams back), so a 4 GiB model
# already needs some 12 GiB of memory at the silo. That covers 1e9 float32
# parameters, twenty times the largest model benchmarked (docs/performance.md),
# and keeps a coordinator from making an ordinary silo host swap or be killed.
# Federations with larger models raise [limits] max_model_bytes.
DEFAULT_MAX_MODEL_BYTES = 4 << 30
# Task ids are uuid4 hex (32 characters); anything this long is not one.
MAX_TASK_ID_BYTES = 256
MAX_CONFIG_KEY_BYTES = 256
# A round deadline further ahead than this is a broken clock or a broken field (the
# coordinator bounds no deadline_s, so the bound is loose enough for any real round).
MAX_DEADLINE_AHEAD_S = 365 * 86400.0
# What a decline reason and its log line may carry: the coordinator chose the
# names in its header, so their number and length are bounded here.
_MAX_LISTED_PROBLEMS = 10
_MAX_PROBLEM_CHARS = 240
_RUNNABLE = {fleet_pb2.TASK_KIND_TRAIN: "TRAIN", fleet_pb2.TASK_KIND_EVALUATE: "EVALUATE"}


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskLimits:
    """What a silo accepts from its coordinator (``[limits]`` in ``silo.toml``).

    Args:
        max_model_bytes: Largest model payload a task may declare; a larger one
            is declined before anything is allocated.
        secagg_corrupt_fraction: The share of a secure-aggregation round's silos
            this silo assumes may collude with the coordinator when it judges the
            announced SecAgg+ graph (see :func:`fedpriv.secagg.graph.refusal`):
            one that is not secure enough under it is declined.
        secagg_security_bits: σ: the security bound a graph must meet, 2^-σ.
        secagg_min_noise_multiplier: With secure aggregation, the least noise
            multiplier z that the round's distributed noise must give the fewest
            survivors it may unmask with (``noise_variance · m ≥ (s · z · C)²``);
            a round announcing less is declined before training. 0 (the
            default): no distributed DP required.

    Raises:
        ConfigError: A limit is out of range.
    """

    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES
    secagg_corrupt_fraction: float = graph.DEFAULT_CORRUPT_FRACTION
    secagg_security_bits: int = graph.DEFAULT_SECURITY_BITS
    secagg_min_noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.max_model_bytes, bool) or self.max_model_bytes <= 0:
            raise ConfigError(
                f"limits.max_model_bytes = {self.max_model_bytes}: must be a positive "
                f"number of bytes (default {DEFAULT_MAX_MODEL_BYTES})"
            )
        if not 0 <= self.secagg_corrupt_fraction < 0.5:
            raise ConfigError(
                f"limits.secagg_corrupt_fraction = {self.secagg_corrupt_fraction}: must be in "
                f"[0, 0.5) (default {graph.DEFAULT_CORRUPT_FRACTION})"
            )
        if not 0 <= self.secagg_min_noise_multiplier < math.inf:
            raise ConfigError(
                f"limits.secagg_min_noise_multiplier = {self.secagg_min_noise_multiplier}: "
                "must be a finite number >= 0 (default 0: no distributed DP required)"
            )
        if not 1 <= self.secagg_security_bits <= 128:
            raise ConfigError(
                f"limits.secagg_security_bits = {self.secagg_security_bits}: must be in "
                f"[1, 128] (default {graph.DEFAULT_SECURITY_BITS})"
            )

    def noise_refusal(self, codec: RingCodec, *, survivors: int) -> str | None:
        """Why this silo declines a round announcing `codec`'s noise, or None.

        `survivors` is the fewest updates the round may unmask with.
        """
        if self.secagg_min_noise_multiplier <= 0:
            return None
        z = math.sqrt(codec.noise_variance * survivors) / (codec.scale * codec.clip_norm)
        if z >= self.secagg_min_noise_multiplier:
            return None
        return (
            f"the round's distributed noise gives {survivors} survivors a noise multiplier "
            f"of {z:.3g}, below this silo's [limits] secagg_min_noise_multiplier = "
            f"{self.secagg_min_noise_multiplier:g}; this silo takes no part"
        )


@runtime_checkable
class ModelOwner(Protocol):
    """A client that knows the tensors its model exchanges (``TorchClient`` does).

    The runtime declines a task whose model has other names or shapes before
    downloading it, instead of failing inside ``fit``. Dtypes may differ: the
    client casts what it receives.
    """

    def model_shapes(self) -> Mapping[str, tuple[int, ...]]:
        """Name and shape of every tensor the client's model exchanges."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class ValidatedTask:
    """A TRAIN or EVALUATE task whose every field and model byte passed the silo's checks."""

    task: fleet_pb2.Task
    layout: TensorLayout
    payload: npt.NDArray[np.uint8]
    config: dict[str, Scalar]
    compression: Compression
    secagg: SecAggSettings | None = None


def _bounded(problems: Sequence[str]) -> list[str]:
    listed = [
        p if len(p) <= _MAX_PROBLEM_CHARS else p[: _MAX_PROBLEM_CHARS - 3] + "..."
        for p in problems[:_MAX_LISTED_PROBLEMS]
    ]
    if len(problems) > _MAX_LISTED_PROBLEMS:
        listed.append(f"and {len(problems) - _MAX_LISTED_PROBLEMS} more problems")
    return listed


def _rejected(task: fleet_pb2.Task, problems: Sequence[str]) -> TaskRejected:
    task_id = task.task_id if len(task.task_id) <= 64 else task.task_id[:61] + "..."
    return TaskRejected(task_id=task_id, round=task.round, problems=_bounded(problems))


def _physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # a platform without these names
        return None


def _check_fields(task: fleet_pb2.Task, now_unix_s: float) -> list[str]:
    problems = []
    if task.kind not in _RUNNABLE:
        problems.append(
            f"unknown task kind {task.kind}; this silo runs TRAIN, EVALUATE, WAIT and "
            "FINISHED tasks (upgrade the silo if the federation uses a newer protocol)"
        )
    if not task.task_id or len(task.task_id.encode()) > MAX_TASK_ID_BYTES:
        problems.append(f"task_id must be 1 to {MAX_TASK_ID_BYTES} bytes")
    if task.round < 1:
        problems.append(f"round {task.round}: rounds count from 1")
    deadline = task.deadline_unix_s
    if not math.isfinite(deadline) or deadline < 0:
        problems.append(f"deadline_unix_s {deadline} is not a time (0 means none)")
    elif deadline > now_unix_s + MAX_DEADLINE_AHEAD_S:
        problems.append(
            f"deadline_unix_s {deadline:.0f} is more than {MAX_DEADLINE_AHEAD_S / 86400:.0f} "
            f"days after this silo's clock ({now_unix_s:.0f})"
        )
    return problems


def _check_config(task: fleet_pb2.Task) -> tuple[dict[str, Scalar], list[str]]:
    config, problems = scalars_from_proto(task.config)
    problems = [p.replace("metric", "config value", 1) for p in problems]
    problems += [
        f"config key {key[:32]!r}... is longer than {MAX_CONFIG_KEY_BYTES} bytes"
        for key in task.config
        if len(key.encode()) > MAX_CONFIG_KEY_BYTES
    ]
    if "round" in config and (isinstance(config["round"], bool) or config["round"] != task.round):
        problems.append(
            f"config round {config['round']!r} differs from the task's round {task.round}"
        )
    return config, problems


def _check_upload_mode(
    task: fleet_pb2.Task,
) -> tuple[Compression, SecAggSettings | None, list[str]]:
    """The task's update compression and secure-aggregation settings, checked."""
    problems = []
    compression = Compression.NONE
    try:
        compression = Compression.from_proto(task.compression)
    except ValueError:
        known = ", ".join(c.name for c in Compression)
        problems.append(
            f"unknown compression {task.compression}; this silo knows {known} "
            "(upgrade the silo if the federation uses a newer protocol)"
        )
    if not task.HasField("secagg"):
        return compression, None, problems
    settings, secagg_problems = settings_from_proto(task.secagg)
    problems += [f"secagg.{p}" for p in secagg_problems]  # each names its field
    if task.kind != fleet_pb2.TASK_KIND_TRAIN:
        problems.append("secure-aggregation settings on a task that is not TRAIN")
    if compression is not Compression.NONE:
        problems.append(
            f"compression {compression.name} with secure aggregation: a masked update "
            "is never compressed"
        )
    return compression, settings, problems


def _check_layout(
    task: fleet_pb2.Task,
    limits: TaskLimits,
    expected: Mapping[str, tuple[int, ...]] | None,
    memory_bytes: int | None,
) -> tuple[TensorLayout | None, list[str]]:
    kind = _RUNNABLE.get(task.kind, "this")
    if not task.HasField("model"):
        return None, [f"{kind} task carries no model"]
    layout, problems = layout_from_proto(task.model)
    if layout is None:
        return None, [f"model header: {p}" for p in problems]
    size = layout.payload_bytes
    if size > limits.max_model_bytes:
        problems.append(
            f"the model declares {size} bytes, more than this silo accepts "
            f"({limits.max_model_bytes}; raise [limits] max_model_bytes if the model is that big)"
        )
    elif memory_bytes is not None and size > memory_bytes:
        problems.append(
            f"the model declares {size} bytes, more than this host's {memory_bytes} bytes of memory"
        )
    if expected is not None:
        problems += _architecture_problems(layout, expected)
    return (None if problems else layout), problems


def _architecture_problems(layout: TensorLayout, mine: Mapping[str, tuple[int, ...]]) -> list[str]:
    sent = {spec.name: spec.shape for spec in layout.specs}
    problems = [f"{name}: missing (this silo's model has it)" for name in mine if name not in sent]
    problems += [f"{name}: not in this silo's model" for name in sent if name not in mine]
    problems += [
        f"{name}: shape {shape} != this silo's model {mine[name]}"
        for name, shape in sent.items()
        if name in mine and mine[name] != shape
    ]
    return problems


class _ModelReceiver:
    """Checks an in-order chunk stream and copies it into a buffer taken at the first chunk."""

    def __init__(
        self,
        layout: TensorLayout,
        take_buffer: Callable[[TensorLayout], npt.NDArray[np.uint8] | None],
    ) -> None:
        self._layout = layout
        self._take_buffer = take_buffer
        self._buffer: npt.NDArray[np.uint8] | None = None
        self._received = 0

    def add(self, offset: int, data: bytes | memoryview) -> str | None:
        """Copy and check one chunk; the problem that ends the stream, if any."""
        layout = self._layout
        if self._received >= layout.payload_bytes:
            return (
                f"chunk at offset {offset} with {len(data)} bytes arrived after the model's "
                f"last byte ({layout.payload_bytes})"
            )
        expected_length = layout.chunk_range(self._received // layout.chunk_bytes)[1]
        if offset != self._received or len(data) != expected_length:
            return (
                f"chunk at offset {offset} with {len(data)} bytes; expected offset "
                f"{self._received} with {expected_length} bytes"
            )
        buffer = self._ensure_buffer()
        buffer[offset : offset + len(data)] = np.frombuffer(data, dtype=np.uint8)
        self._received += len(data)
        nonfinite = self._nonfinite(offset, len(data))
        if nonfinite:
            counts = ", ".join(f"{name}: {count}" for name, count in nonfinite.items())
            return (
                f"the model holds NaN or infinite values ({counts} in bytes {offset} to "
                f"{offset + len(data)}); the silo neither trains on nor evaluates such a model"
            )
        return None

    def finish(self) -> tuple[npt.NDArray[np.uint8] | None, str | None]:
        """The complete payload, or the problem that it is not complete."""
        if self._received != self._layout.payload_bytes:
            return None, (
                f"stream ended after {self._received} of {self._layout.payload_bytes} model "
                "bytes (chunks are missing)"
            )
        return self._ensure_buffer(), None

    def _ensure_buffer(self) -> npt.NDArray[np.uint8]:
        if self._buffer is None:
            size = self._layout.payload_bytes
            reused = self._take_buffer(self._layout)
            if reused is not None and (reused.dtype != np.uint8 or reused.nbytes != size):
                reused = None  # not this model's size: a fresh buffer
            self._buffer = reused if reused is not None else np.empty(size, np.uint8)
        return self._buffer

    def _nonfinite(self, offset: int, length: int) -> dict[str, int]:
        assert self._buffer is not None  # add() filled it first
        counts: dict[str, int] = {}
        for segment in self._layout.segments(offset, length):
            spec = self._layout.specs[segment.index]
            if not spec.dtype.is_floating:
                continue
            values = np.frombuffer(
                self._buffer, spec.dtype.storage, count=segment.count, offset=segment.payload_offset
            )
            if spec.dtype is DType.BFLOAT16:
                values = bfloat16_to_float32(values)
            bad = segment.count - int(np.count_nonzero(np.isfinite(values)))
            if bad:
                counts[spec.name] = bad
        return counts


def receive_task(
    task: fleet_pb2.Task,
    stream: Iterator[Any],
    *,
    stats: ClientStats,
    limits: TaskLimits,
    take_buffer: Callable[[TensorLayout], npt.NDArray[np.uint8] | None] = lambda layout: None,
    expected: Mapping[str, tuple[int, ...]] | None = None,
    now_unix_s: float | None = None,
    memory_bytes: int | None = None,
) -> ValidatedTask:
    """Check a TRAIN or EVALUATE `task` and receive its model from `stream`.

    Args:
        task: The unverified task (the stream's first message).
        stream: The rest of the PullTask stream: the model's chunks.
        stats: Where received bytes are counted.
        limits: This silo's limits.
        take_buffer: Gives a buffer for the model of this layout (reused, or the
            client's own parameters), or None for a fresh one.
        expected: Names and shapes of the silo's own model, when the client declares them.
        now_unix_s: This silo's clock (default: now).
        memory_bytes: The host's memory (default: read from the OS).

    Returns:
        The task with its validated config and model.

    Raises:
        TaskRejected: Something in the task or its model broke a rule; the stream
            may hold unread messages (cancel it).
    """
    now = time.time() if now_unix_s is None else now_unix_s
    memory = _physical_memory_bytes() if memory_bytes is None else memory_bytes
    problems = _check_fields(task, now)
    config, config_problems = _check_config(task)
    problems += config_problems
    compression, secagg, mode_problems = _check_upload_mode(task)
    problems += mode_problems
    layout, layout_problems = _check_layout(task, limits, expected, memory)
    problems += layout_problems
    if layout is not None and secagg is not None:
        elements = sum(spec.numel for spec in layout.specs)
        if secagg.size != elements:
            problems.append(
                f"secure-aggregation size {secagg.size} != the model's {elements} elements"
            )
    if problems or layout is None:
        raise _rejected(task, problems)
    receiver = _ModelReceiver(layout, take_buffer)
    for message in stream:
        chunk = chunk_of(message)
        if chunk is None:
            raise _rejected(task, ["only the model's chunks may follow a Task"])
        stats.bytes_received += len(chunk[1])
        problem = receiver.add(*chunk)
        if problem is not None:
            raise _rejected(task, [problem])
    payload, problem = receiver.finish()
    if payload is None or problem is not None:
        raise _rejected(task, [problem or "no model"])
    return ValidatedTask(
        task=task,
        layout=layout,
        payload=payload,
        config=config,
        compression=compression,
        secagg=secagg,
    )
