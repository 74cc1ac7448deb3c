"""Which trainable layers DP-SGD cannot clip per record, found before the first round.

Opacus computes each record's gradient layer by layer from the layer's input
activations, so it needs every trainable layer to see one input row per record,
and (under ghost clipping) every trainable parameter to be used by one layer
only. A model that breaks either fails deep inside a backward pass, with a
message about tensor shapes. :func:`dp_layer_problems` runs one forward pass of
two all-zero records and names each layer that breaks a rule, so the silo is
refused at start-up with what to change:

- a layer whose input's first dimension is not the batch's (Hugging Face GPT-2's
  position embedding sees ``position_ids`` of shape ``(1, L)``, broadcast over the
  batch): freeze it, as LoRA does;
- a parameter used by two layers (tied input and output embeddings) under ghost
  clipping: freeze it or use ``grad_sample_mode = "hooks"``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["dp_layer_problems"]

logger = logging.getLogger(__name__)

PROBE_BATCH = 2


def _trainable_layers(module: nn.Module) -> dict[str, nn.Module]:
    return {
        name or "(the model)": layer
        for name, layer in module.named_modules()
        if any(p.requires_grad for p in layer.parameters(recurse=False))
    }


def _tied(module: nn.Module) -> list[str]:
    users: dict[int, list[str]] = {}
    for name, layer in module.named_modules():
        for pname, parameter in layer.named_parameters(recurse=False):
            if parameter.requires_grad:
                users.setdefault(id(parameter), []).append(f"{name}.{pname}" if name else pname)
    return [" and ".join(names) for names in users.values() if len(names) > 1]


def dp_layer_problems(
    module: nn.Module,
    *,
    record: Sequence[torch.Tensor],
    forward: Callable[..., Any] | None,
    ghost: bool,
) -> list[str]:
    """What keeps DP-SGD from clipping `module`'s gradients per record (empty: nothing).

    Args:
        module: The model, with the parameters that train marked ``requires_grad``.
        record: One training record's features (without its target), for their
            shapes and dtypes; the probe feeds zeros of that shape, not the data.
        forward: ``forward(module, *features)`` as training calls it (None:
            ``module(*features)``).
        ghost: Ghost clipping will be used (it refuses shared parameters).
    """
    problems: list[str] = []
    if ghost:
        problems += [
            f"parameters {names} are one tensor used by two layers (tied weights), which "
            "ghost clipping cannot clip per record; freeze them or use "
            'grad_sample_mode = "hooks"'
            for names in _tied(module)
        ]
    seen: dict[str, int] = {}

    def record_rows(name: str) -> Callable[..., None]:
        def hook(_layer: nn.Module, args: tuple[Any, ...]) -> None:  # None: inputs unchanged
            first = args[0] if args else None
            rows = first.shape[0] if isinstance(first, torch.Tensor) and first.dim() else -1
            seen.setdefault(name, rows)

        return hook

    trainable = _trainable_layers(module)
    handles = [
        layer.register_forward_pre_hook(record_rows(name)) for name, layer in trainable.items()
    ]
    features = [
        torch.zeros((PROBE_BATCH, *torch.as_tensor(f).shape), dtype=torch.as_tensor(f).dtype)
        for f in record
    ]
    device = next(module.parameters()).device
    features = [f.to(device) for f in features]
    try:
        with torch.no_grad():
            module(*features) if forward is None else forward(module, *features)
    except Exception as err:  # a model that cannot take all-zero records: no probe
        logger.debug("DP layer probe skipped (the model refused zero records): %s", err)
        return problems
    finally:
        for handle in handles:
            handle.remove()
    problems += [
        f"layer {name} ({type(layer).__name__}) is trainable but sees inputs whose first "
        f"dimension is {seen[name]}, not the batch's {PROBE_BATCH}: its per-record gradients "
        "cannot be computed; freeze it (train adapters instead) or give it one input row per record"
        for name, layer in trainable.items()
        if seen.get(name, PROBE_BATCH) not in (PROBE_BATCH, -1)  # -1: called without a tensor
    ]
    return problems
