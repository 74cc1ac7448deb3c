"""The coordinator daemon: store, initial model, gRPC server and the rounds thread, wired up."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
from collections.abc import Mapping
from typing import Any

import grpc
import numpy as np

from fedpriv._config import load_factory
from fedpriv.atrest import AtRestKey, is_sealed
from fedpriv.coordinator.admin import AdminServicer
from fedpriv.coordinator.aggregation import AnyStrategy
from fedpriv.coordinator.audit import DenialRecorder
from fedpriv.coordinator.checkpoint import read_checkpoint
from fedpriv.coordinator.config import CoordinatorConfig, ModelSource
from fedpriv.coordinator.federation import Federation, RoundReporter
from fedpriv.coordinator.servicer import FleetServicer, add_fleet_servicer
from fedpriv.coordinator.store import Store
from fedpriv.coordinator.telemetry import Telemetry
from fedpriv.coordinator.tracking import RunStatus, Tracking
from fedpriv.errors import ConfigError, FedprivError
from fedpriv.pki import RevocationList
from fedpriv.strategy import FedAvg, build_strategy
from fedpriv.strategy.protocol import StatefulStrategy
from fedpriv.transport import AuthInterceptor, ServerHandle, TLSConfig, serve
from fedpriv.transport.auth import DenialCallback, DenialReason
from fedpriv.transport.limits import CallLimits
from fedpriv.v1 import admin_pb2_grpc
from fedpriv.wire import Model
from fedpriv.wire.torch_interop import exchanged_state, model_from_state_dict

__all__ = ["Coordinator", "load_factory", "load_initial_model"]

logger = logging.getLogger(__name__)

# Calls re-check the CRL file as they arrive; this check covers a quiet federation whose
# only open call is a long upload. One stat per second costs nothing.
_REVOCATION_CHECK_S = 1.0


# glibc's mallopt parameter for the arena cap (malloc.h).
_M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int = 1) -> bool:
    """Cap glibc's malloc arenas in this process; True if the cap was set.

    Every thread that allocates gets a malloc arena of its own (up to eight per
    core), and each arena keeps the chunk-sized buffers it freed for reuse, so a
    coordinator with many silos streaming holds several megabytes per thread.
    With one arena, freed buffers are reused across threads: coordinator peak
    RSS at P = 50M, N = 8 measured 316–330 MB instead of 366–376 MB, round time
    within run-to-run noise (docs/performance.md). The ``fedpriv coordinator`` command
    calls this before any thread starts; a process that embeds
    :class:`Coordinator` decides for itself. An operator's ``MALLOC_ARENA_MAX``
    wins; other C libraries are left alone.
    """
    if sys.platform != "linux" or "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_ARENA_MAX, arenas))


def load_initial_model(source: ModelSource, *, key: AtRestKey | None = None) -> Model:
    """Build the initial global model from a factory or a checkpoint.

    A factory may return a ``torch.nn.Module``, a mapping of numpy arrays, or a list
    of them (Flower's ``NDArrays``, named ``"0"``, ``"1"``, ... by position). A
    checkpoint may be plain, or encrypted under `key` (the state's key).

    Raises:
        ConfigError: The factory returned something else, or the checkpoint is
            encrypted and no key is configured.
    """
    if source.checkpoint is not None:
        sealed = is_sealed(source.checkpoint)
        return read_checkpoint(source.checkpoint, key=key if sealed else None)
    assert source.factory is not None  # ModelSource guarantees one of the two
    made = _check_factory(source.factory)()
    if hasattr(made, "named_parameters") and hasattr(made, "state_dict"):  # a torch module
        try:
            state = exchanged_state(made, source.exchange)
        except ValueError as err:
            raise ConfigError(f"model.factory = {source.factory!r}: {err}") from None
        return model_from_state_dict(state, chunk_bytes=source.chunk_bytes)
    if hasattr(made, "state_dict"):
        return model_from_state_dict(made.state_dict(), chunk_bytes=source.chunk_bytes)
    if isinstance(made, Mapping) and all(isinstance(v, np.ndarray) for v in made.values()):
        return Model.from_arrays(made, chunk_bytes=source.chunk_bytes)
    if isinstance(made, list | tuple) and made and all(isinstance(v, np.ndarray) for v in made):
        # Flower's NDArrays: the arrays are named by position, as Flower's ArrayRecord does.
        named = {str(i): v for i, v in enumerate(made)}
        return Model.from_arrays(named, chunk_bytes=source.chunk_bytes)
    raise ConfigError(
        f"model.factory = {source.factory!r} returned {type(made).__name__}; "
        "return a torch.nn.Module, a dict of numpy arrays or a list of them (Flower's NDArrays)"
    )


def _check_factory(spec: str) -> Any:
    """The model factory `spec` names, or a ConfigError saying why it cannot be one."""
    factory = load_factory(spec, field="model.factory")
    if not callable(factory):
        raise ConfigError(
            f"model.factory = {spec!r} is a {type(factory).__name__}, not a function "
            "that returns the initial model"
        )
    return factory


def _restore_strategy(strategy: AnyStrategy, store: Store, round: int) -> None:
    """Give a stateful strategy the state committed with `round` (its optimiser's moments).

    Raises:
        ConfigError: The stored state is the same strategy's but does not fit the model.
    """
    if not isinstance(strategy, StatefulStrategy):
        return
    stored = store.strategy_state(round)
    if stored is None or stored.strategy != strategy.name:
        # A federation that switched strategy (or a state folder from before strategy
        # state was stored): the new strategy starts from its initial state.
        found = "no state" if stored is None else f"the state of {stored.strategy!r}"
        logger.warning(
            "strategy %r starts from its initial state: round %d committed %s",
            strategy.name,
            round,
            found,
        )
        return
    try:
        strategy.restore(stored.state)
    except ValueError as err:
        raise ConfigError(f"cannot resume strategy {strategy.name!r}: {err}") from err
    logger.info("restored the state of strategy %r after round %d", strategy.name, round)


class Coordinator:
    """A running coordinator; use as a context manager.

    Example::

        with Coordinator(config) as coordinator:
            print("listening on", coordinator.port)
            coordinator.wait()

    Args:
        config: Validated configuration.
        insecure: Serve plain text (the CLI's --insecure); logs a warning.
        strategy: Aggregation rule (FedAvg by default).
        reporter: Receives round events.
        on_denied: Called with (identity, peer, reason) for every call the
            authorisation interceptor refuses, and for every open call it ends
            because the certificate was revoked (reason ``REVOKED_WHILE_OPEN``).

    Raises:
        ConfigError: No TLS material without `insecure`, or another bad setting.
        PKIError: The revocation list exists (or ``tls.crl`` is set) and cannot be trusted.
    """

    def __init__(
        self,
        config: CoordinatorConfig,
        *,
        insecure: bool = False,
        strategy: AnyStrategy | None = None,
        reporter: RoundReporter | None = None,
        on_denied: DenialCallback | None = None,
    ) -> None:
        if config.tls is None and not insecure:
            raise ConfigError(
                "[tls] ca, cert and key are required; run with --insecure only on a trusted network"
            )
        self.config = config
        self._insecure = insecure
        self._tls = (
            None
            if config.tls is None or insecure
            else TLSConfig.from_files(ca=config.tls.ca, cert=config.tls.cert, key=config.tls.key)
        )
        # Revoked serials, refused at the interceptor; None without TLS (no certificates).
        self.revocations = (
            None
            if config.tls is None or insecure
            else RevocationList.from_files(
                config.tls.crl_path, ca_cert=config.tls.ca, required=config.tls.crl is not None
            )
        )
        self._on_denied = on_denied
        # True when the state folder holds every round already (a restart after the end).
        self.already_finished = False
        self._auth: AuthInterceptor | None = None
        self._stopping = threading.Event()
        key = None if config.encryption_key is None else config.encryption_key.load()
        self.store = Store(config.state_dir, keep_checkpoints=config.keep_checkpoints, key=key)
        # Every refusal at the interceptor (revoked, not allowed, ...) is an audit entry.
        self._audit_denials = DenialRecorder(self.store.audit)
        for orphan in self.store.remove_orphans():
            logger.info("removed a checkpoint no round committed: %s", orphan.name)
        committed = self.store.last_committed()
        if committed is not None:
            # A lowered keep_checkpoints frees the space at once, before any round runs.
            self.store.prune_checkpoints(committed.round)
        # A checkpoint written by an earlier run is checked against its committed hash;
        # the initial one, hashed as it is written below, is not read back to hash again.
        expected = committed.sha256 if committed is not None else None
        if committed is None:
            committed = self.store.commit_staged(
                self.store.stage_round(
                    round=0,
                    model=load_initial_model(config.model, key=key),
                    started_unix_s=0.0,
                    selected=0,
                    accepted=0,
                    total_weight=0.0,
                )
            )
            next_round = 1
        else:
            next_round = committed.round + 1
            if config.model.factory is not None:
                # Not called (the model is the checkpoint's), but a broken factory fails
                # here rather than on the next fresh state folder.
                _check_factory(config.model.factory)
            if committed.round >= config.rounds.num_rounds:
                self.already_finished = True
                logger.warning(
                    "federation %r already finished: all %d rounds are committed in %s; "
                    "silos that connect now are told so. To train more rounds raise "
                    "rounds.num_rounds; to start over use another state_dir",
                    config.federation,
                    config.rounds.num_rounds,
                    config.state_dir,
                )
            else:
                logger.info("resuming after committed round=%d", committed.round)
        # The global model is served from its checkpoint's pages, not held in memory
        # (unless the checkpoint is encrypted).
        model = self.store.load_checkpoint(committed.checkpoint, sha256=expected)
        if strategy is None and config.strategy.name is not None:
            strategy = build_strategy(
                config.strategy.name, model=model, options=config.strategy.options
            )
        if strategy is None and config.strategy.flower is not None:
            from fedpriv.strategy.flower import flower_strategy

            strategy = flower_strategy(
                config.strategy.flower, model=model, options=config.strategy.options
            )
        strategy = strategy or FedAvg()
        if committed.round > 0:
            _restore_strategy(strategy, self.store, committed.round)
        # Round events go telemetry -> experiment trackers -> `reporter`.
        self.tracking = Tracking.from_config(config, inner=reporter)
        self.telemetry = Telemetry(
            config.state_dir, inner=self.tracking, prometheus=config.prometheus
        )
        self.federation = Federation(
            config=config,
            strategy=strategy,
            store=self.store,
            model=model,
            next_round=next_round,
            reporter=self.telemetry,
        )
        self.limits = CallLimits(config.limits, insecure=insecure)
        self._server_cm: Any = None
        self._handle: ServerHandle | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _denied(self, identity: str | None, peer: str, reason: DenialReason) -> None:
        self._audit_denials(identity, peer, reason)
        if self._on_denied is not None:
            self._on_denied(identity, peer, reason)

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        if self._handle is None:
            raise RuntimeError("coordinator is not running")
        return self._handle.port

    def __enter__(self) -> Coordinator:
        servicer = FleetServicer(self.federation, insecure=self._insecure, limits=self.limits)

        def add(server: grpc.Server) -> list[str]:
            add_fleet_servicer(servicer, server)
            admin = AdminServicer(self.federation, audit=self.store.audit, insecure=self._insecure)
            admin_pb2_grpc.add_AdminServicer_to_server(admin, server)
            return ["fedpriv.v1.Fleet", "fedpriv.v1.Admin"]

        self._auth = AuthInterceptor(
            allowed=self.config.allowed_silos,
            insecure=self._insecure,
            operators=self.config.operators,
            revocations=self.revocations,
            on_denied=self._denied,
        )
        if self.revocations is not None:
            self.revocations.subscribe(self._end_revoked)
            threading.Thread(
                target=self._watch_revocations,
                args=(self.revocations,),
                name="fedpriv-crl",
                daemon=True,
            ).start()
        self._server_cm = serve(
            add,
            address=self.config.address,
            tls=self._tls,
            insecure=self._insecure,
            auth=self._auth,
            limits=self.limits,
        )
        self._handle = self._server_cm.__enter__()
        logger.info(
            "coordinator listening port=%d federation=%s tls=%s",
            self._handle.port,
            self.config.federation,
            not self._insecure,
        )
        self._thread = threading.Thread(target=self._run, name="fedpriv-rounds", daemon=True)
        self._thread.start()
        return self

    def reload_revocations(self) -> int:
        """Re-read the revocation list now (the daemon does on SIGHUP); return the serials added.

        Open calls of newly revoked certificates are ended, and their silos leave
        the round, as when the file change is noticed on its own.
        """
        if self.revocations is None:
            return 0
        return len(self.revocations.reload())

    def _end_revoked(self, serials: frozenset[int]) -> None:
        if self._auth is None:
            return
        for identity in sorted(self._auth.end_revoked(serials)):
            self.federation.leave(identity, "certificate revoked")

    def _watch_revocations(self, revocations: RevocationList) -> None:
        while not self._stopping.wait(_REVOCATION_CHECK_S):
            revocations.refresh()

    def _run(self) -> None:
        self.tracking.start()
        try:
            self.federation.run()
        except FedprivError as err:
            self._error = err
            logger.error("federation stopped: %s", err)
            self.federation.mark_failed(str(err))
            self.tracking.end(RunStatus.FAILED, detail=str(err))
        except Exception as err:  # surfaced to wait() instead of dying silently in a thread
            self._error = err
            logger.exception("federation crashed")
            self.tracking.end(RunStatus.FAILED, detail=f"coordinator crashed: {type(err).__name__}")
        else:  # finished, or stopped (a restart continues the run)
            if self.federation.finished:
                self.tracking.end(RunStatus.FINISHED, results=self.store)
            else:
                self.tracking.end(RunStatus.KILLED)

    def wait(self, timeout_s: float | None = None, *, finish_grace_s: float = 30.0) -> bool:
        """Block until all rounds are done and live silos were told; re-raise a failure.

        Returns:
            True when the federation finished, False on timeout.
        """
        if self._thread is None:
            raise RuntimeError("coordinator is not running")
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            return False
        if self._error is not None:
            # The silos are told why (a FINISHED task with the reason), so none of them
            # keeps retrying a federation that is over.
            self.federation.wait_until_silos_told(finish_grace_s)
            raise self._error
        self.federation.wait_until_silos_told(finish_grace_s)
        return True

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self.federation.stop()
        if self._thread is not None:
            self._thread.join(10)
        if self._server_cm is not None:
            self._server_cm.__exit__(None, None, None)
        self.federation.close()
        self.telemetry.close()
        self.tracking.close()
        self.store.close()
