"""Upload admission is pure: the same header and expectations give the same problems."""

from __future__ import annotations

import numpy as np

from fedpriv.coordinator.admission import Expected, Header, Problem, header_problems
from fedpriv.coordinator.phases import Reason, TaskKind
from fedpriv.wire import Compression, Model

MODEL = Model.from_arrays({"a": np.zeros(4, np.float32), "b": np.zeros(2, np.float32)})
EXPECTED = Expected(
    round=3,
    kind=TaskKind.TRAIN,
    task_id="t",
    layout=MODEL.layout,
    compression=Compression.NONE,
    max_num_examples=100,
)


def header(**changes: object) -> Header:
    fields: dict[str, object] = {
        "round": 3,
        "kind": TaskKind.TRAIN,
        "num_examples": 10,
        "layout": MODEL.layout,
        "compression": Compression.NONE,
        **changes,
    }
    return Header(**fields)  # type: ignore[arg-type]


def test_a_matching_header_has_no_problems():
    assert header_problems(header(), EXPECTED) == []


def test_every_problem_is_listed_with_its_reason_in_a_stable_order():
    other = Model.from_arrays({"a": np.zeros(5, np.float32), "c": np.zeros(2, np.float64)})
    problems = header_problems(
        header(
            round=2,
            kind=TaskKind.EVALUATE,
            num_examples=0,
            layout=other.layout,
            compression=Compression.INT8,
            metric_problems=("loss: not finite",),
        ),
        EXPECTED,
        policy=[Problem(Reason.PRIVACY, "epsilon went down")],
    )
    assert [p.reason for p in problems] == [
        Reason.METRICS,
        Reason.ROUND,
        Reason.KIND,
        Reason.NUM_EXAMPLES,
        Reason.COMPRESSION,
        Reason.PRIVACY,
        Reason.LAYOUT,
        Reason.LAYOUT,
        Reason.LAYOUT,
    ]
    texts = [p.text for p in problems]
    assert "round 2 != 3, the round of task 't'" in texts
    assert "num_examples 0 must be in [1, 100] (rounds.max_num_examples)" in texts
    assert texts[-3:] == ["a: shape (5,) != expected (4,)", "b: missing", "c: not in the model"]


def test_too_many_examples_and_tensors_on_an_evaluation_are_refused():
    evaluation = Expected(
        round=3,
        kind=TaskKind.EVALUATE,
        task_id="t",
        layout=None,
        compression=Compression.NONE,
        max_num_examples=100,
    )
    problems = header_problems(header(kind=TaskKind.EVALUATE, num_examples=101), evaluation)
    assert [p.reason for p in problems] == [Reason.NUM_EXAMPLES, Reason.LAYOUT]
    assert problems[1].text == "an evaluation result must not carry tensors"
    assert header_problems(header(kind=TaskKind.EVALUATE, layout=None), evaluation) == []


def test_an_unreadable_compression_declaration_is_a_compression_problem():
    problems = header_problems(
        header(compression_problems=("update_compression: unknown compression 9",)), EXPECTED
    )
    assert problems == [Problem(Reason.COMPRESSION, "update_compression: unknown compression 9")]
