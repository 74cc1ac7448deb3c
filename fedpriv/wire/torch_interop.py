"""Moving PyTorch state dicts on and off the wire without extra copies.

torch is imported only when these functions run, so the coordinator can serve
models without importing it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from fedpriv.wire.layout import DEFAULT_CHUNK_BYTES, DType, TensorLayout, TensorSpec
from fedpriv.wire.model import Model

if TYPE_CHECKING:
    import torch

__all__ = [
    "Exchange",
    "arrays_from_state_dict",
    "copy_arrays_into",
    "exchanged_state",
    "layout_for_state_dict",
    "model_from_state_dict",
    "views_of_one_buffer",
]


class Exchange(enum.StrEnum):
    """Which tensors of a module travel between a silo and the coordinator."""

    # The state dict without frozen parameters (requires_grad False): what trains,
    # and the buffers (BatchNorm statistics, say). A frozen base model stays where it
    # is, and only its adapters travel.
    TRAINABLE = "trainable"
    ALL = "all"  # the whole state dict


def exchanged_state(module: Any, exchange: Exchange | str = Exchange.TRAINABLE) -> dict[str, Any]:
    """The tensors of `module`'s state dict that `exchange` selects, by name.

    A parameter shared under two names (tied weights) is frozen or not under both.

    Raises:
        ValueError: An unknown `exchange`, or nothing left to exchange.
    """
    try:
        chosen = Exchange(exchange)
    except ValueError:
        choices = ", ".join(repr(e.value) for e in Exchange)
        raise ValueError(f"exchange = {exchange!r}: expected one of {choices}") from None
    state: dict[str, Any] = dict(module.state_dict())
    if chosen is Exchange.TRAINABLE:
        frozen = {
            name
            for name, parameter in module.named_parameters(remove_duplicate=False)
            if not parameter.requires_grad
        }
        state = {name: tensor for name, tensor in state.items() if name not in frozen}
    if not state:
        raise ValueError(f"exchange = {chosen.value!r}: the model has nothing to exchange")
    return state


def _dtype_of(tensor: torch.Tensor) -> DType:
    import torch

    if tensor.dtype == torch.bfloat16:
        return DType.BFLOAT16
    return DType.from_numpy(np.dtype(str(tensor.dtype).removeprefix("torch.")))


def layout_for_state_dict(
    state: Mapping[str, torch.Tensor], *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> TensorLayout:
    """Describe a state dict's tensors (names, wire dtypes, shapes)."""
    specs = [
        TensorSpec(name=name, dtype=_dtype_of(t), shape=tuple(t.shape)) for name, t in state.items()
    ]
    return TensorLayout.from_specs(specs, chunk_bytes=chunk_bytes)


def arrays_from_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, npt.NDArray[Any]]:
    """Numpy views of a state dict's tensors (copied only when on an accelerator).

    bfloat16 tensors come back as their uint16 bit patterns.
    """
    import torch

    arrays: dict[str, npt.NDArray[Any]] = {}
    for name, tensor in state.items():
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype == torch.bfloat16:
            arrays[name] = t.contiguous().view(torch.int16).numpy().view(np.uint16)
        else:
            arrays[name] = t.contiguous().numpy()
    return arrays


def model_from_state_dict(
    state: Mapping[str, torch.Tensor], *, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Model:
    """Lay a state dict out as a :class:`Model`."""
    layout = layout_for_state_dict(state, chunk_bytes=chunk_bytes)
    return Model.from_arrays(arrays_from_state_dict(state), layout=layout)


def copy_arrays_into(
    state: Mapping[str, torch.Tensor], arrays: Mapping[str, npt.NDArray[Any]]
) -> None:
    """Copy `arrays` into the tensors of `state` in place (casting to each tensor's dtype).

    Raises:
        ValueError: Names or shapes differ; nothing is copied in that case.
    """
    import torch

    problems = [f"{n}: missing" for n in state if n not in arrays]
    problems += [f"{n}: not in the model" for n in arrays if n not in state]
    problems += [
        f"{n}: shape {tuple(arrays[n].shape)} != {tuple(t.shape)}"
        for n, t in state.items()
        if n in arrays and tuple(arrays[n].shape) != tuple(t.shape)
    ]
    if problems:
        raise ValueError("parameters do not fit the model: " + "; ".join(problems))
    with torch.no_grad():
        for name, tensor in state.items():
            array = np.asarray(arrays[name])
            if (
                tensor.device.type == "cpu"
                and array.size
                and (
                    array.ctypes.data == tensor.data_ptr()
                    and array.dtype.itemsize == tensor.element_size()
                )
            ):
                continue  # received straight into this tensor's memory: nothing to copy
            tensor.copy_(torch.from_numpy(array))


def views_of_one_buffer(
    module: torch.nn.Module, exchanged: Mapping[str, torch.Tensor], layout: TensorLayout
) -> npt.NDArray[np.uint8] | None:
    """Move `module`'s `exchanged` tensors into one buffer laid out as `layout`; that buffer.

    Each parameter and buffer named in `exchanged` keeps its value and becomes a
    view of its place in the returned bytes (``tensor.data`` is rebound), so that
    a model received into those bytes is the module's, with no copy. None, with
    nothing changed, when the layout does not name the exchanged tensors one for
    one in order, with their shapes and dtypes (bfloat16 as its bit patterns), or
    a tensor is not on the CPU.
    """
    import torch

    if [spec.name for spec in layout.specs] != list(exchanged):
        return None
    for spec, tensor in zip(layout.specs, exchanged.values(), strict=True):
        if tensor.device.type != "cpu" or tuple(spec.shape) != tuple(tensor.shape):
            return None
        bf16 = tensor.dtype == torch.bfloat16
        if (spec.dtype is DType.BFLOAT16) != bf16:
            return None
        if not bf16 and spec.dtype.storage != tensor.detach().numpy().dtype:
            return None
    owners: dict[str, torch.Tensor] = dict(module.named_parameters(remove_duplicate=False))
    owners.update(module.named_buffers(remove_duplicate=False))
    if any(spec.name not in owners for spec in layout.specs):
        return None
    flat = np.empty(layout.payload_bytes, np.uint8)
    with torch.no_grad():
        for spec, offset in zip(layout.specs, layout.offsets, strict=True):
            owner = owners[spec.name]
            region = flat[offset : offset + spec.nbytes]
            if spec.dtype is DType.BFLOAT16:  # its bit patterns, as it travels
                words = region.view(np.int16).reshape(spec.shape)
                words[...] = owner.detach().view(torch.int16).numpy()
                owner.data = torch.from_numpy(words).view(torch.bfloat16)
            else:
                view = region.view(spec.dtype.storage).reshape(spec.shape)
                view[...] = owner.detach().numpy()
                owner.data = torch.from_numpy(view)
    return flat
