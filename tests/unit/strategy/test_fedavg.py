from __future__ import annotations

import threading

import numpy as np

from fedpriv.strategy import FedAvg
from fedpriv.wire import (
    DType,
    Model,
    TensorLayout,
    TensorSpec,
    bfloat16_to_float32,
    float32_to_bfloat16,
)


def fold_model(aggregator, model: Model, weight: float) -> None:
    for offset, chunk in model.chunks():
        aggregator.fold(offset, chunk, weight=weight)


def test_weighted_average_of_several_dtypes():
    rng = np.random.default_rng(0)
    updates = [
        {
            "w": rng.normal(size=(30, 7)).astype(np.float32),
            "h": rng.normal(size=5).astype(np.float16),
            "n": np.array(i * 10, np.int64),
            "d": rng.normal(size=3),
        }
        for i in range(4)
    ]
    weights = [1, 2, 3, 10]
    base = Model.from_arrays(updates[0], chunk_bytes=64)
    aggregator = FedAvg().begin_round(1, model=base)
    for update, weight in zip(updates, weights, strict=True):
        fold_model(aggregator, Model.from_arrays(update, chunk_bytes=64), weight)
    out = aggregator.finalize(total_weight=sum(weights)).arrays()
    for name in ("w", "h", "d"):
        expected = sum(
            w * u[name].astype(np.float64) for u, w in zip(updates, weights, strict=True)
        ) / sum(weights)
        np.testing.assert_allclose(
            out[name], expected, rtol=2e-3 if name == "h" else 1e-6, atol=1e-6
        )
        assert out[name].dtype == updates[0][name].dtype
    assert int(out["n"]) == round((0 * 1 + 10 * 2 + 20 * 3 + 30 * 10) / 16)


def test_bfloat16_average_is_rounded_back_to_bfloat16():
    layout = TensorLayout.from_specs(
        [TensorSpec(name="b", dtype=DType.BFLOAT16, shape=(3,))], chunk_bytes=8
    )
    values = [np.array([1.0, 2.0, -4.0], np.float32), np.array([3.0, 2.0, 4.0], np.float32)]
    aggregator = FedAvg().begin_round(
        1, model=Model.from_arrays({"b": float32_to_bfloat16(values[0])}, layout=layout)
    )
    for v in values:
        fold_model(aggregator, Model.from_arrays({"b": float32_to_bfloat16(v)}, layout=layout), 1.0)
    out = aggregator.finalize(total_weight=2.0)
    np.testing.assert_array_equal(out.arrays()["b"], [2.0, 2.0, 0.0])
    np.testing.assert_array_equal(
        bfloat16_to_float32(np.frombuffer(out.payload, "<u2", 3)), [2.0, 2.0, 0.0]
    )


def test_negative_weight_removes_a_contribution():
    base = Model.from_arrays({"w": np.zeros(1000, np.float32)}, chunk_bytes=256)
    aggregator = FedAvg().begin_round(1, model=base)
    keep = Model.from_arrays({"w": np.full(1000, 2.0, np.float32)}, chunk_bytes=256)
    drop = Model.from_arrays({"w": np.full(1000, 9.0, np.float32)}, chunk_bytes=256)
    fold_model(aggregator, keep, 3.0)
    fold_model(aggregator, drop, 5.0)
    fold_model(aggregator, drop, -5.0)
    np.testing.assert_array_equal(
        aggregator.finalize(total_weight=3.0).arrays()["w"], np.full(1000, 2.0)
    )


def test_concurrent_folds_from_many_threads_are_exact():
    base = Model.from_arrays({"w": np.zeros(50_000, np.float32)}, chunk_bytes=4096)
    aggregator = FedAvg().begin_round(1, model=base)
    update = Model.from_arrays({"w": np.ones(50_000, np.float32)}, chunk_bytes=4096)
    threads = [
        threading.Thread(target=fold_model, args=(aggregator, update, 1.0)) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_array_equal(
        aggregator.finalize(total_weight=8.0).arrays()["w"], np.ones(50_000)
    )


def test_an_old_model_nobody_holds_becomes_a_later_rounds_sum_and_a_held_one_never_does():
    import numpy as np

    from fedpriv.strategy import FedAvg
    from fedpriv.wire import Model

    strategy = FedAvg()
    model = Model.from_arrays({"w": np.zeros(1000, np.float32)}, chunk_bytes=512)

    def round_with(value: float, base: Model) -> Model:
        aggregator = strategy.begin_round(1, model=base)
        update = Model.from_arrays({"w": np.full(1000, value, np.float32)}, chunk_bytes=512)
        for offset, chunk in update.chunks():
            aggregator.fold(offset, chunk, weight=2.0)
        return aggregator.finalize(total_weight=2.0)

    first = round_with(1.0, model)
    kept = first.arrays()["w"]  # someone still holds the first model's tensors
    second = round_with(2.0, first)
    address = second.payload.ctypes.data
    del first
    third = round_with(3.0, second)
    del second
    fourth = round_with(4.0, third)
    # The second model's buffer (held by nobody) was summed into again, from zero...
    assert fourth.payload.ctypes.data == address
    np.testing.assert_array_equal(fourth.arrays()["w"], np.full(1000, 4.0))
    # ...while the first model's, still held, was never touched.
    np.testing.assert_array_equal(kept, np.full(1000, 1.0))
    np.testing.assert_array_equal(third.arrays()["w"], np.full(1000, 3.0))
