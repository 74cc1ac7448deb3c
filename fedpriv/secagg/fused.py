"""Encode and mask in one pass over cache-sized slices, on every core.

A silo's masked update is, element by element,

    y = round(s · f · (new − old)) + noise + Σ_seeds ±PRG(seed)   (mod 2^32)

with f = min(1, C / ‖new − old‖) and stochastic rounding, conditional (redrawn
until the rounded norm meets the bound the noise is accounted against) when the
codec adds noise (see :class:`~fedpriv.secagg.ring.RingCodec`). :func:`encode_masked` computes it
slice by slice (:func:`slice_elements`, sized to stay in cache), straight from the
model's tensors into the upload buffer: no model-sized float or mask vector is
made. The vector is cut into one contiguous range per thread; AES-CTR starts
at any block, so each thread expands its own part of every keystream, and
``cryptography`` and numpy release the GIL while they work.

The coordinator removes masks the same way (:func:`apply_masks`).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedpriv.errors import ConfigError

if TYPE_CHECKING:
    from fedpriv.secagg.ring import RingCodec

__all__ = [
    "SLICE",
    "WIDE_SLICE",
    "apply_masks",
    "encode_masked",
    "secagg_threads",
    "slice_elements",
    "threads_available",
    "upload_buffer",
]

SLICE = 1 << 15  # elements: 128 KiB of uint32, 256 KiB of float64
WIDE_SLICE = 1 << 17  # 512 KiB of uint32: mask removal, and encoding on several threads
_ZEROS = bytes(4 * WIDE_SLICE + 16)
_MAX_REDRAWS = 100
Mask = tuple[bytes, bool]  # (seed, add: True adds PRG(seed), False subtracts it)
_Segment = tuple[int, int, int, int]  # (tensor, start, stop, global offset)


_BUFFERS = threading.local()


def upload_buffer(size: int) -> npt.NDArray[np.uint32]:
    """This thread's reusable uint32 vector of `size` (stale contents).

    A fresh model-sized vector costs the kernel a zeroed page per 4 KiB each round.
    """
    vector: npt.NDArray[np.uint32] | None = getattr(_BUFFERS, "vector", None)
    if vector is None or vector.size != size:
        vector = _BUFFERS.vector = np.empty(size, np.uint32)
    return vector


def secagg_threads() -> int:
    """Threads for a silo's fused pass: ``FEDPRIV_SECAGG_THREADS``, else 1.

    More threads pay on a silo that has its cores to itself (0: every core).

    Raises:
        ConfigError: The variable is not a whole number >= 0.
    """
    raw = os.environ.get("FEDPRIV_SECAGG_THREADS", "1").strip()
    if not raw.isdigit():
        raise ConfigError(f"FEDPRIV_SECAGG_THREADS = {raw!r}: must be a whole number >= 0")
    return int(raw) or threads_available()


def threads_available() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class _Keystreams:
    """The AES-CTR keystreams of several seeds, read on from element `first`."""

    def __init__(self, masks: Sequence[Mask], first: int, width: int) -> None:
        block, skip = divmod(4 * first, 16)
        self._streams = []
        for seed, add in masks:
            cipher = Cipher(algorithms.AES(seed), modes.CTR(block.to_bytes(16, "big")))
            encryptor = cipher.encryptor()
            encryptor.update(bytes(skip))
            self._streams.append((encryptor, add))
        self._buffer = bytearray(4 * width + 16)
        self._words = np.frombuffer(self._buffer, dtype="<u4", count=width)

    def words(self, n: int) -> npt.NDArray[np.uint32]:
        """The next `n` words of the first keystream (valid until the next call)."""
        self._streams[0][0].update_into(memoryview(_ZEROS)[: 4 * n], self._buffer)
        return self._words[:n]

    def apply(self, target: npt.NDArray[np.uint32], *, sign: int = 1) -> None:
        """Add (sign 1) or subtract (sign -1) the next `target.size` elements of each mask."""
        n = target.size
        plain = memoryview(_ZEROS)[: 4 * n]
        for encryptor, add in self._streams:
            encryptor.update_into(plain, self._buffer)
            if add == (sign > 0):
                np.add(target, self._words[:n], out=target)
            else:
                np.subtract(target, self._words[:n], out=target)


def _squares(values: npt.NDArray[np.float64]) -> float:
    """Σ values², without BLAS.

    A dot product per slice hands off to BLAS's threads, which spin, and silos
    sharing cores then wait on each other's (45x slower here).
    """
    return float(np.einsum("i,i->", values, values))


def slice_elements(threads: int, *, floats: bool = True) -> int:
    """Elements per slice of a pass on `threads` threads.

    One thread encoding (`floats`: two float64 work vectors per slice) keeps to
    ``SLICE``, whose working set stays in L2. Mask removal holds uint32 alone,
    and several threads queue for the GIL at every numpy and AES call, so both
    take ``WIDE_SLICE``: a quarter of the calls (10M elements, 2 threads: 0.076
    s → 0.051 s to remove 14 masks).
    """
    return SLICE if floats and threads == 1 else WIDE_SLICE


def _segments(sizes: Sequence[int], width: int) -> list[_Segment]:
    out, offset = [], 0
    for index, size in enumerate(sizes):
        for start in range(0, size, width):
            stop = min(size, start + width)
            out.append((index, start, stop, offset + start))
        offset += size
    return out


def _split(segments: list[_Segment], parts: int) -> list[list[_Segment]]:
    """Contiguous groups of about equal element counts."""
    total = sum(stop - start for _, start, stop, _ in segments)
    groups: list[list[_Segment]] = [[] for _ in range(parts)]
    done = 0
    for segment in segments:
        groups[min(parts - 1, done * parts // max(1, total))].append(segment)
        done += segment[2] - segment[1]
    return [g for g in groups if g]


def _run(parts: int, work: Any, groups: list[list[_Segment]]) -> list[Any]:
    if len(groups) == 1:
        return [work(groups[0])]
    with ThreadPoolExecutor(max_workers=parts, thread_name_prefix="fedpriv-secagg") as pool:
        return list(pool.map(work, groups))


def _flat(value: npt.ArrayLike) -> npt.NDArray[Any]:
    return np.asarray(value).reshape(-1)


def encode_masked(
    codec: RingCodec,
    new: Sequence[npt.ArrayLike],
    old: Sequence[npt.ArrayLike],
    masks: Sequence[Mask],
    out: npt.NDArray[np.uint32],
    *,
    generator: Callable[[], np.random.Generator],
    threads: int | None = None,
) -> float:
    """Write the masked ring encoding of ``new − old`` into `out`; return ‖new − old‖.

    `new` and `old` are the model's tensors in layout order (any float dtype).
    `generator` gives each thread its randomness: 32 bytes that key the rounding's
    AES-256-CTR words, and the noise. In a silo it is a cryptographic one
    (``fedpriv.privacy.central.secure_generator``).

    Raises:
        ValueError: The sizes disagree, or the update has NaN or infinite values.
    """
    news = [_flat(v) for v in new]
    olds = [_flat(v) for v in old]
    sizes = [v.size for v in news]
    if sizes != [v.size for v in olds] or sum(sizes) != codec.size or out.shape != (codec.size,):
        raise ValueError(f"the update has {sum(sizes)} elements, the ring {codec.size}")
    parts = max(1, threads or threads_available())
    width = slice_elements(parts)
    groups = _split(_segments(sizes, width), parts)

    def difference(index: int, start: int, stop: int, d: npt.NDArray[np.float64]) -> None:
        # new − old, exactly, in float64: a copy then a mixed subtraction costs 40%
        # less than subtract(..., dtype=float64), which casts both operands.
        np.copyto(d, news[index][start:stop])
        np.subtract(d, olds[index][start:stop], out=d)

    def squares(group: list[_Segment]) -> float:
        scratch = np.empty(width, np.float64)
        total = 0.0
        for index, start, stop, _ in group:
            d = scratch[: stop - start]
            difference(index, start, stop, d)
            total += _squares(d)
        return total

    norm = math.sqrt(sum(_run(parts, squares, groups)))
    if not math.isfinite(norm):
        raise ValueError("the update has NaN or infinite values")
    factor = codec.scale * min(1.0, codec.clip_norm / norm) if norm > 0 else codec.scale
    half_noise = codec.noise_variance / 2.0
    # The rounded norm bounds the sensitivity that distributed DP's noise is accounted
    # against; without noise nothing is accounted and one draw of the rounding is kept.
    conditional = codec.noise_variance > 0

    def encode(group: list[_Segment]) -> float:
        rng = generator()
        streams = _Keystreams(masks, group[0][3], width)
        # Rounding's uniform words: AES-256-CTR under a fresh key drawn from `rng`.
        rounding = _Keystreams([(rng.bytes(32), True)], 0, width)
        values = np.empty(width, np.float64)
        uniform = np.empty(width, np.float64)
        total = 0.0
        for index, start, stop, offset in group:
            n = stop - start
            v, u = values[:n], uniform[:n]
            difference(index, start, stop, v)
            v *= factor
            # Stochastic rounding: floor(v + w / 2^32), w uniform on [0, 2^32), rounds
            # up with probability frac(v) (to within 2^-32).
            np.multiply(rounding.words(n), 2.0**-32, out=u)
            v += u
            np.floor(v, out=v)
            if conditional:
                total += _squares(v)
            target = out[offset : offset + n]
            np.copyto(target.view(np.int32), v, casting="unsafe")
            if half_noise > 0:
                noise = rng.poisson(half_noise, n) - rng.poisson(half_noise, n)
                target += noise.astype(np.int32).view(np.uint32)
            streams.apply(target)
        return total

    bound = codec.l2_sensitivity**2 if conditional else math.inf
    for _ in range(_MAX_REDRAWS):
        # Rounding is redrawn (masks and all) until the rounded norm meets its bound.
        if sum(_run(parts, encode, groups)) <= bound:
            return norm
    raise RuntimeError("conditional rounding failed to meet its norm bound")


def apply_masks(
    total: npt.NDArray[np.uint32],
    masks: Sequence[Mask],
    *,
    sign: int = -1,
    threads: int | None = None,
) -> None:
    """Add (sign 1) or remove (sign -1) `masks` from `total` in place, in parallel slices."""
    if not masks or total.size == 0:
        return
    parts = max(1, threads or threads_available())
    width = slice_elements(parts, floats=False)
    groups = _split(_segments([total.size], width), parts)

    def work(group: list[_Segment]) -> None:
        streams = _Keystreams(masks, group[0][3], width)
        for _, start, stop, _ in group:
            streams.apply(total[start:stop], sign=sign)

    _run(parts, work, groups)
