"""Batches that always hold several degradation tasks, so that the contrastive term L_cl has negatives.

L_cl (docs/method.md §2.3) contrasts each anchor with the anchors of *other* tasks in the (all-rank) batch;
a batch of one task has no negative and gives L_cl = 0. Where one task dominates the data (RESIDE OTS
holds 72,135 hazy images, Rain100L 200), plain random batches are mostly one task. A global batch of
``TaskMixingBatchSampler`` is drawn as

1. ``batch_size`` items, independently, with probability ∝ ``weights`` (default: equal per item, i.e. the
   data's own task shares; pass e.g. per-item repeat factors to re-balance the tasks);
2. while the batch holds fewer than ``min_tasks`` tasks: a task not in it, drawn ∝ its total weight,
   replaces one item of the batch's most frequent task (its item drawn ∝ weight within the task);
3. shuffled, so the replacing items land anywhere (and on any process).

Global batch ``s`` is a pure function of ``(seed, s)``: ``set_step(s)`` resumes exactly where a run stopped,
and the batches do not depend on the number of processes. Under DDP, process ``r`` of ``W`` takes slice
``r`` of ``batch_size / W`` items of each global batch, which is what L_cl gathers across ranks: the global
batch holds at least ``min_tasks`` tasks (one process's slice may hold fewer). With ``draw_seeds=True``
each item comes as ``(index, seed)``: a 62-bit seed per draw for the data set's own randomness (crops,
flips, noise), the key format of the examples' ``SeededDataset``.
"""
from __future__ import annotations

from collections import Counter
from typing import Hashable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from ..ops.validation import check_positive_int


def _step_generator(seed: int, step: int) -> torch.Generator:
    mixed = int(np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0] >> 1)
    return torch.Generator().manual_seed(mixed)


class TaskMixingBatchSampler(Sampler[list]):
    """Batch sampler (``DataLoader(dataset, batch_sampler=…)``) whose global batches hold ≥ ``min_tasks`` tasks.

    Args:
        labels: the task of every item of the data set (any hashable: names or ids), ``len(dataset)`` long.
        batch_size: the *global* batch (all processes together); a multiple of ``world_size``.
        steps: number of global batches to yield (the run's optimiser steps).
        min_tasks: tasks every global batch holds at least (2: every anchor of L_cl has a negative).
        seed: the batches are a pure function of ``(seed, step)``.
        weights: per-item draw weights ``≥ 0`` (default all 1); a task whose items all weigh 0 is never drawn.
        rank, world_size: this process and the number of processes (DDP).
        draw_seeds: yield ``(index, seed)`` pairs instead of indices.
    """

    def __init__(self, labels: Sequence[Hashable], batch_size: int, *, steps: int, min_tasks: int = 2,
                 seed: int = 0, weights: Sequence[float] | None = None, rank: int = 0, world_size: int = 1,
                 draw_seeds: bool = False) -> None:
        labels = list(labels.tolist() if hasattr(labels, "tolist") else labels)
        if not labels:
            raise ValueError("labels is empty: the sampler needs one task label per item of the data set")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self.steps = check_positive_int(steps, "steps")
        self.min_tasks = check_positive_int(min_tasks, "min_tasks")
        self.world_size = check_positive_int(world_size, "world_size")
        if batch_size % world_size:
            raise ValueError(f"batch_size (global) must be a multiple of world_size {world_size}, got {batch_size}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, {world_size}), got {rank!r}")
        self.weights = self._check_weights(weights, len(labels))
        self.labels, self.rank, self.seed, self.draw_seeds = labels, rank, int(seed), bool(draw_seeds)
        self.local_batch = batch_size // world_size
        members: dict[Hashable, list[int]] = {}
        for index, label in enumerate(labels):
            members.setdefault(label, []).append(index)
        self.tasks = [task for task in members if float(self.weights[members[task]].sum()) > 0]
        self.members = {task: torch.tensor(members[task]) for task in self.tasks}
        self.task_weights = torch.stack([self.weights[self.members[task]].sum() for task in self.tasks])
        if min_tasks > min(batch_size, len(self.tasks)):
            raise ValueError(
                f"min_tasks={min_tasks} needs a batch_size of at least {min_tasks} (got {batch_size}) and as many "
                f"tasks of positive weight; labels hold {len(self.tasks)}: {sorted(map(str, self.tasks))}")
        self.start_step = 0

    @staticmethod
    def _check_weights(weights: Sequence[float] | None, count: int) -> torch.Tensor:
        if weights is None:
            return torch.ones(count, dtype=torch.float64)
        values = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if values.numel() != count:
            raise ValueError(f"weights must have one entry per label ({count}), got {values.numel()}")
        if not bool(torch.isfinite(values).all()) or bool((values < 0).any()) or not float(values.sum()) > 0:
            raise ValueError("weights must be finite, >= 0, and not all 0")
        return values

    def set_step(self, step: int) -> None:
        """Start the next iteration at global batch ``step`` (resume after ``step`` optimiser steps)."""
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= self.steps:
            raise ValueError(f"step must be an integer in [0, {self.steps}], got {step!r}")
        self.start_step = step

    def global_batch(self, step: int) -> list[int]:
        """The indices of global batch ``step`` (all processes), a pure function of ``(seed, step)``."""
        indices, _ = self._draw(step)
        return indices

    def _draw(self, step: int) -> tuple[list[int], list[int]]:
        generator = _step_generator(self.seed, step)
        batch = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=generator).tolist()
        tasks = [self.labels[index] for index in batch]
        while len(present := set(tasks)) < self.min_tasks:
            absent = [i for i, task in enumerate(self.tasks) if task not in present]
            newcomer = self.tasks[absent[int(torch.multinomial(self.task_weights[absent], 1, generator=generator))]]
            crowded = Counter(tasks).most_common(1)[0][0]
            slot = max(position for position, task in enumerate(tasks) if task == crowded)
            pool = self.members[newcomer]
            batch[slot] = int(pool[torch.multinomial(self.weights[pool], 1, generator=generator)])
            tasks[slot] = newcomer
        order = torch.randperm(self.batch_size, generator=generator).tolist()
        seeds = torch.randint(2**62, (self.batch_size,), generator=generator, dtype=torch.int64).tolist()
        return [batch[position] for position in order], seeds

    def __len__(self) -> int:
        return self.steps - self.start_step

    def __iter__(self) -> Iterator[list]:
        first = self.rank * self.local_batch
        for step in range(self.start_step, self.steps):
            indices, seeds = self._draw(step)
            local = slice(first, first + self.local_batch)
            yield list(zip(indices[local], seeds[local])) if self.draw_seeds else indices[local]
