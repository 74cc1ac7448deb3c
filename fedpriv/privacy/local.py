"""Sample-level differential privacy inside a silo: DP-SGD with Opacus.

One round of private training wraps the silo's model with Opacus, trains with
Poisson sampling, per-sample clipping and Gaussian noise, then unwraps it. The
mechanism it ran (noise multiplier, sample rate, steps) is returned so the
ledger can record it; Opacus's own accountant is not the record of truth.

Amplification by sampling holds only if nobody can predict the batches, so the
Poisson sampler and the noise draw from generators whose whole state comes from
the operating system's CSPRNG: never torch's global generator, the loader's own
generator or any seed a user sets. A user's ``torch.manual_seed`` still fixes
data splits and model initialisation; training does not touch the global state.
Every one of the planned steps is taken, an empty Poisson batch included (its
update is noise alone), so the number of noised steps reveals nothing either.
"""

from __future__ import annotations

import enum
import logging
import math
import secrets
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.data_loader import wrap_collate_with_empty
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.utils.batch_memory_manager import BatchMemoryManager
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from fedpriv.errors import ConfigError
from fedpriv.privacy.accounting import DEFAULT_DELTA, GaussianSteps, noise_multiplier_for
from fedpriv.privacy.sampling import PoissonShareSampler

__all__ = [
    "Forward",
    "GradSampleMode",
    "LocalDP",
    "prepare_module",
    "private_plan",
    "split_batch",
    "train_private",
]

logger = logging.getLogger(__name__)

LossFn = Callable[..., torch.Tensor]
#: ``forward(model, *features) -> outputs``: how a batch's features reach the model
#: (a Hugging Face model takes keywords and returns logits inside an output object).
Forward = Callable[..., torch.Tensor]


def split_batch(
    batch: Sequence[torch.Tensor], device: torch.device
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A batch ``(*features, targets)`` on `device`: the features and the targets.

    A batch is a tuple whose last tensor holds the targets, one row per record:
    ``(inputs, targets)`` for most models, ``(input_ids, attention_mask, labels)``
    for a language model.
    """
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ConfigError(
            "a training batch must be a tuple (*features, targets), e.g. (inputs, targets); "
            f"got {type(batch).__name__}"
        )
    *features, targets = (t.to(device) for t in batch)
    return features, targets


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
    delta: float = DEFAULT_DELTA
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
        # 0 for the placeholder record of an empty Poisson batch (see _placeholder).
        self.scale = 1.0

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn(outputs, targets, reduction=self.reduction)
        if self.reduction == "none" and loss.dim() > 1:
            # Ghost clipping scales this by its per-record factors, shape (B,); a (B, 1)
            # or (B, k) loss (mse_loss on a regression head) would broadcast to B x B and
            # clip no record. One mean per record keeps the "mean" loss's value.
            loss = loss.reshape(loss.shape[0], -1).mean(dim=1)
        return loss * self.scale if self.scale != 1.0 else loss


def _placeholder(empty: torch.Tensor) -> torch.Tensor:
    """One all-zero record shaped like the records of the empty batch `empty`.

    An empty Poisson batch still takes its step (its update is noise alone). Not
    every model accepts a batch of none (Hugging Face attention reshapes by
    ``-1``), so the step runs on this data-independent record with its loss scaled
    by 0: its per-sample gradient is exactly zero, clipping keeps it zero, and the
    optimiser adds the same noise over the same expected batch size as for an
    empty batch.
    """
    return torch.zeros((1, *empty.shape[1:]), dtype=empty.dtype, device=empty.device)


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
    forward: Forward | None = None,
    distributed: bool = False,
) -> float:
    """Run `epochs` of DP-SGD on `module` in place; return the mean training loss.

    `loss_fn` must accept ``reduction=`` (as ``torch.nn.functional`` losses do).
    Batches are ``(*features, targets)`` (:func:`split_batch`); `forward` maps the
    wrapped module and the features to outputs (default ``module(*features)``).
    With `distributed` (a torch.distributed process group, one silo on several
    processes) the module trains under Opacus' DP-DDP: each rank samples its share
    of ``loader.dataset`` (every ``world_size``-th record) at ``plan.sample_rate``,
    rank 0 adds the noise and the clipped sums are added across ranks, so `plan`
    is the mechanism of the global batch (:mod:`fedpriv.client.distributed`).
    Each epoch takes ``plan.steps // epochs`` steps on Poisson batches drawn at
    ``plan.sample_rate`` from ``loader.dataset``; only the loader's collate
    function and worker settings are kept, never its sampler or generator.
    Sampling and noise come from generators seeded from the operating system's
    CSPRNG (see `_secret_generator`).

    Raises:
        ConfigError: `plan` does not split into `epochs` equal epochs, or the
            loader's dataset cannot be sampled (an ``IterableDataset``).
    """
    if epochs < 1 or plan.steps % epochs:
        raise ConfigError(
            f"a plan of {plan.steps} steps does not split into {epochs} equal epochs; "
            "build the plan with private_plan(..., epochs=epochs)"
        )
    private_loader = _poisson_loader(
        loader,
        sample_rate=plan.sample_rate,
        steps_per_epoch=plan.steps // epochs,
        generator=_secret_generator(torch.device("cpu")),  # the sampler draws on the CPU
        distributed=distributed,
    )
    if distributed:
        module = DPDDP(module)
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
            data_loader=private_loader,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            # The loader already samples (Poisson, from a secret generator);
            # Opacus would resample from the loader's or torch's global generator.
            poisson_sampling=False,
            grad_sample_mode=dp.grad_sample_mode.value,
            noise_generator=_secret_generator(device),
        )
    if dp.grad_sample_mode is GradSampleMode.GHOST:
        wrapped, private_optimizer, private_criterion, _ = made
    else:
        wrapped, private_optimizer, _ = made
        private_criterion = criterion
    # What make_private does under poisson_sampling=True: each step's per-sample
    # gradients must come from one Poisson batch.
    wrapped.forbid_grad_accumulation()
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
                    (private_criterion, criterion),
                    dp,
                    device,
                    total,
                    seen,
                    progress,
                    forward,
                )
                if progress is not None:
                    progress.epoch_done((total - before_total) / max(seen - before_seen, 1))
    finally:
        wrapped._close()  # remove Opacus's hooks: the module is wrapped afresh each round
    return total / max(seen, 1)


def _secret_generator(device: torch.device) -> torch.Generator:
    """A torch generator on `device` whose state is secret, drawn from the OS CSPRNG.

    A CPU generator (Mersenne Twister) gets its whole 19,937-bit state from
    ``secrets``; other devices' generators (Philox on CUDA) take a 64-bit seed,
    which is then their only secret.

    Example:
        >>> a, b = _secret_generator(torch.device("cpu")), _secret_generator(torch.device("cpu"))
        >>> bool(torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b)))
        False
    """
    generator = torch.Generator(device=device)
    seed = secrets.randbits(64)
    generator.manual_seed(seed)
    if generator.device.type == "cpu":
        _fill_mt19937_state(generator, seed=seed)
    return generator


# torch's serialised CPU generator state: the legacy THGeneratorState (initial
# seed u64, left i32, seeded i32, next u64, then 624 u64 slots that each hold one
# 32-bit Mersenne Twister word, then the normal-sampling cache).
_MT_WORDS = 624
_MT_STATE_OFFSET = 24
_MT_STATE_BYTES = 5056


def _fill_mt19937_state(generator: torch.Generator, *, seed: int) -> None:
    """Replace the Mersenne Twister words of a freshly seeded CPU `generator` with secret ones.

    The layout is checked against what torch's seeding writes before anything is
    replaced; where it differs (another torch build), the 64-bit seed stays the secret.
    """
    state = generator.get_state().numpy().copy()
    words = state[_MT_STATE_OFFSET : _MT_STATE_OFFSET + 8 * _MT_WORDS].view("<u8")
    first = seed & 0xFFFFFFFF
    second = (1812433253 * (first ^ (first >> 30)) + 1) & 0xFFFFFFFF
    if state.size != _MT_STATE_BYTES or int(words[0]) != first or int(words[1]) != second:
        logger.warning(
            "unknown torch generator state layout (%d bytes): the Poisson sampler's "
            "secret is its 64-bit seed only",
            state.size,
        )
        return
    words[:] = np.frombuffer(secrets.token_bytes(4 * _MT_WORDS), dtype="<u4")
    generator.set_state(torch.from_numpy(state))


def _poisson_loader(
    loader: DataLoader[Any],
    *,
    sample_rate: float,
    steps_per_epoch: int,
    generator: torch.Generator,
    distributed: bool = False,
) -> DataLoader[Any]:
    """A loader of `steps_per_epoch` Poisson batches of ``loader.dataset`` per pass.

    Opacus's own pieces (its sampler and empty-batch collate) with the step count
    given exactly: ``DPDataLoader.from_data_loader`` takes ``int(1 / (1 / n))``
    steps, one short of ``n`` for some ``n`` (93, for one).
    """
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        raise ConfigError(
            "DP-SGD needs a map-style dataset to sample records from, got an IterableDataset"
        )
    size = len(dataset)  # type: ignore[arg-type]
    if size < 1:
        raise ConfigError("the training loader's dataset is empty")
    first: Sequence[Any] = dataset[0]
    sampler: Any = (
        PoissonShareSampler(
            size=size,
            rank=torch.distributed.get_rank(),
            world=torch.distributed.get_world_size(),
            rate=sample_rate,
            steps=steps_per_epoch,
            generator=generator,
        )
        if distributed
        else UniformWithReplacementSampler(
            num_samples=size, sample_rate=sample_rate, generator=generator, steps=steps_per_epoch
        )
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=wrap_collate_with_empty(
            collate_fn=loader.collate_fn,
            sample_empty_shapes=[(0, *getattr(x, "shape", ())) for x in first],
            dtypes=[getattr(x, "dtype", type(x)) for x in first],
        ),
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        # Workers' base seeds are drawn from this generator: the secret one, not torch's.
        generator=generator,
        prefetch_factor=loader.prefetch_factor,
        persistent_workers=loader.persistent_workers,
    )


def _epoch(
    wrapped: nn.Module,
    loader: DataLoader[Any],
    optimizer: Any,
    criteria: tuple[Any, _Criterion],
    dp: LocalDP,
    device: torch.device,
    total: float,
    seen: int,
    progress: EpochProgress | None,
    forward: Forward | None,
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
        for batch in batches:
            # An empty Poisson batch still takes its step: the update is noise alone,
            # so whether a batch was empty cannot be read from the steps taken.
            features, targets = split_batch(batch, device)
            empty = not len(targets)
            if empty:
                features, targets = [_placeholder(f) for f in features], _placeholder(targets)
            criterion, inner = criteria
            inner.scale = 0.0 if empty else 1.0
            optimizer.zero_grad(set_to_none=True)
            outputs = wrapped(*features) if forward is None else forward(wrapped, *features)
            loss = criterion(outputs, targets)
            loss.backward()
            optimizer.step()
            if empty:
                targets = targets[:0]
            if len(targets):  # the mean loss of an empty batch is NaN
                total += float(loss.detach()) * len(targets)
                seen += len(targets)
            if progress is not None:
                progress.batch()
    finally:
        if manager is not None:
            manager.__exit__(None, None, None)
    return total, seen
