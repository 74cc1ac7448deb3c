"""Updates in the ring Z/2^32: clipping, fixed-point scaling, rounding, Skellam noise.

A silo's update Δ (new weights minus global weights, every float tensor
flattened) is clipped to L2 norm C, multiplied by the scale s and rounded to
integers by conditional stochastic rounding (Kairouz et al., 2021): rounding is
redrawn until the rounded vector's norm is within a known bound, which is then
the L2 sensitivity of the integer sum. With distributed DP each silo adds
Skellam noise Sk(μ_i) = Poisson(μ_i/2) − Poisson(μ_i/2); a sum of independent
Skellams is Skellam, so the published sum carries exactly Sk(m·μ_i) for m
surviving silos (Agarwal et al., 2021).

The scale leaves headroom for n clipped updates plus eight standard
deviations of noise, so the signed sum never wraps around 2^32 in practice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["RingCodec"]

_HALF_RING = 2**31
_BETA = math.exp(-0.5)  # conditional rounding failure bound of Kairouz et al.
_MAX_REDRAWS = 100


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
    ) -> RingCodec:
        """Pick the scale for `clients` updates and the per-silo noise for `threshold` survivors.

        With noise, any `threshold` survivors together add noise of standard
        deviation ``noise_multiplier · C`` (in update units): the guarantee holds
        even if only the threshold survive.
        """
        spread = clients + 8.0 * noise_multiplier * math.sqrt(clients / threshold)
        scale = (_HALF_RING - clients - 1) / (clip_norm * spread) / 2.0
        variance = (scale * noise_multiplier * clip_norm) ** 2 / threshold
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

        Returns the ring vector and the norm of `delta` before clipping.
        """
        if delta.shape != (self.size,):
            raise ValueError(f"update has shape {delta.shape}, expected ({self.size},)")
        # In place where possible: each pass over a 10M-element float64 vector costs ~10 ms.
        values = np.array(delta, dtype=np.float64)
        norm = math.sqrt(float(np.dot(values, values)))
        if not math.isfinite(norm):
            raise ValueError("the update has NaN or infinite values")
        values *= self.scale * min(1.0, self.clip_norm / norm) if norm > 0 else self.scale
        floor = np.floor(values)
        values -= floor  # the fractional parts
        bound = self.l2_sensitivity**2
        for _ in range(_MAX_REDRAWS):
            # float32 uniforms: the rounding probabilities are off by < 2^-24, and the
            # norm bound, which is all the privacy analysis uses, is checked exactly.
            rounded = floor + (rng.random(self.size, dtype=np.float32) < values)
            if float(np.dot(rounded, rounded)) <= bound:
                break
        else:  # probability below 0.6^100; a bug rather than bad luck
            raise RuntimeError("conditional rounding failed to meet its norm bound")
        # |rounded| <= scale * clip_norm < 2^31 by the choice of scale, and so is the noise.
        integers = rounded.astype(np.int32)
        if self.noise_variance > 0:
            half = self.noise_variance / 2.0
            noise = rng.poisson(half, self.size)
            noise -= rng.poisson(half, self.size)
            integers += noise.astype(np.int32)
        return integers.view(np.uint32), norm

    def decode(self, total: npt.NDArray[np.uint32]) -> npt.NDArray[np.float64]:
        """Map a ring sum back to a float sum of (clipped, noised) updates."""
        return total.view(np.int32).astype(np.float64) / self.scale
