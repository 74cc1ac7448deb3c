"""Upload admission: every problem of a result header, as pure checks.

The round loop asks :func:`header_problems` before it opens an upload. Nothing
here holds state or a lock: the same header against the same expectations
always gives the same problems, which the tests pin down.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedpriv.coordinator.phases import Reason, TaskKind
from fedpriv.wire import Compression, TensorLayout

__all__ = ["Expected", "Header", "Problem", "compare_layout", "header_problems"]


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with an upload, and its kind."""

    reason: Reason
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Header:
    """What a result header claims (already decoded, not yet trusted)."""

    round: int
    kind: TaskKind
    num_examples: int
    layout: TensorLayout | None
    compression: Compression
    layout_problems: tuple[str, ...] = ()
    compression_problems: tuple[str, ...] = ()
    metric_problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Expected:
    """What the phase accepts from this silo."""

    round: int
    kind: TaskKind
    task_id: str
    layout: TensorLayout | None  # None: an evaluation result (no tensors)
    compression: Compression
    max_num_examples: int


def header_problems(
    header: Header, expected: Expected, *, policy: Sequence[Problem] = ()
) -> list[Problem]:
    """Every problem of `header` against `expected`, in a stable order.

    `policy` holds what the round's rules found beyond the header (a privacy
    spend that went down, keys not shared); it goes before the layout's problems.
    """
    problems = [Problem(Reason.LAYOUT, text) for text in header.layout_problems]
    problems += [Problem(Reason.METRICS, text) for text in header.metric_problems]
    if header.round != expected.round:
        problems.append(
            Problem(
                Reason.ROUND,
                f"round {header.round} != {expected.round}, the round of task {expected.task_id!r}",
            )
        )
    if header.kind is not expected.kind:
        problems.append(
            Problem(
                Reason.KIND,
                f"result kind {header.kind.name} != task kind {expected.kind.name}",
            )
        )
    if not 0 < header.num_examples <= expected.max_num_examples:
        problems.append(
            Problem(
                Reason.NUM_EXAMPLES,
                f"num_examples {header.num_examples} must be in "
                f"[1, {expected.max_num_examples}] (rounds.max_num_examples)",
            )
        )
    if header.compression_problems:
        problems += [Problem(Reason.COMPRESSION, text) for text in header.compression_problems]
    elif header.compression is not expected.compression:
        problems.append(
            Problem(
                Reason.COMPRESSION,
                f"compression {header.compression.value!r} != "
                f"{expected.compression.value!r}, the federation's update compression",
            )
        )
    problems += policy
    if expected.layout is not None:
        problems += [
            Problem(Reason.LAYOUT, text) for text in compare_layout(header.layout, expected.layout)
        ]
    elif header.layout is not None and header.layout.specs:
        problems.append(Problem(Reason.LAYOUT, "an evaluation result must not carry tensors"))
    return problems


def compare_layout(layout: TensorLayout | None, expected: TensorLayout) -> list[str]:
    """Every difference between an update's layout and the one expected, sorted."""
    if layout is None:
        return ["a training result must carry the updated tensors"]
    problems = []
    got = {s.name: s for s in layout.specs}
    want = {s.name: s for s in expected.specs}
    for name in want.keys() - got.keys():
        problems.append(f"{name}: missing")
    for name in got.keys() - want.keys():
        problems.append(f"{name}: not in the model")
    for name in want.keys() & got.keys():
        w, g = want[name], got[name]
        if g.shape != w.shape:
            problems.append(f"{name}: shape {g.shape} != expected {w.shape}")
        if g.dtype is not w.dtype:
            problems.append(
                f"{name}: dtype {g.dtype.name.lower()} != expected {w.dtype.name.lower()}"
            )
    if not problems and [s.name for s in layout.specs] != [s.name for s in expected.specs]:
        problems.append("tensors are in a different order than the model's")
    if not problems and layout.chunk_bytes != expected.chunk_bytes:
        problems.append(f"chunk_bytes {layout.chunk_bytes} != the model's {expected.chunk_bytes}")
    return sorted(problems)
