"""Canary audit of a silo's training: an empirical lower bound on ε beside the accountant's.

The silo's own :class:`~fedpriv.client.torch.TorchClient` (model, loss, optimiser,
DP settings) trains for the given rounds on its data plus the canaries drawn
"in"; each canary is scored by its negative loss on its own label, and the
bound comes from :func:`fedpriv.privacy.audit.epsilon_lower_bound`.

Canaries are inputs drawn uniformly over the range of the real inputs, with
random labels: unlike anything in the data, so a model that memorises records
memorises them. The audit's numbers depend on the silo's data; run it on data
you may publish results about.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import DataLoader, TensorDataset

from fedpriv.client.torch import TorchClient
from fedpriv.errors import ConfigError
from fedpriv.privacy.accounting import DEFAULT_DELTA, GaussianSteps, epsilon
from fedpriv.privacy.audit import AuditResult, epsilon_lower_bound
from fedpriv.wire.torch_interop import arrays_from_state_dict, exchanged_state

__all__ = ["audit_client"]

logger = logging.getLogger(__name__)


def _tensors(loader: DataLoader[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The training set as (inputs, labels): any map-style dataset of (input, label) pairs.

    A ``TensorDataset`` is used as it is; another dataset (a ``Subset`` from
    ``random_split``, a user's own class) is read item by item and stacked.
    """
    dataset = loader.dataset
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        inputs, labels = dataset.tensors
    else:
        try:
            size = len(dataset)  # type: ignore[arg-type]
            items = [dataset[i] for i in range(size)]
            inputs = torch.stack([torch.as_tensor(item[0]) for item in items])
            labels = torch.as_tensor([int(item[1]) for item in items])
        except (TypeError, IndexError, ValueError, RuntimeError) as err:
            raise ConfigError(
                "the audit needs the client's train_loader to hold a map-style dataset of "
                f"(input, label) pairs (len() and [i]); {type(dataset).__name__}: {err}"
            ) from err
    if labels.dim() != 1 or labels.is_floating_point():
        raise ConfigError("the audit needs integer class labels (one per example)")
    return inputs, labels


def audit_client(
    client: TorchClient,
    *,
    canaries: int = 1000,
    guesses: int = 200,
    rounds: int = 1,
    epochs: int | None = None,
    delta: float | None = None,
    confidence: float = 0.95,
    seed: int = 0,
) -> AuditResult:
    """Train `client` with canaries for `rounds` rounds and bound its ε from below.

    Args:
        client: The silo's client; its model is trained in place.
        canaries: Canaries drawn; each is trained on with probability 1/2.
        guesses: Guesses, half "in" (highest scores) and half "out" (lowest).
        rounds: Rounds of local training (``fit`` calls) to audit.
        epochs: Epochs per round (default: the client's).
        delta: δ for both bounds (default: the client's DP delta, else ``DEFAULT_DELTA``).
        confidence: Confidence of the lower bound.
        seed: Seeds the canaries, their inclusion and the data order (DP noise
            always comes from the operating system's CSPRNG).

    Raises:
        ConfigError: The client's data cannot carry canaries, or the counts are off.
    """
    if canaries < 2 or not 0 < guesses <= canaries or guesses % 2:
        raise ConfigError(
            f"need an even number of guesses in (0, canaries]; got guesses={guesses}, "
            f"canaries={canaries}"
        )
    if delta is None:
        delta = client.privacy.delta if client.privacy else DEFAULT_DELTA
    inputs, labels = _tensors(client.train_loader)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = client.model
    with torch.no_grad():
        classes = int(model(inputs[:1].to(client.device)).shape[-1])
    low, high = float(inputs.min()), float(inputs.max())
    canary_inputs = torch.from_numpy(
        rng.uniform(low, high, size=(canaries, *inputs.shape[1:])).astype(np.float32)
    ).to(inputs.dtype)
    canary_labels = torch.from_numpy(rng.integers(0, classes, size=canaries)).to(labels.dtype)
    included = rng.random(canaries) < 0.5
    mask = torch.from_numpy(included)
    train = TensorDataset(
        torch.cat([inputs, canary_inputs[mask]]), torch.cat([labels, canary_labels[mask]])
    )
    loader = DataLoader(
        train,
        batch_size=client.train_loader.batch_size or 32,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    audited = TorchClient(
        model,
        train_loader=loader,
        loss_fn=client.loss_fn,
        optimizer_factory=client.optimizer_factory,
        epochs=epochs or client.epochs,
        device=client.device,
        privacy=client.privacy,
        exchange=client.exchange,
    )
    config = {"epochs": audited.epochs}
    parameters: Mapping[str, npt.NDArray[Any]] = arrays_from_state_dict(
        exchanged_state(audited.model, audited.exchange)
    )
    for round in range(1, rounds + 1):
        parameters = audited.fit(parameters, config=config).parameters
        logger.info("audit round %d/%d trained on %d examples", round, rounds, len(train))
    audited.model.eval()
    with torch.no_grad():
        outputs = audited.model(canary_inputs.to(audited.device))
        losses = torch.nn.functional.cross_entropy(
            outputs, canary_labels.to(audited.device), reduction="none"
        )
    scores = (-losses).cpu().numpy()
    order = np.argsort(scores, kind="stable")
    half = guesses // 2
    correct = int(included[order[-half:]].sum() + (~included[order[:half]]).sum())
    plan = audited.plan_privacy(config)
    accountant = (
        None
        if plan is None
        else epsilon(
            [
                GaussianSteps(
                    noise_multiplier=plan.noise_multiplier,
                    sample_rate=plan.sample_rate,
                    steps=plan.steps * rounds,
                )
            ],
            delta=delta,
        )
    )
    return AuditResult(
        canaries=canaries,
        included=int(included.sum()),
        guesses=guesses,
        correct=correct,
        epsilon_lower_bound=epsilon_lower_bound(
            guesses=guesses,
            correct=correct,
            delta=delta,
            canaries=canaries,
            confidence=confidence,
        ),
        accountant_epsilon=accountant,
        delta=delta,
        confidence=confidence,
    )
