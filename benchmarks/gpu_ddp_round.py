"""One silo round on every GPU of this machine (gpu_check.py runs it under torchrun; gloo on CPUs)."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedpriv import LocalDP, TorchClient
from fedpriv.client.distributed import RankZeroClient, follow, start


def client(private: bool) -> TorchClient:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 64, generator=generator)
    y = (x[:, 0] > 0).long()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 2))
    return TorchClient(
        model,
        train_loader=DataLoader(TensorDataset(x, y), batch_size=128),
        loss_fn=nn.functional.cross_entropy,
        optimizer_factory=lambda p: torch.optim.SGD(p, lr=0.1),
        device=f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu",
        privacy=LocalDP(noise_multiplier=1.0) if private else None,
    )


def main() -> int:
    here = start()
    assert here is not None, "run under torchrun"
    lines = []
    for private in (False, True):
        silo = client(private)
        if here.rank == 0:
            rank_zero = RankZeroClient(silo)
            start_state = {k: v.detach().cpu().numpy() for k, v in silo._exchanged().items()}
            result = rank_zero.fit(start_state, config={"round": 1})
            rank_zero.close()
            plan = silo.plan_privacy({})
            lines.append(
                f"{'DP-DDP' if private else 'DDP'}: loss {result.metrics.get('train_loss', 0):.3f}"
                + (f", q={plan.sample_rate:.4f}" if plan else "")
            )
        else:
            follow(silo)
        total = torch.stack([p.detach().double().sum() for p in silo.model.parameters()]).sum()
        sums = [torch.zeros_like(total) for _ in range(here.size)]
        dist.all_gather(sums, total)
        assert all(torch.equal(s, sums[0]) for s in sums), "ranks disagree on the model"
    if here.rank == 0:
        print(f"{here.size} processes ({dist.get_backend()}), ranks agree: " + "; ".join(lines))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
