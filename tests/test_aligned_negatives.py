"""The render cache reads negatives aligned with every crop geometry a user pipeline produces.

An identity "proxy" rendered into a cache (npy and png) and read back with the sample's ``CropFlip`` must equal
the degraded crop exactly: for all 8 dihedral modes, BasicSR's augment flags, an odd-sized image with PromptIR's
``crop_img`` offset, and an image smaller than the crop under the authors' resize and each padding convention
(the padded crops themselves checked against NumPy's ``reflect`` / ``symmetric`` / ``edge`` / ``constant``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from perceive_components.data import CropFlip, centre_crop_to_multiple, paired_crops
from perceive_components.negatives import RenderCache, items_from_folder
from perceive_components.ops.io import read_image, write_image

SIZES = {"large.png": (40, 52), "odd.png": (37, 45), "small.png": (12, 20)}
NUMPY_MODES = {"reflect": "reflect", "symmetric": "symmetric", "edge": "edge", "zeros": "constant"}


@pytest.fixture(scope="module", params=["png", "npy"])
def cache(request, tmp_path_factory):
    """Degraded 8-bit images of three sizes, rendered by an identity proxy through 16² tiles."""
    root = tmp_path_factory.mktemp(f"aligned-{request.param}")
    for index, (name, (height, width)) in enumerate(SIZES.items()):
        write_image(root / "data" / name, torch.rand(3, height, width, generator=torch.Generator().manual_seed(index)))
    store = RenderCache(root / "cache", create=True, file_format=request.param)
    store.render("identity", nn.Identity(), items_from_folder(root / "data", task="rain"), tile=16, overlap=4,
                 progress=False)
    return store, root / "data"


def read_back(cache, name: str, crop: CropFlip) -> tuple[torch.Tensor, torch.Tensor]:
    store, data = cache
    negatives, valid = store.read(name, "rain", crop)
    assert valid.tolist() == [True]
    return negatives[0], read_image(data / name)


def hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("mode", range(8))
def test_dihedral_modes(cache, mode):
    crop = CropFlip.from_dihedral_mode((5, 7, 16, 24), mode, image_size=SIZES["large.png"])
    negative, degraded = read_back(cache, "large.png", crop)
    assert torch.equal(negative, crop.apply(degraded))
    patch = hwc(degraded)[5:21, 7:31]
    expected = np.rot90(patch, mode // 2)
    assert np.array_equal(hwc(negative), np.flipud(expected) if mode % 2 else expected)


@pytest.mark.parametrize("flags", [(h, v, t) for h in (False, True) for v in (False, True) for t in (False, True)])
def test_basicsr_flags(cache, flags):
    crop = CropFlip.from_basicsr((3, 2, 20, 12), *flags)
    negative, degraded = read_back(cache, "large.png", crop)
    assert torch.equal(negative, crop.apply(degraded))
    patch = hwc(degraded)[3:23, 2:14]
    patch = patch[:, ::-1] if flags[0] else patch
    patch = patch[::-1] if flags[1] else patch
    assert np.array_equal(hwc(negative), patch.transpose(1, 0, 2) if flags[2] else patch)


def test_odd_sized_image_with_a_crop_offset(cache):
    top, left, kept_h, kept_w = centre_crop_to_multiple(*SIZES["odd.png"], base=16)     # 37×45 → 32×32 at (2, 6)
    assert (top, left, kept_h, kept_w) == (2, 6, 32, 32)
    crop = CropFlip.from_dihedral_mode((top + 13, left + 16, 16, 16), 7, image_size=SIZES["odd.png"])
    negative, degraded = read_back(cache, "odd.png", crop)
    assert torch.equal(negative, crop.apply(degraded))
    patch = hwc(degraded)[top + 13 : top + 29, left + 16 : left + 32]
    assert np.array_equal(hwc(negative), np.flipud(np.rot90(patch, 3)))


@pytest.mark.parametrize("small_image", ["resize", "reflect", "symmetric", "edge", "zeros"])
def test_image_smaller_than_the_crop(cache, small_image):
    _, data = cache
    degraded = read_image(data / "small.png")
    for seed in range(3):
        crops = paired_crops(degraded, degraded.clone(), 16, generator=torch.Generator().manual_seed(seed),
                             small_image=small_image)
        negative, _ = read_back(cache, "small.png", crops.crop)
        assert torch.equal(negative, crops.degraded)
        positive, _ = read_back(cache, "small.png", crops.positive_crop)
        assert torch.equal(positive, crops.positive)
        if small_image != "resize":
            crop = crops.crop
            padded = np.pad(hwc(degraded), ((0, 4), (0, 0), (0, 0)), mode=NUMPY_MODES[small_image])
            patch = padded[crop.top : crop.top + 16, crop.left : crop.left + 16]
            patch = patch[:, ::-1] if crop.hflip else patch
            assert np.array_equal(hwc(crops.degraded), patch[::-1] if crop.vflip else patch)
