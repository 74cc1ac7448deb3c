"""Silo configuration (one TOML file per silo)."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedpriv._config import Table, check_positive, field_default, read_document
from fedpriv._types import Scalar
from fedpriv.atrest import KeySource
from fedpriv.client.release import ReleasePolicy
from fedpriv.client.tasks import DEFAULT_MAX_MODEL_BYTES, TaskLimits
from fedpriv.errors import ConfigError
from fedpriv.privacy.ledger import PrivacyBudget, PrivacyLedger
from fedpriv.transport import TLSConfig
from fedpriv.transport.options import DEFAULT_POLL_WAIT_S, DEFAULT_RECONNECT_TIMEOUT_S

__all__ = ["ClientConfig"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientConfig:
    """Where the coordinator is, this silo's certificate, and settings for the app.

    Args:
        coordinator: ``host:port``.
        ca: Federation CA certificate.
        cert: This silo's certificate.
        key: This silo's private key.
        server_name: Name to expect in the coordinator's certificate, if not the host.
        identity: Name to claim on a plain-text channel (--insecure only).
        poll_wait_s: Long-poll length.
        reconnect_timeout_s: Give up after this long without reaching the coordinator.
        app: Values passed to the app factory (data paths, silo index, ...); a
            Flower app's ``context.node_config``.
        run_config: A Flower app's ``context.run_config`` over its project's
            ``[tool.flwr.app.config]`` (``[run_config]``; as ``flwr run --run-config``).
        budget: The silo's privacy budget; with it every round is checked and
            recorded in the ledger at `ledger`.
        ledger: Where the privacy ledger is kept (on the silo's own disk).
        ledger_key: Where the key that encrypts the ledger at rest comes from
            (``[privacy] encryption_key_file`` or ``encryption_key_env``); None: plain.
        release: What the silo sends besides its update when it trains with DP
            (``[privacy] share_metrics``, ``public_evaluation``, ``public_num_examples``,
            ``share_resources``).
        limits: What the silo accepts from the coordinator (``[limits]``
            ``max_model_bytes``); a task beyond them is declined.
    """

    coordinator: str
    ca: pathlib.Path | None = None
    cert: pathlib.Path | None = None
    key: pathlib.Path | None = None
    server_name: str | None = None
    identity: str | None = None
    poll_wait_s: int = DEFAULT_POLL_WAIT_S
    reconnect_timeout_s: float = DEFAULT_RECONNECT_TIMEOUT_S
    app: Mapping[str, Scalar] = field(default_factory=dict)
    run_config: Mapping[str, Scalar] = field(default_factory=dict)
    budget: PrivacyBudget | None = None
    ledger: pathlib.Path | None = None
    # Off by default: a lost key makes the ledger unreadable, and the silo then
    # cannot train again without resetting it (docs/encryption-at-rest.md).
    ledger_key: KeySource | None = None
    release: ReleasePolicy = field(default_factory=ReleasePolicy)
    limits: TaskLimits = field(default_factory=TaskLimits)

    def __post_init__(self) -> None:
        if (self.budget is None) != (self.ledger is None):
            raise ConfigError("[privacy] needs both epsilon and ledger (the ledger file's path)")
        if self.ledger_key is not None and self.ledger is None:
            raise ConfigError(
                "[privacy] encryption_key_file or encryption_key_env is set without a ledger: "
                "it encrypts the privacy ledger; set [privacy] epsilon and ledger too"
            )
        given = [k for k in ("ca", "cert", "key") if getattr(self, k) is not None]
        if given and len(given) != 3:
            missing = sorted({"ca", "cert", "key"} - set(given))
            raise ConfigError(f"[tls] is missing {', '.join('tls.' + k for k in missing)}")
        if self.poll_wait_s < 1:
            raise ConfigError(f"client.poll_wait_s = {self.poll_wait_s}: must be >= 1")

    def open_ledger(self, *, reset: bool = False) -> PrivacyLedger | None:
        """Lock and open the silo's privacy ledger; None without ``[privacy]``.

        Close it when the silo stops (it is a context manager).

        Args:
            reset: Start over where the ledger is missing, rolled back or swapped
                although its marker shows another existed (``--reset-ledger``).

        Raises:
            StoreError: Another process has it open, it cannot be read, or it is
                missing where one existed and `reset` is not set.
            IntegrityError: It is encrypted and does not open with the configured
                key (wrong key, or modified), or it is plain where a key is configured.
            ConfigError: It was recorded at another delta than ``[privacy] delta``, it
                is encrypted and no key is configured, or the key cannot be read.
        """
        if self.budget is None or self.ledger is None:
            return None
        key = None if self.ledger_key is None else self.ledger_key.load()
        return PrivacyLedger.open(self.ledger, budget=self.budget, reset=reset, key=key)

    def tls(self, *, insecure: bool) -> TLSConfig | None:
        """The TLS material to connect with; None with `insecure` (plain text).

        Raises:
            ConfigError: No certificate files are configured and `insecure` is not set.
        """
        if insecure:
            return None
        if self.ca is None or self.cert is None or self.key is None:
            raise ConfigError(
                "[tls] ca, cert and key are required; use --insecure only on a trusted network"
            )
        return TLSConfig.from_files(ca=self.ca, cert=self.cert, key=self.key)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, base_dir: pathlib.Path) -> ClientConfig:
        """Build from a parsed TOML document.

        Raises:
            ConfigError: A key is unknown, missing, of the wrong type or out of range.
        """
        return read_document(
            data, base_dir=base_dir, read=lambda top: cls._read(top, base_dir=base_dir)
        )

    @classmethod
    def _read(cls, top: Table, *, base_dir: pathlib.Path) -> ClientConfig:
        coordinator = top.table("coordinator")
        tls = top.table("tls")
        client = top.table("client")
        privacy = top.table("privacy")
        limits = top.table("limits")
        budget_epsilon = privacy.optional("epsilon", float)
        budget = (
            None
            if budget_epsilon is None
            else PrivacyBudget(
                epsilon=budget_epsilon,
                delta=privacy.get("delta", float, field_default(PrivacyBudget, "delta")),
            )
        )
        config = cls(
            coordinator=coordinator.require("address", str),
            server_name=coordinator.optional("server_name", str),
            ca=tls.path("ca"),
            cert=tls.path("cert"),
            key=tls.path("key"),
            identity=client.optional("identity", str),
            poll_wait_s=client.get("poll_wait_s", int, field_default(cls, "poll_wait_s")),
            reconnect_timeout_s=client.get(
                "reconnect_timeout_s",
                float,
                field_default(cls, "reconnect_timeout_s"),
                check_positive,
            ),
            app=top.scalars("app"),
            run_config=top.scalars("run_config"),
            budget=budget,
            ledger=privacy.path("ledger"),
            ledger_key=KeySource.from_table(privacy),
            release=ReleasePolicy(
                share_metrics=privacy.strings("share_metrics") or (),
                public_evaluation=privacy.get(
                    "public_evaluation", bool, field_default(ReleasePolicy, "public_evaluation")
                ),
                public_num_examples=privacy.optional("public_num_examples", int),
                share_resources=privacy.get(
                    "share_resources", bool, field_default(ReleasePolicy, "share_resources")
                ),
            ),
            # The largest model a task may make the silo allocate (see fedpriv.client.tasks).
            limits=TaskLimits(
                max_model_bytes=limits.get("max_model_bytes", int, DEFAULT_MAX_MODEL_BYTES),
                secagg_corrupt_fraction=limits.get(
                    "secagg_corrupt_fraction",
                    float,
                    field_default(TaskLimits, "secagg_corrupt_fraction"),
                ),
                secagg_security_bits=limits.get(
                    "secagg_security_bits", int, field_default(TaskLimits, "secagg_security_bits")
                ),
                secagg_min_noise_multiplier=limits.get(
                    "secagg_min_noise_multiplier",
                    float,
                    field_default(TaskLimits, "secagg_min_noise_multiplier"),
                ),
            ),
        )
        return config
