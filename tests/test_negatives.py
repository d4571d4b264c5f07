"""Proxy negatives: online proxies (task masks, frozen, no grad), the render cache (tiled, resumable,
atomic, aligned read-back with crops and flips, validity, input fingerprints, clear errors), the batch helpers
(merge, K = 0), folder-per-task items, the shared task vocabulary and the ``cache`` CLI."""
from __future__ import annotations

import argparse
import json
import sys

import pytest
import torch
from torch import nn

from perceive_components.data import STANDARD_TASKS, TaskVocabulary
from perceive_components.losses import DifficultyAdaptivePerceptualLoss
from perceive_components.negatives import (
    CacheItem,
    CropFlip,
    ProxyNegatives,
    RenderCache,
    items_from_folder,
    items_from_manifest,
    items_from_task_folders,
    merge_negatives,
    model_fingerprint,
    no_negatives,
    task_folder_key,
)
from perceive_components.negatives.cli import register
from perceive_components.ops.io import read_image, write_image
from perceive_components.ops.metrics import quantize_8bit

QUANT = 0.5 / 255 + 1e-6  # 8-bit files: at most half a level of rounding



class Pointwise(nn.Module):
    """A per-pixel "restorer" (1×1 conv + sigmoid): commutes with crops, flips and tiling."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.mix = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return torch.sigmoid(self.mix(x))


class Counting(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.rows = inner, []

    def forward(self, x):
        self.rows.append(x.shape[0])
        return self.inner(x)


def rand_images(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- CropFlip
def test_cropflip_apply_matches_manual_slicing_and_is_reproducible():
    image = rand_images(3, 10, 14)
    crop = CropFlip(2, 3, 6, 8, hflip=True, vflip=True, rot90=1)
    expected = torch.rot90(image[:, 2:8, 3:11].flip(-1).flip(-2), 1, dims=(-2, -1))
    assert torch.equal(crop.apply(image), expected)
    assert crop.output_size() == (8, 6) == tuple(expected.shape[-2:])
    draws = [CropFlip.random((10, 14), 6, rotations=True, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert draws[0] == draws[1]
    draws[0].check((10, 14))
    with pytest.raises(ValueError, match="does not fit"):
        CropFlip(6, 0, 6, 6).apply(image)
    with pytest.raises(ValueError, match="rot90"):
        CropFlip(0, 0, 2, 2, rot90=5)
    with pytest.raises(ValueError, match="crop_size"):
        CropFlip.random((4, 4), 6)


# ----------------------------------------------------------------------------------------------- online proxies
def test_proxies_run_only_on_covered_samples_frozen_and_without_grad():
    a, b = Counting(Pointwise(1)), Counting(Pointwise(2))
    proxies = ProxyNegatives({"derain": a, "all": b}, tasks={"derain": [2]})
    assert list(proxies.parameters()) == [] and list(proxies.state_dict()) == []
    degraded = rand_images(4, 3, 8, 8).requires_grad_()
    labels = torch.tensor([2, 0, 2, 1])
    negatives, mask = proxies(degraded, labels)
    assert negatives.shape == (4, 2, 3, 8, 8) and not negatives.requires_grad
    assert mask.tolist() == [[True, True], [False, True], [True, True], [False, True]]
    assert a.rows == [2] and b.rows == [4]                 # each proxy saw only the samples it covers
    with torch.no_grad():
        torch.testing.assert_close(negatives[[0, 2], 0], a.inner(degraded[[0, 2]]))
        torch.testing.assert_close(negatives[:, 1], b.inner(degraded))
    assert negatives[[1, 3], 0].abs().sum() == 0
    # an explicit mask (e.g. fold models) replaces the task rule; an all-False column costs nothing
    explicit = torch.tensor([[False, True], [False, False], [False, True], [False, False]])
    _, mask = proxies(degraded, mask=explicit)
    assert mask.tolist() == explicit.tolist() and a.rows == [2] and b.rows == [4, 2]
    proxies.train()
    assert not a.training and not b.training
    proxies.double()
    assert a.inner.mix.weight.dtype == torch.float64


def test_proxy_padding_autocast_and_errors():
    class NeedsMultipleOf8(nn.Module):
        def forward(self, x):
            assert x.shape[-2] % 8 == 0 and x.shape[-1] % 8 == 0
            return nn.functional.pixel_shuffle(nn.functional.pixel_unshuffle(x, 8), 8) * 0.5

    degraded = rand_images(2, 3, 12, 20)
    negatives, _ = ProxyNegatives({"pad": NeedsMultipleOf8()}, multiple=8)(degraded)
    torch.testing.assert_close(negatives[:, 0], degraded * 0.5)
    full, _ = ProxyNegatives({"p": Pointwise()}, autocast_dtype=None)(degraded)
    half, _ = ProxyNegatives({"p": Pointwise()}, autocast_dtype=torch.bfloat16)(degraded)
    assert half.dtype == torch.float32 and (half - full).abs().max() < 0.02
    with pytest.raises(ValueError, match="proxy 'shrink' must return"):
        ProxyNegatives({"shrink": nn.AvgPool2d(2)})(degraded)
    with pytest.raises(ValueError, match="tasks names proxies that do not exist"):
        ProxyNegatives({"p": Pointwise()}, tasks={"q": [0]})
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        ProxyNegatives({"p": Pointwise()})(degraded, mask=torch.ones(2, 1))
    with pytest.raises(ValueError, match="labels must be integer task ids"):
        ProxyNegatives({"p": Pointwise()}, tasks={"p": [0]})(degraded, torch.zeros(2))


# ----------------------------------------------------------------------------------------------- render cache
@pytest.fixture()
def dataset(tmp_path):
    """Three degraded images of different sizes, two tasks, two folds, and a JSONL manifest."""
    root = tmp_path / "data"
    rows = [("rain/a.png", "rain", 0, (40, 56)), ("rain/sub/b.png", "rain", 1, (24, 24)),
            ("noise/c.png", "noise", 0, (33, 47))]
    for index, (key, _, _, (h, w)) in enumerate(rows):
        write_image(root / key, rand_images(3, h, w, seed=index))
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps({"input": k, "task": t, "fold": f}) + "\n" for k, t, f, _ in rows) + "\n")
    return root, manifest


def expected_render(model, path):
    from perceive_components.ops.io import read_image

    with torch.no_grad():
        return quantize_8bit(model(read_image(path)[None])[0])


@pytest.mark.parametrize("file_format", ["png", "npy"])
def test_render_then_read_back_aligned_with_crop_and_flips(tmp_path, dataset, file_format):
    root, manifest = dataset
    items = items_from_manifest(manifest, root)
    model = Pointwise(3)
    cache = RenderCache(tmp_path / "cache", create=True, file_format=file_format)
    counts = cache.render("stage1", model, items, tile=16, overlap=4, progress=False)   # tiled: 40×56 → many tiles
    assert counts == {"rendered": 3, "skipped": 0, "not_covered": 0}
    reopened = RenderCache(tmp_path / "cache")
    crop = CropFlip(5, 7, 16, 24, hflip=True, vflip=False, rot90=3)
    negatives, valid = reopened.read("rain/a.png", "rain", crop, image_size=(40, 56))
    assert negatives.shape == (1, 3, 24, 16) and valid.tolist() == [True]
    torch.testing.assert_close(negatives[0], crop.apply(expected_render(model, items[0].path)), atol=1e-6, rtol=0)
    # the same crop of the degraded input through the proxy online gives the same negative
    from perceive_components.ops.io import read_image

    online, _ = ProxyNegatives({"stage1": model})(crop.apply(read_image(items[0].path))[None])
    assert (online[0, 0] - negatives[0]).abs().max() <= QUANT


def test_validity_mask_fold_slots_and_batch_read_feed_the_loss(tmp_path, dataset):
    root, manifest = dataset
    items = items_from_manifest(manifest, root)
    cache = RenderCache(tmp_path / "cache", create=True)
    fold_models = {0: Pointwise(10), 1: Pointwise(11)}
    for fold, model in fold_models.items():             # each fold model renders the fold it never trained on
        cache.render("fold", model, [i for i in items if i.fold == fold], progress=False)
    counts = cache.render("derain", Pointwise(12), items, tasks=["rain"], progress=False)
    assert counts == {"rendered": 2, "skipped": 0, "not_covered": 1}
    assert not cache.entry_path("derain", "noise/c.png").exists()
    assert cache.slots == ["derain", "fold"]
    crop = CropFlip(0, 0, 16, 16)
    negatives, valid = cache.read("noise/c.png", "noise", crop)
    assert valid.tolist() == [False, True] and negatives[0].abs().sum() == 0
    torch.testing.assert_close(negatives[1], crop.apply(expected_render(fold_models[0], items[2].path)))
    _, valid = cache.read("rain/sub/b.png", "rain", crop)
    assert valid.tolist() == [True, True]
    keys, tasks = [i.key for i in items], [i.task for i in items]
    batch_negatives, mask = cache.read_batch(keys, tasks, [CropFlip(1, 2, 16, 16, hflip=True)] * 3)
    assert batch_negatives.shape == (3, 2, 3, 16, 16) and mask.tolist() == [[True, True], [True, True], [False, True]]
    stack = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1), nn.ReLU())
    loss = DifficultyAdaptivePerceptualLoss(stack, taps=("relu1_1", "relu1_2"), layer_weights=(0.5, 1.0))
    restored, gt, degraded = (rand_images(3, 3, 16, 16, seed=s) for s in range(3))
    assert torch.isfinite(loss(restored, gt, degraded, batch_negatives, mask))
    summary = cache.summary()
    assert summary["slots"]["fold"]["entries"] == 3 and len(summary["slots"]["fold"]["fingerprints"]) == 2
    with pytest.raises(ValueError, match="covers tasks"):
        cache.render("derain", Pointwise(12), items, tasks=["noise"], progress=False)


def test_render_is_resumable_and_atomic(tmp_path, dataset):
    root, _ = dataset
    items = items_from_folder(root, task="any")
    assert [i.key for i in items] == ["noise/c.png", "rain/a.png", "rain/sub/b.png"]

    class FailsOnSecond(Pointwise):
        calls = 0

        def forward(self, x):
            FailsOnSecond.calls += 1
            if FailsOnSecond.calls == 2:
                raise RuntimeError("interrupted")
            return super().forward(x)

    cache = RenderCache(tmp_path / "cache", create=True)
    with pytest.raises(RuntimeError, match="interrupted"):
        cache.render("p", FailsOnSecond(), items, tile=None, progress=False)
    first = cache.entry_path("p", "noise/c.png")
    assert first.is_file() and not cache.entry_path("p", "rain/a.png").exists()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".tmp")]   # no partial file
    stamp = first.stat().st_mtime_ns
    assert cache.missing(items) == {"p": ["rain/a.png", "rain/sub/b.png"]}
    counts = cache.render("p", Pointwise(), items, tile=None, progress=False)
    assert counts == {"rendered": 2, "skipped": 1, "not_covered": 0}
    assert first.stat().st_mtime_ns == stamp
    assert cache.missing(items) == {"p": []}


def test_cache_errors_are_clear(tmp_path, dataset):
    root, manifest = dataset
    with pytest.raises(FileNotFoundError, match="no render cache at"):
        RenderCache(tmp_path / "nowhere")
    cache = RenderCache(tmp_path / "cache", create=True)
    items = items_from_manifest(manifest, root)
    cache.render("p", Pointwise(), items, progress=False)
    cache.entry_path("p", "rain/a.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"slot 'p' has no entry for 'rain/a.png'.*perceive-ir cache render"):
        cache.read("rain/a.png", "rain", CropFlip(0, 0, 8, 8))
    with pytest.raises(ValueError, match="stale cache"):
        cache.read("rain/sub/b.png", "rain", CropFlip(0, 0, 8, 8), image_size=(25, 24))
    with pytest.raises(ValueError, match="does not fit in cache entry"):
        cache.read("rain/sub/b.png", "rain", CropFlip(10, 10, 16, 16))
    with pytest.raises(FileNotFoundError, match="has no slot 'q'"):
        cache.read("rain/sub/b.png", "rain", CropFlip(0, 0, 8, 8), slots=["q"])
    with pytest.raises(ValueError, match="slot must be a simple name"):
        cache.render("../x", Pointwise(), items, progress=False)
    with pytest.raises(ValueError, match="keep the image size"):
        cache.render("shrink", nn.AvgPool2d(2), items, tile=None, progress=False)
    (tmp_path / "bad.jsonl").write_text('{"task": "rain"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        items_from_manifest(tmp_path / "bad.jsonl", root)
    assert CacheItem("k", root / "k").task is None


# ----------------------------------------------------------------------------------------------- CLI
PROXY_FILE = '''
import torch
from torch import nn


class Mix(nn.Module):
    def __init__(self, bias=0.0):
        super().__init__()
        self.mix = nn.Conv2d(3, 3, 1)
        nn.init.constant_(self.mix.bias, bias)

    def forward(self, x):
        return torch.sigmoid(self.mix(x))


def build(**kwargs):
    return Mix(**kwargs)
'''


def _cli(argv):
    parser = argparse.ArgumentParser(prog="perceive-ir")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_render_with_checkpoint_and_inspect(tmp_path, dataset, capsys, monkeypatch):
    root, manifest = dataset
    (tmp_path / "myproxies.py").write_text(PROXY_FILE)
    trained = Pointwise(7)
    torch.save({"params": {f"net.{k}": v for k, v in trained.state_dict().items()}}, tmp_path / "proxy.pth")
    cache_dir = tmp_path / "cache"
    common = ["--cache", str(cache_dir), "--input-root", str(root), "--manifest", str(manifest)]
    with pytest.raises(FileNotFoundError):
        _cli(["cache", "inspect", "--cache", str(tmp_path / "nowhere")])
    rc = _cli(["cache", "render", *common, "--slot", "mix", "--model", f"{tmp_path / 'myproxies.py'}:build",
               "--model-kwargs", '{"bias": 0.5}', "--checkpoint", str(tmp_path / "proxy.pth"), "--tasks", "rain",
               "--fold", "0", "--tile", "16", "--overlap", "4", "--device", "cpu", "--format", "npy"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rendered"] == 1 and report["not_covered"] == 1      # fold 0: rain/a (rain) and noise/c (not covered)
    cache = RenderCache(cache_dir)
    assert cache.file_format == "npy"
    negatives, valid = cache.read("rain/a.png", "rain", CropFlip.full(40, 56))
    torch.testing.assert_close(negatives[0], expected_render(trained, root / "rain/a.png"))  # the checkpoint's weights
    assert _cli(["cache", "inspect", *common]) == 1                    # rain/sub/b (fold 1) is still missing
    report = json.loads(capsys.readouterr().out)
    assert report["missing"]["mix"] == {"count": 1, "first": ["rain/sub/b.png"]}
    monkeypatch.chdir(tmp_path)                                          # MODULE:CALLABLE from the working folder
    rc = _cli(["cache", "render", *common, "--slot", "mix", "--model", "myproxies:build", "--checkpoint",
               str(tmp_path / "proxy.pth"), "--fold", "1"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["rendered"] == 1
    assert _cli(["cache", "inspect", *common]) == 0


def test_cli_rejects_a_bad_model_spec(tmp_path, dataset):
    root, _ = dataset
    with pytest.raises(ValueError, match="MODULE:CALLABLE"):
        _cli(["cache", "render", "--cache", str(tmp_path / "c"), "--slot", "s", "--model", "nocolon",
              "--input-root", str(root)])


@pytest.fixture(autouse=True)
def _restore_import_path():
    path = list(sys.path)
    yield
    sys.path[:] = path
    sys.modules.pop("myproxies", None)


# ----------------------------------------------------------------------------------------------- fingerprints
def test_model_fingerprint_handles_batchnorm_counters():
    proxy = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Sigmoid())
    assert proxy.state_dict()["1.num_batches_tracked"].ndim == 0
    before = model_fingerprint(proxy)
    proxy.train()(rand_images(2, 3, 8, 8))                      # updates the running statistics and the counter
    assert len(before) == 16 and model_fingerprint(proxy) != before


def two_rain_sets(tmp_path):
    """Rain100L and Rain100H share file names and sizes; their pixels differ."""
    roots = {}
    for seed, name in enumerate(("Rain100L", "Rain100H")):
        roots[name] = tmp_path / name
        for index in (1, 2):
            write_image(roots[name] / f"rain-00{index}.png", rand_images(3, 20, 24, seed=10 * seed + index))
    return roots


def test_a_cache_of_another_data_set_with_the_same_names_is_refused(tmp_path):
    roots = two_rain_sets(tmp_path)
    light, heavy = (items_from_folder(roots[name], task="rain") for name in ("Rain100L", "Rain100H"))
    assert [i.key for i in light] == [i.key for i in heavy] == ["rain-001.png", "rain-002.png"]
    cache = RenderCache(tmp_path / "cache", create=True)
    cache.render("p", Pointwise(), light, progress=False)
    cache.verify(light)
    with pytest.raises(ValueError, match=r"(?s)slot 'p': 2 stale: rain-001.png, rain-002.png.*--overwrite"):
        cache.verify(heavy)
    stamp = cache.entry_path("p", "rain-001.png").stat().st_mtime_ns
    with pytest.raises(ValueError, match=r"2 existing entries were rendered from other input pixels.*overwrite=True"):
        cache.render("p", Pointwise(), heavy, progress=False)
    assert cache.entry_path("p", "rain-001.png").stat().st_mtime_ns == stamp   # nothing was rendered
    assert cache.render("p", Pointwise(), heavy, overwrite=True, progress=False)["rendered"] == 2
    cache.verify(heavy)
    negatives, _ = cache.read("rain-001.png", "rain", CropFlip.full(20, 24))
    torch.testing.assert_close(negatives[0], expected_render(Pointwise(), heavy[0].path))


def test_verify_lists_missing_and_unverified_entries_and_reads_inputs_given_in_memory(tmp_path, dataset):
    root, manifest = dataset
    items = items_from_manifest(manifest, root)
    cache = RenderCache(tmp_path / "cache", create=True)
    cache.render("p", Pointwise(), items[:2], progress=False)
    with pytest.raises(ValueError, match=r"slot 'p': 1 missing: noise/c.png"):
        cache.verify(items)
    pixels = {item.key: read_image(item.path) for item in items[:2]}
    cache.verify(items[:2], read=lambda item: pixels[item.key])       # e.g. a data set's synthesised inputs
    pixels["rain/a.png"] = pixels["rain/a.png"].flip(-1)
    assert cache.problems(items[:2], read=lambda item: pixels[item.key])["p"]["stale"] == ["rain/a.png"]
    (tmp_path / "cache" / "p" / "inputs.jsonl").unlink()              # an older cache: no input fingerprints
    with pytest.raises(ValueError, match=r"2 unverified"):
        cache.verify(items[:2])
    with pytest.raises(ValueError, match="before input fingerprints were recorded"):
        cache.render("p", Pointwise(), items[:2], progress=False)


def test_a_log_line_cut_by_a_crash_is_skipped(tmp_path, dataset):
    root, manifest = dataset
    items = items_from_manifest(manifest, root)
    cache = RenderCache(tmp_path / "cache", create=True)
    cache.render("p", Pointwise(), items[:1], progress=False)
    with open(tmp_path / "cache" / "p" / "inputs.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"key": "rain/sub/b.png", "inp')                # no newline: the process died here
    assert cache.render("p", Pointwise(), items, progress=False) == {"rendered": 2, "skipped": 1, "not_covered": 0}
    cache.verify(items)


def test_cli_rerun_over_changed_inputs_stops_and_inspect_lists_them(tmp_path, capsys):
    roots = two_rain_sets(tmp_path)
    (tmp_path / "myproxies.py").write_text(PROXY_FILE)
    model = ["--slot", "mix", "--model", f"{tmp_path / 'myproxies.py'}:build", "--device", "cpu", "--task", "rain"]
    light = ["--cache", str(tmp_path / "cache"), "--input-root", str(roots["Rain100L"])]
    heavy = ["--cache", str(tmp_path / "cache"), "--input-root", str(roots["Rain100H"])]
    assert _cli(["cache", "render", *light, *model]) == 0
    with pytest.raises(ValueError, match="--overwrite"):
        _cli(["cache", "render", *heavy, *model])
    capsys.readouterr()
    assert _cli(["cache", "inspect", *heavy, "--task", "rain"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["stale"]["mix"]["count"] == 2 and report["missing"]["mix"]["count"] == 0
    assert _cli(["cache", "render", *heavy, *model, "--overwrite"]) == 0
    capsys.readouterr()
    assert _cli(["cache", "inspect", *heavy, "--task", "rain"]) == 0


# ----------------------------------------------------------------------------------------------- batch helpers
def test_read_without_a_crop_for_an_uncovered_sample(tmp_path, dataset):
    root, manifest = dataset
    cache = RenderCache(tmp_path / "cache", create=True)
    cache.render("derain", Pointwise(), items_from_manifest(manifest, root), tasks=["rain"], progress=False)
    negatives, valid = cache.read("noise/c.png", "noise", size=(8, 6))
    assert negatives.shape == (1, 3, 8, 6) and not valid.any() and not negatives.any()
    with pytest.raises(ValueError, match=r"slot\(s\) \['derain'\] cover task 'rain'.*pass the sample's crop"):
        cache.read("rain/a.png", "rain", size=(8, 6))
    with pytest.raises(ValueError, match="needs the sample's crop"):
        cache.read("noise/c.png", "noise")
    with pytest.raises(ValueError, match="differs from the crop's output size"):
        cache.read("noise/c.png", "noise", CropFlip(0, 0, 8, 8), size=(8, 6))


def test_cached_and_online_negatives_merge_into_one_batch(tmp_path, dataset):
    root, manifest = dataset
    items = items_from_manifest(manifest, root)
    cache = RenderCache(tmp_path / "cache", create=True)
    cache.render("derain", Pointwise(1), items, tasks=["rain"], progress=False)
    crops = [CropFlip(0, 0, 16, 16, hflip=True)] * 3
    cached = cache.read_batch([i.key for i in items], [i.task for i in items], crops)
    degraded = torch.stack([crop.apply(read_image(i.path)) for crop, i in zip(crops, items)])
    proxies = ProxyNegatives({"a": Pointwise(2), "b": Pointwise(3)}, tasks={"b": ["noise"]})
    online = proxies(degraded, ["rain", "rain", "noise"])
    negatives, mask = merge_negatives(cached, online)
    assert negatives.shape == (3, 3, 3, 16, 16) and mask.tolist() == [[True, True, False], [True, True, False],
                                                                       [False, True, True]]
    assert torch.equal(negatives[:, :1], cached[0]) and torch.equal(negatives[:, 1:], online[0])
    with pytest.raises(ValueError, match="part 1 has negatives"):
        merge_negatives(cached, (online[0][:2], online[1][:2]))
    with pytest.raises(ValueError, match="part 1: mask must be a bool tensor"):
        merge_negatives(cached, (online[0], online[1].float()))
    with pytest.raises(ValueError, match="at least one"):
        merge_negatives()


def test_no_proxies_batch_format_k0_is_accepted_by_the_losses():
    from perceive_components.losses import QualityAwareLoss
    from perceive_components.tiny import tiny_vgg

    restored, gt, degraded = (rand_images(2, 3, 16, 16, seed=s) for s in range(3))
    negatives, mask = no_negatives(2, (16, 16))
    assert negatives.shape == (2, 0, 3, 16, 16) and mask.shape == (2, 0) and mask.dtype == torch.bool
    perceptual = DifficultyAdaptivePerceptualLoss(tiny_vgg(), pretrained=False)
    assert torch.equal(perceptual(restored, gt, degraded, negatives, mask), perceptual(restored, gt, degraded))
    criterion = QualityAwareLoss(None, tiny_vgg(), vgg_pretrained=False, clip_weight=0)
    total, _ = criterion(restored, gt, degraded, negatives, mask)
    assert torch.equal(total, criterion(restored, gt, degraded)[0])
    with pytest.raises(ValueError, match=r"mask must have shape \(B, K\) = \(2, 0\)"):
        perceptual(restored, gt, degraded, negatives, torch.zeros(2, 1, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------- folder per task
def test_folder_per_task_keys_do_not_collide_and_match_the_data_sets_key(tmp_path):
    roots = two_rain_sets(tmp_path)
    items = items_from_task_folders({"rain": roots["Rain100L"], "haze": roots["Rain100H"]})
    assert [i.key for i in items] == ["rain/rain-001.png", "rain/rain-002.png", "haze/rain-001.png",
                                      "haze/rain-002.png"]
    assert [i.task for i in items] == ["rain", "rain", "haze", "haze"]
    path = roots["Rain100H"] / "rain-002.png"
    key = task_folder_key("haze", path.relative_to(roots["Rain100H"]))   # what the data set computes
    cache = RenderCache(tmp_path / "cache", create=True)
    cache.render("p", Pointwise(), items, progress=False)
    negatives, _ = cache.read(key, "haze", CropFlip.full(20, 24))
    torch.testing.assert_close(negatives[0], expected_render(Pointwise(), path))
    with pytest.raises(ValueError, match="task must be a non-empty name without '/'"):
        task_folder_key("a/b", "x.png")
    with pytest.raises(ValueError, match="must lie inside the task's folder"):
        task_folder_key("rain", "../x.png")
    with pytest.raises(ValueError, match="non-empty mapping"):
        items_from_task_folders({})


def test_the_cache_speaks_the_shared_task_vocabulary(tmp_path, dataset):
    root, manifest = dataset
    items = items_from_manifest(manifest, root)
    cache = RenderCache(tmp_path / "cache", create=True)
    cache.render("derain", Pointwise(), items, tasks=["derain"], progress=False)     # an alias of "rain"
    assert cache.slot_config("derain")["tasks"] == ["rain"]
    for task in ("rain", "derain", STANDARD_TASKS.id("rain")):
        assert cache.read("rain/a.png", task, CropFlip(0, 0, 8, 8))[1].tolist() == [True]
    assert cache.read("noise/c.png", STANDARD_TASKS.id("denoise_25"), size=(8, 8))[1].tolist() == [False]
    crop = CropFlip(1, 1, 8, 8).as_tensor()
    batch = torch.utils.data.default_collate([{"task": STANDARD_TASKS.id(i.task), "crop": crop} for i in items])
    _, mask = cache.read_batch([i.key for i in items], batch["task"], batch["crop"])
    assert mask.tolist() == [[True], [True], [False]]
    with pytest.raises(ValueError, match="unknown task 'snow'"):
        cache.render("snow", Pointwise(), items, tasks=["snow"], progress=False)
    own = RenderCache(tmp_path / "cache", vocabulary=TaskVocabulary(["rain", "noise"]))
    assert own.read("rain/a.png", 0, CropFlip(0, 0, 8, 8))[1].tolist() == [True]
