"""The ``fedpriv`` command: argument parsing, logging setup and exit codes; no logic.

What users read (``fedpriv --help``) is ``_DESCRIPTION`` and each command's example,
not this docstring.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pathlib
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from fedpriv._config import read_toml
from fedpriv.cli.inspection import cmd_audit, cmd_audit_log, cmd_report, cmd_status
from fedpriv.cli.logs import logging_to_stderr
from fedpriv.cli.pki import add_pki_commands
from fedpriv.cli.round_table import RoundPrinter, print_epsilons
from fedpriv.errors import ConfigError, FederationStopped, FedprivError
from fedpriv.faults import arm_from_environment
from fedpriv.transport.options import DEFAULT_ADDRESS

__all__ = ["main"]

logger = logging.getLogger("fedpriv.cli")


def _cmd_coordinator(args: argparse.Namespace) -> int:
    from fedpriv.coordinator import Coordinator, CoordinatorConfig
    from fedpriv.coordinator.daemon import limit_malloc_arenas

    limit_malloc_arenas()  # before gRPC starts its threads
    data, base = read_toml(args.config)
    config = CoordinatorConfig.from_dict(data, base_dir=base)
    printer = RoundPrinter(quiet=args.quiet)
    with (
        contextlib.closing(printer),
        Coordinator(config, insecure=args.insecure, reporter=printer) as coordinator,
    ):
        stop = threading.Event()
        reload_crl = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        # SIGHUP re-reads the revocation list now (it is also re-read when its file changes).
        signal.signal(signal.SIGHUP, lambda *_: reload_crl.set())
        while not stop.is_set():
            if reload_crl.is_set():
                reload_crl.clear()
                logger.info("SIGHUP: %d newly revoked", coordinator.reload_revocations())
            if coordinator.wait(timeout_s=0.5):
                break
            printer.progress(coordinator.federation.status())
        else:
            logger.info("stopping on SIGTERM; the last committed round is kept")
            return 0
    if coordinator.already_finished:
        print(
            f"federation {config.federation!r} had already finished all "
            f"{config.rounds.num_rounds} rounds; nothing to do (results: fedpriv report "
            f"{config.state_dir})",
            flush=True,
        )
        return 0
    if printer.last_accuracy is not None:
        print(f"final accuracy: {printer.last_accuracy:.3f}", flush=True)
    print_epsilons(printer)
    return 0


def _cmd_client(args: argparse.Namespace) -> int:
    from fedpriv.client.config import ClientConfig
    from fedpriv.coordinator.daemon import load_factory

    data, base = read_toml(args.config)
    config = ClientConfig.from_dict(data, base_dir=base)
    here = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun (imports torch)
        from fedpriv.client.distributed import RankZeroClient, finish, follow, start

        here = start()  # join the silo's other processes
    if args.quiet or (here is not None and here.rank != 0):
        from fedpriv.client.progress import ProgressMode, set_mode

        set_mode(ProgressMode.OFF)
    if here is not None and args.flower_app:
        raise ConfigError("--flower-app runs in one process; start it without torchrun")
    if here is not None and here.rank != 0:
        # Rank 0 alone talks to the coordinator and keeps the ledger; this rank trains
        # each round rank 0 hands it.
        trained = follow(load_factory(args.app, field="--app")(dict(config.app)))
        logger.info("silo process %d of %d: trained %d rounds", here.rank, here.size, trained)
        finish()
        return 0
    tls = config.tls(insecure=args.insecure)
    # Locked until closed below; on an error the process ends and the kernel drops the lock.
    ledger = config.open_ledger(reset=args.reset_ledger)
    if ledger is not None:
        logger.info(
            "privacy ledger %s: %d runs, epsilon %.4f of %g (delta %g)",
            ledger.path,
            len(ledger.entries),
            ledger.spent_epsilon(),
            ledger.budget.epsilon,
            ledger.budget.delta,
        )
    elif args.reset_ledger:
        logger.warning("--reset-ledger has no effect: this silo has no [privacy] ledger")
    if args.flower_app:
        from fedpriv.client.flower_app import load_flower_app

        client = load_flower_app(
            args.flower_app, node_config=config.app, run_config=config.run_config
        )
    else:
        client = load_factory(args.app, field="--app")(dict(config.app))
    rank_zero = None
    if here is not None:
        client = rank_zero = RankZeroClient(client)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stats = _run_silo(client, config, args, tls, stop, ledger)
    finally:
        if rank_zero is not None:
            rank_zero.close()  # the other ranks return
            if not rank_zero.broken:
                finish()
    if ledger is not None:
        ledger.close()
    logger.info(
        "silo=%s trained=%d evaluated=%d rejected=%d declined=%d bytes_sent=%d",
        stats.silo,
        stats.trained,
        stats.evaluated,
        stats.rejected,
        stats.declined,
        stats.bytes_sent,
    )
    return 0


def _run_silo(
    client: Any,
    config: Any,
    args: argparse.Namespace,
    tls: Any,
    stop: threading.Event,
    ledger: Any,
) -> Any:
    from fedpriv.client import run_client

    return run_client(
        client,
        coordinator=config.coordinator,
        tls=tls,
        insecure=args.insecure,
        identity=args.identity or config.identity,
        server_name=config.server_name,
        poll_wait_s=config.poll_wait_s,
        reconnect_timeout_s=config.reconnect_timeout_s,
        stop=stop,
        ledger=ledger,
        release=config.release,
        limits=config.limits,
    )


def _cmd_run(args: argparse.Namespace) -> int:
    import datetime

    from fedpriv.run import FlowerProject, fresh_run_dir, parse_run_config, run_flower_project

    project = FlowerProject.read(pathlib.Path(args.project))
    if args.state_dir:
        state_dir = pathlib.Path(args.state_dir)
    else:
        now = datetime.datetime.now(datetime.UTC)
        state_dir = fresh_run_dir(project.root / ".fedpriv" / "runs", now)
    overrides = parse_run_config(args.run_config)
    printer = RoundPrinter(quiet=args.quiet)
    with contextlib.closing(printer):
        final = run_flower_project(
            project, state_dir=state_dir, silos=args.silos, run_config=overrides, reporter=printer
        )
    print(f"final model: {final}", flush=True)
    print(f"state: {state_dir} (plots: fedpriv report {state_dir / 'coordinator'})", flush=True)
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    from fedpriv.scaffold import scaffold

    root = pathlib.Path(args.dir)
    made = scaffold(
        root,
        silos=args.silos,
        rounds=args.rounds,
        address=args.address,
        federation=args.federation,
    )
    silos = args.silos
    print(f"wrote a {silos}-silo federation to {root}:")
    print("  ca/           the federation CA (keep ca.key offline)")
    print("  coordinator/  coordinator.toml and the coordinator's certificate")
    print(f"  silo-1/ .. silo-{silos}/  each silo's silo.toml and certificate")
    print("  ops/          an operator's certificate, for fedpriv status")
    print("  app.py        the example silo app: edit make_client to load your data")
    print("run it, each command in its own terminal:")
    print(f"  cd {root}")
    for command in made.commands:
        print(f"  {command}")
    print("while it runs, watch it from another terminal (in the same folder):")
    print(f"  {made.watch}")
    print(
        f"the coordinator keeps its rounds, checkpoints and round log in {made.state_dir}; "
        "a restart resumes from there"
    )
    print(
        "once it has run, plot accuracy, loss and epsilon per round "
        f"(into {made.state_dir / 'report'}):"
    )
    print(f"  {made.report}")
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


_DESCRIPTION = """\
Train one model across organisations without moving their data. A coordinator
schedules rounds and aggregates updates; each silo trains on its own data (with
differential privacy if it has a privacy budget) and talks to the coordinator
over mutually authenticated TLS only."""

_EPILOG = """\
first steps:
  fedpriv init demo-fed            a CA, certificates, configs and an app to start from
  fedpriv run ./my-flower-app      a Flower project as a local federation over mTLS
  fedpriv COMMAND --help           what a command takes, with an example

docs: README.md and docs/ in the fedpriv repository"""

# One example per command, shown under its --help.
_EXAMPLES = {
    "coordinator": "fedpriv coordinator --config coordinator.toml",
    "client": "fedpriv client --app myapp:make_client --config silo.toml\n"
    "  fedpriv client --flower-app mypkg.client_app:app --config silo.toml",
    "run": 'fedpriv run ./quickstart-numpy --silos 3 --run-config "num-server-rounds=5"',
    "audit": "fedpriv audit --app myapp:make_client --config silo.toml --canaries 1000",
    "report": "fedpriv report state/ --out plots/",
    "audit-log": "fedpriv audit-log state/ --kind rejected",
    "status": "fedpriv status --config operator.toml\n"
    "  fedpriv status --config operator.toml --health",
    "init": "fedpriv init demo-fed --silos 3 --rounds 5",
    "pki": "fedpriv pki init --dir pki --federation hospitals\n"
    "  fedpriv pki issue hospital-a --client --dir pki",
}


def _with_examples(commands: Any) -> None:
    """Give each command's --help its one-line purpose and an example."""
    for name, sub in commands.choices.items():
        example = _EXAMPLES.get(name)
        if example is None:
            continue
        sub.formatter_class = argparse.RawDescriptionHelpFormatter
        sub.epilog = f"example:\n  {example}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedpriv",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    commands = parser.add_subparsers(dest="command", required=True)

    coordinator = commands.add_parser("coordinator", help="run the coordinator daemon")
    coordinator.add_argument("--config", required=True, help="coordinator TOML file")
    coordinator.add_argument("--insecure", action="store_true", help="serve plain text (unsafe)")
    coordinator.add_argument("--quiet", action="store_true", help="do not print the round table")
    coordinator.set_defaults(run=_cmd_coordinator)

    client = commands.add_parser("client", help="run a silo")
    app = client.add_mutually_exclusive_group(required=True)
    app.add_argument("--app", help="module:factory returning a fedpriv Client")
    app.add_argument(
        "--flower-app",
        help="module:app of an unmodified Flower app: a ClientApp (Message API or "
        "client_fn) or a client_fn returning a NumPyClient or Client",
    )
    client.add_argument("--config", required=True, help="silo TOML file")
    client.add_argument("--insecure", action="store_true", help="connect in plain text (unsafe)")
    client.add_argument("--identity", help="silo name to claim with --insecure")
    client.add_argument(
        "--quiet", action="store_true", help="no training progress (bars or per-epoch lines)"
    )
    client.add_argument(
        "--reset-ledger",
        action="store_true",
        help="start the privacy ledger over where it is missing or rolled back although one "
        "existed (its earlier spend is then no longer counted; logs a warning)",
    )
    client.set_defaults(run=_cmd_client)

    run = commands.add_parser(
        "run",
        help="run a Flower project (flwr new layout) as a local federation over mTLS",
        description="Read PROJECT_DIR/pyproject.toml ([tool.flwr.app]) and run its ServerApp's "
        "strategy with local silos of its ClientApp, over mutually authenticated TLS on "
        "loopback. Example: fedpriv run ./quickstart-numpy --silos 3",
    )
    run.add_argument("project", help="the Flower project's directory (holds pyproject.toml)")
    run.add_argument(
        "--silos", type=int, help="local silos (default: the federation's num-supernodes, else 2)"
    )
    run.add_argument(
        "--state-dir",
        help="where the store, checkpoints and PKI go (default: PROJECT/.fedpriv/runs/<time>)",
    )
    run.add_argument(
        "--run-config",
        help="overrides of [tool.flwr.app.config], as flwr run "
        'takes them: "num-server-rounds=5 learning-rate=0.05"',
    )
    run.add_argument("--quiet", action="store_true", help="do not print the round table")
    run.set_defaults(run=_cmd_run)

    audit = commands.add_parser(
        "audit", help="canary membership-inference audit: empirical epsilon lower bound"
    )
    audit.add_argument("--app", required=True, help="module:factory returning a TorchClient")
    audit.add_argument("--config", help="silo TOML file; its [app] table goes to the factory")
    audit.add_argument("--canaries", type=int, default=1000, help="canaries drawn (default 1000)")
    audit.add_argument("--guesses", type=int, default=200, help="even number (default 200)")
    audit.add_argument("--rounds", type=int, default=1, help="rounds of local training")
    audit.add_argument("--epochs", type=int, help="epochs per round (default: the client's)")
    from fedpriv.privacy.accounting import DEFAULT_DELTA

    audit.add_argument(
        "--delta", type=float, help=f"default: the client's DP delta, else {DEFAULT_DELTA:g}"
    )
    audit.add_argument("--confidence", type=float, default=0.95)
    audit.add_argument("--seed", type=int, default=0)
    audit.set_defaults(run=cmd_audit)

    report = commands.add_parser(
        "report", help="plot a run: accuracy, loss, epsilon, participation"
    )
    report.add_argument("run_dir", help="the coordinator's state dir (holds metrics.jsonl)")
    report.add_argument("--out", help="folder for the PNGs (default: RUN_DIR/report)")
    report.set_defaults(run=cmd_report)

    audit_log = commands.add_parser(
        "audit-log",
        help="the coordinator's audit log: joins, leaves, rejections, refusals, admin calls",
    )
    audit_log.add_argument("state_dir", help="the coordinator's state dir (holds state.sqlite3)")
    audit_log.add_argument("--identity", help="only this silo's or operator's entries")
    audit_log.add_argument(
        "--kind",
        action="append",
        help="only entries of this kind (repeatable): join, leave, gone, rejected, "
        "duplicate, takeover, denied, admin",
    )
    audit_log.add_argument("--limit", type=_positive, help="only the newest N entries")
    audit_log.add_argument("--json", action="store_true", help="one JSON object per line")
    audit_log.set_defaults(run=cmd_audit_log)

    status = commands.add_parser("status", help="ask a running coordinator for its state")
    status.add_argument(
        "--config",
        required=True,
        help="TOML with [coordinator] address and [tls] (an operator's certificate)",
    )
    status.add_argument(
        "--health",
        action="store_true",
        help="only ask the gRPC health service: exit 0 if SERVING, 1 if it answers "
        "anything else, 2 if the coordinator cannot be reached",
    )
    status.add_argument("--json", action="store_true", help="print the state as JSON")
    status.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    status.add_argument("--insecure", action="store_true", help="connect in plain text (unsafe)")
    status.add_argument("--identity", help="operator name to claim with --insecure")
    status.set_defaults(run=cmd_status)

    init = commands.add_parser("init", help="scaffold a federation: CA, certificates, configs, app")
    init.add_argument("dir", help="a new (or empty) folder")
    init.add_argument("--silos", type=int, default=3, help="number of silos (default 3)")
    init.add_argument("--rounds", type=int, default=5, help="rounds to run (default 5)")
    init.add_argument(
        "--address",
        default=DEFAULT_ADDRESS,
        help=f"coordinator host:port (default {DEFAULT_ADDRESS})",
    )
    init.add_argument("--federation", help="federation name (default: the folder's name)")
    init.set_defaults(run=_cmd_init)

    add_pki_commands(commands)
    _with_examples(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fedpriv`` command line; returns the exit code."""
    args = _parser().parse_args(argv)
    with logging_to_stderr(getattr(logging, str(args.log_level).upper(), logging.INFO)):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        # Crash tests name a fault-injection point here (fedpriv.faults); unset, nothing is armed.
        arm_from_environment()
        return int(args.run(args))
    except FederationStopped as err:
        # Not a usage error: the federation ended without completing (1, as a failed run).
        print(f"fedpriv: {err}", file=sys.stderr)
        return 1
    except FedprivError as err:
        print(f"fedpriv: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
