"""Poisson sampling of one rank's share of a silo's records (DP-SGD on several processes)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["PoissonShareSampler"]


class PoissonShareSampler:
    """Batches of this rank's records (every `world`-th from `rank`), each drawn at `rate`.

    Every one of the `steps` batches is yielded, an empty one included, so that all
    ranks take the same number of steps (their collectives pair up) and the count of
    noised steps reveals nothing. Opacus' ``DistributedUniformWithReplacementSampler``
    skips empty batches, which would leave one rank a step behind the others.

    Example:
        >>> sampler = PoissonShareSampler(
        ...     size=10, rank=1, world=2, rate=1.0, steps=2, generator=torch.Generator()
        ... )
        >>> list(sampler)
        [[1, 3, 5, 7, 9], [1, 3, 5, 7, 9]]
    """

    def __init__(
        self,
        *,
        size: int,
        rank: int,
        world: int,
        rate: float,
        steps: int,
        generator: torch.Generator,
    ) -> None:
        self.indices = torch.arange(rank, size, world)
        self.rate = rate
        self.steps = steps
        self.generator = generator

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            drawn = torch.rand(len(self.indices), generator=self.generator) < self.rate
            yield self.indices[drawn].tolist()

    def __len__(self) -> int:
        return self.steps
