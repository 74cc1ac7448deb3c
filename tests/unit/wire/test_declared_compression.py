"""ResultHeader.update_compression (typed, field 9) and the deprecated name (field 8)."""

from __future__ import annotations

import pytest

from fedpriv.v1 import fleet_pb2
from fedpriv.wire import Compression
from fedpriv.wire.compression import declared_compression


@pytest.mark.parametrize("codec", list(Compression))
def test_each_codec_reads_back_from_the_typed_field_alone_the_name_alone_and_both(codec):
    typed = fleet_pb2.ResultHeader(update_compression=codec.to_proto())
    named = fleet_pb2.ResultHeader(compression=codec.value)
    both = fleet_pb2.ResultHeader(update_compression=codec.to_proto(), compression=codec.value)
    for header in (typed, named, both):
        assert declared_compression(header) == (codec, [])


def test_neither_field_means_none():
    assert declared_compression(fleet_pb2.ResultHeader()) == (Compression.NONE, [])


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        (fleet_pb2.ResultHeader(update_compression=9), "update_compression: unknown compression 9"),
        (
            fleet_pb2.ResultHeader(compression="zstd"),
            "compression (field 8): unknown compression 'zstd'",
        ),
        (
            fleet_pb2.ResultHeader(
                update_compression=fleet_pb2.COMPRESSION_INT8, compression="fp16"
            ),
            "update_compression 'int8' and compression 'fp16' (field 8) disagree",
        ),
        (
            fleet_pb2.ResultHeader(update_compression=fleet_pb2.COMPRESSION_NONE, compression="x"),
            "update_compression 'none' and compression 'x' (field 8) disagree",
        ),
    ],
    ids=["unknown-typed", "unknown-name", "disagree", "unknown-name-beside-typed"],
)
def test_an_unknown_or_contradictory_declaration_is_a_problem(header, problem):
    assert declared_compression(header) == (Compression.NONE, [problem])


def test_the_typed_field_survives_the_wire_and_is_distinct_from_none():
    header = fleet_pb2.ResultHeader(update_compression=fleet_pb2.COMPRESSION_NONE)
    again = fleet_pb2.ResultHeader.FromString(header.SerializeToString())
    assert again.HasField("update_compression")
    assert not fleet_pb2.ResultHeader.FromString(b"").HasField("update_compression")
