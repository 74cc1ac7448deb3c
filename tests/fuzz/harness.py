"""A live federation to fuzz: a real coordinator over mTLS, two honest silos, raw fuzzing silos.

The coordinator runs in this process (its Federation is read to order the folds),
the honest silos are ``run_client`` threads, and each fuzzing silo holds a raw
mTLS channel whose calls take and return ``bytes``: whatever a mutation produces,
even bytes no protobuf parser accepts, reaches the server as it is.

A fuzzing silo takes part in every round like any silo: it pulls its task and
answers with a stream built by the SDK's own encoders (``result_messages``),
then mutated. While its task is open, every input it sends may reach deep into
validation; once an input has settled the task (accepted, rejected, declined,
dropped), later inputs meet the "already answered" checks until the next phase
gives it a fresh task.

The model check is exact. The honest silos' arithmetic is chosen so that FedAvg
is exact in float32 (weights 10 and 30, deltas 1 and 3 on multiples of 1/4), and
the coordinator's folds are replayed in numpy in the same order and dtype: the
two honest uploads first (their order does not matter: a + b == b + a), then any
fuzzing upload the coordinator accepted, in the order it was accepted. Every
model the coordinator serves must equal that replay bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import numpy as np

from fedpriv.client import ClientStats, EvaluateResult, FitResult
from fedpriv.client.messages import result_messages
from fedpriv.coordinator import Coordinator, Store, read_checkpoint
from fedpriv.transport import open_channel
from fedpriv.transport.options import CHANNEL_OPTIONS
from fedpriv.v1 import admin_pb2, fleet_pb2
from fedpriv.wire import Model, PayloadAssembler, TensorLayout, layout_from_proto, scalars_to_proto
from fedpriv.wire.frames import serialize
from tests.helpers import CollectingReporter, make_config, silo_thread

FLEET = "/fedpriv.v1.Fleet/"
ADMIN_STATUS = "/fedpriv.v1.Admin/Status"
HONEST = {"silo-a": (1.0, 10), "silo-b": (3.0, 30)}  # (delta, num_examples)
FUZZERS = ("silo-c", "silo-d", "silo-e")
OPERATOR = "operator"
OUTSIDER = "intruder"  # a certificate of the federation CA, not on the allow list
CHUNK_BYTES = 256
FUZZER_NUM_EXAMPLES = 40
CALL_TIMEOUT_S = 15.0  # far above any answer's time: reaching it is a hang

S = grpc.StatusCode
# What each RPC may answer to any input. INTERNAL and UNKNOWN are never allowed,
# and neither is DEADLINE_EXCEEDED: every input here is finite, so running out of
# time means the server hung on it. RESOURCE_EXHAUSTED is a legitimate refusal
# (message size, per-identity limits) everywhere.
ALLOWED: dict[str, frozenset[grpc.StatusCode]] = {
    "Join": frozenset({S.OK, S.INVALID_ARGUMENT, S.RESOURCE_EXHAUSTED}),
    "PullTask": frozenset({S.OK, S.INVALID_ARGUMENT, S.RESOURCE_EXHAUSTED}),
    "PushResult": frozenset(
        {S.OK, S.INVALID_ARGUMENT, S.FAILED_PRECONDITION, S.RESOURCE_EXHAUSTED}
    ),
    "Heartbeat": frozenset({S.OK, S.INVALID_ARGUMENT, S.RESOURCE_EXHAUSTED}),
    "Leave": frozenset({S.OK, S.INVALID_ARGUMENT, S.RESOURCE_EXHAUSTED}),
    "SecAgg": frozenset({S.INVALID_ARGUMENT, S.FAILED_PRECONDITION, S.RESOURCE_EXHAUSTED}),
    "Status": frozenset({S.OK, S.INVALID_ARGUMENT, S.PERMISSION_DENIED, S.RESOURCE_EXHAUSTED}),
}
REQUEST_TYPES: dict[str, Any] = {
    "Join": fleet_pb2.JoinRequest,
    "PullTask": fleet_pb2.PullTaskRequest,
    "PushResult": fleet_pb2.ResultMessage,
    "Heartbeat": fleet_pb2.HeartbeatRequest,
    "Leave": fleet_pb2.LeaveRequest,
    "SecAgg": fleet_pb2.SecAggRequest,
    "Status": admin_pb2.StatusRequest,
}


def initial_arrays() -> dict[str, np.ndarray]:
    """Multiples of 1/4 in [-64, 64]: every honest FedAvg of them is exact in float32."""
    rng = np.random.default_rng(15)
    return {
        "w": (rng.integers(-256, 256, size=(12, 16)) / 4).astype(np.float32),
        "b": (rng.integers(-256, 256, size=12) / 4).astype(np.float32),
    }


class HonestClient:
    """Adds a fixed delta in float32, as a silo's training would change its weights."""

    def __init__(self, delta: float, num_examples: int) -> None:
        self.delta = delta
        self.num_examples = num_examples

    def fit(self, parameters: Mapping[str, Any], *, config: Mapping[str, Any]) -> FitResult:
        return FitResult(
            parameters={
                k: (v + np.float32(self.delta)).astype(np.float32) for k, v in parameters.items()
            },
            num_examples=self.num_examples,
            metrics={"train_loss": float(self.delta)},
        )

    def evaluate(
        self, parameters: Mapping[str, Any], *, config: Mapping[str, Any]
    ) -> EvaluateResult:
        return EvaluateResult(num_examples=self.num_examples, metrics={"loss": 0.5})


def is_decodable(rpc: str, message: bytes) -> bool:
    """Whether the generated parser accepts `message` as the RPC's request type."""
    request_type = REQUEST_TYPES.get(rpc)
    if request_type is None:
        return True
    try:
        request_type.FromString(message)
    except Exception:  # DecodeError, or a RuntimeWarning-free refusal of another kind
        return False
    return True


@dataclasses.dataclass
class Finding:
    """An answer outside the allowed set (or a hang), with the input that caused it."""

    rpc: str
    silo: str
    code: str
    details: str
    messages: list[bytes]
    note: str = ""

    def __str__(self) -> str:
        shown = [m[:80].hex() + ("..." if len(m) > 80 else "") for m in self.messages[:6]]
        more = f" (+{len(self.messages) - 6} more)" if len(self.messages) > 6 else ""
        return (
            f"{self.rpc} from {self.silo}: {self.code} {self.details!r} {self.note}\n"
            f"    input ({len(self.messages)} messages): {shown}{more}"
        )


@dataclasses.dataclass
class Slot:
    """A fuzzing silo's current task and the valid answer to it."""

    silo: str
    task: fleet_pb2.Task
    layout: TensorLayout | None
    model: dict[str, np.ndarray] | None
    valid: list[bytes]
    open: bool = True


@dataclasses.dataclass
class _Fold:
    num_examples: int
    arrays: dict[str, np.ndarray]


class FuzzFleet:
    """The federation under fuzzing; see the module docstring."""

    def __init__(self, tmp: pathlib.Path, pki: Any, *, num_rounds: int = 10_000) -> None:
        self.pki = pki
        self.initial = initial_arrays()
        self.config = make_config(
            tmp,
            pki.root,
            self.initial,
            allowed=(*HONEST, *FUZZERS),
            chunk_bytes=CHUNK_BYTES,
            num_rounds=num_rounds,
            min_clients=len(HONEST) + len(FUZZERS),
            min_results=len(HONEST),
            deadline_s=120.0,
            federated_evaluation=True,
        )
        self.config = dataclasses.replace(self.config, operators=frozenset({OPERATOR}))
        self.reporter = CollectingReporter()
        self.inputs = Counter[str]()
        self.tests: set[str] = set()  # the tests that ran against this fleet (conftest)
        self.codes = Counter[tuple[str, str]]()
        self.findings: list[Finding] = []
        self.accepted_fuzz = 0
        self.rounds_checked = 0
        self.slots: dict[str, Slot | None] = dict.fromkeys(FUZZERS)
        self.past_valid: list[tuple[str, list[bytes]]] = []  # (silo, stream) of earlier tasks
        self._folds: dict[int, list[_Fold]] = {}
        self._served: dict[int, dict[str, np.ndarray]] = {}
        self._expected: dict[int, dict[str, np.ndarray]] = {0: self.initial}
        self._stack = contextlib.ExitStack()
        self._channels: dict[str, grpc.Channel] = {}
        self.coordinator: Coordinator | None = None
        self._beat = time.monotonic()

    # ---- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> FuzzFleet:
        try:
            return self._start()
        except BaseException:
            self._stack.close()  # a half-started fleet must not keep the process alive
            raise

    def _start(self) -> FuzzFleet:
        coordinator = self._stack.enter_context(Coordinator(self.config, reporter=self.reporter))
        self.coordinator = coordinator
        for silo, (delta, num_examples) in HONEST.items():
            self._stack.enter_context(
                silo_thread(
                    HonestClient(delta, num_examples),
                    port=coordinator.port,
                    tls=self.pki.tls(silo),
                )
            )
        target = f"127.0.0.1:{coordinator.port}"
        # The fuzzing silos' channels may send messages over the server's size limit:
        # the server, not this client, must refuse them. One channel per identity, as
        # a silo has.
        options = [o for o in CHANNEL_OPTIONS if o[0] != "grpc.max_send_message_length"]
        options.append(("grpc.max_send_message_length", 64 << 20))
        for silo in FUZZERS:
            channel = grpc.secure_channel(
                target, self.pki.tls(silo).channel_credentials(), options=options
            )
            self._channels[silo] = self._stack.enter_context(channel)
        for silo in (OPERATOR, OUTSIDER):
            self._channels[silo] = self._stack.enter_context(
                open_channel(target, tls=self.pki.tls(silo))
            )
        self._channels["foreign"] = self._stack.enter_context(
            open_channel(target, tls=self.pki.tls("silo-a", foreign=True))
        )
        for silo in FUZZERS:
            self.call(
                silo,
                "Join",
                [fleet_pb2.JoinRequest(sdk_version="fuzz").SerializeToString()],
                count=False,
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    # ---- raw calls ------------------------------------------------------------------------

    def call(
        self,
        silo: str,
        rpc: str,
        messages: Sequence[bytes],
        *,
        timeout_s: float = CALL_TIMEOUT_S,
        count: bool = True,
    ) -> tuple[grpc.StatusCode, bytes | list[bytes] | None, str]:
        """Send `messages` as `rpc`'s request(s) from `silo`; return (code, reply, details).

        A code outside the RPC's allowed set is recorded as a finding.
        """
        channel = self._channels[silo]
        path = ADMIN_STATUS if rpc == "Status" else FLEET + rpc
        reply: bytes | list[bytes] | None = None
        code, details = S.OK, ""
        try:
            if rpc == "PushResult":
                reply = channel.stream_unary(path)(iter(list(messages)), timeout=timeout_s)
            elif rpc == "PullTask":
                reply = list(channel.unary_stream(path)(messages[0], timeout=timeout_s))
            else:
                reply = channel.unary_unary(path)(messages[0], timeout=timeout_s)
        except grpc.RpcError as err:
            code, details = err.code(), err.details() or ""
        if count:
            self.inputs[rpc] += 1
            self.codes[(rpc, code.name)] += 1
            self._judge(silo, rpc, list(messages), code, details)
        return code, reply, details

    def _judge(
        self, silo: str, rpc: str, messages: list[bytes], code: grpc.StatusCode, details: str
    ) -> None:
        allowed = ALLOWED[rpc]
        if silo in (OUTSIDER, OPERATOR) and rpc != "Status":
            allowed = frozenset({S.PERMISSION_DENIED})  # not on the allow list
        if silo == "foreign":
            allowed = frozenset({S.UNAVAILABLE})  # the TLS handshake fails
        if code in allowed:
            return
        note = "(hang: no answer within the call timeout)" if code is S.DEADLINE_EXCEEDED else ""
        self.findings.append(Finding(rpc, silo, code.name, details, messages, note))

    # ---- slots: a fuzzing silo's open task ------------------------------------------------

    def open_slots(self) -> list[Slot]:
        """The fuzzing silos' open tasks; when none is left, the next phase's tasks.

        A phase may leave some fuzzing silos out (evaluation goes only to silos whose
        update was accepted); those keep polling, so they stay live for the next round.
        """
        if time.monotonic() - self._beat > 2.0:
            # Silos left out of a phase still count as live for the next round.
            for silo in FUZZERS:
                self.call(silo, "Heartbeat", [b""], count=False)
            self._beat = time.monotonic()
        slots = [s for s in self.slots.values() if s is not None and s.open]
        turn = 0
        while not slots:
            # Without waiting first: a task the phase holds for a silo comes at once.
            for silo in FUZZERS:
                self._pull(silo, wait_s=0)
            slots = [s for s in self.slots.values() if s is not None and s.open]
            if not slots:
                # The next phase opens once every silo settled the last one; the
                # coordinator holds this poll until then (or poll_wait_s).
                self._pull(FUZZERS[turn % len(FUZZERS)], wait_s=1)
                turn += 1
                slots = [s for s in self.slots.values() if s is not None and s.open]
        return slots

    def _pull(self, silo: str, *, wait_s: int) -> None:
        """Poll once for `silo`; a new TRAIN or EVALUATE task becomes its slot."""
        slot = self.slots[silo]
        if slot is not None and slot.open:
            return
        code, reply, details = self.call(
            silo,
            "PullTask",
            [fleet_pb2.PullTaskRequest(wait_s=wait_s).SerializeToString()],
            count=False,
        )
        if code is not S.OK:
            raise AssertionError(f"{silo}: a valid PullTask got {code.name}: {details}")
        assert isinstance(reply, list)
        task = fleet_pb2.TaskMessage.FromString(reply[0]).task
        if task.kind == fleet_pb2.TASK_KIND_FINISHED:
            raise AssertionError("the federation finished: raise num_rounds")
        if task.kind in (fleet_pb2.TASK_KIND_TRAIN, fleet_pb2.TASK_KIND_EVALUATE) and (
            slot is None or task.task_id != slot.task.task_id
        ):
            self._replace(silo, self._make_slot(silo, task, reply[1:]))

    def _replace(self, silo: str, new: Slot) -> None:
        old = self.slots[silo]
        if old is not None:
            self.past_valid.append((silo, old.valid))
            del self.past_valid[:-12]
        self.slots[silo] = new

    def _make_slot(self, silo: str, task: fleet_pb2.Task, chunks: list[bytes]) -> Slot:
        layout, problems = layout_from_proto(task.model)
        assert layout is not None, problems
        assembler = PayloadAssembler(layout)
        for raw in chunks:
            chunk = fleet_pb2.TaskMessage.FromString(raw).chunk
            assembler.add(chunk.offset, chunk.data)
        model = Model(layout=layout, payload=assembler.finish()).arrays()
        model = {name: np.array(values) for name, values in model.items()}
        if task.kind == fleet_pb2.TASK_KIND_TRAIN:
            self._check_served(task.round, model)
            # The honest mean: accepted, it leaves the FedAvg where it was.
            update = {k: (v + np.float32(2.5)).astype(np.float32) for k, v in model.items()}
            header = fleet_pb2.ResultHeader(
                task_id=task.task_id,
                round=task.round,
                kind=task.kind,
                num_examples=FUZZER_NUM_EXAMPLES,
                metrics=scalars_to_proto({"train_loss": 0.25}),
                update=layout.to_proto(),
            )
            messages = result_messages(header, layout, update, ClientStats())
        else:
            header = fleet_pb2.ResultHeader(
                task_id=task.task_id,
                round=task.round,
                kind=task.kind,
                num_examples=FUZZER_NUM_EXAMPLES,
                metrics=scalars_to_proto({"loss": 0.5, "accuracy": 0.75}),
            )
            messages = result_messages(header, None, None, ClientStats())
        valid = [serialize(m) for m in messages]
        return Slot(silo=silo, task=task, layout=layout, model=model, valid=valid)

    def wait_honest_accepted(self, slot: Slot) -> None:
        """Block until both honest silos are folded into the slot's phase (fixes the fold order)."""
        if slot.task.kind != fleet_pb2.TASK_KIND_TRAIN:
            return
        assert self.coordinator is not None
        federation = self.coordinator.federation

        def honest_done() -> bool:
            phase = federation.phase  # read under the federation's lock, as its tests do
            if phase is None or phase.tasks.get(slot.silo) != slot.task.task_id:
                return True  # the phase is over: nothing of this slot can be folded
            return all(phase.outcomes.get(silo) == "accepted" for silo in HONEST)

        with federation.cond:
            assert federation.cond.wait_for(honest_done, timeout=60), "honest silos not accepted"

    def push(self, slot: Slot, messages: Sequence[bytes]) -> grpc.StatusCode:
        """Send a (mutated) answer to `slot`'s task and settle the slot."""
        self.wait_honest_accepted(slot)
        code, reply, _ = self.call(slot.silo, "PushResult", messages)
        if code is S.OK and slot.task.kind == fleet_pb2.TASK_KIND_TRAIN:
            assert isinstance(reply, bytes)
            if fleet_pb2.PushReply.FromString(reply).accepted:
                self.note_accepted(slot, messages)
        self.settle(slot)
        return code

    def settle(self, slot: Slot) -> None:
        """Find out whether `slot`'s task is still open (a valid PullTask answers it)."""
        if not slot.open:
            return
        code, reply, details = self.call(
            slot.silo,
            "PullTask",
            [fleet_pb2.PullTaskRequest(wait_s=0).SerializeToString()],
            count=False,
        )
        if code is not S.OK:
            raise AssertionError(f"{slot.silo}: a valid PullTask got {code.name}: {details}")
        assert isinstance(reply, list)
        task = fleet_pb2.TaskMessage.FromString(reply[0]).task
        slot.open = task.task_id == slot.task.task_id
        if not slot.open and task.kind in (fleet_pb2.TASK_KIND_TRAIN, fleet_pb2.TASK_KIND_EVALUATE):
            # The next phase began already: that task is this silo's new slot.
            self._replace(slot.silo, self._make_slot(slot.silo, task, reply[1:]))
        elif not slot.open:
            # Rejoin in case the input was a Leave: the next round waits for every fuzzer.
            self.call(slot.silo, "Join", [b""], count=False)

    def finish_slot(self, slot: Slot) -> None:
        """Settle `slot`'s task with a decline if no input did, so the round moves on."""
        self.settle(slot)
        if slot.open:
            header = fleet_pb2.ResultHeader(
                task_id=slot.task.task_id,
                round=slot.task.round,
                kind=slot.task.kind,
                declined_reason="fuzzing: this silo declines",
            )
            code, _, details = self.call(
                slot.silo,
                "PushResult",
                [fleet_pb2.ResultMessage(header=header).SerializeToString()],
                count=False,
            )
            assert code is S.OK, (code, details)
            self.settle(slot)

    # ---- the exact model check --------------------------------------------------------------

    def note_accepted(self, slot: Slot, messages: Sequence[bytes]) -> None:
        """Record an accepted fuzzing upload as the coordinator must have read it."""
        assert slot.layout is not None
        parsed = [fleet_pb2.ResultMessage.FromString(m) for m in messages]
        header = parsed[0].header
        payload = b"".join(p.chunk.data for p in parsed[1:])
        padded = np.zeros(slot.layout.payload_bytes, np.uint8)
        usable = min(len(payload), slot.layout.payload_bytes)
        padded[:usable] = np.frombuffer(payload[:usable], np.uint8)
        arrays = {
            k: np.array(v) for k, v in Model(layout=slot.layout, payload=padded).arrays().items()
        }
        self._folds.setdefault(slot.task.round, []).append(_Fold(header.num_examples, arrays))
        self.accepted_fuzz += 1

    def _replay(self, round: int, base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The coordinator's FedAvg of `round`, replayed in its order and dtype."""
        updates = [
            (num_examples, {k: (v + np.float32(delta)).astype(np.float32) for k, v in base.items()})
            for delta, num_examples in HONEST.values()
        ]
        updates += [(f.num_examples, f.arrays) for f in self._folds.get(round, [])]
        total_weight = float(sum(n for n, _ in updates))
        out = {}
        for name, values in base.items():
            total = np.zeros(values.size, np.float32)
            with np.errstate(over="ignore", invalid="ignore"):
                for num_examples, arrays in updates:
                    weight = float(num_examples)
                    contribution = arrays[name].ravel().astype(np.float32)
                    if weight != 1.0:
                        contribution = np.multiply(contribution, np.float32(weight))
                    total += contribution
                total /= np.float32(total_weight)
            out[name] = total.reshape(values.shape)
        return out

    def _check_served(self, round: int, served: dict[str, np.ndarray]) -> None:
        """A TRAIN task of `round` serves round - 1's committed model: the replay, exactly."""
        if round in self._served:
            previous = self._served[round]  # the round is retried: same model
            expected = previous
        else:
            base = self._served.get(round - 1)
            expected = self.initial if base is None and round == 1 else None
            if expected is None:
                if base is None:
                    raise AssertionError(f"round {round} served without round {round - 1} seen")
                expected = self._replay(round - 1, base)
                if not all(np.isfinite(v).all() for v in expected.values()):
                    raise AssertionError(f"round {round - 1}'s replay is not finite: it must fail")
        for name, values in expected.items():
            if not np.array_equal(served[name], values):
                diff = np.max(np.abs(served[name].astype(np.float64) - values))
                raise AssertionError(
                    f"round {round} serves a model that is not the FedAvg of the accepted "
                    f"uploads: {name} differs by up to {diff:g}"
                )
        self._served[round] = served
        self._expected[round - 1] = expected
        self.rounds_checked += 1

    def check_committed(self) -> int:
        """The last committed checkpoint equals the replay of its round; returns the round."""
        assert self.coordinator is not None
        store = Store(self.config.state_dir)
        try:
            committed = store.last_committed()
        finally:
            store.close()
        assert committed is not None
        final = read_checkpoint(committed.checkpoint, sha256=committed.sha256).arrays()
        base = self._served.get(committed.round)
        if base is None and committed.round == 0:
            expected = self.initial
        else:
            assert base is not None, f"round {committed.round} committed, never served"
            expected = self._replay(committed.round, base)
        for name, values in expected.items():
            assert np.array_equal(final[name], values), f"committed round {committed.round}: {name}"
        return committed.round

    # ---- helpers for the tests ----------------------------------------------------------

    def other_task_ids(self, silo: str) -> list[str]:
        """Task ids held by the other fuzzing silos (open or not)."""
        return [s.task.task_id for name, s in self.slots.items() if s is not None and name != silo]

    def report(self) -> str:
        lines = [f"inputs: {sum(self.inputs.values())} {dict(self.inputs)}"]
        lines.append(
            "codes: " + ", ".join(f"{r}:{c}={n}" for (r, c), n in sorted(self.codes.items()))
        )
        lines.append(
            f"rounds checked exactly: {self.rounds_checked}; fuzzing uploads accepted: {self.accepted_fuzz}"
        )
        lines += [str(f) for f in self.findings[:20]]
        return "\n".join(lines)


__all__ = [
    "ALLOWED",
    "FUZZERS",
    "HONEST",
    "OPERATOR",
    "OUTSIDER",
    "Finding",
    "FuzzFleet",
    "Slot",
    "is_decodable",
]
