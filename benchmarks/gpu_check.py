"""The GPU paths of the silo side, checked and timed on one machine: ``make gpu-check``.

1. TorchClient on the GPU: a round of training, the exchanged model back as float32.
2. Mixed precision: tokens per second of a GPT-2-small-sized LoRA model (12 layers,
   width 768, 256 tokens) in float32 and under bfloat16 autocast, without DP; with
   DP-SGD in float32 (bf16 under DP is refused by design: clipping by bf16-rounded
   norms would exceed the accounted sensitivity).
3. DP-SGD on the GPU: LoRA with ghost clipping, the noise from a secret CUDA generator,
   and the plan Opacus' own accountant recorded.
4. With two or more GPUs: one silo on two processes (torchrun, NCCL), a plain and
   a DP round, the ranks' models equal afterwards (on the CPU: gloo).

Without a CUDA device it says so and exits 2; ``--device cpu --smoke`` runs the same
checks on the CPU at a small size (the test suite does, so the script cannot rot).

    python benchmarks/gpu_check.py            # on a GPU machine, under 8 minutes
    python benchmarks/gpu_check.py --device cpu --smoke
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time
import warnings
from typing import Any

import torch
from torch.utils.data import TensorDataset

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedpriv.client.hf import add_lora, causal_lm_client, causal_lm_loss, logits_of  # noqa: E402
from fedpriv.privacy import local  # noqa: E402
from fedpriv.privacy.local import LocalDP  # noqa: E402


def gpt2(*, layers: int, width: int, tokens: int, vocab: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = GPT2Config(
        vocab_size=vocab, n_positions=tokens, n_embd=width, n_layer=layers,
        n_head=max(1, width // 64), bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return add_lora(GPT2LMHeadModel(config), rank=8, alpha=16)


def records(n: int, tokens: int, vocab: int) -> TensorDataset:
    ids = torch.randint(0, vocab, (n, tokens), generator=torch.Generator().manual_seed(0))
    return TensorDataset(ids, torch.ones_like(ids), ids)


def check_client(device: torch.device, size: dict[str, int]) -> str:
    client = causal_lm_client(
        gpt2(**size), train=records(32, size["tokens"], size["vocab"]), batch_size=8,
        device=device, precision="fp32",
    )  # fmt: skip
    start = {k: v.detach().cpu().numpy() for k, v in client._exchanged().items()}
    result = client.fit(start, config={"round": 1})
    on_device = {p.device.type for p in client.model.parameters()}
    dtypes = {str(a.dtype) for a in result.parameters.values()}
    assert on_device == {device.type}, on_device
    assert dtypes == {"float32"}, dtypes
    return f"trained one round on {device.type}; {len(result.parameters)} tensors back as float32"


def tokens_per_second(
    device: torch.device, size: dict[str, int], *, precision: str, private: bool, steps: int
) -> float:
    batch = size["batch"]
    client = causal_lm_client(
        gpt2(**{k: v for k, v in size.items() if k != "batch"}),
        train=records(batch * steps, size["tokens"], size["vocab"]),
        batch_size=batch,
        device=device,
        precision=precision,
        privacy=LocalDP(noise_multiplier=1.0) if private else None,
    )
    start = {k: v.detach().cpu().numpy() for k, v in client._exchanged().items()}
    client.fit(start, config={"round": 0, "epochs": 1})  # warm-up: kernels, allocator
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    client.fit(start, config={"round": 1, "epochs": 1})
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps * size["tokens"] / (time.perf_counter() - began)


class RecordingEngine(local.PrivacyEngine):
    made: list[Any] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        RecordingEngine.made.append(self)


def check_dp(device: torch.device, size: dict[str, int]) -> str:
    local.PrivacyEngine = RecordingEngine  # type: ignore[misc]
    model = gpt2(**size).to(device)
    data = records(64, size["tokens"], size["vocab"])
    dp = LocalDP(noise_multiplier=1.0)
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    plan = local.private_plan(dp, batches_per_epoch=len(loader), epochs=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = local.train_private(
            model, loader=loader, loss_fn=causal_lm_loss, optimizer=optimizer, dp=dp,
            plan=plan, epochs=1, device=device, forward=logits_of,
        )  # fmt: skip
    (engine,) = RecordingEngine.made
    assert engine.accountant.history == [(1.0, plan.sample_rate, plan.steps)]
    return f"DP-SGD LoRA on {device.type}: loss {loss:.3f}, Opacus accounted {plan.steps} steps"


def check_torchrun(device: torch.device) -> str:
    count = torch.cuda.device_count()
    if device.type == "cuda" and count < 2:
        return f"skipped: {count} GPU (torchrun needs 2)"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(ROOT / "benchmarks" / "gpu_ddp_round.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"torchrun failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    parser.add_argument("--smoke", action="store_true", help="a small model, a few steps")
    args = parser.parse_args(argv)
    if args.device is None and not torch.cuda.is_available():
        print("no CUDA device here: the GPU check needs one (or --device cpu)", file=sys.stderr)
        return 2
    device = torch.device(args.device or "cuda")
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        print(
            f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
            f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}, "
            f"{torch.cuda.device_count()} GPU(s)",
            flush=True,
        )
    small = {"layers": 2, "width": 64, "tokens": 32, "vocab": 256}
    big = {"layers": 12, "width": 768, "tokens": 256, "vocab": 50257, "batch": 16}
    timed = {**small, "batch": 4} if args.smoke else big
    steps = 3 if args.smoke else 20
    print(f"1. client: {check_client(device, small)}", flush=True)
    print(f"2. tokens/s ({timed['layers']} layers, width {timed['width']}, LoRA r=8):")
    bf16 = device.type == "cpu" or torch.cuda.is_bf16_supported()
    rows = [("fp32", False), ("bf16", False), ("fp32", True)] if bf16 else [("fp32", False)]
    for precision, private in rows:
        rate = tokens_per_second(device, timed, precision=precision, private=private, steps=steps)
        print(f"   {precision:<5} {'DP-SGD' if private else 'plain':<7} {rate:>12,.0f} tokens/s")
    print("   bf16  DP-SGD  refused by design (clipping needs float32 norms)", flush=True)
    print(f"3. {check_dp(device, small)}", flush=True)
    print(f"4. torchrun: {check_torchrun(device)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
