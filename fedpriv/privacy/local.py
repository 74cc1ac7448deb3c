"""Sample-level differential privacy inside a silo: DP-SGD with Opacus.

One round of private training wraps the silo's model with Opacus, trains with
Poisson sampling, per-sample clipping and Gaussian noise, then unwraps it. The
mechanism it ran (noise multiplier, sample rate, steps) is returned so the
ledger can record it; Opacus's own accountant is not the record of truth.
"""

from __future__ import annotations

import enum
import logging
import math
import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from opacus import PrivacyEngine
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader

from fedpriv.errors import ConfigError
from fedpriv.privacy.accounting import GaussianSteps, noise_multiplier_for

__all__ = ["GradSampleMode", "LocalDP", "prepare_module", "private_plan", "train_private"]

logger = logging.getLogger(__name__)

LossFn = Callable[..., torch.Tensor]


class GradSampleMode(enum.Enum):
    """How Opacus obtains per-sample gradient norms."""

    # Ghost clipping: norms without materialising per-sample gradients (Linear,
    # Embedding); other layers fall back to fast gradient clipping. Two backward passes.
    GHOST = "ghost"
    # Classic hooks: per-sample gradients for every layer Opacus supports.
    HOOKS = "hooks"
    # torch.func vmap per-sample gradients.
    FUNCTORCH = "functorch"


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalDP:
    """DP-SGD settings of one silo.

    Give either ``noise_multiplier`` or ``target_epsilon`` with ``planned_rounds``
    (Opacus then picks the smallest noise that keeps the whole planned run
    within the target at ``delta``).

    Args:
        max_grad_norm: Per-sample gradient clipping norm.
        noise_multiplier: Noise standard deviation / clipping norm.
        target_epsilon: Epsilon the planned run may reach.
        planned_rounds: Rounds the silo expects to train (for ``target_epsilon``).
        delta: Delta for ``target_epsilon``; use the silo budget's delta.
        grad_sample_mode: How per-sample norms are computed.
        max_physical_batch_size: Split Poisson batches into physical batches of at
            most this many examples (bounds memory; accounting unchanged).
    """

    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    planned_rounds: int | None = None
    delta: float = 1e-5
    grad_sample_mode: GradSampleMode = GradSampleMode.GHOST
    max_physical_batch_size: int | None = None

    def __post_init__(self) -> None:
        if not self.max_grad_norm > 0 or not math.isfinite(self.max_grad_norm):
            raise ConfigError(f"max_grad_norm = {self.max_grad_norm}: must be a finite number > 0")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ConfigError("local DP needs exactly one of noise_multiplier or target_epsilon")
        if self.target_epsilon is not None and not (self.planned_rounds or 0) >= 1:
            raise ConfigError("target_epsilon needs planned_rounds >= 1 to spread the budget over")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ConfigError(f"noise_multiplier = {self.noise_multiplier}: must be > 0")


def prepare_module(module: nn.Module, *, fix: bool = True) -> nn.Module:
    """Check that Opacus can train `module`; replace unsupported layers if `fix`.

    BatchNorm mixes examples in a batch and breaks per-sample privacy; Opacus's
    validator swaps it for GroupNorm.

    Raises:
        ConfigError: The module has layers Opacus cannot handle and `fix` is False,
            or fixing did not help.
    """
    problems = ModuleValidator.validate(module, strict=False)
    if not problems:
        return module
    if not fix:
        raise ConfigError(
            "the model cannot be trained with DP-SGD: "
            + "; ".join(str(p) for p in problems)
            + " (pass fix=True to let Opacus replace these layers)"
        )
    fixed: nn.Module = ModuleValidator.fix(module)
    remaining = ModuleValidator.validate(fixed, strict=False)
    if remaining:
        raise ConfigError("Opacus could not fix the model: " + "; ".join(str(p) for p in remaining))
    logger.warning(
        "replaced layers Opacus cannot train privately: %s", "; ".join(map(str, problems))
    )
    return fixed


def private_plan(dp: LocalDP, *, batches_per_epoch: int, epochs: int) -> GaussianSteps:
    """The mechanism one round will run: Opacus samples each record with rate 1/batches."""
    sample_rate = 1.0 / batches_per_epoch
    steps = epochs * batches_per_epoch
    if dp.noise_multiplier is not None:
        sigma = dp.noise_multiplier
    else:
        assert dp.target_epsilon is not None and dp.planned_rounds is not None  # __post_init__
        sigma = noise_multiplier_for(
            dp.target_epsilon,
            delta=dp.delta,
            sample_rate=sample_rate,
            steps=steps * dp.planned_rounds,
        )
    return GaussianSteps(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)


class _Criterion(nn.Module):
    """A loss callable as a module with the ``reduction`` switch ghost clipping flips."""

    def __init__(self, loss_fn: LossFn) -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self.reduction = "mean"

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(outputs, targets, reduction=self.reduction)


class EpochProgress(Protocol):
    """Receives training progress (``fedpriv.client.progress`` shows it)."""

    def batch(self) -> None:
        """One batch was trained on."""

    def epoch_done(self, mean_loss: float) -> None:
        """An epoch ended with this mean training loss."""


def train_private(
    module: nn.Module,
    *,
    loader: DataLoader[Any],
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    dp: LocalDP,
    plan: GaussianSteps,
    epochs: int,
    device: torch.device,
    progress: EpochProgress | None = None,
) -> float:
    """Run `epochs` of DP-SGD on `module` in place; return the mean training loss.

    `loss_fn` must accept ``reduction=`` (as ``torch.nn.functional`` losses do).
    Noise comes from a generator seeded from the operating system's CSPRNG,
    never from torch's global generator.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63))
    criterion = _Criterion(loss_fn)
    module.train()  # Opacus refuses modules left in eval mode (by evaluate())
    with warnings.catch_warnings():
        # Opacus warns that its torchcsprng-based secure mode is off; the noise
        # generator passed below is seeded from the OS CSPRNG instead.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")
        made = engine.make_private(
            module=module,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=loader,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=dp.grad_sample_mode.value,
            noise_generator=generator,
        )
    if dp.grad_sample_mode is GradSampleMode.GHOST:
        wrapped, private_optimizer, private_criterion, private_loader = made
    else:
        wrapped, private_optimizer, private_loader = made
        private_criterion = criterion
    total, seen = 0.0, 0
    try:
        with warnings.catch_warnings():
            # torch notes that Opacus's full backward hooks fire on outputs when inputs
            # need no gradient; that is how per-sample clipping works, not a fault.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            wrapped.train()
            for _ in range(epochs):
                before_total, before_seen = total, seen
                total, seen = _epoch(
                    wrapped,
                    private_loader,
                    private_optimizer,
                    private_criterion,
                    dp,
                    device,
                    total,
                    seen,
                    progress,
                )
                if progress is not None:
                    progress.epoch_done((total - before_total) / max(seen - before_seen, 1))
    finally:
        wrapped._close()  # remove Opacus's hooks: the module is wrapped afresh each round
    return total / max(seen, 1)


def _epoch(
    wrapped: nn.Module,
    loader: DataLoader[Any],
    optimizer: Any,
    criterion: Any,
    dp: LocalDP,
    device: torch.device,
    total: float,
    seen: int,
    progress: EpochProgress | None,
) -> tuple[float, int]:
    manager = (
        BatchMemoryManager(
            data_loader=loader,
            max_physical_batch_size=dp.max_physical_batch_size,
            optimizer=optimizer,
        )
        if dp.max_physical_batch_size
        else None
    )
    batches = manager.__enter__() if manager is not None else loader
    try:
        for inputs, targets in batches:
            if len(inputs) == 0:  # an empty Poisson batch: nothing to learn from
                continue
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(wrapped(inputs), targets)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(inputs)
            seen += len(inputs)
            if progress is not None:
                progress.batch()
    finally:
        if manager is not None:
            manager.__exit__(None, None, None)
    return total, seen
