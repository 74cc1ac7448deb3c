"""Coordinator configuration: :class:`CoordinatorConfig` and how it is read from TOML.

The per-concern types it holds (rounds, secure aggregation, strategy, model, TLS files) live
in :mod:`fedpriv.coordinator.settings`, and import from here as well.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedpriv._config import Table, check_positive, field_default, read_document
from fedpriv.atrest import KeySource
from fedpriv.coordinator.pacing import Pace
from fedpriv.coordinator.settings import (
    ModelSource,
    RoundConfig,
    SecAggConfig,
    StrategyConfig,
    TLSFiles,
)
from fedpriv.coordinator.tracking.settings import TrackingConfig
from fedpriv.errors import ConfigError
from fedpriv.privacy.central import CentralDP
from fedpriv.transport.limits import ServerLimits
from fedpriv.transport.options import DEFAULT_ADDRESS, DEFAULT_POLL_WAIT_S
from fedpriv.wire import DEFAULT_CHUNK_BYTES, Compression

__all__ = [
    "DEFAULT_ADDRESS",
    "CoordinatorConfig",
    "ModelSource",
    "RoundConfig",
    "SecAggConfig",
    "StrategyConfig",
    "TLSFiles",
    "TrackingConfig",
]

DEFAULT_HEARTBEAT_S = 10


def _pace(value: str) -> Pace:
    try:
        return Pace(value)
    except ValueError:
        allowed = ", ".join(repr(p.value) for p in Pace)
        raise ConfigError(f"rounds.pace = {value!r}: must be one of {allowed}") from None


def _compression(value: str) -> Compression:
    try:
        return Compression(value)
    except ValueError:
        allowed = ", ".join(repr(c.value) for c in Compression)
        raise ConfigError(
            f"rounds.update_compression = {value!r}: must be one of {allowed}"
        ) from None


def _limits(table: Table) -> ServerLimits:
    """The ``[limits]`` table; every key defaults to :class:`ServerLimits`' value."""
    defaults = ServerLimits()
    values: dict[str, Any] = {}
    for name in ServerLimits.__dataclass_fields__:
        default = getattr(defaults, name)
        values[name] = table.get(name, type(default), default)
    return ServerLimits(**values)


@dataclass(frozen=True, slots=True, kw_only=True)
class CoordinatorConfig:
    """Everything the coordinator daemon needs.

    Args:
        federation: Name of the federation (logs, reports).
        address: ``host:port`` to listen on.
        tls: Certificate files; None only together with the CLI's --insecure.
        allowed_silos: Identities allowed to join; None admits any certificate
            the federation CA signed.
        operators: Identities allowed to call the Admin service (``fedpriv status``);
            empty: nobody.
        rounds: Scheduling.
        model: Initial model.
        state_dir: SQLite database, checkpoints and spool files.
        keep_checkpoints: Keep the newest N rounds' checkpoints (and the initial
            model's); 0 keeps all.
        encryption_key: Where the key that encrypts checkpoints at rest comes from
            (``[store] encryption_key_file`` or ``encryption_key_env``); None: plain.
        heartbeat_interval_s: How often silos report while training.
        poll_wait_s: How long a silo's PullTask may wait before answering WAIT.
        dp: Silo-level DP-FedAvg (clipping, central noise, federation epsilon); None: off.
        prometheus: ``host:port`` for the Prometheus ``/metrics`` endpoint; None: none.
        secure_aggregation: Secure aggregation; None: off. With ``dp`` as well, the
            noise is distributed: each silo adds Skellam noise before masking.
        limits: Limits against exhaustion (the ``[limits]`` table): streams per
            identity, stream timeouts, message sizes, connections, keepalive.
        tracking: Experiment trackers (MLflow, TensorBoard) the federation is logged
            to (the ``[tracking]`` table); none by default.
    """

    federation: str = "fedpriv"
    address: str = DEFAULT_ADDRESS
    tls: TLSFiles | None = None
    allowed_silos: frozenset[str] | None = None
    operators: frozenset[str] = frozenset()
    rounds: RoundConfig = field(default_factory=RoundConfig)
    model: ModelSource
    state_dir: pathlib.Path
    keep_checkpoints: int = 0
    # Off by default: a key that is lost makes every checkpoint unreadable, so
    # encryption is the operator's choice (docs/encryption-at-rest.md).
    encryption_key: KeySource | None = None
    heartbeat_interval_s: int = DEFAULT_HEARTBEAT_S
    poll_wait_s: int = DEFAULT_POLL_WAIT_S
    dp: CentralDP | None = None
    secure_aggregation: SecAggConfig | None = None
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    prometheus: str | None = None
    limits: ServerLimits = field(default_factory=ServerLimits)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if self.prometheus is not None and not self.prometheus.rpartition(":")[2].isdigit():
            raise ConfigError(
                f"metrics.prometheus = {self.prometheus!r}: expected 'host:port', "
                "for example '127.0.0.1:9464'"
            )
        if self.strategy.flower is not None and (
            self.dp is not None or self.secure_aggregation is not None
        ):
            raise ConfigError(
                f"strategy.flower = {self.strategy.flower!r} cannot be combined with [dp] or "
                "secure_aggregation: those need fedpriv's own streaming sum"
            )
        if self.secure_aggregation is not None:
            sizes = [n for n in (self.rounds.max_clients, len(self.allowed_silos or ())) if n]
            self.secure_aggregation.check_round_sizes(
                smallest=self.rounds.min_clients, largest=min(sizes) if sizes else None
            )
            if self.rounds.required_results < self.secure_aggregation.threshold_for(
                self.rounds.min_clients
            ):
                raise ConfigError(
                    f"rounds.min_results = {self.rounds.min_results}: with secure aggregation a "
                    "round needs at least secagg.threshold updates"
                )
            if self.rounds.update_compression is not Compression.NONE:
                raise ConfigError(
                    f"rounds.update_compression = {self.rounds.update_compression.value!r} "
                    "cannot be combined with secure_aggregation = true, which sends updates "
                    "in its own fixed-point ring; use 'none'"
                )
            if self.dp is not None and self.dp.adaptive:
                raise ConfigError(
                    "dp.adaptive = true is not supported with secure_aggregation = true: the "
                    "coordinator never sees an update's norm; use a fixed dp.clip_norm"
                )
        if self.allowed_silos is not None and not self.allowed_silos:
            raise ConfigError(
                "federation.allowed_silos is empty: no silo could join; list them or omit the key"
            )
        if self.dp is not None and self.dp.adaptive:
            # The centred count is divided by expected_clients, not by the true count, so a
            # value no round can reach would bias every unclipped fraction towards 1/2.
            bounds = {
                "rounds.max_clients": self.rounds.max_clients,
                "the number of federation.allowed_silos": len(self.allowed_silos or ()),
            }
            for name, most in bounds.items():
                if most and self.dp.expected_clients > most:
                    raise ConfigError(
                        f"dp.expected_clients = {self.dp.expected_clients}: must be <= {name} "
                        f"({most}), since no round can have more updates; set it to the "
                        "updates you expect per round (default rounds.min_clients)"
                    )
        if self.keep_checkpoints < 0:
            raise ConfigError(
                f"store.keep_checkpoints = {self.keep_checkpoints}: must be >= 0 "
                "(0 keeps every round's checkpoint)"
            )
        if self.heartbeat_interval_s < 1 or self.poll_wait_s < 1:
            raise ConfigError("server.heartbeat_interval_s and server.poll_wait_s must be >= 1")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base_dir: pathlib.Path) -> CoordinatorConfig:
        """Build from a parsed TOML document; relative paths are relative to `base_dir`.

        Raises:
            ConfigError: A key is unknown, missing, of the wrong type or out of range.
        """
        return read_document(
            data, base_dir=base_dir, read=lambda top: cls._read(top, base_dir=base_dir)
        )

    @classmethod
    def _read(cls, top: Table, *, base_dir: pathlib.Path) -> CoordinatorConfig:
        fed = top.table("federation")
        server = top.table("server")
        tls_table = top.table("tls")
        rounds = top.table("rounds")
        model = top.table("model")
        store = top.table("store")
        dp_table = top.table("dp")
        secagg_table = top.table("secagg")
        strategy_table = top.table("strategy")
        metrics_table = top.table("metrics")
        limits_table = top.table("limits")
        tracking_table = top.table("tracking")
        allowed = fed.strings("allowed_silos")
        tls = None
        ca, cert, key, crl = (tls_table.path(k) for k in ("ca", "cert", "key", "crl"))
        if ca is not None and cert is not None and key is not None:
            tls = TLSFiles(ca=ca, cert=cert, key=key, crl=crl)
        elif ca or cert or key:
            missing = [n for n, v in (("ca", ca), ("cert", cert), ("key", key)) if v is None]
            raise ConfigError(f"[tls] is missing {', '.join('tls.' + k for k in missing)}")
        state_dir = store.path("dir", "state") or base_dir / "state"
        # Every default below is the dataclass field's own, written once.
        r, sa = RoundConfig(), SecAggConfig()
        min_clients = rounds.get("min_clients", int, r.min_clients)
        dp = None
        # A [dp] table turns DP-FedAvg on unless it says enabled = false.
        if dp_table.get("enabled", bool, bool(dp_table)):
            dp = CentralDP(
                noise_multiplier=dp_table.require("noise_multiplier", float),
                clip_norm=dp_table.require("clip_norm", float),
                adaptive=dp_table.get("adaptive", bool, field_default(CentralDP, "adaptive")),
                target_quantile=dp_table.get(
                    "target_quantile", float, field_default(CentralDP, "target_quantile")
                ),
                clip_learning_rate=dp_table.get(
                    "clip_learning_rate", float, field_default(CentralDP, "clip_learning_rate")
                ),
                clipped_count_stddev=dp_table.optional("clipped_count_stddev", float),
                expected_clients=dp_table.get("expected_clients", int, min_clients),
                delta=dp_table.get("delta", float, field_default(CentralDP, "delta")),
            )
        else:
            dp_table.ignore_rest()
        secure_aggregation = None
        if top.get("secure_aggregation", bool, False):
            secure_aggregation = SecAggConfig(
                threshold=secagg_table.get("threshold", int, sa.threshold),
                clip_norm=secagg_table.get("clip_norm", float, sa.clip_norm),
                unmask_deadline_s=secagg_table.get(
                    "unmask_deadline_s", float, sa.unmask_deadline_s
                ),
                tolerate_colluders=secagg_table.get(
                    "tolerate_colluders", int, sa.tolerate_colluders
                ),
                graph=secagg_table.get("graph", str, sa.graph),
                dropout=secagg_table.get("dropout", float, sa.dropout),
                corrupt_fraction=secagg_table.get("corrupt_fraction", float, sa.corrupt_fraction),
                security_bits=secagg_table.get("security_bits", int, sa.security_bits),
                correctness_bits=secagg_table.get("correctness_bits", int, sa.correctness_bits),
            )
        elif secagg_table:
            raise ConfigError(
                "[secagg] is set but secure aggregation is off, so the table would have no "
                "effect: add `secure_aggregation = true` at the top level (before any table), "
                "or remove [secagg]"
            )
        config = cls(
            federation=fed.get("name", str, field_default(cls, "federation")),
            address=server.get("address", str, DEFAULT_ADDRESS),
            heartbeat_interval_s=server.get("heartbeat_interval_s", int, DEFAULT_HEARTBEAT_S),
            poll_wait_s=server.get("poll_wait_s", int, DEFAULT_POLL_WAIT_S),
            tls=tls,
            allowed_silos=None if allowed is None else frozenset(allowed),
            operators=frozenset(fed.strings("operators") or ()),
            rounds=RoundConfig(
                num_rounds=rounds.get("num_rounds", int, r.num_rounds),
                min_clients=min_clients,
                min_results=rounds.get("min_results", int, r.min_results),
                max_clients=rounds.get("max_clients", int, r.max_clients),
                deadline_s=rounds.get("deadline_s", float, r.deadline_s, check_positive),
                federated_evaluation=rounds.get(
                    "federated_evaluation", bool, r.federated_evaluation
                ),
                evaluation_deadline_s=rounds.get(
                    "evaluation_deadline_s", float, r.evaluation_deadline_s
                ),
                max_failed_attempts=rounds.get("max_failed_attempts", int, r.max_failed_attempts),
                retry_backoff_s=rounds.get("retry_backoff_s", float, r.retry_backoff_s),
                client_config=rounds.scalars("client_config"),
                update_compression=_compression(
                    rounds.get("update_compression", str, r.update_compression.value)
                ),
                max_update_value=rounds.get("max_update_value", float, r.max_update_value),
                max_num_examples=rounds.get("max_num_examples", int, r.max_num_examples),
                pace=_pace(rounds.get("pace", str, r.pace.value)),
            ),
            model=ModelSource(
                factory=model.optional("factory", str),
                checkpoint=model.path("checkpoint"),
                chunk_bytes=model.get("chunk_bytes", int, DEFAULT_CHUNK_BYTES),
                exchange=model.get("exchange", str, field_default(ModelSource, "exchange")),
            ),
            state_dir=state_dir,
            keep_checkpoints=store.get(
                "keep_checkpoints", int, field_default(cls, "keep_checkpoints")
            ),
            encryption_key=KeySource.from_table(store),
            dp=dp,
            secure_aggregation=secure_aggregation,
            strategy=StrategyConfig(
                name=strategy_table.optional("name", str),
                flower=strategy_table.optional("flower", str),
                options=strategy_table.scalars("options"),
            ),
            prometheus=metrics_table.optional("prometheus", str),
            limits=_limits(limits_table),
            tracking=TrackingConfig.from_table(tracking_table, base_dir=base_dir),
        )
        return config
