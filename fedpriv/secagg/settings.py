"""A round's secure-aggregation settings as they travel in ``Task.secagg``.

The coordinator plans the ring (:meth:`RingCodec.plan`), opens a session and
sends every silo of the round the same :class:`SecAggSettings`; the silo checks
them before it draws a key. A silo in another language reads the same fields
from ``fedpriv.v1.SecAggSettings`` (docs/protocol.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from fedpriv.errors import ProtocolError
from fedpriv.secagg.ring import RingCodec
from fedpriv.v1 import fleet_pb2
from fedpriv.wire import MAX_CHUNK_BYTES, DType, TensorLayout, TensorSpec

__all__ = [
    "MASKED_TENSOR",
    "MAX_SESSION_BYTES",
    "MAX_THRESHOLD",
    "RING_BITS",
    "SecAggSettings",
    "settings_from_proto",
]

# Only Z/2^32 is implemented: the masked update travels as int32.
RING_BITS = 32
# The one tensor of a masked upload: int32, shape (size,).
MASKED_TENSOR = "secagg"
# fedpriv's session ids are 32 hex digits; a bound keeps what a coordinator can make
# a silo hash and echo small.
MAX_SESSION_BYTES = 256
# A share's plaintext names its x as a u16, so no roster (and no threshold) is larger.
MAX_THRESHOLD = 0xFFFF
# The masked update's element count is bounded by what a TensorSpec can describe
# in bytes without overflow; a real model is far below it.
_MAX_SIZE = 1 << 60
_HALF_RING = 2**31
_ALIGN = 8


@dataclass(frozen=True, slots=True, kw_only=True)
class SecAggSettings:
    """One round's secure-aggregation settings (the same for every silo of the round).

    Args:
        session: The round's session id, bound into every key, associated data and share.
        threshold: t, the shares that recover a secret.
        clip_norm: C, the L2 norm each update is clipped to.
        scale: s, ring units per unit of update.
        size: Elements of the masked update (the model's element count).
        noise_variance: Skellam variance each silo adds, in ring units (0: none).
        chunk_bytes: Chunk size of the masked update's tensor stream.
        ring_bits: k of the ring Z/2^k; only 32 is supported.
        degree: Neighbours per silo in the round's SecAgg+ graph (0: the complete graph).
        max_dropped: With a degree, the silos of the key list that may be missing
            from the survivors while the round still unmasks.

    Raises:
        ProtocolError: A value is out of range; every problem is listed.

    Example:
        >>> settings = SecAggSettings(session="s1", threshold=2, clip_norm=1.0,
        ...     scale=1e6, size=10, chunk_bytes=1024)
        >>> SecAggSettings.from_proto(settings.to_proto()) == settings
        True
    """

    session: str
    threshold: int
    clip_norm: float
    scale: float
    size: int
    chunk_bytes: int
    noise_variance: float = 0.0
    ring_bits: int = RING_BITS
    degree: int = 0
    max_dropped: int = 0

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ProtocolError(f"secure-aggregation settings: {'; '.join(problems)}")

    @classmethod
    def from_codec(
        cls,
        codec: RingCodec,
        *,
        session: str,
        threshold: int,
        chunk_bytes: int,
        degree: int = 0,
        max_dropped: int = 0,
    ) -> SecAggSettings:
        """The settings that announce `codec` for a session with threshold `threshold`."""
        return cls(
            degree=degree,
            max_dropped=max_dropped,
            session=session,
            threshold=threshold,
            clip_norm=codec.clip_norm,
            scale=codec.scale,
            size=codec.size,
            noise_variance=codec.noise_variance,
            chunk_bytes=chunk_bytes,
        )

    @classmethod
    def from_proto(cls, message: fleet_pb2.SecAggSettings) -> SecAggSettings:
        """Check and convert a ``fedpriv.v1.SecAggSettings``.

        Raises:
            ProtocolError: A field is out of range; every problem is listed.
        """
        settings, problems = settings_from_proto(message)
        if settings is None:
            raise ProtocolError(f"secure-aggregation settings: {'; '.join(problems)}")
        return settings

    def to_proto(self) -> fleet_pb2.SecAggSettings:
        """The ``fedpriv.v1.SecAggSettings`` message."""
        return fleet_pb2.SecAggSettings(**_values(self))

    @property
    def codec(self) -> RingCodec:
        """How updates map into the ring under these settings."""
        return RingCodec(
            clip_norm=self.clip_norm,
            scale=self.scale,
            size=self.size,
            noise_variance=self.noise_variance,
        )

    @property
    def layout(self) -> TensorLayout:
        """The masked update's tensor layout: one int32 tensor ``secagg`` of `size` elements."""
        return TensorLayout.from_specs(
            [TensorSpec(name=MASKED_TENSOR, dtype=DType.INT32, shape=(self.size,))],
            chunk_bytes=self.chunk_bytes,
        )


def settings_from_proto(
    message: fleet_pb2.SecAggSettings,
) -> tuple[SecAggSettings | None, list[str]]:
    """Convert unverified settings, collecting every problem instead of raising.

    Returns:
        The settings and no problems, or None and every problem found.
    """
    values = _values(message)
    problems = _field_problems(**values)
    if problems:
        return None, problems
    settings = SecAggSettings(**values)
    return settings, []


def _problems(settings: SecAggSettings) -> list[str]:
    return _field_problems(**_values(settings))


def _values(source: SecAggSettings | fleet_pb2.SecAggSettings) -> dict[str, Any]:
    """The settings' fields by name, read from the dataclass or from its message."""
    return {f.name: getattr(source, f.name) for f in fields(SecAggSettings)}


def _positive_finite(value: float) -> bool:
    return not isinstance(value, bool) and math.isfinite(value) and value > 0


def _field_problems(
    *,
    session: str,
    threshold: int,
    clip_norm: float,
    scale: float,
    size: int,
    noise_variance: float,
    chunk_bytes: int,
    ring_bits: int,
    degree: int,
    max_dropped: int,
) -> list[str]:
    problems = []
    if not isinstance(session, str) or not 1 <= len(session.encode()) <= MAX_SESSION_BYTES:
        problems.append(f"session must be 1 to {MAX_SESSION_BYTES} bytes of UTF-8")
    if isinstance(threshold, bool) or not 1 <= threshold <= MAX_THRESHOLD:
        problems.append(f"threshold {threshold!r} must be in [1, {MAX_THRESHOLD}]")
    if not _positive_finite(clip_norm):
        problems.append(f"clip_norm {clip_norm!r} must be a finite number > 0")
    if not _positive_finite(scale):
        problems.append(f"scale {scale!r} must be a finite number > 0")
    if not (_positive_finite(noise_variance) or noise_variance == 0):
        problems.append(f"noise_variance {noise_variance!r} must be a finite number >= 0")
    if isinstance(size, bool) or not 1 <= size < _MAX_SIZE:
        problems.append(f"size {size!r} must be in [1, 2^60)")
    if not 0 < chunk_bytes <= MAX_CHUNK_BYTES or chunk_bytes % _ALIGN:
        problems.append(
            f"chunk_bytes {chunk_bytes!r} must be a positive multiple of {_ALIGN} "
            f"up to {MAX_CHUNK_BYTES}"
        )
    if ring_bits != RING_BITS:
        problems.append(f"ring_bits {ring_bits!r}: this silo implements Z/2^{RING_BITS} only")
    if degree and (degree % 2 or not 2 <= degree <= MAX_THRESHOLD):
        problems.append(f"degree {degree!r} must be 0 or an even number >= 2")
    elif degree and not degree + 1 < 2 * threshold <= 2 * (degree + 1):
        problems.append(
            f"threshold {threshold!r} must be more than half of a neighbourhood of "
            f"{degree + 1} silos and at most all of it"
        )
    if isinstance(max_dropped, bool) or not 0 <= max_dropped <= MAX_THRESHOLD:
        problems.append(f"max_dropped {max_dropped!r} must be in [0, {MAX_THRESHOLD}]")
    if not problems and clip_norm * scale >= _HALF_RING - 1:
        # A clipped, scaled element rounded up (at most s·C + 1) must fit in int32, or it
        # wraps before it is masked.
        problems.append(f"scale {scale!r} times clip_norm {clip_norm!r} must be below 2^31 - 1")
    return problems
