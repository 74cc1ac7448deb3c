"""The hospital federation: three hospitals, DP-SGD in each, secure aggregation at the coordinator.

Usage: python examples/hospitals/run.py [--rounds N] [--epsilon E] [--workdir DIR | --keep]

Prints the round table, the final accuracy on the hospitals' held-out cases and
each hospital's sample-level epsilon from its own privacy ledger.
"""

from __future__ import annotations

import argparse
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

HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")


def write_configs(
    work: pathlib.Path, *, rounds: int, epsilon: float, fed_noise: float, port: int
) -> None:
    (work / "coordinator.toml").write_text(
        coordinator_toml(
            federation="hospitals",
            silos=HOSPITALS,
            port=port,
            # The coordinator sees only the sum of the hospitals' updates, already noised.
            top="secure_aggregation = true\n\n",
            rounds=f"num_rounds = {rounds}\nmin_clients = 3\ndeadline_s = 300",
            model='factory = "examples.hospitals.app:make_model"',
            rest=f"""
# Hospital-level DP: each update clipped to norm 0.5; the hospitals add the
# Skellam noise between them before masking.
[dp]
noise_multiplier = {fed_noise}
clip_norm = 0.5
delta = 1e-5

[secagg]
clip_norm = 0.5
""",
        )
    )
    for index, name in enumerate(HOSPITALS):
        app = f"""
hospital_index = {index}
target_epsilon = {epsilon}
planned_rounds = {rounds}
delta = 1e-5
"""
        budget = f"""
# The hospital's own budget: a round that would pass it is refused before training.
[privacy]
epsilon = {epsilon}
delta = 1e-5
ledger = "ledgers/{name}.json"
# The held-out test cases are an evaluation set the hospitals declare public to the
# federation: their accuracy is reported as computed (DP covers the training cases).
public_evaluation = true
"""
        (work / f"{name}.toml").write_text(silo_toml(name=name, port=port, app=app, rest=budget))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--epsilon", type=float, default=4.0, help="each hospital's budget")
    parser.add_argument(
        "--fed-noise",
        type=float,
        default=0.5,
        help="noise multiplier of hospital-level DP (the Skellam noise the hospitals add)",
    )
    add_work_arguments(parser)
    args = parser.parse_args()
    return run_in_work_folder(
        args.workdir, prefix="fedpriv-hospitals-", keep=args.keep, body=lambda work: run(args, work)
    )


def run(args: argparse.Namespace, work: pathlib.Path) -> int:
    """Write the federation's certificates and configs into `work` and run it."""
    make_pki(work / "pki", federation="hospitals", silos=HOSPITALS)
    write_configs(
        work,
        rounds=args.rounds,
        epsilon=args.epsilon,
        fed_noise=args.fed_noise,
        port=0,  # the coordinator picks a free port; run_federation gives it to the silos
    )
    print(
        f"hospital federation: {len(HOSPITALS)} hospitals, {args.rounds} rounds, mTLS, "
        f"DP-SGD to epsilon {args.epsilon:g} each, secure aggregation; files in {work}",
        flush=True,
    )
    app = "examples.hospitals.app:make_client"
    return run_federation(
        work,
        coordinator_config=work / "coordinator.toml",
        silos={name: (app, work / f"{name}.toml") for name in HOSPITALS},
    )


if __name__ == "__main__":
    sys.exit(main())
