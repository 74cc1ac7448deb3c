"""The round engine alone: a fake clock, a real SQLite store, no gRPC.

Each test drives the federation's RPC entry points by hand while its round loop
runs in a thread, and moves the injected clock instead of sleeping.
"""

from __future__ import annotations

import contextlib
import pathlib
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from fedpriv.coordinator.admission import Header
from fedpriv.coordinator.config import CoordinatorConfig, ModelSource, RoundConfig
from fedpriv.coordinator.federation import Federation
from fedpriv.coordinator.phases import Outcome, Phase, RoundSummary, TaskKind
from fedpriv.coordinator.registry import SiloRegistry
from fedpriv.coordinator.store import Store
from fedpriv.errors import ProtocolError, RoundFailed
from fedpriv.strategy import FedAvg
from fedpriv.wire import Compression, Model

SIZE = 1024  # float32 elements: 4 chunks of 1 KiB


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.federation: Federation | None = None

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float, *, alive: tuple[str, ...] = ()) -> None:
        """Move time on; `alive` silos heartbeat at the new time; wake the round loop."""
        assert self.federation is not None
        with self.federation.cond:
            self.now += seconds
            for silo in alive:
                self.federation.heartbeat(silo)
            self.federation.cond.notify_all()


class Reporter:
    """Collects round events and wakes whoever waits on the federation for them."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.federation: Federation | None = None
        self.completed: list[RoundSummary] = []
        self.committed_when_reported: list[int] = []
        self.failed: list[tuple[int, str]] = []

    def round_completed(self, summary: RoundSummary) -> None:
        committed = self.store.last_committed()
        self.committed_when_reported.append(committed.round if committed else -1)
        self.completed.append(summary)
        self._wake()

    def round_failed(self, round: int, reason: str) -> None:
        self.failed.append((round, reason))
        self._wake()

    def _wake(self) -> None:
        assert self.federation is not None
        with self.federation.cond:
            self.federation.cond.notify_all()


def _model(value: float) -> Model:
    return Model.from_arrays({"w": np.full(SIZE, value, np.float32)}, chunk_bytes=1024)


@contextlib.contextmanager
def engine(
    tmp_path: pathlib.Path, silos: tuple[str, ...] = ("silo-a", "silo-b"), **rounds: object
) -> Iterator[tuple[Federation, FakeClock, Reporter]]:
    settings: dict[str, object] = {
        "num_rounds": 1,
        "min_clients": 2,
        "deadline_s": 60.0,
        "federated_evaluation": False,
        **rounds,
    }
    config = CoordinatorConfig(
        address="127.0.0.1:0",
        rounds=RoundConfig(**settings),  # type: ignore[arg-type]
        model=ModelSource(factory="unused:unused"),
        state_dir=tmp_path / "state",
        heartbeat_interval_s=1,
        poll_wait_s=2,
    )
    store = Store(tmp_path / "state")
    committed = store.commit_staged(
        store.stage_round(
            round=0, model=_model(0.0), started_unix_s=0.0, selected=0, accepted=0, total_weight=0
        )
    )
    clock = FakeClock()
    reporter = Reporter(store)
    federation = Federation(
        config=config,
        strategy=FedAvg(),
        store=store,
        model=store.load_checkpoint(committed.checkpoint),
        next_round=1,
        reporter=reporter,
        clock=clock,
    )
    clock.federation = reporter.federation = federation
    for silo in silos:
        federation.join(silo)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            federation.run()
        except BaseException as err:  # re-raised in the test's thread
            errors.append(err)

    loop = threading.Thread(target=run, daemon=True)
    loop.start()
    try:
        yield federation, clock, reporter
    finally:
        federation.stop()
        loop.join(timeout=30)
        federation.close()
        store.close()
    assert not loop.is_alive(), "the round loop did not stop"
    if errors:
        raise errors[0]


def phase_of(federation: Federation, kind: TaskKind, round: int = 1) -> Phase:
    """Wait (notified on every change) until the phase of `kind` and `round` is open."""

    def opened() -> bool:
        phase = federation.phase
        return phase is not None and phase.kind is kind and phase.round == round

    with federation.cond:
        assert federation.cond.wait_for(opened, timeout=30), f"no {kind.name} phase {round}"
        assert federation.phase is not None
        return federation.phase


def outcome(federation: Federation, phase: Phase, silo: str) -> Outcome:
    with federation.cond:
        assert federation.cond.wait_for(lambda: silo in phase.outcomes, timeout=30)
        return phase.outcomes[silo]


def upload(federation: Federation, phase: Phase, silo: str, model: Model, *, chunks: int = -1):
    """Open an upload of `model` for `silo` and send its first `chunks` chunks (-1: all)."""
    claim = Header(
        round=phase.round,
        kind=phase.kind,
        num_examples=10,
        layout=model.layout if phase.kind is TaskKind.TRAIN else None,
        compression=Compression.NONE,
    )
    opened = federation.open_upload(silo, claim, task_id=phase.tasks[silo], metrics={})
    if phase.kind is TaskKind.TRAIN:
        for index, (offset, chunk) in enumerate(model.chunks()):
            if index == chunks:
                break
            opened.add_chunk(offset, chunk)
    return opened


def finished(federation: Federation, reporter: Reporter, rounds: int = 1) -> None:
    with federation.cond:
        assert federation.cond.wait_for(lambda: federation.finished, timeout=30)
    assert len(reporter.completed) == rounds


def test_a_silo_without_a_result_by_the_deadline_times_out_and_the_round_goes_on(tmp_path):
    with engine(tmp_path, min_results=1) as (federation, clock, reporter):
        train = phase_of(federation, TaskKind.TRAIN)
        federation.complete_upload(upload(federation, train, "silo-a", _model(2.0)))
        assert outcome(federation, train, "silo-a") is Outcome.ACCEPTED
        clock.advance(61.0, alive=("silo-a", "silo-b"))  # past the deadline, both alive
        assert outcome(federation, train, "silo-b") is Outcome.TIMEOUT
        finished(federation, reporter)
    assert reporter.completed[0].accepted == 1
    np.testing.assert_array_equal(federation.model.arrays()["w"], 2.0)


def test_an_upload_in_flight_at_the_deadline_is_late_and_nothing_of_it_is_folded(tmp_path):
    with engine(tmp_path, min_results=1) as (federation, clock, reporter):
        train = phase_of(federation, TaskKind.TRAIN)
        federation.complete_upload(upload(federation, train, "silo-a", _model(2.0)))
        half = upload(federation, train, "silo-b", _model(1e30), chunks=2)
        clock.advance(61.0, alive=("silo-a", "silo-b"))
        assert outcome(federation, train, "silo-b") is Outcome.LATE
        with pytest.raises(ProtocolError, match="closed"):
            half.add_chunk(2048, _model(1e30).payload[2048:3072].data)
        finished(federation, reporter)
    np.testing.assert_array_equal(federation.model.arrays()["w"], 2.0)


def test_an_upload_completed_after_the_phase_closed_is_refused_and_not_folded(tmp_path):
    with engine(tmp_path, min_results=1) as (federation, clock, reporter):
        train = phase_of(federation, TaskKind.TRAIN)
        federation.complete_upload(upload(federation, train, "silo-a", _model(2.0)))
        whole = upload(federation, train, "silo-b", _model(7.0))  # every chunk, not finished
        clock.advance(61.0, alive=("silo-a", "silo-b"))
        assert outcome(federation, train, "silo-b") is Outcome.LATE
        with pytest.raises(ProtocolError):
            federation.complete_upload(whole)
        finished(federation, reporter)
    np.testing.assert_array_equal(federation.model.arrays()["w"], 2.0)


def test_a_silent_silo_is_dropped_before_the_deadline(tmp_path):
    with engine(tmp_path, min_results=1, deadline_s=600.0) as (federation, clock, reporter):
        train = phase_of(federation, TaskKind.TRAIN)
        clock.advance(federation.liveness_s + 1, alive=("silo-a",))
        assert outcome(federation, train, "silo-b") is Outcome.DROPPED
        federation.complete_upload(upload(federation, train, "silo-a", _model(3.0)))
        finished(federation, reporter)
    assert reporter.completed[0].dropped == 1
    assert "silo-b" not in federation.available()


def test_the_evaluation_deadline_ends_evaluation_with_the_silos_that_answered(tmp_path):
    with engine(tmp_path, federated_evaluation=True, evaluation_deadline_s=30.0) as (
        federation,
        clock,
        reporter,
    ):
        train = phase_of(federation, TaskKind.TRAIN)
        for silo, value in (("silo-a", 1.0), ("silo-b", 3.0)):
            federation.complete_upload(upload(federation, train, silo, _model(value)))
        evaluate = phase_of(federation, TaskKind.EVALUATE)
        answered = upload(federation, evaluate, "silo-a", _model(0.0))
        federation.complete_upload(answered)
        assert outcome(federation, evaluate, "silo-a") is Outcome.ACCEPTED
        clock.advance(31.0, alive=("silo-a", "silo-b"))
        assert outcome(federation, evaluate, "silo-b") is Outcome.TIMEOUT
        finished(federation, reporter)
    np.testing.assert_array_equal(federation.model.arrays()["w"], 2.0)


def test_a_round_is_reported_only_once_its_commit_is_durable(tmp_path):
    with engine(tmp_path, num_rounds=2) as (federation, clock, reporter):
        for round in (1, 2):
            train = phase_of(federation, TaskKind.TRAIN, round)
            if round == 2:
                # Round 1 is committed once round 2's phase has opened, and only then shown.
                with federation.cond:
                    assert federation.cond.wait_for(lambda: bool(reporter.completed), 30)
            else:
                assert reporter.completed == []
            for silo in ("silo-a", "silo-b"):
                federation.complete_upload(upload(federation, train, silo, _model(float(round))))
        finished(federation, reporter, rounds=2)
    assert [s.round for s in reporter.completed] == [1, 2]
    assert reporter.committed_when_reported == [1, 2]


def test_too_few_results_fail_the_attempt_and_the_model_stays(tmp_path):
    with (
        pytest.raises(RoundFailed, match="failed 1 times in a row"),
        engine(tmp_path, max_failed_attempts=1) as (federation, clock, reporter),
    ):
        train = phase_of(federation, TaskKind.TRAIN)
        federation.complete_upload(upload(federation, train, "silo-a", _model(5.0)))
        clock.advance(61.0, alive=("silo-a", "silo-b"))
        with federation.cond:
            assert federation.cond.wait_for(lambda: bool(reporter.failed), timeout=30)
    assert (
        reporter.failed[0][0] == 1 and "1 of 2 updates accepted, 2 needed" in reporter.failed[0][1]
    )
    np.testing.assert_array_equal(federation.model.arrays()["w"], 0.0)


def test_selection_samples_max_clients_of_the_live_silos_and_skips_benched_ones():
    now = [0.0]
    registry = SiloRegistry(liveness_s=10.0, clock=lambda: now[0])
    for silo in ("a", "b", "c", "d", "e"):
        registry.touch(silo)
    picks = [registry.select(needed=2, at_most=2) for _ in range(200)]
    assert all(p is not None and len(p) == 2 and p == sorted(p) for p in picks)
    assert {s for p in picks if p for s in p} == {"a", "b", "c", "d", "e"}
    registry.bench(["a", "b", "c"])
    assert registry.select(needed=2, at_most=0) == ["d", "e"]
    assert registry.select(needed=3, at_most=0) is None
    registry.round_done()
    now[0] = 11.0
    registry.touch("a")
    assert registry.select(needed=1, at_most=0) == ["a"]  # the others fell silent
