"""Fine-tune a small transformer language model across three silos; report perplexity.

Usage: python examples/lm/run.py [--rounds N] [--pretrain-steps N] [--workdir DIR | --keep]

1. Pretrain a character-level transformer on public text (the Python standard
   library's docstrings) and save it as the federation's starting checkpoint.
2. Fine-tune it with FedAvg across three silos over mTLS, each on its own
   private text (a share of this repository's Markdown files).
3. Print the held-out perplexity per character: before fine-tuning, and after
   every round (from the coordinator's metrics log).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from examples.launcher import (  # noqa: E402
    add_work_arguments,
    coordinator_toml,
    make_pki,
    run_federation,
    run_in_work_folder,
    silo_toml,
)
from examples.lm import app  # noqa: E402

SILOS = ("silo-1", "silo-2", "silo-3")


def write_configs(work: pathlib.Path, *, rounds: int, port: int) -> None:
    (work / "coordinator.toml").write_text(
        coordinator_toml(
            federation="lm",
            silos=SILOS,
            port=port,
            rounds=f"""
num_rounds = {rounds}
min_clients = 3
deadline_s = 600
client_config = {{ epochs = 1 }}
""",
            # The pretrained network is the starting point.
            model='checkpoint = "pretrained.fpck"',
        )
    )
    for index, name in enumerate(SILOS):
        app = f"silo_index = {index}\nnum_silos = {len(SILOS)}\nlr = 0.003"
        (work / f"{name}.toml").write_text(silo_toml(name=name, port=port, app=app))


def held_out_perplexity(model_state: dict[str, object]) -> float:
    """Perplexity of a model on every silo's held-out text, as the silos evaluate it."""
    from fedpriv.wire.torch_interop import arrays_from_state_dict

    arrays = arrays_from_state_dict(model_state)  # type: ignore[arg-type]
    total, count = 0.0, 0
    for index in range(len(SILOS)):
        client = app.make_client({"silo_index": index, "num_silos": len(SILOS)})
        result = client.evaluate(arrays, config={})
        total += float(result.metrics["loss"]) * result.num_examples
        count += result.num_examples
    return math.exp(total / count)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    add_work_arguments(parser)
    args = parser.parse_args()
    return run_in_work_folder(
        args.workdir, prefix="fedpriv-lm-", keep=args.keep, body=lambda work: run(args, work)
    )


def run(args: argparse.Namespace, work: pathlib.Path) -> int:
    """Pretrain, write the federation's certificates and configs into `work`, fine-tune."""

    from fedpriv.coordinator import write_checkpoint
    from fedpriv.wire.torch_interop import model_from_state_dict

    print(f"pretraining on public text for {args.pretrain_steps} steps ...", flush=True)
    model, loss = app.pretrain(steps=args.pretrain_steps)
    state = model.state_dict()
    write_checkpoint(work / "pretrained.fpck", model_from_state_dict(state))
    before = held_out_perplexity(dict(state))
    print(
        f"pretrained: training loss {loss:.3f}; perplexity on the silos' held-out text "
        f"{before:.2f}",
        flush=True,
    )
    make_pki(work / "pki", federation="lm", silos=SILOS)
    write_configs(work, rounds=args.rounds, port=0)  # the coordinator picks the port
    print(f"fine-tuning across {len(SILOS)} silos, {args.rounds} rounds, mTLS; files in {work}")
    code = run_federation(
        work,
        coordinator_config=work / "coordinator.toml",
        silos={name: ("examples.lm.app:make_client", work / f"{name}.toml") for name in SILOS},
    )
    if code != 0:
        return code
    rounds = [
        json.loads(line)
        for line in (work / "state" / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    after = before
    for record in rounds:
        if record.get("event") == "round_completed" and "loss" in record.get("evaluate", {}):
            after = math.exp(record["evaluate"]["loss"])
            print(f"round {record['round']}: held-out perplexity {after:.2f}", flush=True)
    print(f"final perplexity: {after:.2f} (pretrained: {before:.2f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
