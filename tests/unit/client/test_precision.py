"""TorchClient's precision switch: bfloat16 autocast for the forward pass, float32 elsewhere."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedpriv import LocalDP, TorchClient
from fedpriv.client.precision import autocast_dtype
from fedpriv.errors import ConfigError
from fedpriv.wire.torch_interop import arrays_from_state_dict

CPU = torch.device("cpu")


class Recording(nn.Module):
    """A small classifier that records the dtype its hidden layer computed in."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(8, 16)
        self.out = nn.Linear(16, 3)
        self.seen: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x)
        self.seen.append(h.dtype)
        return self.out(torch.tanh(h))


def client(precision: str, *, privacy: LocalDP | None = None) -> TorchClient:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(96, 8, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # three classes, learnable
    data = TensorDataset(x, y)
    return TorchClient(
        Recording(),
        train_loader=DataLoader(data, batch_size=32),
        val_loader=DataLoader(data, batch_size=32),
        loss_fn=nn.functional.cross_entropy,
        optimizer_factory=lambda p: torch.optim.Adam(p, lr=0.05),
        epochs=5,
        device="cpu",
        privacy=privacy,
        precision=precision,
    )


def test_bf16_trains_the_forward_pass_in_bfloat16_and_keeps_float32_weights():
    # Arrange
    silo = client("bf16")
    start = arrays_from_state_dict(silo.model.state_dict())
    before = silo.evaluate(start, config={}).metrics["loss"]
    # Act
    result = silo.fit(start, config={})
    # Assert: the hidden layer computed in bfloat16, the exchanged model is float32,
    # and it learned
    assert set(silo.model.seen) == {torch.bfloat16}
    assert all(v.dtype == np.float32 for v in result.parameters.values())
    assert all(p.dtype == torch.float32 for p in silo.model.parameters())
    after = silo.evaluate(result.parameters, config={}).metrics["loss"]
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_fp32_and_auto_on_the_cpu_run_in_float32(precision):
    silo = client(precision)
    silo.fit(arrays_from_state_dict(silo.model.state_dict()), config={})
    assert set(silo.model.seen) == {torch.float32}


def test_under_dp_auto_is_float32_and_bf16_is_refused_naming_why():
    dp = LocalDP(noise_multiplier=1.0, max_grad_norm=1.0)
    assert client("auto", privacy=dp).autocast is None
    with pytest.raises(ConfigError, match="does not combine with DP-SGD.*max_grad_norm"):
        client("bf16", privacy=dp)


def test_an_unknown_precision_names_the_choices():
    with pytest.raises(ConfigError, match="precision = 'fp8': expected one of 'auto', 'bf16'"):
        client("fp8")


def test_auto_picks_bfloat16_only_on_a_cuda_gpu_that_has_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert autocast_dtype("auto", CPU) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert autocast_dtype("auto", torch.device("cuda")) is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    with pytest.raises(ConfigError, match="Tesla V100 has no bfloat16"):
        autocast_dtype("bf16", torch.device("cuda"))
