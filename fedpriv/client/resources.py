"""What a silo tells the coordinator about its hardware and pace (``Resources``).

The hardware comes from the client's ``device`` (a TorchClient's; CUDA devices
are counted and their memory read when torch is loaded). The pace comes from the
client's ``pace``, ``(seconds per local step, steps of a round's full work)``,
which a TorchClient measures in every ``fit``. A client with neither sends an
empty message: the coordinator treats its pace as unknown.
"""

from __future__ import annotations

import sys
from typing import Any

from fedpriv.wire.resources import Resources

__all__ = ["describe"]


def _hardware(device: Any) -> Resources:
    kind = getattr(device, "type", None) or (str(device).split(":")[0] if device else "")
    if kind not in ("cpu", "cuda", "mps"):
        return Resources()
    torch = sys.modules.get("torch")
    if kind == "cuda" and torch is not None and torch.cuda.is_available():
        memory = torch.cuda.get_device_properties(torch.device(device)).total_memory
        return Resources(kind, torch.cuda.device_count(), int(memory))
    return Resources(kind, 1, 0)


def describe(client: Any) -> Resources:
    """`client`'s hardware and, once it has trained, its pace."""
    hardware = _hardware(getattr(client, "device", None))
    pace = getattr(client, "pace", None)
    if pace is None:
        return hardware
    step_seconds, full_steps = pace
    return Resources(
        hardware.device_kind,
        hardware.device_count,
        hardware.device_memory_bytes,
        float(step_seconds),
        int(full_steps),
    )
