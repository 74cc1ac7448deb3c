"""Mixed precision for TorchClient: bfloat16 autocast where the device has it.

bfloat16 keeps float32's exponent range, so training needs no loss scaling; the
parameters, the optimiser's state and the exchanged model stay float32, and only
the forward pass (and the loss) runs in bfloat16 under ``torch.autocast``.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator

import torch

from fedpriv.errors import ConfigError

__all__ = ["Precision", "autocast", "autocast_dtype"]


class Precision(enum.StrEnum):
    """How a silo's forward pass computes."""

    AUTO = "auto"  # bfloat16 autocast on a CUDA GPU that supports it; float32 elsewhere
    BF16 = "bf16"  # bfloat16 autocast on CUDA or the CPU
    FP32 = "fp32"  # no autocast


def autocast_dtype(precision: Precision | str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device` (None: plain float32).

    Example:
        >>> autocast_dtype("bf16", torch.device("cpu"))
        torch.bfloat16
        >>> autocast_dtype("fp32", torch.device("cpu")) is None
        True

    Raises:
        ConfigError: An unknown precision, or bf16 on a device without it.
    """
    try:
        chosen = Precision(precision)
    except ValueError:
        choices = ", ".join(repr(p.value) for p in Precision)
        raise ConfigError(f"precision = {precision!r}: expected one of {choices}") from None
    if chosen is Precision.FP32:
        return None
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if chosen is Precision.AUTO:
        return torch.bfloat16 if cuda_bf16 else None
    if device.type == "cuda" and not cuda_bf16:
        raise ConfigError(
            f"precision = 'bf16': {torch.cuda.get_device_name(device)} has no bfloat16; "
            "use 'fp32' (or 'auto', which picks it)"
        )
    if device.type not in ("cuda", "cpu"):
        raise ConfigError(f"precision = 'bf16' runs on CUDA or the CPU, not on {device.type}")
    return torch.bfloat16


@contextlib.contextmanager
def autocast(dtype: torch.dtype | None, device: torch.device) -> Iterator[None]:
    """Run the block under ``torch.autocast`` in `dtype` (no-op for None)."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
