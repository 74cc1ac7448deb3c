"""The coordinator's per-concern settings: TLS files, rounds, secure aggregation, strategy, model.

Each type is frozen and checks its own values on construction; :mod:`fedpriv.coordinator.config`
puts them together and reads them from TOML.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from fedpriv._types import Scalar
from fedpriv.coordinator.pacing import Pace
from fedpriv.errors import ConfigError
from fedpriv.pki.crl import CRL_FILE
from fedpriv.secagg import graph as graph_plans
from fedpriv.wire import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, Compression
from fedpriv.wire.torch_interop import Exchange

__all__ = [
    "DEFAULT_DEADLINE_S",
    "DEFAULT_MAX_NUM_EXAMPLES",
    "DEFAULT_MAX_UPDATE_VALUE",
    "ModelSource",
    "RoundConfig",
    "SecAggConfig",
    "StrategyConfig",
    "TLSFiles",
]

_GRAPHS = ("auto", "complete", "harary")
DEFAULT_DEADLINE_S = 600.0
# Trained weights, logits and optimiser statistics stay far below a million; 1e6 x a
# weight of 1e7 x 3e25 silos is still float32-finite, so no accepted set of updates
# can overflow the weighted sum.
DEFAULT_MAX_UPDATE_VALUE = 1e6
# Larger than any one silo's dataset here (ImageNet is 1.3 M), small enough that a
# self-reported weight cannot lose integer precision in a float accumulator.
DEFAULT_MAX_NUM_EXAMPLES = 10_000_000
_FLOAT32_MAX = 3.4028234663852886e38
_MAX_EXACT_INTEGER = 2**53


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSFiles:
    """Paths of the federation CA and this party's certificate and key.

    Args:
        ca: The federation CA certificate.
        cert: This party's certificate.
        key: This party's private key.
        crl: The revocation list the coordinator enforces (``tls.crl``); it must
            exist. None: ``ca.crl`` beside the CA certificate, enforced once it
            exists (``fedpriv pki revoke`` writes it there).
    """

    ca: pathlib.Path
    cert: pathlib.Path
    key: pathlib.Path
    crl: pathlib.Path | None = None

    @property
    def crl_path(self) -> pathlib.Path:
        """The CRL file to enforce: `crl`, else ``ca.crl`` beside `ca`."""
        return self.crl if self.crl is not None else self.ca.parent / CRL_FILE


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundConfig:
    """How rounds are scheduled.

    Args:
        num_rounds: Rounds to complete before the federation finishes.
        min_clients: Silos that must be connected to start a round.
        min_results: Accepted updates needed to finish a round (0: equal to
            ``min_clients``); fewer and the round fails without publishing a model.
        max_clients: Silos selected per round (0: every available silo).
        deadline_s: Time a selected silo has to return its update.
        federated_evaluation: Ask the round's silos to evaluate each new model.
        evaluation_deadline_s: Time silos have to return evaluation metrics.
        max_failed_attempts: Consecutive failed attempts at one round before the
            coordinator gives up.
        retry_backoff_s: Wait before the second attempt at a failed round; it doubles
            with each further failure, up to a minute (0: retry at once).
        client_config: Values sent to silos with every task (epochs, lr, ...).
        update_compression: How silos compress their updates on the wire
            ("none", "fp16", "bf16" or "int8"; float32 models only).
        max_update_value: Largest absolute value of any floating-point element of
            an update; an update beyond it is rejected (reason ``bounds``), so that
            no accepted update can overflow the weighted sum.
        max_num_examples: Largest ``num_examples`` (an update's self-reported
            weight) accepted; an update above it is rejected (reason ``num_examples``).
            Set it near the largest silo's dataset so that no silo can claim to
            outweigh the others.
        pace: ``"slowest"``: every silo does its full work each round. ``"balanced"``:
            a silo whose reported pace would make the round wait for it gets a step
            budget that fits the median silo's round time (fedpriv.coordinator.pacing).
    """

    num_rounds: int = 3
    min_clients: int = 2
    min_results: int = 0
    max_clients: int = 0
    deadline_s: float = DEFAULT_DEADLINE_S
    federated_evaluation: bool = True
    evaluation_deadline_s: float = 120.0
    max_failed_attempts: int = 3
    retry_backoff_s: float = 5.0
    client_config: Mapping[str, Scalar] = field(default_factory=dict)
    update_compression: Compression = Compression.NONE
    max_update_value: float = DEFAULT_MAX_UPDATE_VALUE
    max_num_examples: int = DEFAULT_MAX_NUM_EXAMPLES
    pace: Pace = Pace.SLOWEST

    @property
    def required_results(self) -> int:
        """Accepted updates a round needs."""
        return self.min_results or self.min_clients

    def __post_init__(self) -> None:
        for name in ("num_rounds", "min_clients", "max_failed_attempts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rounds.{name} = {getattr(self, name)}: must be >= 1")
        if not (self.retry_backoff_s >= 0 and math.isfinite(self.retry_backoff_s)):
            raise ConfigError(f"rounds.retry_backoff_s = {self.retry_backoff_s}: must be >= 0")
        if not 0 <= self.min_results <= self.min_clients:
            raise ConfigError(
                f"rounds.min_results = {self.min_results}: must be in [0, rounds.min_clients "
                f"({self.min_clients})]; 0 means equal to min_clients"
            )
        if self.max_clients and self.max_clients < self.min_clients:
            raise ConfigError(
                f"rounds.max_clients = {self.max_clients}: must be 0 or >= rounds.min_clients "
                f"({self.min_clients})"
            )
        for name in ("deadline_s", "evaluation_deadline_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"rounds.{name} = {getattr(self, name)}: must be > 0")
        if not 0 < self.max_update_value <= _FLOAT32_MAX:
            raise ConfigError(
                f"rounds.max_update_value = {self.max_update_value}: must be in (0, "
                f"{_FLOAT32_MAX:g}] (float32's largest value); default {DEFAULT_MAX_UPDATE_VALUE:g}"
            )
        if not 1 <= self.max_num_examples <= _MAX_EXACT_INTEGER:
            raise ConfigError(
                f"rounds.max_num_examples = {self.max_num_examples}: must be in [1, 2**53]; "
                f"default {DEFAULT_MAX_NUM_EXAMPLES}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class SecAggConfig:
    """Secure aggregation settings (``secure_aggregation = true`` and the ``[secagg]`` table).

    Args:
        threshold: t, silos whose shares recover a secret; rounds need at least t
            survivors. It must be more than half of every round's silos (else a
            coordinator could collect t shares of both secrets of one silo).
            0: a majority of the round's silos (n // 2 + 1).
        clip_norm: L2 norm each update is clipped to before quantisation (without
            ``[dp]``; with it, ``dp.clip_norm`` is used).
        unmask_deadline_s: Time survivors have to reveal their shares.
        tolerate_colluders: k, silos that may collude with the coordinator (and
            remove their own noise) while the distributed-DP guarantee still
            holds; each silo's noise is scaled up to cover them. In [0, t).
        graph: Who masks with whom: ``"complete"`` (every pair), ``"harary"``
            (SecAgg+: a sparse graph whenever one meets the failure bounds) or
            ``"auto"`` (the sparse graph where it at least halves each silo's masks
            and tolerates a dropout; else the complete graph).
        dropout: With a sparse graph, the fraction of a round's silos that may drop
            out after sharing while the round still unmasks.
        corrupt_fraction: With a sparse graph, the fraction of silos that may
            collude with the coordinator (at least `tolerate_colluders` silos).
        security_bits: σ: the sparse graph leaks more than the sum with
            probability at most 2^-σ.
        correctness_bits: η: the sparse graph fails to unmask with at most the
            tolerated dropouts with probability at most 2^-η.
    """

    threshold: int = 0
    clip_norm: float = 10.0
    unmask_deadline_s: float = 60.0
    tolerate_colluders: int = 0
    graph: str = "auto"
    dropout: float = 0.1
    corrupt_fraction: float = 0.05
    security_bits: int = graph_plans.DEFAULT_SECURITY_BITS
    correctness_bits: int = graph_plans.DEFAULT_CORRECTNESS_BITS

    def __post_init__(self) -> None:
        if self.threshold < 0:
            raise ConfigError(f"secagg.threshold = {self.threshold}: must be >= 0")
        if not self.clip_norm > 0:
            raise ConfigError(f"secagg.clip_norm = {self.clip_norm}: must be > 0")
        if not self.unmask_deadline_s > 0:
            raise ConfigError(f"secagg.unmask_deadline_s = {self.unmask_deadline_s}: must be > 0")
        if self.tolerate_colluders < 0:
            raise ConfigError(
                f"secagg.tolerate_colluders = {self.tolerate_colluders}: must be >= 0"
            )
        if self.graph not in _GRAPHS:
            raise ConfigError(f"secagg.graph = {self.graph!r}: must be one of {', '.join(_GRAPHS)}")
        if not 0 <= self.dropout < 0.5:
            raise ConfigError(f"secagg.dropout = {self.dropout}: must be in [0, 0.5)")
        if not 0 <= self.corrupt_fraction < 0.5:
            raise ConfigError(
                f"secagg.corrupt_fraction = {self.corrupt_fraction}: must be in [0, 0.5)"
            )
        for name in ("security_bits", "correctness_bits"):
            if not 1 <= getattr(self, name) <= 128:
                raise ConfigError(f"secagg.{name} = {getattr(self, name)}: must be in [1, 128]")
        if self.graph == "harary" and self.threshold:
            raise ConfigError(
                f'secagg.threshold = {self.threshold} with secagg.graph = "harary": a sparse '
                'graph plans t per neighbourhood itself; set threshold = 0, or graph = "complete"'
            )
        if self.threshold and self.tolerate_colluders >= self.threshold:
            raise ConfigError(
                f"secagg.tolerate_colluders = {self.tolerate_colluders}: must be less than "
                f"secagg.threshold ({self.threshold}); t survivors with t colluders among "
                "them would leave no honest noise"
            )

    def threshold_for(self, clients: int) -> int:
        """T for a round of `clients` silos.

        Raises:
            ConfigError: T would not be more than half of `clients`, or would exceed it.
        """
        threshold = self.threshold or clients // 2 + 1
        if not clients < 2 * threshold <= 2 * clients:
            raise ConfigError(
                f"secagg.threshold = {threshold} for a round of {clients} silos: must be more "
                f"than half of them and at most all; use 0 for a majority of each round"
            )
        return threshold

    def graph_for(self, clients: int) -> graph_plans.GraphPlan:
        """The masking graph, k and t for a round of `clients` silos.

        Raises:
            ConfigError: The complete graph's threshold does not fit `clients`.
        """
        if self.graph == "harary" or (self.graph == "auto" and not self.threshold):
            colluders = max(self.tolerate_colluders, math.ceil(self.corrupt_fraction * clients))
            sparse = graph_plans.plan(
                silos=clients,
                dropout=self.dropout,
                colluders=colluders,
                security_bits=self.security_bits,
                correctness_bits=self.correctness_bits,
            )
            worth_it = sparse is not None and (
                self.graph == "harary"
                or (2 * sparse.masks_per_silo <= clients and sparse.dropped >= 1)
            )
            if sparse is not None and worth_it and sparse.min_survivors > self.tolerate_colluders:
                return sparse
        return graph_plans.complete_plan(
            silos=clients,
            threshold=self.threshold_for(clients),
            colluders=self.tolerate_colluders,
        )

    def check_round_sizes(self, *, smallest: int, largest: int | None) -> None:
        """Check t and k for every round size from `smallest` to `largest` (None: unbounded).

        Raises:
            ConfigError: Some allowed round size would get a threshold of at most
                half its silos, or k would not stay below the threshold.
        """
        if self.threshold:
            if self.threshold > smallest:
                raise ConfigError(
                    f"secagg.threshold = {self.threshold}: must be <= rounds.min_clients "
                    f"({smallest}), or no round could ever be unmasked"
                )
            if largest is None:
                raise ConfigError(
                    f"secagg.threshold = {self.threshold}: must be more than half of every "
                    "round's silos, but rounds.max_clients = 0 and no federation.allowed_silos "
                    "let a round select any number; set rounds.max_clients to at most "
                    f"{2 * self.threshold - 1}, or use threshold = 0 (a majority of each round)"
                )
            if 2 * self.threshold <= largest:
                raise ConfigError(
                    f"secagg.threshold = {self.threshold}: must be more than half of every "
                    f"round's silos, and a round may select {largest} (rounds.max_clients or "
                    f"federation.allowed_silos); raise it to at least {largest // 2 + 1}, lower "
                    f"rounds.max_clients to {2 * self.threshold - 1}, or use threshold = 0"
                )
        fewest = self.threshold_for(smallest)
        if self.tolerate_colluders >= fewest:
            raise ConfigError(
                f"secagg.tolerate_colluders = {self.tolerate_colluders}: must be less than the "
                f"threshold of the smallest round ({fewest} for rounds.min_clients = {smallest})"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class StrategyConfig:
    """The aggregation rule (the ``[strategy]`` table).

    Args:
        name: A native strategy (``fedavg``, ``fedprox``, ``fedadam``, ``fedyogi``,
            ``fedadagrad``, ``krum``, ``median``, ``trimmed_mean``); None: ``fedavg``.
        flower: A Flower strategy instead of a native one: a class name in
            ``flwr.server.strategy`` (``FedAdam``, ``FedTrimmedAvg``, ``Krum``, ...) or
            ``flwr.serverapp.strategy:NAME`` for the Message API's strategies.
        options: Keyword arguments for the strategy.
    """

    name: str | None = None
    flower: str | None = None
    options: Mapping[str, Scalar] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.name is not None and self.flower is not None:
            raise ConfigError(
                f"strategy.name = {self.name!r} and strategy.flower = {self.flower!r}: "
                "give one of them"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSource:
    """Where the initial global model comes from: a factory or a checkpoint (one of them)."""

    factory: str | None = None
    checkpoint: pathlib.Path | None = None
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    # Which tensors of a torch module the factory returns make the global model: its
    # trainable parameters and buffers (as TorchClient exchanges them), or all.
    exchange: Exchange = Exchange.TRAINABLE

    def __post_init__(self) -> None:
        if (self.factory is None) == (self.checkpoint is None):
            raise ConfigError(
                "[model] needs exactly one of factory = 'module:function' or checkpoint"
            )
        try:
            object.__setattr__(self, "exchange", Exchange(self.exchange))
        except ValueError:
            choices = ", ".join(repr(e.value) for e in Exchange)
            raise ConfigError(
                f"model.exchange = {self.exchange!r}: expected one of {choices}"
            ) from None
        if self.factory is not None and ":" not in self.factory:
            raise ConfigError(f"model.factory = {self.factory!r}: expected 'module:function'")
        if not 0 < self.chunk_bytes <= MAX_CHUNK_BYTES or self.chunk_bytes % 8:
            raise ConfigError(
                f"model.chunk_bytes = {self.chunk_bytes}: must be a multiple of 8 in "
                f"(0, {MAX_CHUNK_BYTES}]"
            )
