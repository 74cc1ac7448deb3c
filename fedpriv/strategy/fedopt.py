"""Server optimisers over the round's mean update: FedAdam, FedYogi, FedAdagrad.

Reddi et al., 2021, "Adaptive Federated Optimization".
Each round the pseudo-gradient is ``delta = mean - base``, the weighted mean
of the silos' models minus the global model they started from. FedAdam,
FedYogi and FedAdagrad keep a first moment ``m`` and a second moment ``v`` of
it across rounds and step from the base::

    m     = beta_1 * m + (1 - beta_1) * delta
    v     = beta_2 * v + (1 - beta_2) * delta**2                  (Adam)
          = v - (1 - beta_2) * delta**2 * sign(v - delta**2)      (Yogi)
          = v + delta**2                                          (Adagrad)
    model = base + eta_t * m / (sqrt(v) + tau)

The maths and defaults are Flower's (``flwr.server.strategy.fedadam`` and
siblings), so a run can switch between the two and keep its tuning: both
moments start at zero, and FedAdam's bias-corrected step is
``eta_t = eta * sqrt(1 - beta_2**(t + 1)) / (1 - beta_1**(t + 1))`` with ``t``
the round number. Only the mean is needed, so these work on a securely
aggregated or centrally noised sum too.

The moments are stored in float32 for float32 and narrower tensors, float64
for float64 ones (FedAvg's accumulator rule): two float64 moments would be
four copies of a float32 model on the coordinator, and float32 rounding of a
moment (6e-8 relative) is far below the round-to-round noise of the
pseudo-gradient. The arithmetic runs in float64, one tensor at a time.
Integer and boolean tensors (step counters) take the plain mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import numpy.typing as npt

from fedpriv._types import Scalar
from fedpriv.errors import ConfigError
from fedpriv.strategy.protocol import UpdateSum, model_from_flat
from fedpriv.wire import DType, Model, TensorLayout

__all__ = ["FedAdagrad", "FedAdam", "FedYogi"]


def _moment_dtype(dtype: DType) -> np.dtype[np.floating]:
    return np.dtype(np.float64) if dtype is DType.FLOAT64 else np.dtype(np.float32)


def _check(name: str, option: str, value: float, *, low: float, high: float | None) -> None:
    """Refuse `value` outside ``[low, high)`` (``[low, inf)`` without `high`)."""
    if not math.isfinite(value) or value < low or (high is not None and value >= high):
        allowed = f"in [{low}, {high})" if high is not None else f"a finite number >= {low}"
        raise ConfigError(f"{name} {option} = {value}: must be {allowed}")


class _FedOpt:
    """Shared state and step of the three optimisers; subclasses update ``v``."""

    name: ClassVar[str]
    supports_secure_aggregation: ClassVar[bool] = True

    def __init__(
        self,
        *,
        eta: float,
        eta_l: float,
        beta_1: float,
        beta_2: float,
        tau: float,
        layout: TensorLayout | None,
    ) -> None:
        _check(self.name, "eta", eta, low=0.0, high=None)
        _check(self.name, "eta_l", eta_l, low=0.0, high=None)
        _check(self.name, "beta_1", beta_1, low=0.0, high=1.0)
        _check(self.name, "beta_2", beta_2, low=0.0, high=1.0)
        _check(self.name, "tau", tau, low=0.0, high=None)
        if eta == 0:
            raise ConfigError(f"{self.name} eta = 0: the model would never change; use > 0")
        self.eta = float(eta)
        # The silos' learning rate in Reddi et al.'s tuning; kept beside eta as Flower
        # keeps it. Silos set their own optimiser's rate: nothing is announced.
        self.eta_l = float(eta_l)
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.tau = float(tau)
        self._layout: TensorLayout | None = None
        self._m: list[npt.NDArray[np.floating] | None] = []
        self._v: list[npt.NDArray[np.floating] | None] = []
        self._pending: Model | None = None  # restored before the layout was known
        if layout is not None:
            self._allocate(layout)

    def _allocate(self, layout: TensorLayout) -> None:
        """Zero moments for every floating tensor of `layout` (None for the others)."""
        self._layout = layout
        self._m = [
            np.zeros(spec.numel, _moment_dtype(spec.dtype)) if spec.dtype.is_floating else None
            for spec in layout.specs
        ]
        self._v = [None if m is None else np.zeros_like(m) for m in self._m]

    def state(self) -> Model | None:
        """The moments: ``m/<tensor>`` and ``v/<tensor>`` per floating tensor (None before any)."""
        if self._layout is None:
            return None
        arrays: dict[str, npt.NDArray[np.generic]] = {}
        for spec, m, v in zip(self._layout.specs, self._m, self._v, strict=True):
            if m is not None and v is not None:
                arrays[f"m/{spec.name}"] = m
                arrays[f"v/{spec.name}"] = v
        return Model.from_arrays(arrays)

    def restore(self, state: Model) -> None:
        """Take up moments that :meth:`state` returned.

        Without a layout yet (no ``layout=``), they are taken up at the first round.

        Raises:
            ValueError: The moments are not those of this model's floating tensors.
        """
        if self._layout is None:
            self._pending = state
            return
        expected = self.state()
        assert expected is not None  # the layout is known
        if expected.layout.specs != state.layout.specs:
            raise ValueError(
                f"{self.name}: the stored moments are not those of this model's tensors"
            )
        stored = state.arrays()
        for spec, m, v in zip(self._layout.specs, self._m, self._v, strict=True):
            if m is not None and v is not None:
                m[...] = stored[f"m/{spec.name}"]
                v[...] = stored[f"v/{spec.name}"]

    def configure(self, round: int) -> Mapping[str, Scalar]:
        """Server optimisers announce nothing to the silos."""
        return {}

    def _step_size(self, round: int) -> float:
        """The step ``eta_t`` of round `round` (FedAdam corrects it for the moments' bias)."""
        return self.eta

    def _update_v(
        self, v: npt.NDArray[np.floating], square: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.float64]:
        raise NotImplementedError

    def aggregate(self, round: int, *, base: Model, total: UpdateSum) -> Model:
        """Step from `base` along the moments of round `round`'s mean update.

        Raises:
            ValueError: The round's model has another layout than earlier rounds'
                (the moments would not line up), or the sum's weight is not positive.
        """
        if total.layout != base.layout:
            raise ValueError(f"{self.name}: the round's sum is not in the base model's layout")
        if self._layout is None:
            self._allocate(base.layout)
            if self._pending is not None:
                pending, self._pending = self._pending, None
                self.restore(pending)
        elif self._layout != base.layout:
            raise ValueError(
                f"{self.name}: the model's layout changed since the moments were made; "
                "a server optimiser's state belongs to one model"
            )
        step = self._step_size(round)
        tensors: list[npt.NDArray[np.floating]] = []
        for index, current in enumerate(base.arrays().values()):
            m, v = self._m[index], self._v[index]
            if m is None or v is None:  # not floating: the plain mean
                tensors.append(total.sums[index] / total.weight)
                continue
            delta = total.mean_delta(index, current)
            m_new = self.beta_1 * m + (1.0 - self.beta_1) * delta
            v_new = self._update_v(v, delta * delta)
            m[...] = m_new
            v[...] = v_new
            new = current.reshape(-1).astype(np.float64)
            new += step * m_new / (np.sqrt(v_new) + self.tau)
            tensors.append(new)
        return model_from_flat(base.layout, tensors)


class FedAdam(_FedOpt):
    """Adam on the server (Reddi et al., Algorithm 2, with Flower's defaults).

    Args:
        eta: Server learning rate.
        eta_l: Client learning rate (recorded, not announced).
        beta_1: First-moment decay.
        beta_2: Second-moment decay.
        tau: Adaptivity floor added to ``sqrt(v)``.
        layout: The global model's layout, to allocate the moments now
            (default: at the first round).

    Raises:
        ConfigError: A rate or decay out of range.
    """

    name = "fedadam"

    def __init__(
        self,
        *,
        eta: float = 1e-1,
        eta_l: float = 1e-1,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-9,
        layout: TensorLayout | None = None,
    ) -> None:
        super().__init__(eta=eta, eta_l=eta_l, beta_1=beta_1, beta_2=beta_2, tau=tau, layout=layout)

    def _step_size(self, round: int) -> float:
        # Flower's bias correction (Kingma & Ba's alpha_t), counted from the round number.
        t = round + 1.0
        return float(self.eta * math.sqrt(1.0 - self.beta_2**t) / (1.0 - self.beta_1**t))

    def _update_v(
        self, v: npt.NDArray[np.floating], square: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.float64]:
        return self.beta_2 * v + (1.0 - self.beta_2) * square


class FedYogi(_FedOpt):
    """Yogi on the server: ``v`` moves towards ``delta**2`` by a bounded step.

    Args:
        eta: Server learning rate.
        eta_l: Client learning rate (recorded, not announced).
        beta_1: First-moment decay.
        beta_2: Second-moment decay.
        tau: Adaptivity floor added to ``sqrt(v)``.
        layout: The global model's layout, to allocate the moments now.

    Raises:
        ConfigError: A rate or decay out of range.
    """

    name = "fedyogi"

    def __init__(
        self,
        *,
        eta: float = 1e-2,
        eta_l: float = 0.0316,
        beta_1: float = 0.9,
        beta_2: float = 0.99,
        tau: float = 1e-3,
        layout: TensorLayout | None = None,
    ) -> None:
        super().__init__(eta=eta, eta_l=eta_l, beta_1=beta_1, beta_2=beta_2, tau=tau, layout=layout)

    def _update_v(
        self, v: npt.NDArray[np.floating], square: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.float64]:
        return v - (1.0 - self.beta_2) * square * np.sign(v - square)


class FedAdagrad(_FedOpt):
    """Adagrad on the server: ``v`` sums every round's ``delta**2``; no momentum.

    Args:
        eta: Server learning rate.
        eta_l: Client learning rate (recorded, not announced).
        tau: Adaptivity floor added to ``sqrt(v)``.
        layout: The global model's layout, to allocate the moments now.

    Raises:
        ConfigError: A rate out of range.
    """

    name = "fedadagrad"

    def __init__(
        self,
        *,
        eta: float = 1e-1,
        eta_l: float = 1e-1,
        tau: float = 1e-9,
        layout: TensorLayout | None = None,
    ) -> None:
        # Flower fixes both decays at 0: m is the round's delta, v the running sum.
        super().__init__(eta=eta, eta_l=eta_l, beta_1=0.0, beta_2=0.0, tau=tau, layout=layout)

    def _update_v(
        self, v: npt.NDArray[np.floating], square: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.float64]:
        return v + square
