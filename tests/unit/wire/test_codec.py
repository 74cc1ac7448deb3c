from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedpriv.v1 import tensor_pb2
from fedpriv.wire import (
    MAX_CHUNK_BYTES,
    DType,
    Model,
    PayloadAssembler,
    TensorLayout,
    TensorSpec,
    arrays_from_payload,
    bfloat16_to_float32,
    encode_chunks,
    float32_to_bfloat16,
    layout_from_proto,
    specs_from_arrays,
)


def roundtrip(arrays, chunk_bytes=64, layout=None):
    layout = layout or TensorLayout.from_specs(specs_from_arrays(arrays), chunk_bytes=chunk_bytes)
    wire_layout, problems = layout_from_proto(
        tensor_pb2.TensorHeader.FromString(layout.to_proto().SerializeToString())
    )
    assert problems == []
    assembler = PayloadAssembler(wire_layout)
    for offset, data in encode_chunks(layout, arrays):
        assert len(data) <= chunk_bytes
        assembler.add(offset, data)
    return arrays_from_payload(wire_layout, assembler.finish())


@pytest.mark.parametrize(
    "array",
    [
        np.arange(37, dtype=np.float32).reshape(37, 1) / 7,
        np.array([1.5, -2.25, np.finfo(np.float16).max], dtype=np.float16),
        np.arange(-5, 12, dtype=np.int64).reshape(1, 17),
        np.array(3.25, dtype=np.float32),  # 0-d
        np.zeros((0, 5), dtype=np.float32),  # empty
        np.array([True, False, True]),
        np.arange(9, dtype=np.int8),
        np.linspace(-1, 1, 11),
    ],
    ids=["float32", "float16", "int64", "0-d", "empty", "bool", "int8", "float64"],
)
def test_tensor_roundtrips_exactly(array):
    out = roundtrip({"before": np.ones(3, np.float16), "t": array, "after": np.ones(1, np.int8)})
    assert out["t"].dtype == array.dtype and out["t"].shape == array.shape
    np.testing.assert_array_equal(out["t"], array)


def test_bfloat16_roundtrips_and_rounds_half_to_even():
    values = np.array([1.0, -2.5, 3.140625, 1e30, 0.0, np.inf, -np.inf], dtype=np.float32)
    bits = float32_to_bfloat16(values)
    layout = TensorLayout.from_specs(
        [TensorSpec(name="h", dtype=DType.BFLOAT16, shape=(7,))], chunk_bytes=8
    )
    out = roundtrip({"h": bits}, chunk_bytes=8, layout=layout)["h"]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, bfloat16_to_float32(bits))
    np.testing.assert_array_equal(out[[0, 1, 2, 4, 5, 6]], values[[0, 1, 2, 4, 5, 6]])
    # 1 + 2**-8 lies half way between two bfloat16 values: ties go to the even one (1.0)
    assert bfloat16_to_float32(float32_to_bfloat16(np.array([1 + 2**-8], np.float32)))[0] == 1.0
    assert np.isnan(bfloat16_to_float32(float32_to_bfloat16(np.array([np.nan], np.float32))))[0]


def test_bfloat16_from_torch_roundtrips_bit_exactly():
    import torch

    from fedpriv.wire.torch_interop import arrays_from_state_dict, layout_for_state_dict

    state = {"w": torch.randn(5, 3).to(torch.bfloat16), "n": torch.tensor(7)}
    layout = layout_for_state_dict(state, chunk_bytes=8)
    assert [s.dtype for s in layout.specs] == [DType.BFLOAT16, DType.INT64]
    out = roundtrip(arrays_from_state_dict(state), chunk_bytes=8, layout=layout)
    back = torch.from_numpy(out["w"]).to(torch.bfloat16)
    assert torch.equal(back, state["w"]) and int(out["n"]) == 7


def test_no_element_straddles_a_chunk_and_tensors_are_8_byte_aligned():
    layout = TensorLayout.from_specs(
        [
            TensorSpec(name="a", dtype=DType.INT8, shape=(3,)),
            TensorSpec(name="b", dtype=DType.FLOAT64, shape=(5,)),
            TensorSpec(name="c", dtype=DType.FLOAT16, shape=(9,)),
        ],
        chunk_bytes=16,
    )
    assert layout.offsets == (0, 8, 48)
    covered = {name: 0 for name in "abc"}
    for index in range(layout.num_chunks):
        offset, length = layout.chunk_range(index)
        for segment in layout.segments(offset, length):
            size = layout.specs[segment.index].dtype.itemsize
            assert offset <= segment.payload_offset
            assert segment.payload_offset + segment.count * size <= offset + length
            covered[layout.specs[segment.index].name] += segment.count
    assert covered == {"a": 3, "b": 5, "c": 9}


def test_decoded_arrays_are_views_on_the_payload_not_copies():
    model = Model.from_arrays({"w": np.arange(1000, dtype=np.float32)})
    w = model.arrays()["w"]
    assert np.shares_memory(w, model.payload)


def test_chunks_never_exceed_4_mib():
    with pytest.raises(ValueError, match="no larger than"):
        TensorLayout.from_specs([], chunk_bytes=MAX_CHUNK_BYTES + 8)
    model = Model.from_arrays({"w": np.zeros(3_000_000, np.float32)}, chunk_bytes=MAX_CHUNK_BYTES)
    assert max(len(view) for _, view in model.chunks()) == MAX_CHUNK_BYTES


@pytest.mark.parametrize(
    ("mutate", "problem"),
    [
        (lambda h: h.tensors[0].__setattr__("dtype", 99), "unknown dtype 99"),
        (lambda h: h.__setattr__("payload_bytes", 12345), "payload_bytes 12345"),
        (lambda h: h.__setattr__("chunk_bytes", 12), "multiple of 8"),
        (lambda h: h.__setattr__("chunk_bytes", 0), "multiple of 8"),
        (lambda h: h.tensors[1].__setattr__("name", "w"), "unique"),
        (lambda h: h.tensors[0].__setattr__("name", ""), "name must be"),
    ],
)
def test_malformed_headers_are_reported(mutate, problem):
    header = TensorLayout.from_specs(
        [
            TensorSpec(name="w", dtype=DType.FLOAT32, shape=(4,)),
            TensorSpec(name="b", dtype=DType.FLOAT32, shape=(2,)),
        ],
        chunk_bytes=8,
    ).to_proto()
    mutate(header)
    layout, problems = layout_from_proto(header)
    assert layout is None
    assert any(problem in p for p in problems), problems


def test_out_of_order_or_short_chunks_are_refused():
    layout = TensorLayout.from_specs(
        [TensorSpec(name="w", dtype=DType.FLOAT32, shape=(4,))], chunk_bytes=8
    )
    assembler = PayloadAssembler(layout)
    with pytest.raises(ValueError, match="does not follow"):
        assembler.add(8, b"\0" * 8)
    assembler.add(0, b"\0" * 8)
    with pytest.raises(ValueError, match="does not follow"):
        assembler.add(8, b"\0" * 4)
    with pytest.raises(ValueError, match="stream ended after 8 of 16"):
        assembler.finish()


def test_unsupported_dtype_is_named():
    with pytest.raises(TypeError, match="complex128"):
        specs_from_arrays({"z": np.zeros(2, np.complex128)})


dtypes = st.sampled_from(
    [np.float32, np.float16, np.float64, np.int64, np.int32, np.int8, np.uint8]
)


@settings(max_examples=60, deadline=None)
@given(
    arrays=st.lists(
        dtypes.flatmap(
            lambda d: hnp.arrays(
                d, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=7)
            )
        ),
        min_size=1,
        max_size=5,
    ),
    chunk_words=st.integers(1, 16),
)
def test_any_arrays_roundtrip_with_any_chunk_size(arrays, chunk_words):
    named = {f"t{i}": a for i, a in enumerate(arrays)}
    out = roundtrip(named, chunk_bytes=8 * chunk_words)
    for name, array in named.items():
        np.testing.assert_array_equal(out[name], array)
