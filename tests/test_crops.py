"""Crop geometry: the field's augmentation conventions mapped onto CropFlip, checked against the upstream NumPy
operations (written here from their definitions); small-image padding against np.pad, the authors' resize
against PIL; the collate-friendly encoding; paired_crops."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from perceive_components.data import (CropFlip, PairedCrops, centre_crop_to_multiple, crop_flip, fit_image, fit_size,
                                      pad_to, paired_crops, resize_bicubic_8bit)


def hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy()


def dihedral_reference(patch: np.ndarray, mode: int) -> np.ndarray:
    """``data_augmentation(image, mode)`` of AirNet / PromptIR / AdaIR / Restormer (utils/image_utils.py,
    basicsr/data/transforms.py) on an (H, W, C) patch."""
    if mode == 0:
        return patch
    if mode == 1:
        return np.flipud(patch)
    if mode == 2:
        return np.rot90(patch)
    if mode == 3:
        return np.flipud(np.rot90(patch))
    if mode == 4:
        return np.rot90(patch, k=2)
    if mode == 5:
        return np.flipud(np.rot90(patch, k=2))
    if mode == 6:
        return np.rot90(patch, k=3)
    return np.flipud(np.rot90(patch, k=3))


def basicsr_reference(patch: np.ndarray, hflip: bool, vflip: bool, rot90: bool) -> np.ndarray:
    """BasicSR ``augment``'s ``_augment``: cv2.flip(img, 1) (left-right), cv2.flip(img, 0) (up-down), then
    ``img.transpose(1, 0, 2)``."""
    if hflip:
        patch = patch[:, ::-1]
    if vflip:
        patch = patch[::-1]
    if rot90:
        patch = patch.transpose(1, 0, 2)
    return patch


def crop_img_reference(image: np.ndarray, base: int) -> np.ndarray:
    """PromptIR / AirNet / AdaIR ``crop_img(image, base)``."""
    h, w = image.shape[:2]
    crop_h, crop_w = h % base, w % base
    return image[crop_h // 2 : h - crop_h + crop_h // 2, crop_w // 2 : w - crop_w + crop_w // 2, :]


def rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", range(8))
def test_dihedral_modes_match_data_augmentation(mode):
    image = rand(3, 13, 17)
    crop = CropFlip.from_dihedral_mode((2, 3, 8, 8), mode)
    expected = dihedral_reference(hwc(image)[2:10, 3:11], mode)
    assert np.array_equal(hwc(crop.apply(image)), expected)
    rectangular = CropFlip.from_dihedral_mode((1, 2, 6, 9), mode)  # non-square: turns swap the output sides
    expected = dihedral_reference(hwc(image)[1:7, 2:11], mode)
    assert np.array_equal(hwc(rectangular.apply(image)), expected)
    assert rectangular.output_size() == expected.shape[:2]


@pytest.mark.parametrize("flags", [(h, v, t) for h in (False, True) for v in (False, True) for t in (False, True)])
def test_basicsr_augment_flags_match_augment(flags):
    image = rand(3, 12, 15, seed=1)
    crop = CropFlip.from_basicsr((3, 4, 7, 9), *flags)
    assert np.array_equal(hwc(crop.apply(image)), basicsr_reference(hwc(image)[3:10, 4:13], *flags))


def test_convention_constructors_reject_bad_values():
    with pytest.raises(ValueError, match="mode must be an integer 0..7"):
        CropFlip.from_dihedral_mode((0, 0, 4, 4), 8)
    with pytest.raises(ValueError, match="mode must be an integer 0..7"):
        CropFlip.from_dihedral_mode((0, 0, 4, 4), True)
    with pytest.raises(ValueError, match="base must be a positive integer"):
        centre_crop_to_multiple(20, 20, 0)
    with pytest.raises(ValueError, match="no side of a multiple"):
        centre_crop_to_multiple(15, 40, 16)


@pytest.mark.parametrize("size", [(37, 50), (35, 48), (32, 33), (47, 63)])  # odd and even remainders
def test_promptir_crop_img_offset_then_random_crop_and_mode(size):
    """PromptIR's pipeline: crop_img(base=16) → random crop at (ind_H, ind_W) → data_augmentation(mode)."""
    image = rand(3, *size, seed=2)
    top, left, kept_h, kept_w = centre_crop_to_multiple(*size, base=16)
    reference = crop_img_reference(hwc(image), 16)
    assert reference.shape[:2] == (kept_h, kept_w)
    assert np.array_equal(hwc(image)[top : top + kept_h, left : left + kept_w], reference)
    ind_h, ind_w, patch = kept_h - 16, kept_w - 16, 16  # the last position: the offset must be exact
    crop = CropFlip.from_dihedral_mode((top + ind_h, left + ind_w, patch, patch), 3, image_size=size)
    expected = dihedral_reference(reference[ind_h : ind_h + patch, ind_w : ind_w + patch], 3)
    assert np.array_equal(hwc(crop.apply(image)), expected)


@pytest.mark.parametrize("mode,numpy_mode", [("reflect", "reflect"), ("symmetric", "symmetric"), ("edge", "edge"),
                                             ("zeros", "constant")])
@pytest.mark.parametrize("extra", [(3, 2), (9, 14)])  # pads shorter and longer than the image
def test_padding_matches_numpy(mode, numpy_mode, extra):
    image = rand(3, 5, 7, seed=3)
    out = pad_to(image, (5 + extra[0], 7 + extra[1]), mode)
    assert np.array_equal(hwc(out), np.pad(hwc(image), ((0, extra[0]), (0, extra[1]), (0, 0)), mode=numpy_mode))


def test_fit_size_is_the_authors_rule():
    assert fit_size((180, 180), (256, 256)) == (256, 256)           # BSD400 for 256² crops
    assert fit_size((24, 28), (32, 32)) == (32, 37)                 # short side to the crop, round(28·32/24)
    assert fit_size((100, 300), (128, 128)) == (128, 384)
    assert fit_size((300, 400), (256, 256)) == (300, 400)           # holds the crop: unchanged


def test_resize_follows_pil_bicubic_on_8bit_images():
    generator = torch.Generator().manual_seed(4)
    smooth = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 14, generator=generator), size=(45, 40),
                                             mode="bilinear", align_corners=False)[0]
    image = (smooth * 255).round() / 255                              # an 8-bit image
    out = resize_bicubic_8bit(image, (64, 57))
    pixels = (hwc(image) * 255).round().astype(np.uint8)
    expected = np.asarray(Image.fromarray(pixels).resize((57, 64), Image.Resampling.BICUBIC)).astype(np.float64)
    levels = hwc(out).astype(np.float64) * 255
    assert np.abs(levels - levels.round()).max() < 1e-3               # on the 8-bit grid
    difference = np.abs(levels.round() - expected)
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01   # PIL's fixed point: rare ±1
    assert torch.equal(fit_image(image, 32), image)                   # large enough: untouched
    assert fit_image(image, 50).shape == (3, 56, 50)                  # s = 50/40: (round(45·1.25), 50)


def test_geometry_order_resize_pad_crop_flip_turn():
    image = rand(3, 6, 9, seed=5)
    crop = CropFlip(1, 2, 5, 4, hflip=True, vflip=True, rot90=1, resize=(8, 12), image_size=(6, 9))
    resized = resize_bicubic_8bit(image, (8, 12))
    expected = torch.rot90(resized[:, 1:6, 2:6].flip(-1).flip(-2), 1, dims=(-2, -1))
    assert torch.equal(crop.apply(image), expected)
    padded = CropFlip(2, 3, 8, 8, hflip=True, padding="symmetric")
    reference = np.pad(hwc(image), ((0, 4), (0, 2), (0, 0)), mode="symmetric")[2:10, 3:11][:, ::-1]
    assert np.array_equal(hwc(padded.apply(image)), reference)


def test_geometry_checks_name_the_problem():
    image = rand(3, 10, 12)
    with pytest.raises(ValueError, match="drawn for an image of 10×13"):
        CropFlip(0, 0, 4, 4, image_size=(10, 13)).apply(image)
    with pytest.raises(ValueError, match=r"does not fit .* \(set padding="):
        CropFlip(8, 0, 4, 4).apply(image)
    with pytest.raises(ValueError, match="starts outside"):
        CropFlip(10, 0, 4, 4, padding="reflect").apply(image)
    with pytest.raises(ValueError, match="padding must be one of"):
        CropFlip(0, 0, 4, 4, padding="wrap")
    with pytest.raises(ValueError, match="resize must be"):
        CropFlip(0, 0, 4, 4, resize=(0, 5))
    with pytest.raises(ValueError, match="plain boxes only"):
        CropFlip(0, 0, 4, 4, resize=(20, 24)).crop_array(hwc(image))


def test_encoding_round_trips_through_default_collate():
    crops = [CropFlip(1, 2, 3, 4, True, False, 3, "edge", None, (9, 9)),
             CropFlip(0, 5, 3, 4, False, True, 0, None, (30, 40), (20, 27))]
    batch = torch.utils.data.default_collate([{"crop": crop.as_tensor()} for crop in crops])
    assert batch["crop"].shape == (2, 12) and batch["crop"].dtype == torch.int64
    assert CropFlip.from_tensor(batch["crop"]) == crops
    assert CropFlip.from_tensor(crops[1].as_tensor()) == crops[1]
    with pytest.raises(ValueError, match=r"shape \(12,\) or \(B, 12\)"):
        CropFlip.from_tensor(torch.zeros(11, dtype=torch.int64))


def test_paired_crops_align_target_and_take_the_positive_from_the_same_image():
    degraded, clean = rand(3, 40, 50, seed=6), rand(3, 40, 50, seed=7)
    crops = paired_crops(degraded, clean, 16, generator=torch.Generator().manual_seed(0), rotations=True)
    assert isinstance(crops, PairedCrops) and crops.degraded.shape == crops.positive.shape == (3, 16, 16)
    assert torch.equal(crops.degraded, crops.crop.apply(degraded))
    assert torch.equal(crops.target, crops.crop.apply(clean))
    assert torch.equal(crops.positive, crops.positive_crop.apply(degraded))
    assert crops.crop.image_size == (40, 50) and crops.crop.resize is None and crops.crop.padding is None
    again = paired_crops(degraded, clean, 16, generator=torch.Generator().manual_seed(0), rotations=True)
    assert again.crop == crops.crop and again.positive_crop == crops.positive_crop   # a pure function of the seed
    batch = paired_crops(torch.stack([degraded, clean]), torch.stack([clean, degraded]), 16, positive=False,
                         generator=torch.Generator().manual_seed(1))
    assert batch.positive is None and torch.equal(batch.degraded[1], batch.crop.apply(clean))


@pytest.mark.parametrize("small_image", ["resize", "reflect", "symmetric", "edge", "zeros"])
def test_paired_crops_of_a_small_image(small_image):
    degraded, clean = rand(3, 12, 20, seed=8), rand(3, 12, 20, seed=9)
    crops = paired_crops(degraded, clean, 16, generator=torch.Generator().manual_seed(2), small_image=small_image)
    crop = crops.crop
    assert crops.degraded.shape == (3, 16, 16) and torch.equal(crops.target, crop.apply(clean))
    if small_image == "resize":
        assert crop.resize == (16, 27) and crop.padding is None       # s = 16/12 → (16, round(26.7))
    else:
        assert crop.resize is None and crop.padding == small_image and crop.top == 0


def test_paired_crops_reject_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        paired_crops(rand(3, 20, 20), rand(3, 20, 21), 8)
    with pytest.raises(ValueError, match="degraded must be a floating tensor"):
        paired_crops(torch.zeros(3, 20, 20, dtype=torch.uint8), rand(3, 20, 20), 8)
    with pytest.raises(ValueError, match="small_image must be one of"):
        paired_crops(rand(3, 20, 20), rand(3, 20, 20), 8, small_image="wrap")


def test_crop_flip_shorthand_pads_by_reflection_and_cuts_batches():
    image = rand(3, 10, 12)
    out = crop_flip(image, (0, 0, 16, 16), (True, False))
    reference = np.pad(hwc(image), ((0, 6), (0, 4), (0, 0)), mode="reflect")[:, ::-1]
    assert np.array_equal(hwc(out), reference)
    batch = rand(2, 3, 20, 20)
    box, flip = (2, 3, 8, 8), (False, True)
    assert torch.equal(crop_flip(batch, box, flip)[1], crop_flip(batch[1], box, flip))
    with pytest.raises(ValueError, match="box must be"):
        crop_flip(image, (0, 0, 0, 4), (False, False))
