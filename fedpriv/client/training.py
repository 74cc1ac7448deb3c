"""The pieces of a TorchClient's round: FedProx's pull, autocast under DP, budgets, timing."""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

from fedpriv._types import Scalar
from fedpriv.client.precision import Precision, autocast_dtype
from fedpriv.errors import ConfigError
from fedpriv.privacy.local import LocalDP
from fedpriv.strategy.fedprox import PROXIMAL_MU

__all__ = [
    "StepTimer",
    "autocast_for",
    "batches_of",
    "dataset_size",
    "max_steps_of",
    "proximal_mu",
    "proximal_term",
]

logger = logging.getLogger(__name__)


def dataset_size(loader: DataLoader[Any]) -> int:
    """The records of `loader`'s dataset (a fit result's ``num_examples``)."""
    try:
        return len(loader.dataset)  # type: ignore[arg-type]  # sized datasets only
    except TypeError:
        return sum(len(batch[0]) for batch in loader)


def proximal_mu(config: Mapping[str, Scalar]) -> float:
    """The task's ``proximal_mu`` (0 without one).

    Raises:
        ConfigError: It is not a finite number >= 0.
    """
    value = config.get(PROXIMAL_MU, 0.0)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ConfigError(f"task config {PROXIMAL_MU} = {value!r}: must be a finite number >= 0")
    return float(value)


@contextlib.contextmanager
def proximal_term(optimizer: torch.optim.Optimizer, mu: float) -> Iterator[None]:
    """Add FedProx's ``mu * (w - w_global)`` to every gradient `optimizer` steps with.

    ``w_global`` is each parameter's value on entry (the global model just
    loaded). A step pre-hook on the user's own optimiser adds the term to
    ``p.grad`` right before the update, so any optimiser (SGD, momentum, Adam)
    minimises ``loss + mu / 2 * ||w - w_global||^2``, as FedProx defines it.

    Under DP-SGD the term would be lost in the loss: it depends on the weights
    alone, so it has no per-sample gradient for Opacus to clip. Here Opacus's
    DPOptimizer calls the user's optimiser only after clipping, noising and
    scaling, so the hook sees the privatised gradient and adds the term to it
    unclipped and un-noised. That is post-processing of the DP-SGD output plus
    a function of the global model (public to the silo): no privacy cost, and
    the ledger's accounting is unchanged. With physical batches
    (``max_physical_batch_size``) Opacus calls the optimiser once per logical
    step, so the term is added once per step as well.
    """
    if mu == 0:
        yield
        return
    anchors = [
        (p, p.detach().clone())
        for group in optimizer.param_groups
        for p in group["params"]
        if p.requires_grad
    ]

    def pull(*_: Any) -> None:
        with torch.no_grad():
            for parameter, anchor in anchors:
                correction = (parameter.detach() - anchor).mul_(mu)
                if parameter.grad is None:  # unused this step: the term is its whole gradient
                    parameter.grad = correction
                else:
                    parameter.grad.add_(correction)

    handle = optimizer.register_step_pre_hook(pull)
    try:
        yield
    finally:
        handle.remove()


def autocast_for(
    precision: Precision | str, device: torch.device, privacy: LocalDP | None
) -> torch.dtype | None:
    """The autocast dtype a TorchClient trains with (None: float32).

    Not under DP-SGD: Opacus would compute the per-sample gradients (hooks,
    functorch) or their norms (ghost clipping) in bfloat16, whose rounding (up to
    2^-9 of a norm) can leave a clipped gradient above ``max_grad_norm``: more than
    the sensitivity the ledger accounts for.

    Raises:
        ConfigError: See :func:`autocast_dtype`; or bf16 asked for under DP-SGD.
    """
    dtype = autocast_dtype(precision, device)
    if dtype is None or privacy is None:
        return dtype
    if Precision(precision) is Precision.AUTO:
        logger.info("precision auto: float32 under DP-SGD (clipping must see float32 norms)")
        return None
    raise ConfigError(
        "precision = 'bf16' does not combine with DP-SGD: Opacus would clip per-sample "
        "gradients by norms rounded to bfloat16, which can exceed max_grad_norm and so the "
        "sensitivity the privacy ledger accounts for; use precision = 'fp32' or 'auto'"
    )


class StepTimer:
    """Passes progress on and notes when each step ended: the round's pace without its set-up."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.ends: list[float] = []

    def batch(self) -> None:
        """A step ended: note when, and pass it on."""
        self.ends.append(time.perf_counter())
        self.inner.batch()

    def epoch_done(self, mean_loss: float) -> None:
        """Pass the epoch's end on."""
        self.inner.epoch_done(mean_loss)

    def step_seconds(self) -> float | None:
        """The median time between two steps' ends (None: fewer than two steps)."""
        gaps = [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)]
        return statistics.median(gaps) if gaps else None


def max_steps_of(config: Mapping[str, Scalar]) -> int | None:
    """A task's ``max_steps`` (a pacing coordinator's budget), None when absent.

    Raises:
        ConfigError: It is not a positive integer.
    """
    value = config.get("max_steps")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ConfigError(f"max_steps = {value!r}: expected a whole number of steps")
    if value < 1:
        raise ConfigError(f"max_steps = {value}: at least 1")
    return int(value)


def batches_of(loader: DataLoader[Any]) -> int | None:
    """Batches in one pass over `loader` (None: an iterable dataset, unknown)."""
    try:
        return len(loader)
    except TypeError:  # an iterable dataset: unknown
        return None
