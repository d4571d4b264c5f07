"""One-task batches: L_cl says so (without an extra host sync), and TaskMixingBatchSampler prevents them."""
from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from perceive_components.data import TaskMixingBatchSampler
from perceive_components.losses import DegradationContrastiveLoss
from perceive_components.losses.contrastive import NoNegativesWarning
from perceive_components.ops import validation

# A data set where one task dominates, as OTS haze next to Rain100L: 92 % haze.
LABELS = ["haze"] * 92 + ["rain"] * 5 + ["noise"] * 3


def embeddings(count: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(count, 8, generator=torch.Generator().manual_seed(seed)), dim=1)


def run_steps(batches: list[list[int]]) -> tuple[DegradationContrastiveLoss, list[float], list[str]]:
    """L_cl over the batches (task ids from LABELS); returns the loss module, values and warnings."""
    ids = {task: number for number, task in enumerate(sorted(set(LABELS)))}
    criterion, values = DegradationContrastiveLoss(), []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, batch in enumerate(batches):
            labels = torch.tensor([ids[LABELS[index]] for index in batch])
            values.append(criterion(embeddings(len(batch), step), embeddings(len(batch), 100 + step), labels).item())
    return criterion, values, [str(w.message) for w in caught if issubclass(w.category, NoNegativesWarning)]


# ----------------------------------------------------------------------------- the warning
def test_one_task_batches_are_counted_and_warned_at_powers_of_two():
    batches = [[0, 1, 2, 3]] * 13 + [[0, 1, 95, 98]] * 3  # 13 of 16 steps: haze only
    criterion, values, messages = run_steps(batches)
    assert values[:13] == [0.0] * 13 and all(v > 0 for v in values[13:])
    assert (criterion.calls, criterion.calls_without_negatives) == (16, 13)
    assert [m.split(" in ", 2)[2].split(" calls")[0] for m in messages] == ["1 of 1", "2 of 2", "4 of 4", "8 of 8"]
    assert "TaskMixingBatchSampler" in messages[0]


def test_the_count_rides_in_the_value_checks_sync(monkeypatch):
    syncs = []
    monkeypatch.setattr(validation, "host_values", lambda stats: syncs.append(tuple(stats.shape)) or stats.tolist())
    with pytest.warns(NoNegativesWarning):
        DegradationContrastiveLoss()(embeddings(4, 0), embeddings(4, 1), torch.zeros(4, dtype=torch.long))
    assert syncs == [(3, 2)]  # anchor, positive and the count: one read


# ----------------------------------------------------------------------------- the sampler
def test_plain_batches_are_mostly_one_task_and_mixed_ones_never():
    plain = TaskMixingBatchSampler(LABELS, 4, steps=200, min_tasks=1, seed=3)
    mixed = TaskMixingBatchSampler(LABELS, 4, steps=200, min_tasks=2, seed=3)
    one_task = sum(len({LABELS[i] for i in batch}) == 1 for batch in plain)
    assert one_task > 120  # 0.92⁴ ≈ 72 % of plain batches hold haze only
    assert all(len({LABELS[i] for i in batch}) >= 2 for batch in mixed)
    _, values, messages = run_steps(list(mixed)[:16])
    assert messages == [] and all(v > 0 for v in values)
    _, _, messages = run_steps(list(plain)[:16])
    assert messages  # the recipe's silent zeros, now said out loud
    three = TaskMixingBatchSampler(LABELS, 6, steps=50, min_tasks=3, seed=0)
    assert all(len({LABELS[i] for i in batch}) == 3 for batch in three)


def test_mixing_keeps_the_data_shares_otherwise():
    sampler = TaskMixingBatchSampler(LABELS, 32, steps=300, min_tasks=2, seed=1)
    counts = Counter(LABELS[i] for batch in sampler for i in batch)
    assert counts["haze"] / sum(counts.values()) == pytest.approx(0.92, abs=0.02)  # 32-item batches rarely need help
    weights = [1.0 if task == "haze" else 10.0 for task in LABELS]  # repeat factors re-balance the tasks
    balanced = TaskMixingBatchSampler(LABELS, 32, steps=300, seed=1, weights=weights)
    shares = Counter(LABELS[i] for batch in balanced for i in batch)
    assert shares["haze"] / sum(shares.values()) == pytest.approx(92 / 172, abs=0.03)


def test_batches_are_a_pure_function_of_seed_and_step():
    sampler = TaskMixingBatchSampler(LABELS, 8, steps=10, seed=5)
    straight = list(sampler)
    again = TaskMixingBatchSampler(LABELS, 8, steps=10, seed=5)
    again.set_step(6)  # resumed after 6 optimiser steps
    assert len(again) == 4 and list(again) == straight[6:]
    assert straight[3] == sampler.global_batch(3)
    assert list(TaskMixingBatchSampler(LABELS, 8, steps=10, seed=6)) != straight
    seeded = list(TaskMixingBatchSampler(LABELS, 8, steps=10, seed=5, draw_seeds=True))
    assert [[index for index, _ in batch] for batch in seeded] == straight
    assert len({seed for batch in seeded for _, seed in batch}) == 80  # one seed per draw


def test_ddp_ranks_split_each_global_batch_which_holds_several_tasks():
    single = TaskMixingBatchSampler(LABELS, 4, steps=30, seed=2)
    ranks = [TaskMixingBatchSampler(LABELS, 4, steps=30, seed=2, rank=r, world_size=2) for r in range(2)]
    for step, (whole, first, second) in enumerate(zip(single, *ranks)):
        assert len(first) == len(second) == 2 and first + second == whole == single.global_batch(step)
        assert len({LABELS[i] for i in whole}) >= 2
    for r in ranks:
        r.set_step(25)
    assert [b for r in ranks for b in r] == [single.global_batch(s)[:2] for s in range(25, 30)] + \
        [single.global_batch(s)[2:] for s in range(25, 30)]


def test_loader_and_argument_errors():
    loader = torch.utils.data.DataLoader(list(range(len(LABELS))), batch_sampler=TaskMixingBatchSampler(LABELS, 4, steps=3))
    assert [len(batch) for batch in loader] == [4, 4, 4]
    for kwargs, message in (
        (dict(labels=["a"] * 5, batch_size=4), r"min_tasks=2 needs .* labels hold 1: \['a'\]"),
        (dict(labels=LABELS, batch_size=4, min_tasks=5), "min_tasks=5 needs a batch_size of at least 5"),
        (dict(labels=LABELS, batch_size=4, weights=[0.0] * 92 + [1.0] * 8, min_tasks=3), "labels hold 2"),
        (dict(labels=LABELS, batch_size=6, world_size=4), "multiple of world_size 4"),
        (dict(labels=LABELS, batch_size=4, rank=2, world_size=2), r"rank must be an integer in \[0, 2\)"),
        (dict(labels=LABELS, batch_size=4, weights=[1.0] * 3), "one entry per label"),
        (dict(labels=LABELS, batch_size=4, weights=[-1.0] * 100), ">= 0"),
        (dict(labels=[], batch_size=4), "labels is empty"),
        (dict(labels=LABELS, batch_size=0), "batch_size must be a positive integer"),
    ):
        with pytest.raises(ValueError, match=message):
            TaskMixingBatchSampler(steps=2, **kwargs)
    with pytest.raises(ValueError, match="step must be an integer in"):
        TaskMixingBatchSampler(LABELS, 4, steps=2).set_step(3)
