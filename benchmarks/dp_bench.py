"""DP-SGD step time against non-private training, per clipping mode, like for like.

Both sides run the same loop (fedpriv's, ``train_private`` for DP and the same
loop without Opacus for the baseline) over the same Poisson loader at the same
sample rate, so batch sizes vary alike. A step's time is the gap between two
consecutive steps' ends, data loading included on both sides; the table shows
the median over the steady steps (the first two are dropped) and, apart, the
per-round fixed cost that DP adds: wrapping the model, building the optimiser
and the sampler (the round's wall time less its steps).

Models: the digits demo MLP (64 -> 512 -> 256 -> 128 -> 10), a small CNN, and
a GPT-2-architecture transformer (4 layers, width 128, 64 tokens, vocabulary
1,024) with LoRA adapters of rank 8 on its attention, trained on blocks of
tokens: DP-SGD's target there is at most 2x the non-private step with the
fastest mode.

    python benchmarks/dp_bench.py            # batch 64 and 256 (LoRA: 32), 30 steps
    python benchmarks/dp_bench.py --smoke    # a few steps, for the test suite
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from examples.digits.app import make_model  # noqa: E402
from fedpriv.privacy import local  # noqa: E402
from fedpriv.privacy.local import GradSampleMode, LocalDP, private_plan, train_private  # noqa: E402

LORA_TARGET = 2.0
VOCAB, BLOCK = 1024, 64


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


def lora_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from fedpriv.client.hf import add_lora

    hf_logging.set_verbosity_error()
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=BLOCK, n_embd=128, n_layer=4, n_head=4,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return add_lora(GPT2LMHeadModel(config), rank=8, alpha=16)


class Task:
    """A model, its records and how a batch becomes a loss."""

    def __init__(
        self,
        name: str,
        factory: Callable[[], nn.Module],
        data: Callable[[int], TensorDataset],
        loss_fn: Callable[..., torch.Tensor],
        forward: Callable[..., Any] | None = None,
    ) -> None:
        self.name, self.factory, self.data = name, factory, data
        self.loss_fn, self.forward = loss_fn, forward


def _classes(shape: tuple[int, ...]) -> Callable[[int], TensorDataset]:
    def make(n: int) -> TensorDataset:
        generator = torch.Generator().manual_seed(0)
        return TensorDataset(
            torch.randn(n, *shape, generator=generator),
            torch.randint(0, 10, (n,), generator=generator),
        )

    return make


def _tokens(n: int) -> TensorDataset:
    ids = torch.randint(0, VOCAB, (n, BLOCK), generator=torch.Generator().manual_seed(0))
    return TensorDataset(ids, torch.ones_like(ids), ids)


def tasks() -> list[Task]:
    from fedpriv.client.hf import causal_lm_loss, logits_of

    return [
        Task("digits MLP", make_model, _classes((64,)), nn.functional.cross_entropy),
        Task("small CNN", small_cnn, _classes((1, 28, 28)), nn.functional.cross_entropy),
        Task("LoRA GPT-2", lora_gpt2, _tokens, causal_lm_loss, logits_of),
    ]


class StepClock:
    """Receives fedpriv's progress calls; keeps the time at the end of every step."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def batch(self) -> None:
        self.ends.append(time.perf_counter())

    def epoch_done(self, mean_loss: float) -> None:
        del mean_loss

    def steady_step(self, start: float) -> float:
        gaps = [b - a for a, b in zip([start, *self.ends], self.ends, strict=False)]
        return statistics.median(gaps[2:] or gaps)


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)


def time_plain(task: Task, loader: DataLoader, steps: int) -> float:
    """The same loop as DP-SGD's, over the same kind of Poisson batches, without Opacus."""
    model = task.factory()
    model.train()
    poisson = local._poisson_loader(
        loader,
        sample_rate=1 / steps,
        steps_per_epoch=steps,
        generator=local._secret_generator(torch.device("cpu")),
    )
    optimizer = _optimizer(model)
    clock = StepClock()
    start = time.perf_counter()
    for batch in poisson:
        features, targets = local.split_batch(batch, torch.device("cpu"))
        optimizer.zero_grad(set_to_none=True)
        outputs = model(*features) if task.forward is None else task.forward(model, *features)
        task.loss_fn(outputs, targets).backward()
        optimizer.step()
        clock.batch()
    return clock.steady_step(start)


def time_private(
    task: Task, loader: DataLoader, steps: int, mode: GradSampleMode
) -> tuple[float, float]:
    """(steady step, fixed cost per round) of DP-SGD in `mode`."""
    model = task.factory()
    dp = LocalDP(noise_multiplier=1.0, grad_sample_mode=mode)
    plan = private_plan(dp, batches_per_epoch=steps, epochs=1)
    clock = StepClock()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_private(
            model,
            loader=loader,
            loss_fn=task.loss_fn,
            optimizer=_optimizer(model),
            dp=dp,
            plan=plan,
            epochs=1,
            device=torch.device("cpu"),
            progress=clock,
            forward=task.forward,
        )
    wall = time.perf_counter() - start
    step = clock.steady_step(start)
    return step, max(0.0, wall - step * len(clock.ends))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--lora-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batches, args.lora_batch, args.steps = [16], 8, 4
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"{'model':<11} {'batch':>5} {'mode':<10} {'ms/step':>9} {'setup ms':>9} {'x plain':>8}")
    verdicts = []
    for task in tasks():
        for batch in [args.lora_batch] if task.forward else args.batches:
            loader = DataLoader(task.data(batch * args.steps), batch_size=batch)
            plain = time_plain(task, loader, args.steps)
            print(
                f"{task.name:<11} {batch:>5} {'plain':<10} {plain * 1e3:>9.2f} {'-':>9} {1.0:>7.2f}x"
            )
            ratios = {}
            for mode in GradSampleMode:
                step, setup = time_private(task, loader, args.steps, mode)
                ratios[mode.value] = step / plain
                print(
                    f"{task.name:<11} {batch:>5} {mode.value:<10} {step * 1e3:>9.2f} "
                    f"{setup * 1e3:>9.1f} {step / plain:>7.2f}x"
                )
            if task.forward is not None:
                fastest = min(ratios, key=ratios.__getitem__)
                ratio = ratios[fastest]
                verdict = "PASS" if ratio <= LORA_TARGET else "MISS"
                verdicts.append(
                    f"target: {task.name} DP-SGD step <= {LORA_TARGET:g}x the non-private step "
                    f"(fastest mode, {fastest}): {ratio:.2f}x -> {verdict}"
                )
    for line in verdicts:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
