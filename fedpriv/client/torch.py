"""A PyTorch helper: give it a model, loaders, a loss and an optimiser factory."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from fedpriv._types import Scalar
from fedpriv.client.base import EvaluateResult, FitResult
from fedpriv.client.distributed import data_parallel, global_batches, local_loader, world
from fedpriv.client.precision import Precision, autocast
from fedpriv.client.progress import training_progress
from fedpriv.client.training import (
    StepTimer,
    autocast_for,
    batches_of,
    dataset_size,
    max_steps_of,
    proximal_mu,
    proximal_term,
)
from fedpriv.errors import ConfigError
from fedpriv.privacy.accounting import GaussianSteps
from fedpriv.privacy.layers import dp_layer_problems
from fedpriv.privacy.local import (
    Forward,
    GradSampleMode,
    LocalDP,
    prepare_module,
    private_plan,
    split_batch,
    train_private,
)
from fedpriv.wire.layout import TensorLayout
from fedpriv.wire.torch_interop import (
    Exchange,
    arrays_from_state_dict,
    copy_arrays_into,
    exchanged_state,
    views_of_one_buffer,
)

__all__ = ["TorchClient", "best_device"]

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def best_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TorchClient:
    """Trains a ``torch.nn.Module`` on local loaders; implements :class:`fedpriv.Client`.

    Args:
        model: The network. What is exchanged with the coordinator is its
            ``state_dict`` less its frozen parameters (see `exchange`).
        train_loader: Local training data, yielding ``(inputs, targets)``, or
            ``(*features, targets)`` for a model of several inputs.
        loss_fn: Loss on ``(outputs, targets)``.
        optimizer_factory: Builds a fresh optimiser from parameters each round,
            e.g. ``lambda p: torch.optim.Adam(p, lr=1e-3)``.
        val_loader: Local validation data for ``evaluate``; None reports nothing.
        epochs: Local epochs per round (a task's ``epochs`` config overrides it).
        device: Where to train; default :func:`best_device`.
        privacy: Train with DP-SGD (Opacus) under these settings. Layers Opacus
            cannot train privately (BatchNorm) are replaced by its validator.
            ``loss_fn`` must then accept ``reduction=``, as the functional losses do.
        exchange: ``"trainable"`` (the default): the state dict without the
            parameters that have ``requires_grad`` off, so a frozen base model stays
            on the silo and only what trains (adapters, a head) and the buffers
            travel; the coordinator's ``[model] exchange`` must say the same.
            ``"all"``: the whole state dict.
        precision: ``"auto"`` (the default) runs the forward pass under bfloat16
            autocast on a CUDA GPU that supports it and in float32 elsewhere;
            ``"bf16"`` asks for it (on the CPU too), ``"fp32"`` turns it off. The
            parameters and the exchanged model stay float32. Not under DP-SGD
            (``"auto"`` is float32 there, ``"bf16"`` an error): see ``autocast_for``.
        forward: ``forward(model, *features) -> outputs``; the default is
            ``model(*features)``. :mod:`fedpriv.client.hf` passes keywords to a
            Hugging Face model and takes its logits.

    A task config with ``proximal_mu`` > 0 (FedProx) adds
    ``mu / 2 * ||w - w_global||^2`` to the local objective, ``w_global`` being
    the model the round started from. Its gradient ``mu * (w - w_global)`` is
    added to each step's gradient inside the optimiser's step; with DP-SGD that
    is after Opacus clips and noises, which a loss term could not be (Opacus
    sees only per-sample gradients, and this term has none). See
    :func:`proximal_term`.
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
        precision: Precision | str = Precision.AUTO,
        exchange: Exchange | str = Exchange.TRAINABLE,
        forward: Forward | None = None,
    ) -> None:
        self.device = torch.device(device) if device is not None else best_device()
        self.privacy = privacy
        self.autocast = autocast_for(precision, self.device, privacy)
        if privacy is not None:
            model = prepare_module(model)
        self.model = model.to(self.device)
        try:
            self.exchange = Exchange(exchange)
            self._exchanged()  # nothing to exchange is an error now, not in the first round
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self._plans: dict[int, GaussianSteps] = {}
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.loss_fn = loss_fn
        self.optimizer_factory = optimizer_factory
        self.epochs = epochs
        self.forward = forward
        #: (seconds per local step last round, steps of a full round); None before fit.
        self.pace: tuple[float, int] | None = None
        self._timer: StepTimer | None = None
        # The buffer the exchanged tensors are views of (receive_buffer), and its layout.
        self._flat: npt.NDArray[np.uint8] | None = None
        self._flat_layout: TensorLayout | None = None
        if privacy is not None:
            self._check_dp_layers(privacy)

    def _check_dp_layers(self, privacy: LocalDP) -> None:
        """Refuse, naming the layers, a model whose gradients DP-SGD cannot clip per record."""
        dataset = self.train_loader.dataset
        if isinstance(dataset, IterableDataset) or not len(dataset):  # type: ignore[arg-type]
            return  # train_private says why it cannot sample these
        record = dataset[0]
        problems = dp_layer_problems(
            self.model,
            record=record[:-1],
            forward=self.forward,
            ghost=privacy.grad_sample_mode is GradSampleMode.GHOST,
        )
        if problems:
            raise ConfigError("the model cannot be trained with DP-SGD: " + "; ".join(problems))

    def _forward(self, model: nn.Module, *features: torch.Tensor) -> torch.Tensor:
        return model(*features) if self.forward is None else self.forward(model, *features)

    def model_shapes(self) -> dict[str, tuple[int, ...]]:
        """Name and shape of every tensor ``fit`` and ``evaluate`` accept (those exchanged).

        The runtime declines a task whose model has other names or shapes
        (:class:`fedpriv.client.tasks.ModelOwner`) instead of failing in ``fit``.
        """
        return {name: tuple(t.shape) for name, t in self._exchanged().items()}

    def receive_buffer(self, layout: TensorLayout) -> npt.NDArray[np.uint8] | None:
        """Memory to receive the next model into: the exchanged tensors' own (None: copy).

        On the CPU, the exchanged parameters and buffers are moved once into one
        buffer laid out as the wire lays out the model, and stay views of it. The
        silo's runtime then receives each model straight into the tensors that
        train, and the update leaves from them: one model of memory, not two. None
        (the model is copied in as before) on a GPU, or for a layout that does not
        match the exchanged tensors one for one.
        """
        if self.device.type != "cpu":
            return None
        exchanged = self._exchanged()
        if self._flat is not None and self._flat_layout == layout:
            base = self._flat.ctypes.data
            if all(  # still views of it (nothing rebound the tensors since)
                t.data_ptr() == base + offset
                for t, offset in zip(exchanged.values(), layout.offsets, strict=True)
            ):
                return self._flat
        flat = views_of_one_buffer(self.model, exchanged, layout)
        if flat is None:
            return None
        self._flat, self._flat_layout = flat, layout
        return flat

    def exchanged_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors exchanged with the coordinator, by name: views of the model's own."""
        return exchanged_state(self.model, self.exchange)

    _exchanged = exchanged_tensors

    def _load(self, parameters: Mapping[str, npt.NDArray[Any]]) -> None:
        copy_arrays_into(self._exchanged(), parameters)

    def plan_privacy(self, config: Mapping[str, Scalar]) -> GaussianSteps | None:
        """The DP mechanism ``fit`` will run with `config` (None without privacy).

        A ``max_steps`` below the round's full work (a pacing coordinator's budget)
        runs that many steps at the same noise and sample rate: less is spent.
        """
        if self.privacy is None:
            return None
        epochs = int(config.get("epochs", self.epochs))
        if epochs not in self._plans:
            self._plans[epochs] = private_plan(
                self.privacy, batches_per_epoch=self._batches_per_epoch(), epochs=epochs
            )
        full = self._plans[epochs]
        limit = max_steps_of(config)
        if limit is None or limit >= full.steps:
            return full
        return GaussianSteps(
            noise_multiplier=full.noise_multiplier, sample_rate=full.sample_rate, steps=limit
        )

    def _batches_per_epoch(self) -> int:
        """Steps per epoch: of the global batch when the silo runs on several processes."""
        here = world()
        if here is None:
            return len(self.train_loader)
        size = len(self.train_loader.dataset)  # type: ignore[arg-type]
        return global_batches(size, self.train_loader.batch_size or 1, here.size)

    def fit(
        self, parameters: Mapping[str, npt.NDArray[Any]], *, config: Mapping[str, Scalar]
    ) -> FitResult:
        """Load `parameters`, train for ``epochs`` and return the new state dict.

        A task config's ``max_steps`` (from a pacing coordinator) ends the round after
        that many local steps. Afterwards :attr:`pace` holds the seconds per step this
        round took and the steps of a full round, which the silo reports.
        """
        self._load(parameters)
        epochs = int(config.get("epochs", self.epochs))
        mu = proximal_mu(config)
        optimizer = self.optimizer_factory(self.model.parameters())
        with proximal_term(optimizer, mu):
            result, _ = self._train(optimizer, config, epochs)
        step_seconds = self._timer.step_seconds() if self._timer is not None else None
        if step_seconds is not None:
            self.pace = (step_seconds, epochs * self._batches_per_epoch())
        return result

    def _train(
        self, optimizer: torch.optim.Optimizer, config: Mapping[str, Scalar], epochs: int
    ) -> tuple[FitResult, int]:
        """The round's result and the local steps it took."""
        label = f"round {config['round']}" if "round" in config else "training"
        plan = self.plan_privacy(config)
        if self.privacy is not None and plan is not None:
            full = epochs * self._batches_per_epoch()
            if plan.steps < full:  # a pacing budget: the steps in one pass
                epochs = 1
            batches = None if self.privacy.max_physical_batch_size else plan.steps // epochs
            with training_progress(epochs=epochs, batches=batches, label=label) as shown:
                progress = self._timer = StepTimer(shown)
                mean_loss = train_private(
                    self.model,
                    distributed=world() is not None,
                    loader=self.train_loader,
                    loss_fn=self.loss_fn,
                    optimizer=optimizer,
                    dp=self.privacy,
                    plan=plan,
                    epochs=epochs,
                    device=self.device,
                    progress=progress,
                    forward=self.forward,
                )
            metrics = {"train_loss": mean_loss, "noise_multiplier": plan.noise_multiplier}
            return self._result(metrics), plan.steps
        return self._train_plain(optimizer, epochs, label, max_steps_of(config))

    def _result(self, metrics: Mapping[str, Scalar]) -> FitResult:
        return FitResult(
            parameters=arrays_from_state_dict(self._exchanged()),
            num_examples=dataset_size(self.train_loader),
            metrics=metrics,
        )

    def _train_plain(
        self, optimizer: torch.optim.Optimizer, epochs: int, label: str, limit: int | None
    ) -> tuple[FitResult, int]:
        self.model.train()
        total_loss, seen, steps = 0.0, 0, 0
        here = world()
        model: nn.Module = self.model
        loader = self.train_loader
        if here is not None:  # one silo on several processes: DDP over this rank's share
            model, loader = data_parallel(self.model, self.device), local_loader(loader, here)
        batches = batches_of(loader)
        with training_progress(epochs=epochs, batches=batches, label=label) as shown:
            progress = self._timer = StepTimer(shown)
            for _ in range(epochs):
                epoch_loss, epoch_seen = 0.0, 0
                for batch in loader:
                    if limit is not None and steps >= limit:
                        break
                    features, targets = split_batch(batch, self.device)
                    optimizer.zero_grad(set_to_none=True)
                    with autocast(self.autocast, self.device):  # the backward pass outside it
                        loss = self.loss_fn(self._forward(model, *features), targets)
                    loss.backward()  # type: ignore[no-untyped-call]  # torch stub gap
                    optimizer.step()
                    epoch_loss += float(loss.detach()) * len(targets)
                    epoch_seen += len(targets)
                    steps += 1
                    progress.batch()
                progress.epoch_done(epoch_loss / max(epoch_seen, 1))
                total_loss += epoch_loss
                seen += epoch_seen
        return self._result({"train_loss": total_loss / max(seen, 1)}), steps

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
        for batch in self.val_loader:
            features, targets = split_batch(batch, self.device)
            with autocast(self.autocast, self.device):
                outputs = self._forward(self.model, *features)
                loss = self.loss_fn(outputs, targets)
            total_loss += float(loss) * len(targets)
            seen += len(targets)
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
