"""Round inputs as the engine hands them to strategies: spool files on disk, and sums."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.server.client_proxy import ClientProxy

from fedpriv.strategy.protocol import SpooledUpdate, UpdateSum
from fedpriv.wire import Model


class Spools:
    """Writes models to real spool files and opens them with ``os.open``."""

    def __init__(self, directory: pathlib.Path) -> None:
        self.directory = directory
        self.fds: list[int] = []

    def update(self, silo: str, model: Model, *, weight: float = 1.0) -> SpooledUpdate:
        path = self.directory / f"{silo}.update"
        path.write_bytes(model.payload.tobytes())
        fd = os.open(path, os.O_RDONLY)
        self.fds.append(fd)
        return SpooledUpdate(silo=silo, weight=weight, layout=model.layout, fd=fd)

    def updates(
        self, models: Sequence[Model], weights: Sequence[float] | None = None
    ) -> list[SpooledUpdate]:
        weights = weights if weights is not None else [1.0] * len(models)
        return [
            self.update(f"silo-{i}", m, weight=w)
            for i, (m, w) in enumerate(zip(models, weights, strict=True))
        ]

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


def update_sum(models: Sequence[Model], weights: Sequence[float]) -> UpdateSum:
    """The weighted sum the engine ends a round with (float64 sums, no shared payload)."""
    layout = models[0].layout
    sums = [np.zeros(spec.numel, np.float64) for spec in layout.specs]
    for model, weight in zip(models, weights, strict=True):
        for total, values in zip(sums, model.arrays().values(), strict=True):
            total += weight * values.reshape(-1).astype(np.float64)
    return UpdateSum(layout=layout, sums=sums, weight=float(sum(weights)), contributors=len(models))


class _Proxy(ClientProxy):
    def _refuse(self, *args, **kwargs):
        raise RuntimeError("not callable in tests")

    get_properties = get_parameters = fit = evaluate = reconnect = _refuse


def flower_results(
    models: Sequence[Model], weights: Sequence[int]
) -> list[tuple[ClientProxy, FitRes]]:
    """The same updates as Flower's ``aggregate_fit`` receives them."""
    return [
        (
            _Proxy(f"silo-{i}"),
            FitRes(
                status=Status(code=Code.OK, message=""),
                parameters=ndarrays_to_parameters(list(m.arrays().values())),
                num_examples=int(w),
                metrics={},
            ),
        )
        for i, (m, w) in enumerate(zip(models, weights, strict=True))
    ]
