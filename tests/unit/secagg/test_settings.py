"""SecAggSettings: what Task.secagg carries, checked on both sides of the wire."""

from __future__ import annotations

import math

import pytest

from fedpriv.errors import ProtocolError
from fedpriv.secagg import RingCodec
from fedpriv.secagg.settings import SecAggSettings, settings_from_proto
from fedpriv.v1 import fleet_pb2
from fedpriv.wire import Compression, DType

VALID = {
    "session": "0123456789abcdef0123456789abcdef",
    "threshold": 3,
    "clip_norm": 1.5,
    "scale": 1e6,
    "size": 1000,
    "noise_variance": 2.5,
    "chunk_bytes": 4096,
    "ring_bits": 32,
}


def test_settings_survive_a_round_trip_through_the_proto():
    settings = SecAggSettings(**VALID)

    wire = fleet_pb2.Task.FromString(fleet_pb2.Task(secagg=settings.to_proto()).SerializeToString())

    assert wire.HasField("secagg")
    assert SecAggSettings.from_proto(wire.secagg) == settings


def test_settings_from_a_planned_codec_rebuild_that_codec_and_the_masked_layout():
    codec = RingCodec.plan(clip_norm=2.0, size=10, clients=5, threshold=3, noise_multiplier=1.0)

    settings = SecAggSettings.from_codec(codec, session="s", threshold=3, chunk_bytes=16)

    assert settings.codec == codec
    assert settings.ring_bits == 32
    (spec,) = settings.layout.specs
    assert (spec.name, spec.dtype, spec.shape) == ("secagg", DType.INT32, (10,))
    assert settings.layout.chunk_bytes == 16


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"session": ""}, "session must be 1 to 256 bytes"),
        ({"session": "x" * 257}, "session must be 1 to 256 bytes"),
        ({"threshold": 0}, "threshold 0 must be in [1, 65535]"),
        ({"threshold": 65536}, "threshold 65536 must be in [1, 65535]"),
        ({"clip_norm": 0.0}, "clip_norm 0.0 must be a finite number > 0"),
        ({"clip_norm": -1.0}, "clip_norm -1.0 must be a finite number > 0"),
        ({"clip_norm": math.inf}, "clip_norm inf must be a finite number > 0"),
        ({"scale": math.nan}, "scale nan must be a finite number > 0"),
        ({"noise_variance": -0.5}, "noise_variance -0.5 must be a finite number >= 0"),
        ({"noise_variance": math.nan}, "noise_variance nan must be a finite number >= 0"),
        ({"size": 0}, "size 0 must be in [1, 2^60)"),
        ({"size": 1 << 60}, "size 1152921504606846976 must be in [1, 2^60)"),
        ({"chunk_bytes": 0}, "chunk_bytes 0 must be a positive multiple of 8"),
        ({"chunk_bytes": 12}, "chunk_bytes 12 must be a positive multiple of 8"),
        ({"chunk_bytes": (4 << 20) + 8}, "must be a positive multiple of 8 up to 4194304"),
        ({"ring_bits": 0}, "ring_bits 0: this silo implements Z/2^32 only"),
        ({"ring_bits": 64}, "ring_bits 64: this silo implements Z/2^32 only"),
        ({"scale": 2.0**31, "clip_norm": 1.0}, "must be below 2^31 - 1"),
        # rounded up, s·C = 2^31 - 0.5 would reach 2^31, which int32 cannot hold
        ({"scale": 2.0**31 - 0.5, "clip_norm": 1.0}, "must be below 2^31 - 1"),
    ],
)
def test_each_bad_value_is_refused_on_both_sides_naming_the_field(changes, words):
    values = VALID | changes

    with pytest.raises(ProtocolError, match="secure-aggregation settings") as raised:
        SecAggSettings(**values)
    settings, problems = settings_from_proto(fleet_pb2.SecAggSettings(**values))

    assert words in str(raised.value)
    assert settings is None
    assert len(problems) == 1 and words in problems[0]
    with pytest.raises(ProtocolError, match="secure-aggregation settings"):
        SecAggSettings.from_proto(fleet_pb2.SecAggSettings(**values))


def test_every_problem_is_listed_at_once():
    # An unset message: no session, threshold, norm, scale, size, chunk or ring.
    settings, problems = settings_from_proto(fleet_pb2.SecAggSettings())

    assert settings is None
    fields = [p.split(" ", 1)[0] for p in problems]
    assert fields == [
        "session",
        "threshold",
        "clip_norm",
        "scale",
        "size",
        "chunk_bytes",
        "ring_bits",
    ]


@pytest.mark.parametrize("codec", list(Compression))
def test_compression_maps_one_to_one_onto_the_proto_enum(codec):
    number = codec.to_proto()

    assert Compression.from_proto(number) is codec
    assert fleet_pb2.Compression.Name(number) == f"COMPRESSION_{codec.name}"


def test_an_unknown_compression_number_is_refused():
    with pytest.raises(ValueError, match="unknown compression 9"):
        Compression.from_proto(9)
