"""Which aggregation mode a coordinator runs, from its configuration and strategy.

The combinations the maths allows are built here, and only here; the others
are refused with a :class:`~fedpriv.errors.ConfigError` that says why.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from fedpriv.coordinator.config import CoordinatorConfig
from fedpriv.coordinator.modes import AggregationMode, PlainMode, WholeUpdateMode
from fedpriv.coordinator.modes_dp import CentralDPMode, ReleaseHistory
from fedpriv.coordinator.modes_secagg import SecureMode
from fedpriv.coordinator.store import Store
from fedpriv.coordinator.upload import SpoolPool
from fedpriv.errors import ConfigError
from fedpriv.privacy.accounting import GaussianSteps, SkellamSum
from fedpriv.privacy.central import ClipState
from fedpriv.strategy.protocol import Strategy, WholeUpdateStrategy
from fedpriv.wire import Compression, DType, Model

__all__ = ["AnyStrategy", "build_mode", "check_strategy", "resume_releases"]

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


def resume_releases(
    store: Store, *, next_round: int
) -> tuple[list[GaussianSteps | SkellamSum], float | None]:
    """The silo-level releases of the committed rounds, and the last adaptive clip norm."""
    per_round: dict[int, dict[str, float]] = {}
    for round, _, name, value in store.metrics(source="federation"):
        per_round.setdefault(round, {})[name] = value
    releases: list[GaussianSteps | SkellamSum] = []
    clip_norm = None
    for round in sorted(per_round):
        values = per_round[round]
        if round < next_round and "skellam_mu" in values:
            releases.append(
                SkellamSum(
                    mu=values["skellam_mu"],
                    l1_sensitivity=values["l1_sensitivity"],
                    l2_sensitivity=values["l2_sensitivity"],
                )
            )
        elif round < next_round and "noise_multiplier" in values:
            releases.append(
                GaussianSteps(noise_multiplier=values["noise_multiplier"], sample_rate=1.0, steps=1)
            )
            clip_norm = values.get("next_clip_norm", clip_norm)
    return releases, clip_norm


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
    history = None
    clip = None
    if config.dp is not None:
        releases, clip_norm = resume_releases(store, next_round=next_round)
        history = ReleaseHistory(releases, delta=config.dp.delta)
        # Only an adaptive norm carries over a restart; a fixed one is the configured one.
        clip = ClipState(config.dp, clip_norm=clip_norm if config.dp.adaptive else None)
    if config.secure_aggregation is not None:
        return SecureMode(
            config.secure_aggregation,
            model=model,
            dp=config.dp,
            history=history,
            alive=alive,
            clock=clock,
            on_refused=on_refused,
            bench=bench,
        )
    if not isinstance(strategy, Strategy):
        return WholeUpdateMode(spools, compression=compression)
    plain = PlainMode(compression=compression)
    if clip is not None and history is not None:
        return CentralDPMode(plain, clip=clip, history=history)
    return plain
