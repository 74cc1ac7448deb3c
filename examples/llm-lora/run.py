"""DP LoRA fine-tuning of a GPT-2-architecture model across three silos; perplexity and epsilon.

Usage: python examples/llm-lora/run.py [--model DIR] [--rounds N] [--epsilon E]
       [--pretrain-steps N] [--workdir DIR | --keep]

1. The base model: ``--model DIR`` (a local ``save_pretrained`` folder), or a small
   GPT-2 pretrained here on public text (the Python standard library's docstrings).
2. Three silos fine-tune LoRA adapters on their own text (a share of this
   repository's Markdown) with DP-SGD, FedAvg over mTLS; only the adapters travel.
3. It prints each silo's held-out perplexity before and after, the bytes a silo
   sends per round beside the whole model's, and each silo's epsilon from its ledger.
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import sqlite3
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

from examples.launcher import (  # noqa: E402
    add_work_arguments,
    coordinator_toml,
    make_pki,
    run_federation,
    run_in_work_folder,
    silo_toml,
)

SILOS = ("silo-1", "silo-2", "silo-3")
DELTA = 1e-5


def write_configs(
    work: pathlib.Path, *, model_dir: pathlib.Path, rounds: int, epsilon: float
) -> None:
    """The coordinator's and the silos' TOML files in `work`."""
    (work / "coordinator.toml").write_text(
        coordinator_toml(
            federation="llm-lora",
            silos=SILOS,
            rounds=f"""
num_rounds = {rounds}
min_clients = {len(SILOS)}
deadline_s = 900
# Under DP a silo releases no un-noised metric; run.py measures perplexity itself.
federated_evaluation = false
client_config = {{ epochs = 2 }}
""",
            # The initial adapters (the base model never leaves the silos).
            model='checkpoint = "adapters.fpck"',
        )
    )
    for index, name in enumerate(SILOS):
        app = f"""model_dir = "{model_dir}"
silo_index = {index}
num_silos = {len(SILOS)}
target_epsilon = {epsilon}
planned_rounds = {rounds}
delta = {DELTA}
batch_size = 64
physical_batch = 16
lr = 0.02
"""
        privacy = f"""[privacy]
epsilon = {epsilon}
delta = {DELTA}
ledger = "ledgers/{name}.json"
"""
        (work / f"{name}.toml").write_text(silo_toml(name=name, app=app, rest=privacy))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local save_pretrained folder of a causal LM")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=8.0, help="each silo's budget")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    add_work_arguments(parser)
    args = parser.parse_args()
    return run_in_work_folder(
        args.workdir, prefix="fedpriv-llm-lora-", keep=args.keep, body=lambda w: run(args, w)
    )


def run(args: argparse.Namespace, work: pathlib.Path) -> int:
    """Prepare the base and the adapters, run the federation, report."""
    import lora_app
    from transformers.utils import logging as hf_logging

    from fedpriv.coordinator import Store, read_checkpoint, write_checkpoint
    from fedpriv.privacy.ledger import PrivacyBudget, PrivacyLedger
    from fedpriv.wire.torch_interop import exchanged_state, model_from_state_dict

    hf_logging.disable_progress_bar()
    if args.model:
        model_dir = pathlib.Path(args.model).resolve()
        print(f"base model: {model_dir}", flush=True)
    else:
        model_dir = work / "base"
        print(f"pretraining a small GPT-2 on public text for {args.pretrain_steps} steps ...")
        loss = lora_app.prepare_base(model_dir, steps=args.pretrain_steps)
        print(f"pretrained: training loss {loss:.3f}; saved to {model_dir}", flush=True)
    model = lora_app.make_model(str(model_dir))
    adapters = exchanged_state(model)
    write_checkpoint(work / "adapters.fpck", model_from_state_dict(adapters))
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapters.values())
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    initial = {k: v.detach().cpu().numpy().copy() for k, v in adapters.items()}
    before = lora_app.held_out_perplexity(str(model_dir), initial, num_silos=len(SILOS))
    make_pki(work / "pki", federation="llm-lora", silos=SILOS)
    write_configs(work, model_dir=model_dir, rounds=args.rounds, epsilon=args.epsilon)
    print(
        f"fine-tuning LoRA adapters with DP-SGD across {len(SILOS)} silos, {args.rounds} "
        f"rounds, mTLS; files in {work}",
        flush=True,
    )
    code = run_federation(
        work,
        coordinator_config=work / "coordinator.toml",
        silos={name: ("lora_app:make_client", work / f"{name}.toml") for name in SILOS},
        app_path=[HERE],
    )
    if code != 0:
        return code
    store = Store(work / "state")
    try:
        committed = store.last_committed()
    finally:
        store.close()
    uri = f"file:{work / 'state' / 'state.sqlite3'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        query = (
            "SELECT bytes_received FROM participants WHERE task = 'train' AND outcome = 'accepted'"
        )
        sent = [n for (n,) in db.execute(query)]
    assert committed is not None  # the coordinator exited 0: every round committed
    final = read_checkpoint(committed.checkpoint, sha256=committed.sha256).arrays()
    after = lora_app.held_out_perplexity(str(model_dir), final, num_silos=len(SILOS))
    print(
        f"sent per silo per round: {max(sent)} bytes (the adapters); the whole model is "
        f"{model_bytes} bytes ({model_bytes / adapter_bytes:.0f}x)",
        flush=True,
    )
    for index, name in enumerate(SILOS):
        with PrivacyLedger.open(
            work / "ledgers" / f"{name}.json",
            budget=PrivacyBudget(epsilon=args.epsilon, delta=DELTA),
        ) as ledger:
            spent = ledger.spent_epsilon()
            entries = len(ledger.entries)
        print(
            f"{name}: held-out perplexity {before[index]:.1f} -> {after[index]:.1f}; "
            f"epsilon {spent:.2f} of {args.epsilon:g} (delta {DELTA:g}, {entries} round"
            f"{'' if entries == 1 else 's'}, ledger)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
