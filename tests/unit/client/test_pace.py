"""A TorchClient measures its pace and honours a pacing coordinator's step budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedpriv import LocalDP, TorchClient
from fedpriv.client.release import ReleasePolicy
from fedpriv.client.resources import describe
from fedpriv.errors import ConfigError, PrivacyWarning
from fedpriv.wire.resources import Resources

RECORDS, BATCH = 64, 8  # 8 batches an epoch


class CountingSGD(torch.optim.SGD):
    steps = 0

    def step(self, closure=None):
        CountingSGD.steps += 1
        return super().step(closure)


def client(privacy=None) -> TorchClient:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(RECORDS, 4, generator=generator)
    y = (x[:, 0] > 0).long()
    return TorchClient(
        nn.Linear(4, 2),
        train_loader=DataLoader(TensorDataset(x, y), batch_size=BATCH),
        loss_fn=nn.functional.cross_entropy,
        optimizer_factory=lambda p: CountingSGD(p, lr=0.1),
        epochs=2,
        device="cpu",
        privacy=privacy,
    )


def _start(c: TorchClient):
    return {k: v.detach().numpy().copy() for k, v in c._exchanged().items()}


def test_pace_is_measured_and_a_budget_ends_the_round_early():
    c = client()
    assert c.pace is None
    CountingSGD.steps = 0
    c.fit(_start(c), config={"round": 1})
    assert CountingSGD.steps == 16
    step_seconds, full = c.pace
    assert step_seconds > 0 and full == 16
    CountingSGD.steps = 0
    c.fit(_start(c), config={"round": 2, "max_steps": 5})
    assert CountingSGD.steps == 5
    assert c.pace[1] == 16  # still the full work's steps
    reported = describe(c)
    assert (reported.device_kind, reported.device_count, reported.full_steps) == ("cpu", 1, 16)


def test_under_dp_a_budget_is_the_plan_and_spends_less():
    c = client(LocalDP(noise_multiplier=1.0))
    full = c.plan_privacy({"round": 1})
    limited = c.plan_privacy({"round": 1, "max_steps": 5})
    assert (full.steps, limited.steps) == (16, 5)
    assert limited.sample_rate == full.sample_rate
    assert limited.noise_multiplier == full.noise_multiplier
    result = c.fit(_start(c), config={"round": 1, "max_steps": 5})
    assert result.metrics["noise_multiplier"] == full.noise_multiplier
    assert c.pace[1] == 16


@pytest.mark.parametrize("bad", [0, -3, 2.5, "ten", True])
def test_a_malformed_budget_is_refused(bad):
    c = client()
    with pytest.raises(ConfigError, match="max_steps"):
        c.fit(_start(c), config={"max_steps": bad})


def test_under_dp_the_pace_leaves_only_when_opted_in_with_a_warning():
    measured = Resources("cuda", 2, 1 << 30, 0.5, 40)
    assert ReleasePolicy().resources(measured, private=False) == measured
    assert ReleasePolicy().resources(measured, private=True) == Resources("cuda", 2, 1 << 30)
    shared = ReleasePolicy(share_resources=True)
    assert shared.resources(measured, private=True) == measured
    with pytest.warns(PrivacyWarning, match="share_resources"):
        shared.announce()
