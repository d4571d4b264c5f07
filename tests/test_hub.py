"""Publishing and loading prompt weights: local folders, a loopback Hub, offline cache, clear failures."""
from __future__ import annotations

import json

import huggingface_hub.constants as hf_constants
import pytest
import torch

from fakehub import FakeHub
from perceive_components import QualityPerceiver
from perceive_components.tiny import TINY_CLIP_NAME


@pytest.fixture()
def saved(tmp_path, tiny_clip):
    torch.manual_seed(3)
    perceiver = QualityPerceiver(clip_model=TINY_CLIP_NAME, pretrained=None, n_ctx=4, clip=tiny_clip)
    perceiver.training_info = {"triplets": 12, "steps": 5, "triplets_per_task": {"noise": 12}}
    perceiver.audit_metrics = {"accuracy": 0.75, "strict": 0.5, "monotonic": 0.9,
                               "per_task": {"noise": {"accuracy": 0.75, "strict": 0.5, "monotonic": 0.9}}}
    folder = tmp_path / "prompts"
    perceiver.save_pretrained(folder)
    return perceiver, folder


@pytest.fixture()
def fake_hub(monkeypatch):
    with FakeHub() as hub:
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hf_constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        yield hub


def test_save_writes_only_prompts_config_and_card(saved):
    from safetensors.torch import load_file

    perceiver, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    tensors = load_file(folder / "model.safetensors")
    assert list(tensors) == ["prompt_learner.ctx"] and tensors["prompt_learner.ctx"].shape == (3, 4, 64)
    config = json.loads((folder / "config.json").read_text())
    assert config["clip_model"] == TINY_CLIP_NAME and config["n_ctx"] == 4
    assert config["tier_words"] == ["terrible", "mediocre", "excellent"]
    assert config["text_width"] == 64 and config["logit_scale"] == pytest.approx(perceiver.logit_scale)
    card = (folder / "README.md").read_text()
    for needle in (TINY_CLIP_NAME, "terrible, mediocre, excellent", "| n_ctx | 4 |", "triplets_per_task",
                   "| accuracy | 0.7500 |", "| noise |", "license: apache-2.0"):
        assert needle in card, needle


def test_local_round_trip_is_bit_exact(saved, tiny_clip):
    perceiver, folder = saved
    loaded = QualityPerceiver.from_pretrained(folder, clip=tiny_clip)
    assert torch.equal(loaded.prompt_learner.ctx, perceiver.prompt_learner.ctx)
    assert loaded.audit_metrics["accuracy"] == 0.75 and loaded.training_info["steps"] == 5
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(images), perceiver(images))
    assert not loaded.training


def test_download_through_loopback_hub_then_offline_cache_hit(saved, tiny_clip, fake_hub, tmp_path, monkeypatch):
    perceiver, folder = saved
    fake_hub.add_folder("org/prompts", folder)
    cache = tmp_path / "cache"
    loaded = QualityPerceiver.from_pretrained("org/prompts", clip=tiny_clip, cache_dir=cache)
    assert torch.equal(loaded.prompt_learner.ctx, perceiver.prompt_learner.ctx)
    methods = {method for method, _ in fake_hub.file_requests()}
    assert methods == {"HEAD", "GET"}

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    seen = len(fake_hub.requests)
    again = QualityPerceiver.from_pretrained("org/prompts", clip=tiny_clip, cache_dir=cache)
    assert torch.equal(again.prompt_learner.ctx, perceiver.prompt_learner.ctx)
    assert len(fake_hub.requests) == seen  # zero requests on an offline cache hit


def test_missing_repo_and_missing_file_fail_clearly(saved, tiny_clip, fake_hub, tmp_path):
    _, folder = saved
    with pytest.raises(FileNotFoundError, match="does not exist"):
        QualityPerceiver.from_pretrained("org/nothing-here", clip=tiny_clip, cache_dir=tmp_path / "c1")
    fake_hub.repos["org/config-only"] = {"config.json": (folder / "config.json").read_bytes()}
    with pytest.raises(FileNotFoundError, match="no file 'model.safetensors'"):
        QualityPerceiver.from_pretrained("org/config-only", clip=tiny_clip, cache_dir=tmp_path / "c2")


def test_offline_missing_repo_fails_at_once_without_building_clip(tmp_path, monkeypatch):
    import time

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE") as info:
        QualityPerceiver.from_pretrained("org/not-cached", cache_dir=tmp_path)  # clip=None: would need CLIP
    assert time.perf_counter() - start < 5
    assert "hf download org/not-cached" in str(info.value)


def test_missing_local_folder_and_files(tmp_path, tiny_clip):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        QualityPerceiver.from_pretrained(str(tmp_path / "nope" / "deeper"), clip=tiny_clip)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        QualityPerceiver.from_pretrained(tmp_path / "empty", clip=tiny_clip)


def test_corrupt_safetensors_fails_clearly(saved, tiny_clip):
    _, folder = saved
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        QualityPerceiver.from_pretrained(folder, clip=tiny_clip)
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        QualityPerceiver.from_pretrained(folder, clip=tiny_clip)


def test_config_that_does_not_fit_the_clip(saved, tiny_clip):
    import open_clip

    _, folder = saved
    wider = open_clip.CLIP(32, vision_cfg=dict(image_size=32, layers=1, width=64, head_width=32, patch_size=8),
                           text_cfg=dict(context_length=77, vocab_size=49408, width=48, heads=2, layers=1))
    with pytest.raises(ValueError, match="text width 48"):
        QualityPerceiver.from_pretrained(folder, clip=wider)

    config = json.loads((folder / "config.json").read_text())
    config["n_ctx"] = 8
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"n_ctx=8"):
        QualityPerceiver.from_pretrained(folder, clip=tiny_clip)


def test_foreign_config_and_extra_tensors(saved, tiny_clip):
    from safetensors.torch import save_file

    _, folder = saved
    good = (folder / "config.json").read_text()
    (folder / "config.json").write_text(json.dumps({"format": "something-else", "clip_model": "x", "n_ctx": 4,
                                                    "tier_words": ["a", "b"]}))
    with pytest.raises(ValueError, match="not a perceive-components"):
        QualityPerceiver.from_pretrained(folder, clip=tiny_clip)
    (folder / "config.json").write_text(good)
    save_file({"prompt_learner.ctx": torch.zeros(3, 4, 64), "extra": torch.zeros(1)}, folder / "model.safetensors")
    with pytest.raises(ValueError, match="exactly"):
        QualityPerceiver.from_pretrained(folder, clip=tiny_clip)


def test_preprocessing_is_recorded_and_version_01_configs_load_antialiased(saved, tiny_clip):
    perceiver, folder = saved
    images = torch.rand(2, 3, 80, 72)
    config = json.loads((folder / "config.json").read_text())
    assert config["resize_antialias"] is False
    assert "(no antialias)" in (folder / "README.md").read_text()
    loaded = QualityPerceiver.from_pretrained(folder, clip=tiny_clip)
    assert loaded.resize_antialias is False
    with torch.no_grad():
        assert torch.equal(loaded(images), perceiver(images))

    del config["resize_antialias"]  # a config written by version 0.1, whose prompts trained antialiased
    (folder / "config.json").write_text(json.dumps(config))
    old = QualityPerceiver.from_pretrained(folder, clip=tiny_clip)
    assert old.resize_antialias is True
    perceiver.resize_antialias = True
    with torch.no_grad():
        assert torch.equal(old(images), perceiver(images))
    old.save_pretrained(folder)  # saved again, the setting is now written down
    assert json.loads((folder / "config.json").read_text())["resize_antialias"] is True


@pytest.mark.parametrize("scale", ["NaN", "Infinity", "-1.0", "0", "true"])
def test_config_with_a_bad_logit_scale_is_refused(saved, tiny_clip, scale):
    _, folder = saved
    text = (folder / "config.json").read_text()
    config = json.loads(text)
    text = text.replace(f'"logit_scale": {config["logit_scale"]!r}', f'"logit_scale": {scale}')
    (folder / "config.json").write_text(text)
    with pytest.raises(ValueError, match=r"config.json: logit_scale must be a finite number > 0"):
        QualityPerceiver.from_pretrained(folder, clip=tiny_clip)


def test_a_file_is_not_a_perceiver(saved, tmp_path, tiny_clip):
    _, folder = saved
    with pytest.raises(NotADirectoryError, match="is a file, not a perceiver: expected a folder written by "
                                                 "save_pretrained .* or a Hub repo id"):
        QualityPerceiver.from_pretrained(folder / "model.safetensors", clip=tiny_clip)
    (tmp_path / "quality_prompts_100000.pth").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="perceive-ir convert authors-prompts"):
        QualityPerceiver.from_pretrained(tmp_path / "quality_prompts_100000.pth", clip=tiny_clip)


@pytest.mark.parametrize("name", ["trained-perceiver", "runs/stage1/perceiver", "./perceiver", "my perceiver/v1"])
def test_missing_paths_that_cannot_be_repo_ids_fail_without_the_hub(name, tmp_path, monkeypatch, tiny_clip):
    import time

    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # online: nothing stops a download but us
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="does not exist .* and it is not a Hub repo id"):
        QualityPerceiver.from_pretrained(name, clip=tiny_clip)
    assert time.perf_counter() - start < 1


def test_a_missing_relative_folder_that_could_be_a_repo_id_says_so(tmp_path, monkeypatch, caplog):
    import logging

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with caplog.at_level(logging.INFO, logger="perceive_components.hub"):
        with pytest.raises(FileNotFoundError, match=r"no local folder 'runs/perceiver' exists \(looked for .*"
                                                    r"runs/perceiver\); as a Hub repo id, .*HF_HUB_OFFLINE=1"):
            QualityPerceiver.from_pretrained("runs/perceiver")
    assert "no local folder 'runs/perceiver' exists" in caplog.text  # said before the Hub is tried
