"""Updates in the ring Z/2^32: clipping, fixed-point scaling, rounding, Skellam noise.

A silo's update Δ (new weights minus global weights, every float tensor
flattened) is clipped to L2 norm C, multiplied by the scale s and rounded to
integers by conditional stochastic rounding (Kairouz et al., 2021): rounding is
redrawn until the rounded vector's norm is within a known bound, which is then
the L2 sensitivity of the integer sum. With distributed DP each silo adds
Skellam noise Sk(μ_i) = Poisson(μ_i/2) − Poisson(μ_i/2); a sum of independent
Skellams is Skellam, so the published sum carries exactly Sk(m·μ_i) for m
surviving silos (Agarwal et al., 2021); with k colluding silos tolerated, the
noise nobody but the honest silos knows is Sk((m − k)·μ_i).

The scale leaves headroom for n clipped updates plus eight standard
deviations of noise, so the signed sum never wraps around 2^32 in practice.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["RingCodec"]

_HALF_RING = 2**31
_BETA = math.exp(-0.5)  # conditional rounding failure bound of Kairouz et al.
_MAX_REDRAWS = 100
# numpy's Poisson sampler keeps its variance within 0.1% up to rates of 1e13 but is
# off by 4-10% from 1e14 on (measured over 2M draws, numpy 2.4); Skellam halves stay
# at or below this rate.
_MAX_POISSON_RATE = 1e12

# Work vectors per thread, reused from round to round: a fresh 80 MB vector costs
# the kernel a zeroed page per 4 KiB (about 0.3 s here), a reused one nothing.
_WORK = threading.local()


def _work(name: str, size: int, dtype: type[np.generic]) -> npt.NDArray[Any]:
    """This thread's `name` vector of `size` × `dtype` (its contents are stale)."""
    vectors: dict[str, npt.NDArray[Any]] = getattr(_WORK, "vectors", {})
    _WORK.vectors = vectors
    vector = vectors.get(name)
    if vector is None or vector.size != size or vector.dtype != dtype:
        vector = vectors[name] = np.empty(size, dtype)
    return vector


@dataclass(frozen=True, slots=True, kw_only=True)
class RingCodec:
    """How updates map into Z/2^32 for one round (announced to silos in the task).

    Args:
        clip_norm: C, the L2 norm every update is clipped to.
        scale: s, fixed-point scale (integer units per unit of update).
        size: Elements per update (P).
        noise_variance: μ_i, Skellam variance each silo adds, in integer units (0: none).
    """

    clip_norm: float
    scale: float
    size: int
    noise_variance: float = 0.0

    @classmethod
    def plan(
        cls,
        *,
        clip_norm: float,
        size: int,
        clients: int,
        threshold: int,
        noise_multiplier: float = 0.0,
        tolerate_colluders: int = 0,
    ) -> RingCodec:
        """Pick the scale for `clients` updates and the per-silo noise for `threshold` survivors.

        With noise, any `threshold` survivors together add noise of standard
        deviation ``noise_multiplier · C`` (in update units) even after
        `tolerate_colluders` of them remove their own noise (a silo that colludes
        with the coordinator knows its noise and can subtract it): each silo adds
        variance ``(s·z·C)² / (threshold − tolerate_colluders)``, and the guarantee
        holds even if only the threshold survive.

        Raises:
            ValueError: `tolerate_colluders` is not in ``[0, threshold)``, or
                `threshold` is not in ``[1, clients]``.
        """
        if not 1 <= threshold <= clients:
            raise ValueError(f"threshold {threshold}: must be in [1, clients ({clients})]")
        if not 0 <= tolerate_colluders < threshold:
            raise ValueError(
                f"tolerate_colluders {tolerate_colluders}: must be in [0, threshold ({threshold}))"
            )
        honest = threshold - tolerate_colluders
        # Headroom for `clients` clipped updates plus 8 standard deviations of all their noise.
        spread = clients + 8.0 * noise_multiplier * math.sqrt(clients / honest)
        scale = (_HALF_RING - clients - 1) / (clip_norm * spread) / 2.0
        variance = (scale * noise_multiplier * clip_norm) ** 2 / honest
        if variance / 2.0 > _MAX_POISSON_RATE:
            # Fewer fixed-point bits, so each Poisson half stays where numpy's sampler has
            # the variance the accounting assumes; the rounding error (variance <= 1/4 per
            # element) stays negligible beside noise of this size.
            scale *= math.sqrt(2.0 * _MAX_POISSON_RATE / variance)
            variance = (scale * noise_multiplier * clip_norm) ** 2 / honest
        return cls(clip_norm=clip_norm, scale=scale, size=size, noise_variance=variance)

    @property
    def l2_sensitivity(self) -> float:
        """Bound on the L2 norm of one silo's rounded update, in integer units."""
        c = self.scale * self.clip_norm
        d = self.size
        return math.sqrt(
            c * c + d / 4.0 + math.sqrt(2.0 * math.log(1.0 / _BETA)) * (c + math.sqrt(d) / 2.0)
        )

    @property
    def l1_sensitivity(self) -> float:
        """Bound on the L1 norm of one silo's rounded update (integer vectors: ≤ L2², √d·L2)."""
        l2 = self.l2_sensitivity
        return min(l2 * l2, math.sqrt(self.size) * l2)

    def encode(
        self, delta: npt.NDArray[np.floating], *, rng: np.random.Generator
    ) -> tuple[npt.NDArray[np.uint32], float]:
        """Clip, scale, round and noise `delta`.

        Returns the ring vector and the norm of `delta` before clipping. The ring
        vector is reused by this thread's next ``encode``: send it before then.
        """
        if delta.shape != (self.size,):
            raise ValueError(f"update has shape {delta.shape}, expected ({self.size},)")
        # In place, in this thread's reused vectors: each pass over a 10M-element
        # float64 vector costs ~10 ms, each fresh vector far more.
        values = _work("values", self.size, np.float64)
        np.copyto(values, delta)
        norm = math.sqrt(float(np.dot(values, values)))
        if not math.isfinite(norm):
            raise ValueError("the update has NaN or infinite values")
        values *= self.scale * min(1.0, self.clip_norm / norm) if norm > 0 else self.scale
        floor = np.floor(values, out=_work("floor", self.size, np.float64))
        values -= floor  # the fractional parts
        values *= 2.0**32  # as thresholds for 32-bit uniform integers (exact: a power of 2)
        bound = self.l2_sensitivity**2
        up = _work("up", self.size, np.bool_)
        rounded = _work("rounded", self.size, np.float64)
        for _ in range(_MAX_REDRAWS):
            # Raw 32-bit words straight from the bit generator, a cryptographic keystream
            # under secure_generator(), at half the cost of float uniforms through numpy's
            # Generator. Round up with probability frac to within 2^-32; the norm bound,
            # which is all the privacy analysis uses, is checked exactly.
            words = rng.bit_generator.random_raw((self.size + 1) // 2).view(np.uint32)
            np.less(words[: self.size], values, out=up)
            np.add(floor, up, out=rounded)
            if float(np.dot(rounded, rounded)) <= bound:
                break
        else:  # probability below 0.6^100; a bug rather than bad luck
            raise RuntimeError("conditional rounding failed to meet its norm bound")
        # |rounded| <= scale * clip_norm < 2^31 by the choice of scale, and so is the noise.
        # The result is this thread's vector too: the caller sends it before encoding again.
        integers = _work("integers", self.size, np.int32)
        np.copyto(integers, rounded, casting="unsafe")
        if self.noise_variance > 0:
            half = self.noise_variance / 2.0
            noise = rng.poisson(half, self.size)
            noise -= rng.poisson(half, self.size)
            integers += noise.astype(np.int32)
        return integers.view(np.uint32), norm

    def decode(self, total: npt.NDArray[np.uint32]) -> npt.NDArray[np.float64]:
        """Map a ring sum back to a float sum of (clipped, noised) updates."""
        return total.view(np.int32).astype(np.float64) / self.scale
