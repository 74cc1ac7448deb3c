"""The DP layer probe names what Opacus cannot clip, and stays out of the way otherwise."""

from __future__ import annotations

import torch
from torch import nn

from fedpriv.privacy.layers import dp_layer_problems


class Positional(nn.Module):
    """A trainable table read with one row for the whole batch (like GPT-2's wpe)."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(8, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.table(torch.arange(x.shape[1]).unsqueeze(0))  # (1, L, 4)
        return self.head(rows + x.unsqueeze(-1)).mean(dim=1)


class RefusesZeros(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(x.abs().sum()):
            raise ValueError("all-zero input")
        return self.head(x)


def test_a_layer_without_a_batch_dimension_is_named():
    problems = dp_layer_problems(Positional(), record=[torch.zeros(8)], forward=None, ghost=True)
    assert len(problems) == 1 and problems[0].startswith("layer table (Embedding)")


def test_tied_weights_are_named_under_ghost_clipping_only():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    ghost = dp_layer_problems(model, record=[torch.zeros(4)], forward=None, ghost=True)
    assert ghost and "0.weight and 1.weight" in ghost[0]
    assert dp_layer_problems(model, record=[torch.zeros(4)], forward=None, ghost=False) == []


def test_a_model_that_refuses_zero_records_is_not_probed_and_not_refused():
    assert (
        dp_layer_problems(RefusesZeros(), record=[torch.zeros(4)], forward=None, ghost=True) == []
    )
    assert (
        dp_layer_problems(nn.Linear(4, 2), record=[torch.zeros(4)], forward=None, ghost=True) == []
    )
