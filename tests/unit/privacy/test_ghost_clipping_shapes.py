"""Per-record clipping holds for losses whose unreduced value is not one number per record.

A regression model's ``mse_loss(outputs, targets, reduction="none")`` has shape (B, 1).
Opacus's ghost clipping multiplies that by its per-record clipping factors of shape (B,);
broadcast, the product is B x B, the second backward pass weights every record by the sum
of all factors, and no record is clipped to max_grad_norm any more. The attack: records
with huge errors move the model far more than lr * C allows.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedpriv.privacy.accounting import GaussianSteps
from fedpriv.privacy.local import GradSampleMode, LocalDP, train_private

CLIP, LR, RECORDS = 1.0, 1.0, 8


def one_step(mode: GradSampleMode, *, outlier: bool) -> torch.Tensor:
    """How far one DP-SGD step over every record (noise negligible) moves the model."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    inputs = torch.randn(RECORDS, 3)
    # Every record's error is ~100, so every per-record gradient is far above CLIP.
    targets = torch.full((RECORDS, 1), 100.0)
    if outlier:
        targets[-1] = 1e6
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    train_private(
        model,
        loader=DataLoader(TensorDataset(inputs, targets), batch_size=RECORDS),
        loss_fn=nn.functional.mse_loss,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        dp=LocalDP(noise_multiplier=1e-9, max_grad_norm=CLIP, grad_sample_mode=mode),
        plan=GaussianSteps(noise_multiplier=1e-9, sample_rate=1.0, steps=1),
        epochs=1,
        device=torch.device("cpu"),
    )
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    return after - before


@pytest.mark.parametrize("mode", [GradSampleMode.GHOST, GradSampleMode.HOOKS])
def test_one_step_moves_the_model_at_most_lr_times_the_clipping_norm(mode):
    # Opacus divides the sum of clipped gradients by the expected batch (RECORDS here).
    step = one_step(mode, outlier=False)
    assert step.norm() <= LR * CLIP * (1 + 1e-5), step.norm()


def test_ghost_clipping_equals_per_sample_hooks_with_a_column_output():
    ghost = one_step(GradSampleMode.GHOST, outlier=True)
    hooks = one_step(GradSampleMode.HOOKS, outlier=True)
    torch.testing.assert_close(ghost, hooks, rtol=1e-4, atol=1e-6)


def test_one_outlier_record_moves_the_step_by_at_most_its_share_of_the_clip():
    # Neighbouring datasets (the last record's target replaced): each record's clipped
    # gradient has norm <= CLIP, so the steps differ by at most 2 * LR * CLIP / RECORDS.
    for mode in (GradSampleMode.GHOST, GradSampleMode.HOOKS):
        diff = one_step(mode, outlier=True) - one_step(mode, outlier=False)
        assert diff.norm() <= 2 * LR * CLIP / RECORDS * (1 + 1e-5), (mode, diff.norm())
