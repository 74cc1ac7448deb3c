"""Which aggregation mode a coordinator runs, from its configuration and strategy.

The combinations the maths allows are built here, and only here; the others
are refused with a :class:`~fedpriv.errors.ConfigError` that says why.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from fedpriv.coordinator.config import CoordinatorConfig
from fedpriv.coordinator.modes import AggregationMode, PlainMode, WholeUpdateMode
from fedpriv.coordinator.modes_dp import CentralDPMode
from fedpriv.coordinator.modes_secagg import SecureMode
from fedpriv.coordinator.release_ledger import FederationAccount
from fedpriv.coordinator.store import Store
from fedpriv.coordinator.upload import SpoolPool
from fedpriv.errors import ConfigError
from fedpriv.privacy.central import ClipState
from fedpriv.strategy.protocol import Strategy, WholeUpdateStrategy
from fedpriv.wire import Compression, DType, Model

__all__ = ["AnyStrategy", "build_mode", "check_strategy"]

AnyStrategy = Strategy | WholeUpdateStrategy


def check_strategy(config: CoordinatorConfig, strategy: AnyStrategy, model: Model) -> None:
    """Refuse a strategy the configured privacy or compression cannot run with.

    Raises:
        ConfigError: The combination is not possible; the message says why.
    """
    if not isinstance(strategy, Strategy | WholeUpdateStrategy):
        raise ConfigError(
            f"strategy {getattr(strategy, 'name', type(strategy).__name__)!r} cannot be used: "
            "it implements neither fedpriv.strategy.Strategy (configure, aggregate) nor "
            "WholeUpdateStrategy (configure, aggregate_updates)"
        )
    whole = not isinstance(strategy, Strategy)
    if whole and config.secure_aggregation is not None:
        raise ConfigError(
            f"strategy {strategy.name!r} needs each silo's update on its own; secure "
            "aggregation reveals only their sum: use a streaming strategy (fedavg, fedprox, "
            "fedadam, fedyogi, fedadagrad) or turn secure_aggregation off"
        )
    if whole and config.dp is not None:
        raise ConfigError(
            f"strategy {strategy.name!r} cannot run under [dp]: it reads individual updates, "
            "and [dp] noises only their sum: use a streaming strategy with [dp]"
        )
    if (
        isinstance(strategy, Strategy)
        and config.secure_aggregation is not None
        and not strategy.supports_secure_aggregation
    ):
        raise ConfigError(f"strategy {strategy.name!r} does not support secure aggregation")
    compression = config.rounds.update_compression
    if compression is not Compression.NONE:
        bad = [s.describe() for s in model.layout.specs if s.dtype is not DType.FLOAT32]
        if bad:
            raise ConfigError(
                f"rounds.update_compression = {compression.value!r} "
                f"needs a float32 model; this one also has {', '.join(bad)}"
            )


def build_mode(
    config: CoordinatorConfig,
    *,
    strategy: AnyStrategy,
    store: Store,
    model: Model,
    next_round: int,
    spools: SpoolPool,
    alive: Callable[[str], bool],
    clock: Callable[[], float],
    on_refused: Callable[[str, str], None],
    bench: Callable[[Collection[str]], None],
) -> AggregationMode:
    """The aggregation mode of a coordinator with `config` (checked first).

    Raises:
        ConfigError: See :func:`check_strategy`.
    """
    check_strategy(config, strategy, model)
    compression = config.rounds.update_compression
    account = None
    clip = None
    if config.dp is not None:
        # The release ledger holds every committed round's release (rounds before
        # next_round): the accountant's history and the adaptive norm come from it.
        account = FederationAccount.resume(
            store.releases, next_round=next_round, delta=config.dp.delta
        )
        clip_norm = account.next_clip_norm
        # Only an adaptive norm carries over a restart; a fixed one is the configured one.
        clip = ClipState(config.dp, clip_norm=clip_norm if config.dp.adaptive else None)
    if config.secure_aggregation is not None:
        return SecureMode(
            config.secure_aggregation,
            model=model,
            dp=config.dp,
            account=account,
            alive=alive,
            clock=clock,
            on_refused=on_refused,
            bench=bench,
        )
    if not isinstance(strategy, Strategy):
        return WholeUpdateMode(spools, compression=compression)
    plain = PlainMode(compression=compression)
    if clip is not None and account is not None:
        return CentralDPMode(plain, clip=clip, account=account)
    return plain
