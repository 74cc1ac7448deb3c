"""Updates in the ring Z/2^32: clipping, fixed-point scaling, rounding, Skellam noise.

A silo's update Δ (new weights minus global weights, every float tensor
flattened) is clipped to L2 norm C, multiplied by the scale s and rounded to
integers by stochastic rounding. With noise the rounding is conditional
(Kairouz et al., 2021): redrawn until the rounded vector's norm is within a
known bound, which is then the L2 sensitivity of the integer sum that the
noise is accounted against. With distributed DP each silo adds
Skellam noise Sk(μ_i) = Poisson(μ_i/2) − Poisson(μ_i/2); a sum of independent
Skellams is Skellam, so the published sum carries exactly Sk(m·μ_i) for m
surviving silos (Agarwal et al., 2021); with k colluding silos tolerated, the
noise nobody but the honest silos knows is Sk((m − k)·μ_i).

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
# numpy's Poisson sampler keeps its variance within 0.1% up to rates of 1e13 but is
# off by 4-10% from 1e14 on (measured over 2M draws, numpy 2.4); Skellam halves stay
# at or below this rate.
_MAX_POISSON_RATE = 1e12


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
        """Clip, scale, round and noise `delta` (the fused pass of a silo, without masks).

        Returns the ring vector and the norm of `delta` before clipping. The ring
        vector is reused by this thread's next ``encode``: send it before then.
        """
        from fedpriv.secagg.fused import encode_masked, upload_buffer

        if delta.shape != (self.size,):
            raise ValueError(f"update has shape {delta.shape}, expected ({self.size},)")
        out = upload_buffer(self.size)
        zero = np.broadcast_to(np.float64(0.0), delta.shape)
        norm = encode_masked(self, [delta], [zero], [], out, generator=lambda: rng, threads=1)
        return out, norm

    def decode(self, total: npt.NDArray[np.uint32]) -> npt.NDArray[np.float64]:
        """Map a ring sum back to a float sum of (clipped, noised) updates."""
        return total.view(np.int32).astype(np.float64) / self.scale
