"""Standard 3-task/5-task data layouts, synthetic noise, task resampling, crop geometry records and positives."""
from __future__ import annotations

import pytest
import torch

from data_factory import make_layout
from perceive_components.data import CropFlip, fit_image
from perceive_components.data.layouts import (DEFAULT_REPEATS, TASK_LABELS, AllInOneTrainSet, fixed_noisy,
                                              standard_test_sets)
from perceive_components.data.pairing import LayoutError
from perceive_components.ops.io import read_image


@pytest.fixture(scope="module")
def five_task_root(tmp_path_factory):
    return make_layout(tmp_path_factory.mktemp("allinone"), tasks=("noise", "haze", "rain", "blur", "lowlight"))


def draw(dataset, index, seed=0):
    return dataset.sample(index, torch.Generator().manual_seed(seed))


def test_resampling_factors_set_the_epoch_composition(five_task_root):
    three = AllInOneTrainSet(five_task_root, "3task", crop_size=16)
    assert three.counts() == {"noise": (3, 36), "haze": (2, 2), "rain": (2, 720)}  # 12 / 1 / 360
    five = AllInOneTrainSet(five_task_root, "5task", crop_size=16, repeats={"rain": 2})
    assert five.counts() == {"noise": (3, 36), "haze": (2, 2), "rain": (2, 4), "blur": (1, 30), "lowlight": (1, 140)}
    assert len(five) == 36 + 2 + 4 + 30 + 140
    tasks = [five.locate(i).task for i in range(len(five))]
    assert [tasks.count(t) for t in ("noise", "haze", "rain", "blur", "lowlight")] == [36, 2, 4, 30, 140]
    assert DEFAULT_REPEATS == {"noise": 12, "haze": 1, "rain": 360, "blur": 30, "lowlight": 140}
    with pytest.raises(ValueError, match="not in this layout"):
        AllInOneTrainSet(five_task_root, "3task", repeats={"blur": 3})
    with pytest.raises(ValueError, match=r"repeats\['rain'\] must be a positive integer"):
        AllInOneTrainSet(five_task_root, "3task", repeats={"rain": 0})
    with pytest.raises(ValueError, match="layout must be one of"):
        AllInOneTrainSet(five_task_root, "7task")
    with pytest.raises(ValueError, match="crop_size must be a positive integer"):
        AllInOneTrainSet(five_task_root, crop_size=0)


def test_items_are_aligned_crops_with_records_that_recut_the_source(five_task_root):
    dataset = AllInOneTrainSet(five_task_root, "5task", crop_size=16)
    for index in (36, len(dataset) - 1, 40, 38 + 30):  # haze, low light, rain, blur
        item = draw(dataset, index, seed=index)
        pair = dataset.locate(index)
        assert item["task"] == TASK_LABELS[pair.task] and item["sigma"] == 0
        assert item["path"] == pair.key and (five_task_root / "train" / item["path"]).is_file()
        source, clean = read_image(pair.degraded), read_image(pair.clean)
        crop, positive_crop = CropFlip.from_tensor(item["crop"]), CropFlip.from_tensor(item["positive_crop"])
        assert torch.equal(item["degraded"], crop.apply(source)) and crop.image_size == (24, 28)
        assert torch.equal(item["target"], crop.apply(clean))
        assert torch.equal(item["positive"], positive_crop.apply(source))
        assert torch.equal(dataset.degraded_image(item["path"]), source)  # what a render cache would render
    assert draw(dataset, 36)["path"] == "haze/hazy/0001_0.8_0.2.png" and dataset.locate(36).clean.name == "0001.png"
    assert draw(dataset, 37)["path"] == "haze/hazy/part2/0002_0.9_0.1.png" and dataset.locate(37).clean.name == "0002.png"
    batch = torch.utils.data.default_collate([draw(dataset, 36, s) for s in range(3)])
    assert batch["degraded"].shape == (3, 3, 16, 16) and batch["crop"].shape == (3, 12)
    assert [c.image_size for c in CropFlip.from_tensor(batch["crop"])] == [(24, 28)] * 3


def test_sigma_is_the_entrys_as_in_the_authors_epoch(five_task_root):
    dataset = AllInOneTrainSet(five_task_root, "3task", crop_size=8)   # 3 noise images, repeat 12, 3 σ's
    per_image = {}
    for index in range(dataset.counts()["noise"][1]):
        item = draw(dataset, index, seed=index)
        per_image.setdefault(dataset.locate(index).key, []).append(item["sigma"])
        assert item["path"] == f"noise/sigma{item['sigma']}/{dataset.locate(index).key.rsplit('/', 1)[1]}"
    assert len(per_image) == 3
    assert all(sorted(sigmas) == [15] * 4 + [25] * 4 + [50] * 4 for sigmas in per_image.values())  # 12 = 4 × 3
    assert draw(dataset, 5, seed=0)["sigma"] == draw(dataset, 5, seed=1)["sigma"]                 # not drawn
    odd = AllInOneTrainSet(five_task_root, "3task", crop_size=8, repeats={"noise": 1})             # σ's rotate
    assert sorted(draw(odd, index)["sigma"] for index in range(3)) == [15, 25, 50]
    per_draw = AllInOneTrainSet(five_task_root, "3task", crop_size=8, sigma_draw="per_draw")
    assert {draw(per_draw, 0, seed)["sigma"] for seed in range(30)} == {15, 25, 50}
    with pytest.raises(ValueError, match="sigma_draw must be one of"):
        AllInOneTrainSet(five_task_root, "3task", sigma_draw="random")


def test_synthetic_noise_is_one_task_and_the_positive_sees_the_same_realisation(five_task_root):
    dataset = AllInOneTrainSet(five_task_root, "3task", crop_size=24, flips=False)  # crop = whole 24×28 height
    labels, same_crops = set(), 0
    for seed in range(30):
        item = draw(dataset, seed % 9, seed)
        labels.add(item["task"])
        crop, positive_crop = CropFlip.from_tensor(item["crop"]), CropFlip.from_tensor(item["positive_crop"])
        residual = item["degraded"] - item["target"]
        if crop.left == positive_crop.left:  # both crops cover the same pixels: the same noisy values
            assert torch.equal(item["degraded"], item["positive"])
            same_crops += 1
        else:
            shift = positive_crop.left - crop.left  # overlapping columns agree too
            left, right = (item["degraded"], item["positive"]) if shift > 0 else (item["positive"], item["degraded"])
            assert torch.equal(left[..., abs(shift):], right[..., : 24 - abs(shift)])
        assert residual.abs().max() <= item["sigma"] / 255 * 6
    assert labels == {TASK_LABELS["noise"]} and same_crops > 0
    # a draw is a pure function of its seed (exact resume); another seed gives other noise
    assert torch.equal(draw(dataset, 0, 7)["degraded"], draw(dataset, 0, 7)["degraded"])
    assert not torch.equal(draw(dataset, 0, 7)["degraded"], draw(dataset, 0, 8)["degraded"])


def test_small_images_are_resized_like_the_authors_before_the_noise(five_task_root):
    dataset = AllInOneTrainSet(five_task_root, "3task", crop_size=32, noise_seed=3)   # images are 24×28
    noisy = draw(dataset, 0)
    crop = CropFlip.from_tensor(noisy["crop"])
    assert crop.image_size == (32, 37) and crop.resize is None        # the noise was made on the resized image
    clean = fit_image(read_image(dataset.locate(0).clean), 32)
    assert torch.equal(noisy["target"], crop.apply(clean))
    assert torch.equal(noisy["degraded"], crop.apply(dataset.degraded_image(noisy["path"])))
    rain = draw(dataset, len(dataset) - 1)
    crop = CropFlip.from_tensor(rain["crop"])
    assert crop.image_size == (24, 28) and crop.resize == (32, 37)    # a file: resized inside the geometry
    assert torch.equal(rain["degraded"], crop.apply(read_image(dataset.locate(len(dataset) - 1).degraded)))
    padded = AllInOneTrainSet(five_task_root, "3task", crop_size=32, small_image="symmetric")
    crop = CropFlip.from_tensor(draw(padded, len(padded) - 1)["crop"])
    assert crop.resize is None and crop.padding == "symmetric" and crop.image_size == (24, 28)


def test_noise_statistics_match_sigma():
    clean = torch.full((3, 64, 64), 0.5)
    for sigma in (15, 25, 50):
        noisy = fixed_noisy(clean, "noise/sigma/x.png", sigma, noise_seed=0)
        assert (noisy - clean).std().item() == pytest.approx(sigma / 255, rel=0.08)


def test_fixed_noise_makes_noisy_images_cacheable(five_task_root):
    fresh = AllInOneTrainSet(five_task_root, "3task", crop_size=8)
    assert all(not key.startswith("noise") for key in fresh.cache_keys())
    with pytest.raises(ValueError, match="noise_seed"):
        fresh.degraded_image("noise/sigma25/img0.png")
    fixed = AllInOneTrainSet(five_task_root, "3task", crop_size=8, noise_seed=5)
    assert len(fixed.cache_keys()) == 3 * 3 + 2 + 2
    item = draw(fixed, 1, seed=3)
    full = fixed.degraded_image(item["path"])
    assert torch.equal(item["degraded"], CropFlip.from_tensor(item["crop"]).apply(full))


def test_test_sets_follow_spec_names(five_task_root):
    three = standard_test_sets(five_task_root, "3task")
    assert list(three) == ["CBSD68_s15", "CBSD68_s25", "CBSD68_s50", "SOTS", "Rain100L"]
    five = standard_test_sets(five_task_root, "5task")
    assert list(five) == ["CBSD68_s25", "SOTS", "Rain100L", "GoPro", "LOL"]
    noisy = three["CBSD68_s25"][0]
    assert torch.equal(noisy["degraded"], three["CBSD68_s25"][0]["degraded"])  # fixed realisation
    assert noisy["degraded"].shape == noisy["target"].shape == (3, 24, 28)


def test_missing_pieces_are_all_listed(tmp_path, five_task_root):
    with pytest.raises(LayoutError) as info:
        AllInOneTrainSet(tmp_path / "nothing", "5task")
    message = str(info.value)
    for folder in ("noise/clean/", "haze/hazy/", "haze/clean/", "rain/rainy/", "rain/clean/", "blur/blurry/",
                   "blur/sharp/", "lowlight/low/", "lowlight/high/"):
        assert f"missing folder {folder}" in message
    assert "BSD400 + WED" in message and "RESIDE OTS" in message and "docs/data.md" in message

    partial = make_layout(tmp_path / "partial", tasks=("noise", "haze", "rain"), splits=("train",))
    (partial / "train" / "rain" / "clean" / "norain-2.png").unlink()
    (partial / "train" / "haze" / "hazy" / "0001_0.8_0.2.png").unlink()
    (partial / "train" / "haze" / "hazy" / "part2" / "0002_0.9_0.1.png").unlink()
    with pytest.raises(LayoutError) as info:
        AllInOneTrainSet(partial, "5task")
    message = str(info.value)
    assert "rain: 1 of 2 images in rain/rainy/ have no clean partner in rain/clean/: rain-2.png" in message
    assert "haze: folder haze/hazy/ holds no images" in message
    assert "missing folder blur/blurry/" in message and "noise" not in message.split("expected")[0]
    with pytest.raises(LayoutError, match="(?s)test data .* missing folder noise/clean/"):
        standard_test_sets(partial, "3task")
    assert isinstance(info.value, ValueError)
