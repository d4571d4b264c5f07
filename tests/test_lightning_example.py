"""examples/lightning_promptir_perceive.py: PromptIR's Lightning trainer with Perceive-IR added runs 3 steps on the
CPU with the tiny builders; every term is finite and the contrastive one non-zero; its checkpoint holds no frozen
network and loads strictly into the bare PromptIR (upstream evaluation) and back into the adapter."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

pl = pytest.importorskip("lightning.pytorch", reason="the lightning extra is not installed")

from examples import lightning_promptir_perceive as example  # noqa: E402
from examples.backbones import create_backbone  # noqa: E402
from perceive_components import PerceiveAdapter, backbone_state_dict, load_weights  # noqa: E402
from perceive_components.data import CropFlip  # noqa: E402
from perceive_components.negatives import RenderCache, items_from_task_folders  # noqa: E402
from perceive_components.tiny import tiny_sgm  # noqa: E402


def _write(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two images per task, 52×61 (crop_img cuts them to 48×48 at an offset of (2, 6))."""
    root = tmp_path_factory.mktemp("promptir-data")
    rng = np.random.default_rng(0)
    for index in range(2):
        clean = rng.integers(0, 256, (52, 61, 3), dtype=np.uint8)
        _write(root / "noise" / "clean" / f"{index}.png", clean)
        for task, shift in (("rain", 40), ("haze", 90)):
            _write(root / task / "clean" / f"{task}-{index}.png", clean)
            _write(root / task / "degraded" / f"{task}-{index}.png", np.clip(clean.astype(int) + shift, 0, 255)
                   .astype(np.uint8))
    return root


@pytest.fixture(scope="module")
def cache(data, tmp_path_factory):
    """A proxy that darkens by 0.1 (not the identity, so a misaligned read shows), rendered for rain and haze."""
    class Darken(nn.Module):
        def forward(self, x):
            return (x - 0.1).clamp(0, 1)

    root = tmp_path_factory.mktemp("promptir-cache")
    items = items_from_task_folders({"rain": data / "rain" / "degraded", "haze": data / "haze" / "degraded"})
    RenderCache(root, create=True).render("darken", Darken(), items, tasks=["rain", "haze"], tile=None, progress=False)
    return root


def test_samples_read_negatives_aligned_with_the_augmented_patch(data, cache):
    dataset = example.PromptTrainDataset(data, patch_size=32, rain_repeat=1, proxy_cache=cache)
    example.random.seed(0)
    seen = set()
    for index, sample in enumerate(dataset.sample_ids):
        (_, de_id), degraded, clean, positive, task, negatives, mask = dataset[index]
        assert degraded.shape == clean.shape == positive.shape == (3, 32, 32)
        if de_id >= 3:  # rain / haze: the cached proxy output, cut like the patch, is the patch darkened
            torch.testing.assert_close(negatives[0], (degraded - 0.1).clamp(0, 1), atol=0.6 / 255, rtol=0)  # 8-bit render
            assert mask.tolist() == [True]
        else:  # fresh noise: no render, masked out
            assert mask.tolist() == [False] and negatives.abs().sum() == 0
        seen.add(int(task))
    assert seen == {0, 1, 2}  # noise, haze, rain
    # the geometry the example builds is the one upstream's crop_img + patch + data_augmentation cut
    full = np.arange(52 * 61 * 3, dtype=np.int64).reshape(52, 61, 3)
    for mode in range(8):
        upstream = example.data_augmentation(example.crop_img(full, 16)[5:37, 9:41], mode)
        crop = CropFlip.from_dihedral_mode((2 + 5, 6 + 9, 32, 32), mode, image_size=(52, 61))
        ours = crop.apply(torch.from_numpy(full).permute(2, 0, 1)).permute(1, 2, 0).numpy()
        assert np.array_equal(ours, upstream), mode


def test_three_lightning_steps_then_the_checkpoint_serves_upstream_and_the_adapter(data, cache, tmp_path,
                                                                                   monkeypatch):
    logged = []
    monkeypatch.setattr(example.PromptIRModel, "log_dict",
                        lambda self, values, **kw: logged.append({k: float(v) for k, v in values.items()}))
    pl.seed_everything(0)
    trainer = example.main(["--data", str(data), "--tiny", "--max-steps", "3", "--batch-size", "6",
                            "--patch-size", "32", "--rain-repeat", "4", "--proxy-cache", str(cache),
                            "--out", str(tmp_path / "run")])
    assert trainer.global_step == 3 and len(logged) == 3
    for values in logged:
        assert set(values) == {f"train_{t}" for t in ("l1", "contrastive", "clip", "perceptual", "total")}
        assert all(math.isfinite(v) for v in values.values())
        assert values["train_contrastive"] > 0  # batches hold several tasks
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert {key.split(".")[1] for key in state} == {"backbone", "perceive"}  # no CLIP, VGG or DINOv2 inside
    assert all(key.startswith("net.") for key in state)

    model = trainer.lightning_module.cpu().eval()
    bare = create_backbone("promptir-tiny").eval()
    bare.load_state_dict(backbone_state_dict(path), strict=True)  # upstream-style evaluation of the backbone
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bare(x), model.net.backbone(x), rtol=0, atol=0)
        fresh = PerceiveAdapter(create_backbone("promptir-tiny"), levels=bare.decoder_levels(), sgm=tiny_sgm(blocks=4))
        load_weights(fresh, path)  # ... and back into the adapter
        torch.testing.assert_close(fresh(x), model.net(x), rtol=0, atol=0)
