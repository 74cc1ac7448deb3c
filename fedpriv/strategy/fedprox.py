"""FedProx (Li et al., 2020): FedAvg on the server, a proximal term on each silo.

The server side is FedAvg's mean. What differs is announced: every round's
task config carries ``proximal_mu``, and a silo's trainer then keeps its
weights near the global model it started from, minimising
``loss(w) + mu / 2 * ||w - w_global||^2`` (``fedpriv.client.torch.TorchClient``
does this, under DP-SGD too).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from fedpriv._types import Scalar
from fedpriv.errors import ConfigError
from fedpriv.strategy.fedavg import FedAvg

__all__ = ["PROXIMAL_MU", "FedProx"]

#: The task-config key a silo reads the proximal coefficient from (Flower's name).
PROXIMAL_MU = "proximal_mu"


class FedProx(FedAvg):
    """FedAvg that announces the proximal coefficient ``mu`` to every silo.

    ``mu = 0`` is plain FedAvg. Li et al. tune ``mu`` in {0.001, 0.01, 0.1, 1}.

    Args:
        proximal_mu: The proximal coefficient ``mu`` (>= 0).

    Raises:
        ConfigError: `proximal_mu` is negative or not finite.

    Example:
        >>> FedProx(proximal_mu=0.01).configure(1)
        {'proximal_mu': 0.01}
    """

    name = "fedprox"

    def __init__(self, *, proximal_mu: float) -> None:
        if not (math.isfinite(proximal_mu) and proximal_mu >= 0):
            raise ConfigError(
                f"fedprox proximal_mu = {proximal_mu}: must be a finite number >= 0 "
                "(0 is plain FedAvg)"
            )
        super().__init__()
        self.proximal_mu = float(proximal_mu)

    def configure(self, round: int) -> Mapping[str, Scalar]:
        """``{"proximal_mu": mu}`` for every round."""
        return {PROXIMAL_MU: self.proximal_mu}
