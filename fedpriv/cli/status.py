"""``fedpriv status``: ask a running coordinator what it is doing."""

from __future__ import annotations

import json
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedpriv.client.config import ClientConfig
from fedpriv.transport import error_from_rpc, open_channel
from fedpriv.v1 import admin_pb2, admin_pb2_grpc

__all__ = [
    "check_health",
    "format_discarded",
    "format_rounds",
    "format_status",
    "query_status",
    "to_json",
]


def _channel(config: ClientConfig, *, insecure: bool, identity: str | None) -> grpc.Channel:
    return open_channel(
        config.coordinator,
        tls=config.tls(insecure=insecure),
        insecure=insecure,
        identity=identity or config.identity,
        server_name=config.server_name,
    )


def check_health(
    config: ClientConfig, *, insecure: bool, identity: str | None, timeout_s: float
) -> str:
    """The gRPC health service's answer for the whole server: SERVING, NOT_SERVING, ..."""
    with _channel(config, insecure=insecure, identity=identity) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def query_status(
    config: ClientConfig, *, insecure: bool, identity: str | None, timeout_s: float
) -> dict[str, Any]:
    """Call ``Admin.Status``; the reply as a plain dict (every field present)."""
    with _channel(config, insecure=insecure, identity=identity) as channel:
        try:
            reply = admin_pb2_grpc.AdminStub(channel).Status(
                admin_pb2.StatusRequest(), timeout=timeout_s
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None
    return {
        "federation": reply.federation,
        "state": reply.state,
        "round": reply.round,
        "num_rounds": reply.num_rounds,
        "completed_rounds": reply.completed_rounds,
        "min_clients": reply.min_clients,
        "silos": [
            {
                "name": silo.name,
                "seconds_since_seen": silo.seconds_since_seen,
                "live": silo.live,
                "round_outcome": silo.round_outcome,
                "device_kind": silo.device_kind,
                "device_count": silo.device_count,
                "device_memory_bytes": silo.device_memory_bytes,
                "step_seconds": silo.step_seconds,
                "full_steps": silo.full_steps,
                "max_steps": silo.max_steps,
            }
            for silo in reply.silos
        ],
        "last_round_metrics": dict(reply.last_round_metrics),
        "uptime_s": reply.uptime_s,
        "secure_aggregation": reply.secure_aggregation,
        "central_dp": reply.central_dp,
        "rounds_without_dp": list(reply.rounds_without_dp),
        "discarded_updates": [
            {"round": d.round, "silo": d.silo, "reason": d.reason} for d in reply.discarded_updates
        ],
    }


def format_rounds(rounds: tuple[int, ...] | list[int]) -> str:
    """Round numbers as ranges: ``1–3, 5``.

    Example:
        >>> format_rounds([1, 2, 3, 5])
        '1–3, 5'
    """
    spans: list[list[int]] = []
    for number in sorted(rounds):
        if spans and number == spans[-1][1] + 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in spans)


def format_status(status: dict[str, Any]) -> str:
    """Render a status dict as text for a terminal or a log."""
    on_off = {True: "on", False: "off"}
    without = status.get("rounds_without_dp") or []
    guarantee = ""
    if without:
        which = f"round{'s' if len(without) > 1 else ''} {format_rounds(without)}"
        guarantee = f", ε = none ({which} ran without DP)"
    lines = [
        f"federation: {status['federation']}  state: {status['state']}  "
        f"round {status['round']}/{status['num_rounds']} "
        f"({status['completed_rounds']} completed)  uptime {float(status['uptime_s']):.0f} s",
        f"secure aggregation: {on_off[bool(status['secure_aggregation'])]}  "
        f"central DP: {on_off[bool(status['central_dp'])]}{guarantee}  "
        f"min silos per round: {status['min_clients']}",
    ]
    silos = status["silos"]
    if silos:
        width = max(4, *(len(s["name"]) for s in silos))
        lines.append(f"{'silo':<{width}}  live  last seen  this round")
        for silo in silos:
            seen = float(silo["seconds_since_seen"])
            shown = "never" if seen < 0 else f"{seen:.1f} s ago"
            lines.append(
                f"{silo['name']:<{width}}  {'yes' if silo['live'] else 'no':<4}  "
                f"{shown:<9}  {silo['round_outcome'] or '-'}"
            )
        lines += format_resources(silos)
    else:
        lines.append("no silo has joined yet")
    metrics = status["last_round_metrics"]
    if metrics:
        shown = "  ".join(f"{k} {float(v):.4g}" for k, v in sorted(metrics.items()))
        lines.append(f"last round: {shown}")
    lines += format_discarded(status.get("discarded_updates") or [])
    return "\n".join(lines)


def format_resources(silos: list[dict[str, Any]]) -> list[str]:
    r"""A table of what the silos reported of their hardware and pace (none known: no lines).

    Example:
        >>> silos = [{"name": "a", "device_kind": "cuda", "device_count": 2,
        ...           "device_memory_bytes": 80 << 30, "step_seconds": 0.05,
        ...           "full_steps": 400, "max_steps": 0},
        ...          {"name": "b", "device_kind": "cpu", "device_count": 1,
        ...           "step_seconds": 0.2, "full_steps": 400, "max_steps": 100}]
        >>> print("\n".join(format_resources(silos)))
        silo  device          s/step  full steps  this round
        a     2 cuda 80 GiB    0.050         400  full
        b     1 cpu            0.200         400  100 steps
    """
    if not any(s.get("device_kind") or s.get("step_seconds") for s in silos):
        return []
    width = max(4, *(len(s["name"]) for s in silos))
    lines = [f"{'silo':<{width}}  {'device':<14}  s/step  full steps  this round"]
    for silo in silos:
        kind = silo.get("device_kind") or ""
        device = f"{int(silo.get('device_count') or 0)} {kind}" if kind else "?"
        memory = int(silo.get("device_memory_bytes") or 0)
        if memory:
            device += f" {memory / 2**30:.0f} GiB"
        step = float(silo.get("step_seconds") or 0.0)
        full = int(silo.get("full_steps") or 0)
        budget = int(silo.get("max_steps") or 0)
        lines.append(
            f"{silo['name']:<{width}}  {device:<14}  {f'{step:.3f}' if step else '?':>6}  "
            f"{full if full else '?':>10}  {f'{budget} steps' if budget else 'full'}"
        )
    return lines


def format_discarded(discarded: list[dict[str, Any]]) -> list[str]:
    """Lines naming the updates failed attempts threw away, by round and reason (none: none).

    Example:
        >>> for line in format_discarded([{"round": 1, "silo": "a", "reason": "too few"}]):
        ...     print(line)
        discarded updates (their attempt failed; DP budget spent on them bought nothing):
          round 1: a (the attempt failed: too few)
    """
    if not discarded:
        return []
    attempts: dict[tuple[int, str], list[str]] = {}
    for update in discarded:
        attempts.setdefault((int(update["round"]), str(update["reason"])), []).append(
            str(update["silo"])
        )
    lines = ["discarded updates (their attempt failed; DP budget spent on them bought nothing):"]
    for (round, reason), silos in attempts.items():
        lines.append(f"  round {round}: {', '.join(silos)} (the attempt failed: {reason})")
    return lines


def to_json(status: dict[str, Any]) -> str:
    """The status as one JSON document."""
    return json.dumps(status, sort_keys=True)
