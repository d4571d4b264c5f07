"""The paper's noisy test inputs (perceive_components.data.noisy_test_sets) against the protocol written out here:
3-task — crop to multiples of 16, one RandomState(0) over the sorted images σ 15 → 25 → 50, truncation to uint8;
5-task — torch generator seeded 3407 + index, no crop, truncation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from perceive_components.data.noisy_test_sets import noisy_test_images, write_noisy_test_sets


def _clean(count: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.integers(0, 256, (37 + 5 * i, 50 - 3 * i, 3), dtype=np.uint8) for i in range(count)]


def test_three_task_noise_is_adair_order_cropped_and_truncated():
    clean = _clean()
    sets = noisy_test_images(clean, "3task")
    assert list(sets) == [15, 25, 50]
    rng = np.random.RandomState(0)
    for sigma in (15, 25, 50):
        targets, noisy = sets[sigma]
        for image, target, got in zip(clean, targets, noisy):
            h, w = image.shape[0] // 16 * 16, image.shape[1] // 16 * 16
            top, left = (image.shape[0] - h) // 2, (image.shape[1] - w) // 2
            expected_target = image[top:top + h, left:left + w]
            assert np.array_equal(target, expected_target)
            values = expected_target.astype(np.float64) + rng.randn(h, w, 3) * sigma
            assert np.array_equal(got, np.floor(np.clip(values, 0, 255)).astype(np.uint8))  # truncation
    # truncation, not rounding, is what makes these files: some pixel must differ from the rounded version
    targets, noisy = sets[50]
    again = np.random.RandomState(0)
    for _ in range(2):  # skip σ 15 and 25
        for t in targets:
            again.randn(*t.shape)
    rounded = np.clip(np.rint(targets[0] + again.randn(*targets[0].shape) * 50), 0, 255).astype(np.uint8)
    assert not np.array_equal(rounded, noisy[0])


def test_five_task_noise_is_seeded_per_image_without_crop():
    clean = _clean(2)
    targets, noisy = noisy_test_images(clean, "5task")[25]
    for index, (image, got) in enumerate(zip(clean, noisy)):
        assert targets[index] is image and got.shape == image.shape
        x = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
        n = torch.randn(x.shape, generator=torch.Generator().manual_seed(3407 + index))
        expected = (x * 255.0 + 25 * n).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        assert np.array_equal(got, expected)


def test_written_sets_hold_exactly_those_pixels(tmp_path):
    clean = _clean()
    for index, image in enumerate(clean):
        Image.fromarray(image).save(tmp_path / f"b{index}.png")
    folders = write_noisy_test_sets(tmp_path, tmp_path / "out", "3task")
    assert [f.name for f in folders] == ["CBSD68-sigma15", "CBSD68-sigma25", "CBSD68-sigma50"]
    sets = noisy_test_images(clean, "3task")
    for folder, sigma in zip(folders, (15, 25, 50)):
        for index in range(3):
            with Image.open(folder / "degraded" / f"b{index}.png") as image:
                assert np.array_equal(np.asarray(image), sets[sigma][1][index])
    with pytest.raises(ValueError, match="uint8"):
        noisy_test_images([clean[0].astype(np.float32)])
    with pytest.raises(ValueError, match="protocol"):
        noisy_test_images(clean, "7task")
