"""Configuration and metric values: four scalar kinds, nothing Python-specific."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fedpriv._types import Scalar
from fedpriv.v1 import fleet_pb2

__all__ = ["scalars_from_proto", "scalars_to_proto"]

MAX_SCALARS = 256
MAX_STRING_BYTES = 4096


def scalars_to_proto(values: Mapping[str, Scalar]) -> dict[str, fleet_pb2.Scalar]:
    """Convert a mapping of scalars to protobuf ``Scalar`` messages.

    Raises:
        TypeError: A value is not a bool, int, float or str.
    """
    out: dict[str, fleet_pb2.Scalar] = {}
    for key, value in values.items():
        if isinstance(value, bool):
            out[key] = fleet_pb2.Scalar(bool_value=value)
        elif isinstance(value, int):
            out[key] = fleet_pb2.Scalar(int_value=value)
        elif isinstance(value, float):
            out[key] = fleet_pb2.Scalar(double_value=value)
        elif isinstance(value, str):
            out[key] = fleet_pb2.Scalar(string_value=value)
        else:
            raise TypeError(
                f"{key!r}: {type(value).__name__} cannot be sent; use bool, int, float or str"
            )
    return out


def scalars_from_proto(values: Mapping[str, Any]) -> tuple[dict[str, Scalar], list[str]]:
    """Convert unverified protobuf scalars; non-finite floats and oversized values are refused.

    Returns:
        The accepted values and a list of problems (empty when all were accepted).
    """
    problems: list[str] = []
    if len(values) > MAX_SCALARS:
        return {}, [f"{len(values)} metrics sent; at most {MAX_SCALARS} allowed"]
    out: dict[str, Scalar] = {}
    for key, message in values.items():
        kind = message.WhichOneof("kind")
        if kind is None:
            problems.append(f"metric {key!r} has no value")
        elif kind == "double_value" and not math.isfinite(message.double_value):
            problems.append(f"metric {key!r} is {message.double_value}, not a finite number")
        elif kind == "string_value" and len(message.string_value.encode()) > MAX_STRING_BYTES:
            problems.append(f"metric {key!r} is longer than {MAX_STRING_BYTES} bytes")
        else:
            out[key] = getattr(message, kind)
    return out, problems
