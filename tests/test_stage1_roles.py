"""The roles stage 1 rests on, pinned: stable folds, a fold model never renders its own training images,
and one crop and flip shared by every image of a triplet (and of a fold restorer's pair)."""
from __future__ import annotations

import hashlib

import torch
from torch import nn

import perceive_components.stage1.render as render_module
from perceive_components.stage1 import PairImages, TensorTriplets, build_triplets, fold_of, scan_pairs
from perceive_components.stage1.train import _StepBatches
from stage1_helpers import write_pair_folder

# Folds must never move between versions: a moved image would be rendered by a model that trained on it.
GOLDEN_PATHS = ["noise/clean/0001.png", "haze/clean/0001.jpg", "rain/clean/norain-1.png",
                "blur/clean/GOPR0372_07_00/000047.png", "lowlight/clean/22.png", "a.png"]
GOLDEN_FOLDS = {2: [0, 1, 0, 0, 1, 0], 5: [3, 4, 1, 1, 4, 2]}


def test_fold_hash_is_frozen():
    for k, folds in GOLDEN_FOLDS.items():
        assert [fold_of(path, k) for path in GOLDEN_PATHS] == folds
    # the documented formula: int(sha256(salt | relative POSIX path)[:16], 16) mod K
    digest = hashlib.sha256(b"perceive-ir-stage1|noise/clean/0001.png").hexdigest()
    assert fold_of("noise/clean/0001.png", 5) == int(digest[:16], 16) % 5


class Recorder(nn.Module):
    """A fold 'restorer' that remembers which clean images it was trained on."""

    def __init__(self, trained_on: frozenset = frozenset()):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.trained_on = trained_on

    def forward(self, x):
        return x


def test_a_fold_model_never_renders_the_images_it_trained_on(tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_pair_folder(data, n_per_task=5, size=16)
    pairs = scan_pairs(data)
    renders = []

    def fake_training(factory, pair_images: PairImages, **kwargs):
        return Recorder(frozenset(row["clean"] for row in pair_images.rows))

    original_render = render_module.render_medium

    def spy_render(model, rows, *args, **kwargs):
        renders.append((model.trained_on, {row["clean"] for row in rows}))
        return original_render(model, rows, *args, **kwargs)

    monkeypatch.setattr(render_module, "train_fold_restorer", fake_training)
    monkeypatch.setattr(render_module, "render_medium", spy_render)
    build_triplets(Recorder, pairs, data, tmp_path / "out", k=2, progress=False)
    everything = {pair["clean"] for pair in pairs}
    assert len(renders) == 2
    for trained_on, rendered in renders:
        assert rendered and trained_on and not trained_on & rendered  # never its own training images
        assert trained_on | rendered == everything  # and it trained on all the others
    assert set().union(*(rendered for _, rendered in renders)) == everything


def offset_triplets(count: int = 4) -> TensorTriplets:
    """low = a ramp, medium = low + 0.25, high = low + 0.5: any crop or flip not shared breaks the offsets."""
    ramp = torch.arange(20 * 24, dtype=torch.float32).reshape(1, 20, 24) / (2 * 20 * 24)  # in [0, 0.5)
    low = torch.stack([(ramp + 0.01 * index).expand(3, -1, -1) for index in range(count)]) * 0.9
    return TensorTriplets(low, low + 0.25, low + 0.5, ["a", "b"] * (count // 2))


def test_prompt_batches_crop_and_flip_the_three_images_alike():
    triplets = offset_triplets()
    batches = _StepBatches(triplets, triplets.tasks, batch_size=4, crop_size=8, seed=0, balanced=True)
    flipped = set()
    for step in range(12):
        images, labels = batches[step]
        low, medium, high = images.chunk(3)
        assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
        torch.testing.assert_close(medium - low, torch.full_like(low, 0.25))
        torch.testing.assert_close(high - low, torch.full_like(low, 0.5))
        column = low[:, 0, :, 0]  # the ramp grows downwards (and left to right unless flipped)
        flipped.update(bool(flip) for flip in (low[:, 0, 0, 0] > low[:, 0, 0, -1]).tolist())
        assert torch.all(column[:, 1:] > column[:, :-1])  # never flipped upside down (horizontal flips only)
    assert flipped == {True, False}


def test_fold_restorer_crops_cut_degraded_and_clean_alike(tmp_path):
    data = tmp_path / "data"
    write_pair_folder(data, n_per_task=2, size=24)
    pairs = PairImages(scan_pairs(data), data)

    class Offset(PairImages):
        def __getitem__(self, index):
            clean = super().__getitem__(index)["clean"] * 0.5
            return {"degraded": clean + 0.25, "clean": clean, "task": "t"}

    offset = Offset(pairs.rows, data)
    generator = torch.Generator().manual_seed(0)
    seen_flips = set()
    for _ in range(10):
        degraded, clean = render_module._random_crops(offset, [0, 1, 2, 3], 12, generator)
        torch.testing.assert_close(degraded - clean, torch.full_like(clean, 0.25))
        originals = [offset[i]["clean"] for i in range(4)]
        for crop, whole in zip(clean, originals):
            matches = [(dims, y, x) for dims in ((), (-1,), (-2,), (-1, -2)) for y in range(13) for x in range(13)
                       if torch.equal(crop.flip(dims) if dims else crop, whole[:, y:y + 12, x:x + 12])]
            assert matches
            seen_flips.add(matches[0][0])
    assert len(seen_flips) > 1
