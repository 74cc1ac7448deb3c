"""DP-SGD step time against non-private training, per clipping mode, as ratios.

Models: the digits demo MLP (64 -> 512 -> 256 -> 128 -> 10) and a small CNN
(two 3x3 conv layers + linear head on 1x28x28 inputs). Each mode trains the same
number of steps on the same synthetic batch stream; the table reports the
median step time and its ratio to plain SGD. Opacus runs with its own Poisson
sampling, so DP batch sizes vary around the expected size.

    python benchmarks/dp_bench.py            # batch 64 and 256, 30 timed steps
    python benchmarks/dp_bench.py --smoke    # a few steps, for the test suite
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from examples.digits.app import make_model  # noqa: E402
from fedpriv.privacy.local import GradSampleMode, LocalDP, private_plan, train_private  # noqa: E402


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "digits MLP": (make_model, (64,)),
    "small CNN": (small_cnn, (1, 28, 28)),
}


def loader_for(shape: tuple[int, ...], batch: int, steps: int) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    n = batch * steps
    data = TensorDataset(
        torch.randn(n, *shape, generator=generator), torch.randint(0, 10, (n,), generator=generator)
    )
    return DataLoader(data, batch_size=batch)


def time_plain(model: nn.Module, loader: DataLoader) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    times = []
    for inputs, targets in loader:
        start = time.perf_counter()
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:] or times)


def time_private(model: nn.Module, loader: DataLoader, mode: GradSampleMode) -> float:
    dp = LocalDP(noise_multiplier=1.0, grad_sample_mode=mode)
    plan = private_plan(dp, batches_per_epoch=len(loader), epochs=1)
    start = time.perf_counter()
    train_private(
        model,
        loader=loader,
        loss_fn=nn.functional.cross_entropy,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
        dp=dp,
        plan=plan,
        epochs=1,
        device=torch.device("cpu"),
    )
    # Includes wrapping the model once per run (amortised over the steps), as a round does.
    return (time.perf_counter() - start) / len(loader)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batches, args.steps = [16], 3
    torch.manual_seed(0)
    print(f"{'model':<12} {'batch':>5} {'mode':<10} {'ms/step':>9} {'x SGD':>7}")
    for name, (factory, shape) in MODELS.items():
        for batch in args.batches:
            loader = loader_for(shape, batch, args.steps)
            plain = time_plain(factory(), loader)
            print(f"{name:<12} {batch:>5} {'sgd':<10} {plain * 1e3:>9.2f} {1.0:>6.2f}x")
            for mode in GradSampleMode:
                step = time_private(factory(), loader, mode)
                print(
                    f"{name:<12} {batch:>5} {mode.value:<10} {step * 1e3:>9.2f} {step / plain:>6.2f}x"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
