"""A resumable, sharded batch order whose every draw carries its own seed.

Epoch ``e`` fixes a permutation of the data set and one 62-bit seed per position, both from
(seed, e) alone. Global batch ``b`` is positions ``[b·G, (b+1)·G)``; process ``r`` of ``W`` takes the
``r``-th slice of ``G / W`` of them. Hence

- the sample order does not depend on the number of processes (1 GPU or 8 see the same global batches);
- the position after ``step`` optimiser steps is ``divmod(step, steps_per_epoch)``, so resuming at a
  step replays exactly the remaining order — nothing else needs to be stored;
- each draw's randomness (crops, flips, noise) comes from its own seed, not from a worker's RNG, so it
  does not depend on ``num_workers`` or on where the run was interrupted.

``SeededDataset`` turns the ``(index, seed)`` keys into items: it calls ``dataset.sample(index,
generator)`` when the data set has it (the library's data sets do) and otherwise runs
``dataset[index]`` with Python/NumPy/torch global RNGs seeded by the draw seed (then restored).
"""
from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def epoch_order(dataset_len: int, seed: int, epoch: int, shuffle: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The permutation ``(N,)`` and per-position draw seeds ``(N,)`` of one epoch (int64)."""
    mixed = int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)
    generator = torch.Generator().manual_seed(mixed)
    order = torch.randperm(dataset_len, generator=generator) if shuffle else torch.arange(dataset_len)
    seeds = torch.randint(2**62, (dataset_len,), generator=generator, dtype=torch.int64)
    return order, seeds


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields, for this process, lists of ``(index, seed)`` — its share of each global batch.

    ``set_position(epoch, start_batch)`` chooses where the next iteration starts; incomplete global
    batches at the end of an epoch are dropped.
    """

    def __init__(self, dataset_len: int, global_batch: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True) -> None:
        if global_batch <= 0 or global_batch % world_size:
            raise ValueError(f"batch_size (global) must be a positive multiple of the number of processes "
                             f"({world_size}), got {global_batch}")
        if dataset_len < global_batch:
            raise ValueError(f"the training set has {dataset_len} items, fewer than one global batch of {global_batch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.dataset_len, self.global_batch = dataset_len, global_batch
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.local_batch = global_batch // world_size
        self.steps_per_epoch = dataset_len // global_batch
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch < self.steps_per_epoch:
            raise ValueError(f"start_batch must be in [0, {self.steps_per_epoch}), got {start_batch}")
        self.epoch, self.start_batch = epoch, start_batch

    def set_epoch(self, epoch: int) -> None:
        """``DistributedSampler``-style: start ``epoch`` from its first batch."""
        self.set_position(epoch, 0)

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) after ``step`` global batches."""
        return divmod(step, self.steps_per_epoch)

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order, seeds = epoch_order(self.dataset_len, self.seed, self.epoch, self.shuffle)
        for batch in range(self.start_batch, self.steps_per_epoch):
            first = batch * self.global_batch + self.rank * self.local_batch
            positions = range(first, first + self.local_batch)
            yield [(int(order[p]), int(seeds[p])) for p in positions]


@contextlib.contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Run a block with Python, NumPy and torch (CPU) global RNGs seeded by ``seed``; restore them after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class SeededDataset(Dataset):
    """Adapter from ``(index, seed)`` keys to items of ``dataset`` (see the module docstring)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._sample = getattr(dataset, "sample", None)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        if self._sample is not None:
            return self._sample(index, torch.Generator().manual_seed(seed))
        with seeded_global_rng(seed):
            return self.dataset[index]
