"""Tensor streams: specs, payload layout, chunk encoding and zero-copy decoding.

This package never imports grpc; it only knows the protobuf messages.
"""

from __future__ import annotations

from fedpriv.wire.codec import (
    PayloadAssembler,
    arrays_from_payload,
    bfloat16_to_float32,
    chunk_pieces,
    encode_chunks,
    float32_to_bfloat16,
    layout_from_proto,
    specs_from_arrays,
)
from fedpriv.wire.compression import Compression
from fedpriv.wire.layout import (
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    DType,
    TensorLayout,
    TensorSpec,
)
from fedpriv.wire.model import Model
from fedpriv.wire.scalars import scalars_from_proto, scalars_to_proto

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "Compression",
    "MAX_CHUNK_BYTES",
    "DType",
    "Model",
    "PayloadAssembler",
    "TensorLayout",
    "TensorSpec",
    "arrays_from_payload",
    "bfloat16_to_float32",
    "chunk_pieces",
    "encode_chunks",
    "float32_to_bfloat16",
    "layout_from_proto",
    "scalars_from_proto",
    "scalars_to_proto",
    "specs_from_arrays",
]
