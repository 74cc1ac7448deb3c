"""FedProx in TorchClient: ``proximal_mu`` pulls local training towards the global model,
exactly as the proximal loss term would without DP, and still under Opacus's DP-SGD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedpriv.client.torch import TorchClient
from fedpriv.errors import ConfigError
from fedpriv.privacy.local import GradSampleMode, LocalDP
from fedpriv.wire.torch_interop import arrays_from_state_dict

RECORDS = 96
BATCH = 12
EPOCHS = 3
LR = 0.05


def dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(3)
    inputs = torch.randn(RECORDS, 4, generator=generator)
    # Targets far from what the start predicts: the data pulls the weights a long way.
    targets = inputs @ torch.tensor([3.0, -2.0, 1.0, 4.0]) + 5.0
    return TensorDataset(inputs, targets)


def start_model() -> nn.Module:
    torch.manual_seed(0)
    # One output per record, flattened: under ghost clipping Opacus needs a per-record
    # loss of shape (B,), which (B, 1) outputs would not give.
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1), nn.Flatten(0))


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=LR),
    "momentum": lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=LR),
}


def client(optimizer: str, privacy: LocalDP | None = None) -> TorchClient:
    return TorchClient(
        start_model(),
        train_loader=DataLoader(dataset(), batch_size=BATCH),  # fixed order: deterministic
        loss_fn=nn.functional.mse_loss,
        optimizer_factory=OPTIMIZERS[optimizer],
        epochs=EPOCHS,
        device="cpu",
        privacy=privacy,
    )


def flat(arrays) -> np.ndarray:
    return np.concatenate([np.asarray(a, np.float64).reshape(-1) for a in arrays.values()])


def fit(silo: TorchClient, mu: float | None) -> tuple[float, np.ndarray]:
    """Train one round from the client's start; the distance moved and the new weights."""
    global_model = arrays_from_state_dict(silo.model.state_dict())
    start = flat(global_model)
    config = {"round": 1} if mu is None else {"round": 1, "proximal_mu": mu}
    result = silo.fit(global_model, config=config)
    new = flat(result.parameters)
    return float(np.linalg.norm(new - start)), new


def proximal_loss_reference(optimizer: str, mu: float) -> np.ndarray:
    """FedProx as Li et al. write it: the proximal term in the loss (no DP)."""
    model = start_model()
    anchors = [p.detach().clone() for p in model.parameters()]
    opt = OPTIMIZERS[optimizer](model.parameters())
    for _ in range(EPOCHS):
        for inputs, targets in DataLoader(dataset(), batch_size=BATCH):
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(inputs), targets)
            loss = loss + mu / 2 * sum(
                ((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchors, strict=True)
            )
            loss.backward()
            opt.step()
    return flat({k: v.detach().numpy() for k, v in model.state_dict().items()})


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_without_dp_the_pull_equals_the_proximal_loss_term(optimizer):
    _, got = fit(client(optimizer), mu=0.7)
    np.testing.assert_allclose(got, proximal_loss_reference(optimizer, 0.7), rtol=1e-5, atol=1e-6)


def test_without_dp_mu_pulls_the_weights_towards_the_global_model():
    free, plain = fit(client("sgd"), mu=None)
    zero, same = fit(client("sgd"), mu=0.0)
    pulled, _ = fit(client("sgd"), mu=10.0)
    np.testing.assert_array_equal(same, plain)  # mu = 0 is no term at all
    assert pulled < 0.5 * free


@pytest.mark.parametrize("mode", [GradSampleMode.GHOST, GradSampleMode.HOOKS])
@pytest.mark.parametrize("physical", [None, 5])
def test_under_dp_sgd_mu_still_pulls_the_weights_towards_the_global_model(mode, physical):
    # Arrange: Opacus clips each record's gradient to 1 and adds noise of std 0.3 per
    # step; the data's pull alone carries the weights ~lr per step for 24 steps.
    privacy = LocalDP(
        noise_multiplier=0.3,
        max_grad_norm=1.0,
        grad_sample_mode=mode,
        max_physical_batch_size=physical,
    )
    # Act
    free, _ = fit(client("sgd", privacy), mu=0.0)
    pulled, _ = fit(client("sgd", privacy), mu=10.0)
    # Assert: with lr * mu = 0.5 the weights stay within ~1/mu of the global model
    # (a fixed point of the step), a fraction of the free drift; the term was not
    # dropped with the loss, nor clipped with the per-sample gradients.
    assert free > 0.25
    assert pulled < 0.3 * free


@pytest.mark.parametrize("physical", [None, 5])
def test_under_dp_the_pull_runs_once_per_private_step_after_the_noise(physical):
    # Arrange: a hook beside fedpriv's on the user's optimiser sees what the pull sees.
    calls = []

    def factory(params):
        optimizer = torch.optim.SGD(params, lr=LR)
        optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: calls.append(
                all(p.grad is not None for g in opt.param_groups for p in g["params"])
            )
        )
        return optimizer

    silo = client(
        "sgd", LocalDP(noise_multiplier=0.8, max_grad_norm=1.0, max_physical_batch_size=physical)
    )
    silo.optimizer_factory = factory
    global_model = arrays_from_state_dict(silo.model.state_dict())
    # Act
    result = silo.fit(global_model, config={"round": 1, "proximal_mu": 0.5})
    # Assert: the private round ran (Opacus's noise), and the user's optimiser stepped
    # once per planned DP-SGD step, each time with the privatised gradient in place.
    plan = silo.plan_privacy({})
    assert result.metrics["noise_multiplier"] == pytest.approx(0.8)
    assert len(calls) == plan.steps == EPOCHS * (RECORDS // BATCH)
    assert all(calls)


def test_the_hook_is_gone_after_the_round():
    optimizers = []

    def factory(params):
        optimizers.append(torch.optim.SGD(params, lr=LR))
        return optimizers[-1]

    silo = client("sgd")
    silo.optimizer_factory = factory
    global_model = arrays_from_state_dict(silo.model.state_dict())
    silo.fit(global_model, config={"proximal_mu": 1.0})
    assert len(optimizers) == 1 and not optimizers[0]._optimizer_step_pre_hooks


@pytest.mark.parametrize("mu", [-1.0, float("nan"), "0.1", True])
def test_a_bad_proximal_mu_is_refused(mu):
    silo = client("sgd")
    with pytest.raises(ConfigError, match="proximal_mu"):
        silo.fit(arrays_from_state_dict(silo.model.state_dict()), config={"proximal_mu": mu})
