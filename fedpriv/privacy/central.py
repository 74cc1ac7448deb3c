"""Silo-level differential privacy across the federation: DP-FedAvg.

Each silo's update Δ = w_silo − w_global is clipped to L2 norm C, the clipped
updates are summed with equal weight, Gaussian noise N(0, (z_Δ·C)²) is added to
the sum, and the sum is divided by the number of updates (McMahan et al., 2018).
One silo joining or leaving changes the sum by at most C, so each round is a
Gaussian mechanism with noise multiplier z over the silos' whole datasets.

Adaptive clipping (Andrew et al., 2021) moves C towards the `target_quantile`
of the update norms: each silo contributes the bit b = [‖Δ‖ ≤ C]; the noised
fraction b̃ = (Σb + N(0, σ_b²)) / m updates C ← C·exp(−η·(b̃ − γ)). The bits
cost privacy too, so the update noise is raised to
z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) and the round stays a Gaussian mechanism with
overall noise multiplier z (their Theorem 1).

Everything here is numpy only: the coordinator applies it without torch.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import randomgen

from fedpriv.errors import ConfigError

__all__ = [
    "CentralDP",
    "ClipState",
    "add_gaussian_noise",
    "clip_factor",
    "secure_generator",
]

# Noise is drawn in slices of this many elements, so a 50M-parameter model never
# needs a second model-sized buffer.
_NOISE_SLICE = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class CentralDP:
    """DP-FedAvg settings (the coordinator's ``[dp]`` table).

    Args:
        noise_multiplier: Overall noise multiplier z of each round (noise
            standard deviation on the sum over clipping norm).
        clip_norm: Clipping norm C of the first round (the fixed norm when not adaptive).
        adaptive: Adapt C each round towards ``target_quantile`` of the update norms.
        target_quantile: γ, the fraction of updates that should be unclipped.
        clip_learning_rate: η, the geometric step of the clipping norm.
        clipped_count_stddev: σ_b, noise on the count of unclipped updates;
            default ``expected_clients / 20`` (the paper's choice).
        expected_clients: Updates expected per round, for the default σ_b.
        delta: δ at which the federation-level ε is reported.
    """

    noise_multiplier: float
    clip_norm: float
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clipped_count_stddev: float | None = None
    expected_clients: int = 2
    delta: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("noise_multiplier", "clip_norm", "clip_learning_rate"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"dp.{name} = {value!r}: must be a finite number > 0")
        if not 0 < self.target_quantile < 1:
            raise ConfigError(f"dp.target_quantile = {self.target_quantile}: must be in (0, 1)")
        if not 0 < self.delta < 1:
            raise ConfigError(f"dp.delta = {self.delta}: must be in (0, 1)")
        if self.expected_clients < 1:
            raise ConfigError(f"dp.expected_clients = {self.expected_clients}: must be >= 1")
        if self.adaptive and not 2 * self.count_stddev > self.noise_multiplier:
            raise ConfigError(
                f"dp.clipped_count_stddev = {self.count_stddev:g}: adaptive clipping needs "
                f"2 * clipped_count_stddev > dp.noise_multiplier ({self.noise_multiplier:g}), "
                "or the count alone would use up the privacy of the round"
            )

    @property
    def count_stddev(self) -> float:
        """σ_b, the standard deviation of the noise on the unclipped count."""
        if self.clipped_count_stddev is not None:
            return self.clipped_count_stddev
        return self.expected_clients / 20.0

    @property
    def update_noise_multiplier(self) -> float:
        """z_Δ, the noise multiplier applied to the sum of updates.

        Example:
            >>> CentralDP(noise_multiplier=1.0, clip_norm=1.0).update_noise_multiplier
            1.0
            >>> dp = CentralDP(noise_multiplier=1.0, clip_norm=1.0, adaptive=True,
            ...                clipped_count_stddev=5.0)
            >>> round(dp.update_noise_multiplier, 4)
            1.005
        """
        z = self.noise_multiplier
        if not self.adaptive:
            return z
        return float((z**-2 - (2.0 * self.count_stddev) ** -2) ** -0.5)


class ClipState:
    """The clipping norm of the next round and its adaptive update.

    Args:
        dp: Settings.
        clip_norm: Current norm (the stored one after a restart); default ``dp.clip_norm``.
    """

    def __init__(self, dp: CentralDP, *, clip_norm: float | None = None) -> None:
        self.dp = dp
        self.clip_norm = dp.clip_norm if clip_norm is None else clip_norm

    def noise_stddev(self) -> float:
        """Standard deviation of the noise added to this round's sum of updates."""
        return self.dp.update_noise_multiplier * self.clip_norm

    def update(self, *, unclipped: int, count: int, rng: np.random.Generator) -> float:
        """Adapt the norm from this round's `unclipped` of `count` updates.

        Returns the noised unclipped fraction that was used; the true one is never released.

        Example:
            >>> state = ClipState(CentralDP(noise_multiplier=1e-3, clip_norm=1.0, adaptive=True,
            ...                             clipped_count_stddev=1e-3))
            >>> _ = state.update(unclipped=4, count=4, rng=np.random.default_rng(0))
            >>> round(state.clip_norm, 4)  # every update was unclipped: C shrinks by exp(-0.1)
            0.9048
        """
        if count < 1:
            raise ValueError("count must be >= 1")
        noised = (unclipped + rng.normal(0.0, self.dp.count_stddev)) / count
        if self.dp.adaptive:
            self.clip_norm *= math.exp(
                -self.dp.clip_learning_rate * (noised - self.dp.target_quantile)
            )
        return float(noised)


def clip_factor(norm: float, clip_norm: float) -> float:
    """Scale that brings an update of L2 `norm` within `clip_norm` (1.0 if already within).

    Example:
        >>> clip_factor(4.0, 1.0), clip_factor(0.5, 1.0)
        (0.25, 1.0)
    """
    if not math.isfinite(norm) or norm < 0:
        raise ValueError(f"norm must be finite and >= 0, got {norm}")
    return 1.0 if norm <= clip_norm else clip_norm / norm


def secure_generator() -> np.random.Generator:
    """A numpy generator over a cryptographic keystream, keyed from the OS CSPRNG.

    AES-128 in counter mode (randomgen's ``AESCounter``) where the CPU has AES
    instructions, ChaCha20 elsewhere (software AES would leak its key through
    cache timing; ChaCha20 runs in constant time). Each call draws a fresh key
    from ``secrets``, so no seed that numpy, torch or a user sets bears on it,
    and without the key the output cannot be told from random.

    Example:
        >>> a, b = secure_generator(), secure_generator()
        >>> bool((a.random(4) == b.random(4)).all())
        False
    """
    return np.random.Generator(_keystream_bit_generator(prefer_aes=True))


def _keystream_bit_generator(*, prefer_aes: bool) -> np.random.BitGenerator:
    """AES-CTR under a fresh 128-bit key if `prefer_aes` and AES-NI is there, else ChaCha20."""
    if prefer_aes:
        aes = randomgen.AESCounter(key=secrets.randbits(128))
        if aes.use_aesni:
            chosen: np.random.BitGenerator = aes
            return chosen
    chacha: np.random.BitGenerator = randomgen.ChaCha(key=secrets.randbits(256), rounds=20)
    return chacha


def add_gaussian_noise(
    values: npt.NDArray[np.floating], *, stddev: float, rng: np.random.Generator
) -> None:
    """Add N(0, stddev²) to every element of the 1-d float array `values`, in place."""
    if stddev < 0 or not math.isfinite(stddev):
        raise ValueError(f"stddev must be finite and >= 0, got {stddev}")
    if stddev == 0:
        return
    dtype = values.dtype if values.dtype in (np.float32, np.float64) else np.dtype(np.float64)
    buffer = np.empty(min(_NOISE_SLICE, values.size), dtype=dtype)
    for start in range(0, values.size, _NOISE_SLICE):
        part = values[start : start + _NOISE_SLICE]
        noise = buffer[: part.size]
        rng.standard_normal(out=noise, dtype=dtype.type)
        noise *= dtype.type(stddev)
        part += noise
