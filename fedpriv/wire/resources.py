"""A silo's hardware and pace as it travels (``Resources`` in fleet.proto), checked both ways."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedpriv.v1 import fleet_pb2

__all__ = ["DEVICE_KINDS", "MAX_DEVICES", "MAX_FULL_STEPS", "MAX_STEP_SECONDS", "Resources"]

DEVICE_KINDS = frozenset({"", "cpu", "cuda", "mps"})
MAX_DEVICES = 1024
MAX_STEP_SECONDS = 86_400.0
MAX_FULL_STEPS = 10**9


@dataclass(frozen=True, slots=True)
class Resources:
    """What a silo trains on and how fast (0 or empty: unknown).

    Example:
        >>> r = Resources.from_proto(Resources("cuda", 2, 80 << 30, 0.25, 400).to_proto())
        >>> r.round_seconds
        100.0
        >>> Resources.from_proto(fleet_pb2.Resources(step_seconds=float("nan"))).problems()
        ['step_seconds = nan: must be finite, 0 to 86400']
    """

    device_kind: str = ""
    device_count: int = 0
    device_memory_bytes: int = 0
    step_seconds: float = 0.0
    full_steps: int = 0

    @property
    def round_seconds(self) -> float | None:
        """Time of a round's full work at the last measured pace (None: unknown)."""
        if self.step_seconds > 0 and self.full_steps > 0 and not self.problems():
            return self.step_seconds * self.full_steps
        return None

    def problems(self) -> list[str]:
        """Why these values cannot be believed (empty: they can)."""
        out = []
        if self.device_kind not in DEVICE_KINDS:
            out.append(f"device_kind = {self.device_kind[:16]!r}: expected cpu, cuda or mps")
        if not 0 <= self.device_count <= MAX_DEVICES:
            out.append(f"device_count = {self.device_count}: must be 0 to {MAX_DEVICES}")
        if not (math.isfinite(self.step_seconds) and 0 <= self.step_seconds <= MAX_STEP_SECONDS):
            out.append(
                f"step_seconds = {self.step_seconds}: must be finite, 0 to {MAX_STEP_SECONDS:g}"
            )
        if not 0 <= self.full_steps <= MAX_FULL_STEPS:
            out.append(f"full_steps = {self.full_steps}: must be 0 to {MAX_FULL_STEPS}")
        return out

    def without_pace(self) -> Resources:
        """The hardware alone (what a silo under DP sends unless its operator opts in)."""
        return Resources(self.device_kind, self.device_count, self.device_memory_bytes)

    def to_proto(self) -> fleet_pb2.Resources:
        """The message."""
        return fleet_pb2.Resources(
            device_kind=self.device_kind,
            device_count=self.device_count,
            device_memory_bytes=self.device_memory_bytes,
            step_seconds=self.step_seconds,
            full_steps=self.full_steps,
        )

    @classmethod
    def from_proto(cls, message: fleet_pb2.Resources) -> Resources:
        """The values as received (check :meth:`problems` before using them)."""
        return cls(
            device_kind=message.device_kind,
            device_count=message.device_count,
            device_memory_bytes=message.device_memory_bytes,
            step_seconds=message.step_seconds,
            full_steps=message.full_steps,
        )
