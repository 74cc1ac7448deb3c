"""What the coordinator tells the outside world about rounds: a JSONL log and Prometheus.

Every completed or failed round is appended to ``<state_dir>/metrics.jsonl``
(one JSON object per line, fsynced), which ``fedpriv report`` plots. With
``[metrics] prometheus = "host:port"`` the same events also feed a Prometheus
endpoint at ``http://host:port/metrics``.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from fedpriv.coordinator.federation import RoundReporter, RoundSummary
from fedpriv.coordinator.phases import RejectionReporter

__all__ = ["Telemetry"]

logger = logging.getLogger(__name__)


class Telemetry:
    """A :class:`RoundReporter` that logs rounds as JSONL and to Prometheus, then forwards them.

    Args:
        state_dir: Where ``metrics.jsonl`` is appended.
        inner: The reporter to forward to (the CLI's round table).
        prometheus: ``host:port`` to serve ``/metrics`` on; None: no endpoint.
    """

    def __init__(
        self,
        state_dir: pathlib.Path,
        *,
        inner: RoundReporter | None = None,
        prometheus: str | None = None,
    ) -> None:
        self.path = state_dir / "metrics.jsonl"
        self._inner = inner
        self._lock = threading.Lock()
        self.registry = CollectorRegistry()
        self._rounds = Counter(
            "fedpriv_rounds_completed", "Rounds completed", registry=self.registry
        )
        self._failed = Counter(
            "fedpriv_rounds_failed",
            "Round attempts that published no model",
            registry=self.registry,
        )
        self._round = Gauge("fedpriv_round", "Last completed round", registry=self.registry)
        self._duration = Histogram(
            "fedpriv_round_duration_seconds",
            "Round duration",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=self.registry,
        )
        self._bytes = Counter(
            "fedpriv_update_bytes_received", "Update bytes received", registry=self.registry
        )
        self._participants = Counter(
            "fedpriv_participants",
            "Silo results per round by outcome (accepted, rejected, dropped, declined)",
            ["outcome"],
            registry=self.registry,
        )
        self._rejections = Counter(
            "fedpriv_rejections",
            "Updates rejected, by the kind of their first problem (layout, round, kind, "
            "num_examples, compression, metrics, privacy, secagg, non_finite, bounds, stream)",
            ["reason"],
            registry=self.registry,
        )
        self._silo_epsilon = Gauge(
            "fedpriv_silo_epsilon",
            "Sample-level epsilon a silo reported",
            ["silo"],
            registry=self.registry,
        )
        self._federation_epsilon = Gauge(
            "fedpriv_federation_epsilon",
            "Silo-level epsilon of the federation",
            registry=self.registry,
        )
        self.server: Any = None
        self.port: int | None = None
        if prometheus is not None:
            host, _, port = prometheus.rpartition(":")
            self.server, _ = start_http_server(
                int(port), addr=host or "127.0.0.1", registry=self.registry
            )
            self.port = int(self.server.server_port)
            logger.info("prometheus metrics on http://%s:%d/metrics", host, self.port)

    def _append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def round_completed(self, summary: RoundSummary) -> None:
        """Log, count, and forward a completed round."""
        self._rounds.inc()
        self._round.set(summary.round)
        self._duration.observe(summary.duration_s)
        self._bytes.inc(summary.bytes_received)
        for outcome in ("accepted", "rejected", "dropped", "declined"):
            self._participants.labels(outcome).inc(getattr(summary, outcome))
        for silo, values in summary.silo_metrics.items():
            if "epsilon" in values:
                self._silo_epsilon.labels(silo).set(float(values["epsilon"]))
        if "epsilon" in summary.federation_metrics:
            self._federation_epsilon.set(summary.federation_metrics["epsilon"])
        self._append(
            {
                "event": "round_completed",
                "unix_s": time.time(),
                "round": summary.round,
                "selected": summary.selected,
                "accepted": summary.accepted,
                "rejected": summary.rejected,
                "dropped": summary.dropped,
                "declined": summary.declined,
                "fit": dict(summary.fit_metrics),
                "evaluate": dict(summary.evaluation_metrics),
                "silos": {s: dict(v) for s, v in summary.silo_metrics.items()},
                "federation": dict(summary.federation_metrics),
                "bytes_received": summary.bytes_received,
                "duration_s": summary.duration_s,
                "privacy": summary.privacy.value,
            }
        )
        if self._inner is not None:
            self._inner.round_completed(summary)

    def update_rejected(self, *, silo: str, round: int, reason: str, detail: str) -> None:
        """Log and count a rejected update; the round goes on without it."""
        self._rejections.labels(reason).inc()
        self._append(
            {
                "event": "update_rejected",
                "unix_s": time.time(),
                "round": round,
                "silo": silo,
                "reason": reason,
                "detail": detail[:1000],
            }
        )
        if isinstance(self._inner, RejectionReporter):
            self._inner.update_rejected(silo=silo, round=round, reason=reason, detail=detail)

    def round_failed(self, round: int, reason: str) -> None:
        """Log, count, and forward a failed attempt."""
        self._failed.inc()
        self._append(
            {"event": "round_failed", "unix_s": time.time(), "round": round, "reason": reason}
        )
        if self._inner is not None:
            self._inner.round_failed(round, reason)

    def close(self) -> None:
        """Stop the Prometheus endpoint."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
