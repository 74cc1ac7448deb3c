"""One silo on several processes (GPUs, nodes): ``torchrun … fedpriv client``.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every process runs the silo app, and
:func:`start` joins them in one process group (NCCL on CUDA, gloo on the CPU).
Rank 0 alone talks to the coordinator: its client is wrapped in
:class:`RankZeroClient`, which hands every training task (the model, the config)
to the other ranks by broadcast before it trains; the other ranks run
:func:`follow` and never open a connection. All ranks then train one round
together: a :class:`~fedpriv.client.torch.TorchClient` in a process group wraps
its model in DistributedDataParallel, and each rank trains on its share of the
data (every ``world_size``-th record from its rank). Evaluation runs on rank 0.

With DP-SGD the model is wrapped in Opacus' DP-DDP instead: each rank samples
its share with Poisson rate ``q`` and clips each record's gradient, rank 0 adds
the noise, and the clipped sums are added across ranks. One record is on one
rank, so the mechanism is that of one process with the global batch: ``q =
world_size × batch_size / records`` and ``ceil(records / (world_size ×
batch_size))`` steps per epoch, which is what the ledger records
(:func:`global_batches`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

from fedpriv._types import Scalar
from fedpriv.client.base import EvaluateResult, FitResult
from fedpriv.errors import ConfigError
from fedpriv.wire.torch_interop import arrays_from_state_dict, copy_arrays_into

__all__ = [
    "RankZeroClient",
    "World",
    "data_parallel",
    "finish",
    "follow",
    "global_batches",
    "local_loader",
    "local_share",
    "start",
    "world",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class World:
    """This process's place in the silo's process group."""

    rank: int
    size: int


def world() -> World | None:
    """The silo's process group, once :func:`start` joined it (None: one process)."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    size = dist.get_world_size()
    return World(rank=dist.get_rank(), size=size) if size > 1 else None


def start() -> World | None:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); None when alone.

    Raises:
        ConfigError: The torchrun variables are incomplete.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return None
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={size} but {', '.join(missing)} unset: start the silo with torchrun"
        )
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    joined = world()
    assert joined is not None  # WORLD_SIZE > 1
    logger.info("silo process %d of %d joined (%s)", joined.rank, joined.size, dist.get_backend())
    return joined


def finish() -> None:
    """Leave the process group once every rank is done (its threads end before exit).

    A gloo group left for the interpreter's exit can abort the process at shutdown.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def global_batches(records: int, batch_size: int, size: int) -> int:
    """Steps per epoch of a silo whose ranks each take batches of `batch_size`.

    Example:
        >>> global_batches(1000, 32, 1), global_batches(1000, 32, 2)
        (32, 16)
    """
    return max(1, math.ceil(records / (batch_size * size)))


def local_share(dataset: Dataset[Any], here: World) -> Subset[Any]:
    """This rank's records: every ``size``-th, from index ``rank`` (disjoint, covering all)."""
    return Subset(dataset, range(here.rank, len(dataset), here.size))  # type: ignore[arg-type]


def local_loader(loader: DataLoader[Any], here: World) -> DataLoader[Any]:
    """`loader` over this rank's share, with its batch size, collate and workers."""
    return DataLoader(
        local_share(loader.dataset, here),
        batch_size=loader.batch_size,
        shuffle=True,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` under DistributedDataParallel (its parameters shared, not copied)."""
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device])
    return DistributedDataParallel(model)


_FIT, _STOP = "fit", "stop"


def _broadcast(message: list[Any]) -> list[Any]:
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return list(box[0])


class RankZeroClient:
    """Rank 0's client: each training task goes to every rank, then all train together."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.broken = False

    def __getattr__(self, name: str) -> Any:  # model_shapes, plan_privacy, privacy, ...
        return getattr(self.inner, name)

    def fit(
        self, parameters: Mapping[str, npt.NDArray[Any]], *, config: Mapping[str, Scalar]
    ) -> FitResult:
        """Send the task to the other ranks, then train on this rank's share.

        Raises:
            SystemExit: Training failed here while the other ranks may wait in a
                collective for this one: the silo cannot go on to the next task in
                step, so this process ends and torchrun stops the others.
        """
        tensors = _model_tensors(self.inner)
        if tensors is None:  # not a TorchClient: the arrays travel in the message
            _broadcast([_FIT, dict(parameters), dict(config)])
        else:  # the model goes tensor by tensor, into every rank's own (no pickle)
            _broadcast([_FIT, None, dict(config)])
            copy_arrays_into(tensors, parameters)
            for tensor in tensors.values():
                dist.broadcast(tensor, src=0)
        try:
            result: FitResult = self.inner.fit(parameters, config=config)
        except Exception as err:
            self.broken = True
            logger.exception("training failed on rank 0; ending the silo's processes")
            raise SystemExit(f"rank 0's training failed ({type(err).__name__}: {err})") from err
        return result

    def evaluate(
        self, parameters: Mapping[str, npt.NDArray[Any]], *, config: Mapping[str, Scalar]
    ) -> EvaluateResult:
        """Evaluate on rank 0 alone (its validation data)."""
        result: EvaluateResult = self.inner.evaluate(parameters, config=config)
        return result

    def close(self) -> None:
        """Tell the other ranks the silo is done; they return from :func:`follow`.

        Not after a failed round: they are not listening (torchrun stops them).
        """
        if not self.broken:
            _broadcast([_STOP])


def follow(inner: Any) -> int:
    """Run the training tasks rank 0 hands out until it stops; the rounds trained."""
    trained = 0
    while True:
        message = _broadcast([])
        if message[0] == _STOP:
            return trained
        _, parameters, config = message
        if parameters is None:  # rank 0 sends the model tensor by tensor
            tensors = _model_tensors(inner)
            assert tensors is not None, "rank 0 runs a TorchClient, this rank another app"
            for tensor in tensors.values():
                dist.broadcast(tensor, src=0)
            parameters = arrays_from_state_dict(tensors)
        inner.fit(parameters, config=config)
        trained += 1


def _model_tensors(client: Any) -> dict[str, torch.Tensor] | None:
    """The exchanged tensors of a TorchClient (views of its model), None for other apps."""
    tensors = getattr(client, "exchanged_tensors", None)
    return None if tensors is None else dict(tensors())
