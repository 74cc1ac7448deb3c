"""The commands that look at a federation or a silo app: audit, report, audit-log, status."""

from __future__ import annotations

import argparse
import pathlib
from typing import Any

from fedpriv._config import read_toml
from fedpriv.errors import ConfigError

__all__ = ["cmd_audit", "cmd_audit_log", "cmd_report", "cmd_status"]


def cmd_audit(args: argparse.Namespace) -> int:
    """Run ``fedpriv audit``: audit a silo app by membership inference (3: audit failed)."""
    from fedpriv.client.audit import audit_client
    from fedpriv.client.torch import TorchClient
    from fedpriv.coordinator.daemon import load_factory

    app: dict[str, Any] = {}
    if args.config:
        data, _ = read_toml(args.config)
        app = dict(data.get("app", {}))
    client = load_factory(args.app, field="--app")(app)
    if not isinstance(client, TorchClient):
        raise ConfigError(f"--app {args.app!r} must return a fedpriv.TorchClient to be audited")
    result = audit_client(
        client,
        canaries=args.canaries,
        guesses=args.guesses,
        rounds=args.rounds,
        epochs=args.epochs,
        delta=args.delta,
        confidence=args.confidence,
        seed=args.seed,
    )
    print(
        f"canaries: {result.canaries} ({result.included} trained on); "
        f"guesses: {result.correct}/{result.guesses} correct",
        flush=True,
    )
    print(
        f"empirical epsilon lower bound: {result.epsilon_lower_bound:.3f} "
        f"({result.confidence:.0%} confidence, delta {result.delta:g})",
        flush=True,
    )
    if result.accountant_epsilon is None:
        print("accountant epsilon: none (the client trains without DP)", flush=True)
    else:
        print(
            f"accountant epsilon: {result.accountant_epsilon:.3f} (delta {result.delta:g})",
            flush=True,
        )
        if result.epsilon_lower_bound > result.accountant_epsilon:
            print(
                "AUDIT FAILED: the empirical lower bound exceeds the accountant's epsilon",
                flush=True,
            )
            return 3
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Run ``fedpriv report``: plots of a run's rounds, its guarantee and its discarded updates."""
    from fedpriv.cli.report import describe_discarded, describe_guarantee, write_report

    run_dir = pathlib.Path(args.run_dir)
    out = pathlib.Path(args.out) if args.out else run_dir / "report"
    for name, points in write_report(run_dir, out).items():
        print(f"{out / name}: {points} points", flush=True)
    guarantee = describe_guarantee(run_dir)
    if guarantee is not None:
        print(guarantee, flush=True)
    for line in describe_discarded(run_dir):
        print(line, flush=True)
    return 0


def cmd_audit_log(args: argparse.Namespace) -> int:
    """Run ``fedpriv audit-log``: the coordinator's audit entries, as a table or JSON lines."""
    from fedpriv.cli.audit_log import format_entries, parse_kinds, to_json_lines
    from fedpriv.coordinator.audit import AuditLog

    kinds = parse_kinds(args.kind)
    log = AuditLog.open(pathlib.Path(args.state_dir))
    try:
        entries = log.entries(identity=args.identity, kinds=kinds, limit=args.limit)
    finally:
        log.close()
    text = to_json_lines(entries) if args.json else format_entries(entries)
    if text:
        print(text, flush=True)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Run ``fedpriv status``: a running coordinator's state, or its health with --health."""
    from fedpriv.cli.status import check_health, format_status, query_status, to_json
    from fedpriv.client.config import ClientConfig

    data, base = read_toml(args.config)
    config = ClientConfig.from_dict(data, base_dir=base)
    options = {"insecure": args.insecure, "identity": args.identity, "timeout_s": args.timeout}
    if args.health:
        serving = check_health(config, **options)
        print(serving, flush=True)
        return 0 if serving == "SERVING" else 1
    status = query_status(config, **options)
    print(to_json(status) if args.json else format_status(status), flush=True)
    return 0
