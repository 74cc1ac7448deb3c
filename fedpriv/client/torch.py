"""A PyTorch helper: give it a model, loaders, a loss and an optimiser factory."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy.typing as npt
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedpriv._types import Scalar
from fedpriv.client.base import EvaluateResult, FitResult
from fedpriv.client.progress import training_progress
from fedpriv.privacy.accounting import GaussianSteps
from fedpriv.privacy.local import LocalDP, prepare_module, private_plan, train_private
from fedpriv.wire.torch_interop import arrays_from_state_dict, copy_arrays_into

__all__ = ["TorchClient", "best_device"]

logger = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def best_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dataset_size(loader: DataLoader[Any]) -> int:
    try:
        return len(loader.dataset)  # type: ignore[arg-type]  # sized datasets only
    except TypeError:
        return sum(len(batch[0]) for batch in loader)


def _batches(loader: DataLoader[Any]) -> int | None:
    try:
        return len(loader)
    except TypeError:  # an iterable dataset: unknown
        return None


class TorchClient:
    """Trains a ``torch.nn.Module`` on local loaders; implements :class:`fedpriv.Client`.

    Args:
        model: The network; its ``state_dict`` defines what is exchanged.
        train_loader: Local training data, yielding ``(inputs, targets)``.
        loss_fn: Loss on ``(outputs, targets)``.
        optimizer_factory: Builds a fresh optimiser from parameters each round,
            e.g. ``lambda p: torch.optim.Adam(p, lr=1e-3)``.
        val_loader: Local validation data for ``evaluate``; None reports nothing.
        epochs: Local epochs per round (a task's ``epochs`` config overrides it).
        device: Where to train; default :func:`best_device`.
        privacy: Train with DP-SGD (Opacus) under these settings. Layers Opacus
            cannot train privately (BatchNorm) are replaced by its validator.
            ``loss_fn`` must then accept ``reduction=``, as the functional losses do.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        train_loader: DataLoader[Any],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        optimizer_factory: OptimizerFactory,
        val_loader: DataLoader[Any] | None = None,
        epochs: int = 1,
        device: torch.device | str | None = None,
        privacy: LocalDP | None = None,
    ) -> None:
        self.device = torch.device(device) if device is not None else best_device()
        self.privacy = privacy
        if privacy is not None:
            model = prepare_module(model)
        self.model = model.to(self.device)
        self._plans: dict[int, GaussianSteps] = {}
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.loss_fn = loss_fn
        self.optimizer_factory = optimizer_factory
        self.epochs = epochs

    def model_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name and shape of every tensor ``fit`` and ``evaluate`` accept (the state dict).

        The runtime declines a task whose model has other names or shapes
        (:class:`fedpriv.client.tasks.ModelOwner`) instead of failing in ``fit``.
        """
        return {name: tuple(t.shape) for name, t in self.model.state_dict().items()}

    def _load(self, parameters: Mapping[str, npt.NDArray[Any]]) -> None:
        copy_arrays_into(self.model.state_dict(), parameters)

    def plan_privacy(self, config: Mapping[str, Scalar]) -> GaussianSteps | None:
        """The DP mechanism ``fit`` will run with `config` (None without privacy)."""
        if self.privacy is None:
            return None
        epochs = int(config.get("epochs", self.epochs))
        if epochs not in self._plans:
            self._plans[epochs] = private_plan(
                self.privacy, batches_per_epoch=len(self.train_loader), epochs=epochs
            )
        return self._plans[epochs]

    def fit(
        self, parameters: Mapping[str, npt.NDArray[Any]], *, config: Mapping[str, Scalar]
    ) -> FitResult:
        """Load `parameters`, train for ``epochs`` and return the new state dict."""
        self._load(parameters)
        epochs = int(config.get("epochs", self.epochs))
        optimizer = self.optimizer_factory(self.model.parameters())
        plan = self.plan_privacy(config)
        label = f"round {config['round']}" if "round" in config else "training"
        batches = _batches(self.train_loader)
        if self.privacy is not None and plan is not None:
            if self.privacy.max_physical_batch_size:
                batches = None  # physical batches: their number varies
            with training_progress(epochs=epochs, batches=batches, label=label) as progress:
                mean_loss = train_private(
                    self.model,
                    loader=self.train_loader,
                    loss_fn=self.loss_fn,
                    optimizer=optimizer,
                    dp=self.privacy,
                    plan=plan,
                    epochs=epochs,
                    device=self.device,
                    progress=progress,
                )
            return FitResult(
                parameters=arrays_from_state_dict(self.model.state_dict()),
                num_examples=_dataset_size(self.train_loader),
                metrics={"train_loss": mean_loss, "noise_multiplier": plan.noise_multiplier},
            )
        self.model.train()
        total_loss = 0.0
        seen = 0
        with training_progress(epochs=epochs, batches=batches, label=label) as progress:
            for _ in range(epochs):
                epoch_loss, epoch_seen = 0.0, 0
                for inputs, targets in self.train_loader:
                    inputs, targets = inputs.to(self.device), targets.to(self.device)
                    optimizer.zero_grad(set_to_none=True)
                    loss = self.loss_fn(self.model(inputs), targets)
                    loss.backward()  # type: ignore[no-untyped-call]  # torch stub gap
                    optimizer.step()
                    epoch_loss += float(loss.detach()) * len(inputs)
                    epoch_seen += len(inputs)
                    progress.batch()
                progress.epoch_done(epoch_loss / max(epoch_seen, 1))
                total_loss += epoch_loss
                seen += epoch_seen
        return FitResult(
            parameters=arrays_from_state_dict(self.model.state_dict()),
            num_examples=_dataset_size(self.train_loader),
            metrics={"train_loss": total_loss / max(seen, 1)},
        )

    @torch.no_grad()
    def evaluate(
        self, parameters: Mapping[str, npt.NDArray[Any]], *, config: Mapping[str, Scalar]
    ) -> EvaluateResult:
        """Load `parameters` and report loss (and accuracy for class targets) on ``val_loader``."""
        self._load(parameters)
        if self.val_loader is None:
            return EvaluateResult(num_examples=0)
        self.model.eval()
        total_loss = 0.0
        correct = 0
        seen = 0
        classification = True
        for inputs, targets in self.val_loader:
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            outputs = self.model(inputs)
            total_loss += float(self.loss_fn(outputs, targets)) * len(inputs)
            seen += len(inputs)
            if (
                classification
                and outputs.dim() == 2
                and targets.dim() == 1
                and not targets.is_floating_point()
            ):
                correct += int((outputs.argmax(dim=1) == targets).sum())
            else:
                classification = False
        metrics: dict[str, Scalar] = {"loss": total_loss / max(seen, 1)}
        if classification and seen:
            metrics["accuracy"] = correct / seen
        return EvaluateResult(num_examples=seen, metrics=metrics)
