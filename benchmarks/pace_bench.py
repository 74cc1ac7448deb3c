"""Resource-aware rounds: one silo at a quarter of the others' speed, with and without the policy.

Three silos train a TorchClient each (threads in this process, mTLS over
loopback); one of them is throttled to a quarter of the others' speed (it
waits three times its step's compute after every step, as a CPU silo beside
GPU silos would take longer). The same federation runs with ``[rounds] pace =
"slowest"`` (every silo does its full work; the throttled one sets every
round's pace) and ``"balanced"`` (the throttled silo gets a step budget that
fits the median silo's round time). The table shows each run's median round
time, the steps the throttled silo took per round, and whether every silo's
update was accepted in every round; the target is a round at least 1.5x faster
with the policy.

    python benchmarks/pace_bench.py            # 4 rounds each
    python benchmarks/pace_bench.py --smoke    # 2 rounds, for the test suite
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from fedpriv import TorchClient  # noqa: E402
from fedpriv.client import run_client  # noqa: E402
from fedpriv.coordinator import (  # noqa: E402
    Coordinator,
    CoordinatorConfig,
    ModelSource,
    RoundConfig,
    TLSFiles,
    write_checkpoint,
)
from fedpriv.coordinator.pacing import Pace  # noqa: E402
from fedpriv.pki import CertificateAuthority, Role  # noqa: E402
from fedpriv.transport import TLSConfig  # noqa: E402
from fedpriv.wire import Model  # noqa: E402

TARGET = 1.5
SILOS = ("fast-1", "fast-2", "throttled")
RECORDS, BATCH, WIDTH = 1024, 32, 1024


class Throttled(torch.optim.SGD):
    """SGD that waits `slowdown - 1` times each step's compute after it: a slower device."""

    def __init__(self, params: Any, *, slowdown: float, steps: list[int]) -> None:
        super().__init__(params, lr=0.05)
        self.slowdown, self.steps, self._last = slowdown, steps, time.perf_counter()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._last = time.perf_counter()
        super().zero_grad(set_to_none)

    def step(self, closure: Any = None) -> Any:
        result = super().step(closure)
        self.steps[-1] += 1
        if self.slowdown > 1:
            time.sleep((self.slowdown - 1) * (time.perf_counter() - self._last))
        return result


def silo(index: int, slowdown: float, steps: list[int]) -> TorchClient:
    generator = torch.Generator().manual_seed(index)
    x = torch.randn(RECORDS, WIDTH, generator=generator)
    y = (x[:, 0] > 0).long()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, 2))

    def optimizer(params: Any) -> torch.optim.Optimizer:
        steps.append(0)
        return Throttled(params, slowdown=slowdown, steps=steps)

    return TorchClient(
        model,
        train_loader=DataLoader(TensorDataset(x, y), batch_size=BATCH),
        loss_fn=nn.functional.cross_entropy,
        optimizer_factory=optimizer,
        device="cpu",
    )


def run(work: pathlib.Path, pace: Pace, rounds: int) -> tuple[list[float], list[int], bool]:
    """Round times, the throttled silo's steps per round, and whether every update counted."""
    pki = work / "pki"
    steps: list[int] = []
    clients = [silo(0, 1.0, []), silo(1, 1.0, []), silo(2, 4.0, steps)]
    arrays = {k: v.detach().numpy().copy() for k, v in clients[0]._exchanged().items()}
    write_checkpoint(work / f"{pace}.fpck", Model.from_arrays(arrays))
    config = CoordinatorConfig(
        address="127.0.0.1:0",
        tls=TLSFiles(ca=pki / "ca.crt", cert=pki / "coordinator.crt", key=pki / "coordinator.key"),
        allowed_silos=frozenset(SILOS),
        rounds=RoundConfig(num_rounds=rounds, min_clients=3, federated_evaluation=False, pace=pace),
        model=ModelSource(checkpoint=work / f"{pace}.fpck"),
        state_dir=work / f"state-{pace}",
        heartbeat_interval_s=1,
        poll_wait_s=2,
    )
    times: list[float] = []
    accepted: list[int] = []

    class Clock:
        def round_completed(self, summary: Any) -> None:
            times.append(summary.duration_s)
            accepted.append(summary.accepted)

        def round_failed(self, round: int, reason: str) -> None:
            del round, reason

    with Coordinator(config, reporter=Clock()) as coordinator:
        threads = [
            threading.Thread(
                target=run_client,
                args=(client,),
                kwargs={
                    "coordinator": f"127.0.0.1:{coordinator.port}",
                    "tls": TLSConfig.from_files(
                        ca=pki / "ca.crt", cert=pki / f"{name}.crt", key=pki / f"{name}.key"
                    ),
                    "poll_wait_s": 2,
                },
                daemon=True,
            )
            for name, client in zip(SILOS, clients, strict=True)
        ]
        for thread in threads:
            thread.start()
        assert coordinator.wait(timeout_s=600), "the federation did not finish"
        for thread in threads:
            thread.join(60)
    return times, steps, all(n == len(SILOS) for n in accepted) and len(accepted) == rounds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds = 2
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="fedpriv-pace-") as tmp:
        work = pathlib.Path(tmp)
        ca = CertificateAuthority.create(work / "pki", federation="pace")
        ca.issue("coordinator", role=Role.SERVER, out_dir=work / "pki", hosts=["127.0.0.1"])
        for name in SILOS:
            ca.issue(name, role=Role.CLIENT, out_dir=work / "pki")
        print(f"{'pace':<9} {'median round s':>14} {'throttled steps/round':>22} {'all in':>7}")
        medians = {}
        for pace in (Pace.SLOWEST, Pace.BALANCED):
            times, steps, complete = run(work, pace, args.rounds)
            # The first round has no measured pace yet: the policy starts in round 2.
            steady = times[1:] or times
            medians[pace] = statistics.median(steady)
            shown = ",".join(str(s) for s in steps)
            print(
                f"{pace.value:<9} {medians[pace]:>14.3f} {shown:>22} {'yes' if complete else 'NO':>7}"
            )
        ratio = medians[Pace.SLOWEST] / medians[Pace.BALANCED]
        verdict = "PASS" if ratio >= TARGET else "MISS"
        print(
            f"target: rounds >= {TARGET:g}x faster with pace = balanced (one silo at 1/4 "
            f"speed, every silo contributing): {ratio:.2f}x -> {verdict}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
