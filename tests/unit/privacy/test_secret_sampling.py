"""Poisson sampling in DP-SGD is secret: an attacker who knows the code and every seed cannot
predict the batches, and every planned step is taken, empty batches included."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedpriv.privacy.local import (
    GradSampleMode,
    LocalDP,
    _secret_generator,
    private_plan,
    train_private,
)

# As examples/digits/app.py seeds a silo: torch.manual_seed(SEED), numpy's SEED, and the
# training loader's generator SEED + index.
SEED = 2026
INDEX = 1
SILOS = 3
RECORDS = 96
BATCH = 8
EPOCHS = 2


class RecordingDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Fixed records; remembers the indices of every batch the loader fetches."""

    def __init__(self, size: int) -> None:
        generator = torch.Generator().manual_seed(7)  # the data itself is not the secret
        self.features = torch.randn(size, 8, generator=generator)
        self.labels = torch.randint(0, 3, (size,), generator=generator)
        self.batches: list[list[int]] = []

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[index], self.labels[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # The loader fetches a whole batch at once through here, empty batches too.
        self.batches.append(list(indices))
        return [self[i] for i in indices]


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 3))


def make_loader(dataset: Dataset[Any], *, loader_seed: int | None) -> DataLoader[Any]:
    generator = None if loader_seed is None else torch.Generator().manual_seed(loader_seed)
    return DataLoader(dataset, batch_size=BATCH, shuffle=True, generator=generator)


def train(
    model: nn.Module, loader: DataLoader[Any], *, dp: LocalDP, plan: Any, epochs: int
) -> None:
    train_private(
        model,
        loader=loader,
        loss_fn=nn.functional.cross_entropy,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        dp=dp,
        plan=plan,
        epochs=epochs,
        device=torch.device("cpu"),
    )


def run_silo(*, loader_seed: int | None, mode: GradSampleMode = GradSampleMode.GHOST) -> list:
    """One silo's private training with every seed set as the examples set it."""
    torch.manual_seed(SEED)
    np.random.seed(SEED)
    dataset = RecordingDataset(RECORDS)
    model = make_model()
    loader = make_loader(dataset, loader_seed=loader_seed)
    dp = LocalDP(noise_multiplier=1.0, grad_sample_mode=mode)
    plan = private_plan(dp, batches_per_epoch=len(loader), epochs=EPOCHS)
    train(model, loader, dp=dp, plan=plan, epochs=EPOCHS)
    assert len(dataset.batches) == plan.steps
    return dataset.batches


def opacus_draws(loader_seed: int | None, *, global_seed: int | None) -> list[list[int]]:
    """The attack: replay Opacus's Poisson sampler as make_private(poisson_sampling=True) runs it.

    With a loader generator Opacus samples from it; without one, from torch's global
    generator, which the attacker reseeds and advances through the same model set-up.
    """
    if global_seed is not None:
        torch.manual_seed(global_seed)
        np.random.seed(global_seed)
    dataset = RecordingDataset(RECORDS)
    make_model()  # consumes the global generator exactly as the silo's set-up does
    poisson = DPDataLoader.from_data_loader(make_loader(dataset, loader_seed=loader_seed))
    for _ in range(EPOCHS):
        for _ in poisson:
            pass
    return dataset.batches


def candidate_seeds() -> list[int]:
    """Every seed the code or a config exposes, and then some."""
    exposed = {SEED, SEED + INDEX, 0, torch.initial_seed()}
    exposed.update(SEED + k for k in range(SILOS))
    exposed.update(range(16))
    return sorted(exposed)


def all_replays() -> list[list[list[int]]]:
    replays = []
    for seed in candidate_seeds():
        replays.append(opacus_draws(seed, global_seed=SEED))  # a loader generator seeded so
        replays.append(opacus_draws(None, global_seed=seed))  # torch's global generator
    return replays


def test_the_replay_attack_reproduces_opacus_own_sampling():
    # The attack is sound: Opacus's sampler, driven from the examples' seeds, is replayed exactly.
    first = opacus_draws(SEED + INDEX, global_seed=SEED)
    assert first == opacus_draws(SEED + INDEX, global_seed=SEED)
    assert opacus_draws(None, global_seed=SEED) == opacus_draws(None, global_seed=SEED)
    assert sum(map(len, first)) > 0


@pytest.mark.parametrize("loader_seed", [SEED + INDEX, None], ids=["loader-seeded", "global"])
def test_identically_seeded_silos_draw_different_batches(loader_seed):
    first = run_silo(loader_seed=loader_seed)
    second = run_silo(loader_seed=loader_seed)
    assert first != second
    # Not a near miss either: most steps differ.
    assert sum(a != b for a, b in zip(first, second, strict=True)) > len(first) // 2


@pytest.mark.parametrize("loader_seed", [SEED + INDEX, None], ids=["loader-seeded", "global"])
def test_no_exposed_seed_replays_the_batches(loader_seed):
    drawn = run_silo(loader_seed=loader_seed)
    replays = all_replays()
    assert drawn not in replays
    # Not even the first step's batch is predicted.
    assert drawn[0] not in [replay[0] for replay in replays]


def test_training_leaves_torch_global_generator_untouched():
    # A user's torch.manual_seed keeps fixing splits and model init after a private round.
    torch.manual_seed(SEED)
    dataset = RecordingDataset(RECORDS)
    model = make_model()
    loader = make_loader(dataset, loader_seed=None)
    dp = LocalDP(noise_multiplier=1.0)
    plan = private_plan(dp, batches_per_epoch=len(loader), epochs=1)
    state = torch.get_rng_state()
    train(model, loader, dp=dp, plan=plan, epochs=1)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(SEED)
    again = make_model()
    torch.manual_seed(SEED)
    assert all(
        torch.equal(a, b)
        for a, b in zip(again.parameters(), make_model().parameters(), strict=True)
    )


def test_secret_generator_state_is_not_its_visible_seed():
    generator = _secret_generator(torch.device("cpu"))
    other = _secret_generator(torch.device("cpu"))
    # The whole Mersenne Twister state is secret, not just the 64-bit seed torch reports.
    from_seed = torch.Generator().manual_seed(generator.initial_seed())
    assert not torch.equal(generator.get_state(), from_seed.get_state())
    draws = torch.rand(1000, generator=generator)
    assert not torch.equal(draws, torch.rand(1000, generator=from_seed))
    assert not torch.equal(draws, torch.rand(1000, generator=other))
    words = generator.get_state().numpy()[24 : 24 + 8 * 624].view("<u8")
    assert int(words.max()) < 2**32 and len(set(words.tolist())) > 600


class StepRecorder(torch.optim.SGD):
    """Plain SGD that records, at each real step, the batch it came from and the change."""

    def __init__(self, model: nn.Module, dataset: RecordingDataset, *, lr: float) -> None:
        super().__init__(model.parameters(), lr=lr)
        self.model, self.dataset = model, dataset
        self.steps: list[tuple[list[int], torch.Tensor]] = []

    def step(self, closure: Any = None) -> Any:
        before = nn.utils.parameters_to_vector(self.model.parameters()).detach().clone()
        result = super().step(closure)
        after = nn.utils.parameters_to_vector(self.model.parameters()).detach()
        self.steps.append((self.dataset.batches[-1], after - before))
        return result


def _train_one_record_batches(records: int, epochs: int, lr: float, dp: LocalDP):
    """DP-SGD on `records` records, one expected per batch; the recorder, plan and loss."""
    dataset = RecordingDataset(records)
    model = make_model()
    loader = DataLoader(dataset, batch_size=1)
    plan = private_plan(dp, batches_per_epoch=len(loader), epochs=epochs)
    optimizer = StepRecorder(model, dataset, lr=lr)
    loss = train_private(
        model,
        loader=loader,
        loss_fn=nn.functional.cross_entropy,
        optimizer=optimizer,
        dp=dp,
        plan=plan,
        epochs=epochs,
        device=torch.device("cpu"),
    )
    return optimizer, plan, loss


@pytest.mark.parametrize(
    ("mode", "physical"),
    [(GradSampleMode.GHOST, None), (GradSampleMode.HOOKS, None), (GradSampleMode.GHOST, 2)],
    ids=["ghost", "hooks", "ghost-physical-batches"],
)
def test_empty_poisson_batches_take_a_noised_step(mode, physical):
    # One record per expected batch: about a third of Poisson batches come out empty.
    records, epochs, lr, sigma, clip = 20, 5, 0.1, 2.0, 1.5
    optimizer, plan, loss = _train_one_record_batches(
        records, epochs, lr, LocalDP(
            noise_multiplier=sigma, max_grad_norm=clip, grad_sample_mode=mode,
            max_physical_batch_size=physical,
        ),
    )  # fmt: skip
    assert np.isfinite(loss)
    assert len(optimizer.steps) == plan.steps
    empty = [change for batch, change in optimizer.steps if not batch]
    assert len(empty) >= 5  # P(fewer) < 1e-9 at 100 steps with P(empty) = 0.95^20
    # Noise alone: N(0, (lr·σ·C / expected batch)²) on every parameter, nothing else.
    expected_std = lr * sigma * clip / (records * plan.sample_rate)
    pooled = torch.cat(empty)
    # Every empty step is noised, not skipped: it moves (almost) every parameter. An
    # element can stay put when its noise is below half its float32 ulp (p ~ 3e-7, so
    # about once in a hundred runs of 27K noised elements); a skipped step moves none.
    assert all(float((change != 0).float().mean()) > 0.99 for change in empty)
    assert float(pooled.mean()) == pytest.approx(0.0, abs=5 * expected_std / pooled.numel() ** 0.5)
    assert float(pooled.std()) == pytest.approx(expected_std, rel=0.05)
    for change in empty:
        assert float(change.std()) == pytest.approx(expected_std, rel=0.25)


@pytest.mark.parametrize(
    ("mode", "physical"),
    [(GradSampleMode.GHOST, None), (GradSampleMode.HOOKS, None), (GradSampleMode.GHOST, 2)],
    ids=["ghost", "hooks", "ghost-physical-batches"],
)
def test_the_step_of_an_empty_batch_carries_no_gradient(mode, physical):
    # The empty batch's step runs on an all-zero placeholder record with its loss
    # scaled by 0. With almost no noise, that step must leave the model where it was
    # (a placeholder that counted would move the bias by about lr / expected batch).
    records, epochs, lr = 20, 5, 0.5
    optimizer, _, _ = _train_one_record_batches(
        records, epochs, lr, LocalDP(
            noise_multiplier=1e-9, max_grad_norm=1.0, grad_sample_mode=mode,
            max_physical_batch_size=physical,
        ),
    )  # fmt: skip
    empty = [change for batch, change in optimizer.steps if not batch]
    full = [change for batch, change in optimizer.steps if batch]
    assert len(empty) >= 5 and full
    assert max(float(change.abs().max()) for change in empty) < 1e-7
    assert max(float(change.abs().max()) for change in full) > 1e-3
