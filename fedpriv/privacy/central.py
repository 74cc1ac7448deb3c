"""Silo-level differential privacy across the federation: DP-FedAvg.

Each silo's update Δ = w_silo − w_global is clipped to L2 norm C, the clipped
updates are summed with equal weight, Gaussian noise N(0, (z_Δ·C)²) is added to
the sum, and the sum is divided by the number of updates (McMahan et al., 2018).
One silo's update added to or removed from the sum changes it by at most C, so
each round is a Gaussian mechanism with noise multiplier z over the silos' whole
datasets. The number of updates is treated as public: the guarantee covers what
the released models (and, with adaptive clipping, norms) reveal about the data
of a silo that took part, not whether it took part.

Adaptive clipping (Andrew et al., 2021, Algorithm 1) moves C towards the
`target_quantile` γ of the update norms. Each accepted update contributes the
bit b = [‖Δ‖ ≤ C], centred as b − ½, and the round releases

    b̃ = (Σ (b − ½) + N(0, σ_b²)) / M + ½,

where M = ``expected_clients`` is a configured constant, never the round's true
count. The next norm C ← C·exp(−η·(b̃ − γ)) is computed from b̃ alone. Adding or
removing one silo changes Σ (b − ½) by exactly ½, whatever its bit and the
others' (``CentralDP.count_sensitivity``); the uncentred Σ b would change by 1.
The released pair is then one Gaussian mechanism on the vector
(Σ clipped Δ, Σ (b − ½)) with sensitivities (C, ½) and noise (z_Δ·C, σ_b), whose
noise multiplier z satisfies z⁻² = z_Δ⁻² + (σ_b/½)⁻². The update noise is raised
to z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) so that the round costs exactly the configured z
(their Theorem 1). M only scales b̃: it changes how fast C moves, not the
privacy. With fixed clipping no count is computed or released.

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
from fedpriv.privacy.accounting import DEFAULT_DELTA

__all__ = [
    "CentralDP",
    "ClipState",
    "add_gaussian_noise",
    "clip_factor",
    "secure_generator",
]

# Adding or removing one silo changes the centred count Σ (b − ½) by exactly ½.
_COUNT_SENSITIVITY = 0.5

# Noise is drawn in slices of this many elements, so a 50M-parameter model never
# needs a second model-sized buffer.
_NOISE_SLICE = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class CentralDP:
    """DP-FedAvg settings (the coordinator's ``[dp]`` table).

    Args:
        noise_multiplier: Overall noise multiplier z of each round: the noise of
            the updates and of the unclipped count together, over their sensitivities.
        clip_norm: Clipping norm C of the first round (the fixed norm when not adaptive).
        adaptive: Adapt C each round towards ``target_quantile`` of the update norms.
        target_quantile: γ, the fraction of updates that should be unclipped.
        clip_learning_rate: η, the geometric step of the clipping norm.
        clipped_count_stddev: σ_b, noise on the centred count of unclipped
            updates; default ``expected_clients / 20`` (the paper's choice).
            Adaptive clipping needs σ_b > z/2.
        expected_clients: M, the updates expected per round: the centred count is
            divided by this public constant (never by the true count), and it
            sets the default σ_b. A round with more or fewer updates moves C
            more or less; its privacy does not depend on M.
        delta: δ at which the federation-level ε is reported.
    """

    noise_multiplier: float
    clip_norm: float
    adaptive: bool = False
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2
    clipped_count_stddev: float | None = None
    expected_clients: int = 2
    delta: float = DEFAULT_DELTA

    def __post_init__(self) -> None:
        for name in ("noise_multiplier", "clip_norm", "clip_learning_rate"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigError(f"dp.{name} = {value!r}: must be a finite number > 0")
        if not 0 < self.target_quantile < 1:
            raise ConfigError(f"dp.target_quantile = {self.target_quantile}: must be in (0, 1)")
        if not 0 < self.delta < 1:
            raise ConfigError(f"dp.delta = {self.delta}: must be in (0, 1)")
        if (
            isinstance(self.expected_clients, bool)
            or not isinstance(self.expected_clients, int)
            or self.expected_clients < 1
        ):
            raise ConfigError(
                f"dp.expected_clients = {self.expected_clients!r}: must be an integer >= 1"
            )
        stddev = self.clipped_count_stddev
        if stddev is not None and not (
            isinstance(stddev, int | float) and math.isfinite(stddev) and stddev > 0
        ):
            raise ConfigError(f"dp.clipped_count_stddev = {stddev!r}: must be a finite number > 0")
        if self.adaptive and not self.count_stddev > _COUNT_SENSITIVITY * self.noise_multiplier:
            raise ConfigError(
                f"dp.clipped_count_stddev = {self.count_stddev:g}: adaptive clipping needs "
                f"clipped_count_stddev > dp.noise_multiplier / 2 ({self.noise_multiplier / 2:g}), "
                "or the count alone would use up the privacy of the round; raise it "
                "(the default is dp.expected_clients / 20)"
            )

    @property
    def count_stddev(self) -> float:
        """σ_b, the standard deviation of the noise on the centred unclipped count."""
        if self.clipped_count_stddev is not None:
            return self.clipped_count_stddev
        return self.expected_clients / 20.0

    @property
    def count_sensitivity(self) -> float:
        """L2 sensitivity of the centred count Σ (b − ½) to one silo added or removed: ½.

        Example:
            >>> CentralDP(noise_multiplier=1.0, clip_norm=1.0).count_sensitivity
            0.5
        """
        return _COUNT_SENSITIVITY

    @property
    def update_noise_multiplier(self) -> float:
        """z_Δ, the noise multiplier applied to the sum of updates.

        With adaptive clipping, z_Δ = (z⁻² − (σ_b / count_sensitivity)⁻²)^(−1/2),
        so that the updates (sensitivity C, noise z_Δ·C) and the centred count
        (sensitivity ½, noise σ_b) together are a Gaussian mechanism with noise
        multiplier z.

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
        return float((z**-2 - (self.count_stddev / self.count_sensitivity) ** -2) ** -0.5)


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

    @staticmethod
    def centred_count(*, unclipped: int, count: int) -> float:
        """Σ (b − ½) over `count` updates of which `unclipped` were within the norm.

        This is the value the count noise is added to. One silo added or removed
        changes it by exactly ½ (``CentralDP.count_sensitivity``).

        Example:
            >>> ClipState.centred_count(unclipped=3, count=4)
            1.0
        """
        if not 0 <= unclipped <= count:
            raise ValueError(f"need 0 <= unclipped <= count, got {unclipped} of {count}")
        return unclipped - count / 2

    def update(self, *, unclipped: int, count: int, rng: np.random.Generator) -> float:
        """Adapt the norm from this round's `unclipped` of `count` updates.

        Releases b̃ = (Σ (b − ½) + N(0, σ_b²)) / M + ½ with M = ``dp.expected_clients``
        and moves the norm to C·exp(−η·(b̃ − γ)). Only b̃ and the new norm depend
        on the bits; the true count is never released.

        Returns:
            b̃, the noised unclipped fraction (an estimate: it may leave [0, 1]).

        Raises:
            ValueError: Clipping is fixed (no count is accounted, so none may be
                released), or `unclipped` is not within [0, `count`].

        Example:
            >>> state = ClipState(CentralDP(noise_multiplier=1e-3, clip_norm=1.0, adaptive=True,
            ...                             clipped_count_stddev=1e-3, expected_clients=4))
            >>> _ = state.update(unclipped=4, count=4, rng=np.random.default_rng(0))
            >>> round(state.clip_norm, 4)  # every update was unclipped: C shrinks by exp(-0.1)
            0.9048
        """
        if not self.dp.adaptive:
            raise ValueError("fixed clipping accounts no unclipped count; none may be released")
        statistic = self.centred_count(unclipped=unclipped, count=count)
        noised = (statistic + rng.normal(0.0, self.dp.count_stddev)) / self.dp.expected_clients
        noised += 0.5
        self.clip_norm *= math.exp(-self.dp.clip_learning_rate * (noised - self.dp.target_quantile))
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
