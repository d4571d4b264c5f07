"""Example backbones: exact sizes and checkpoint layouts of the upstream releases, shapes, and loader errors."""
from __future__ import annotations

import hashlib
import itertools

import pytest
import torch

from examples.backbones import (
    CheckpointError,
    create_backbone,
    get_backbone_entry,
    list_backbones,
    load_checkpoint,
    save_official_checkpoint,
)

FULL_PARAMETERS = {"restormer": 26_126_644, "nafnet": 29_159_715, "promptir": 35_592_263}
# sha256 (first 16 hex digits) of the sorted "key:shape" lines of the upstream model's state dict, computed
# once from the upstream code (Restormer default, NAFNet SIDD width 32, PromptIR decoder=True). Equal digests
# mean the official checkpoints have exactly our keys and shapes.
UPSTREAM_LAYOUT_DIGESTS = {"restormer": "925ac7f4a29e941c", "nafnet": "ac0fdca81b6c4b83", "promptir": "73f560b8f101a03b"}
TINY = ["restormer-tiny", "nafnet-tiny", "promptir-tiny"]
FAMILY = {"restormer-tiny": "Restormer", "nafnet-tiny": "NAFNet", "promptir-tiny": "PromptIR"}
# PromptIR builds six 1x1 convolutions that its forward pass never calls (kept for the official checkpoints).
PROMPTIR_UNUSED = ("chnl_reduce1.", "chnl_reduce2.", "chnl_reduce3.",
                   "reduce_noise_channel_1.", "reduce_noise_channel_2.", "reduce_noise_channel_3.")


def layout_digest(state: dict[str, torch.Tensor]) -> str:
    lines = "\n".join(f"{key}:{tuple(value.shape)}" for key, value in sorted(state.items()))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]



@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    return {name: create_backbone(name).eval() for name in TINY}


@pytest.mark.parametrize("name", list(FULL_PARAMETERS))
def test_full_config_count_layout_and_official_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = create_backbone(name)
    assert sum(p.numel() for p in model.parameters()) == FULL_PARAMETERS[name]
    assert layout_digest(model.state_dict()) == UPSTREAM_LAYOUT_DIGESTS[name]

    path = save_official_checkpoint(model, tmp_path / f"{name}.pth")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if name == "promptir":  # PyTorch Lightning: {'state_dict': {'net.' + key: tensor}}
        assert list(raw) == ["state_dict"] and all(key.startswith("net.") for key in raw["state_dict"])
        assert layout_digest({k[len("net."):]: v for k, v in raw["state_dict"].items()}) == UPSTREAM_LAYOUT_DIGESTS[name]
    else:  # BasicSR: {'params': state_dict}
        assert list(raw) == ["params"] and layout_digest(raw["params"]) == UPSTREAM_LAYOUT_DIGESTS[name]
    del raw

    reference = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
    load_checkpoint(model, path)
    assert all(torch.equal(value, reference[key]) for key, value in model.state_dict().items())


@pytest.mark.parametrize("name", TINY)
def test_tiny_configs_are_small_and_keep_the_shape(name, tiny_models):
    model = tiny_models[name]
    assert 5_000 < sum(p.numel() for p in model.parameters()) < 100_000
    for height, width in [(32, 32), (64, 48)]:
        images = torch.rand(2, 3, height, width)
        with torch.no_grad():
            assert model(images).shape == images.shape


def test_restormer_and_promptir_refuse_sizes_off_the_grid_and_nafnet_pads(tiny_models):
    odd = torch.rand(1, 3, 30, 45)
    for name in ["restormer-tiny", "promptir-tiny"]:
        with pytest.raises(ValueError, match="multiples of 8, got 30x45"):
            tiny_models[name](odd)
    with torch.no_grad():
        assert tiny_models["nafnet-tiny"](odd).shape == odd.shape


@pytest.mark.parametrize("name", TINY)
def test_decoder_levels_match_the_tensors_that_flow(name, tiny_models):
    model = tiny_models[name]
    levels, strides = model.decoder_levels(), model.decoder_strides()
    assert list(levels) == list(strides) and list(strides.values()) == sorted(strides.values(), reverse=True)
    seen: dict[str, tuple[torch.Size, torch.Size]] = {}
    modules = dict(model.named_modules())
    handles = [modules[level].register_forward_hook(
        lambda module, args, output, level=level: seen.__setitem__(level, (args[0].shape, output.shape)))
        for level in levels]
    height, width = 64, 32
    with torch.no_grad():
        model(torch.rand(1, 3, height, width))
    for handle in handles:
        handle.remove()
    for level, (in_shape, out_shape) in seen.items():
        assert in_shape[1] == out_shape[1] == levels[level], level
        assert (out_shape[2], out_shape[3]) == (height // strides[level], width // strides[level]), level
    assert set(seen) == set(levels)


def test_size_factor_is_two_to_the_number_of_downsamplings(tiny_models):
    assert tiny_models["restormer-tiny"].size_factor == 8
    assert tiny_models["promptir-tiny"].size_factor == 8
    assert tiny_models["nafnet-tiny"].size_factor == 16
    assert create_backbone("nafnet-tiny", enc_blk_nums=(1, 1), dec_blk_nums=(1, 1)).size_factor == 4


@pytest.mark.parametrize("name", TINY)
def test_every_parameter_is_trained_except_promptirs_vestigial_convs(name):
    torch.manual_seed(0)
    model = create_backbone(name)
    with torch.no_grad():  # NAFNet's β, γ start at 0, which would block gradients to the block bodies
        for key, parameter in model.named_parameters():
            if key.endswith((".beta", ".gamma")):
                parameter.fill_(0.5)
    model(torch.rand(2, 3, 32, 32)).square().mean().backward()
    no_grad = sorted(key for key, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0)
    expected = [key for key, _ in model.named_parameters() if key.startswith(PROMPTIR_UNUSED)]
    assert no_grad == sorted(expected)
    assert (len(expected) > 0) == (name == "promptir-tiny")


@pytest.mark.parametrize("name", TINY)
def test_official_round_trip_restores_the_outputs(name, tiny_models, tmp_path):
    path = save_official_checkpoint(tiny_models[name], tmp_path / "weights.pth")
    torch.manual_seed(1)
    other = load_checkpoint(create_backbone(name).eval(), path)
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(other(images), tiny_models[name](images))


def test_loader_reads_lightning_extras_ddp_prefix_ema_and_safetensors(tiny_models, tmp_path):
    from safetensors.torch import save_file

    model = tiny_models["restormer-tiny"]
    state = model.state_dict()
    shifted = {key: value + 1 for key, value in state.items()}

    def equal_to(target, reference):
        return all(torch.equal(target.state_dict()[key], reference[key]) for key in reference)

    torch.save({"state_dict": {f"net.{k}": v for k, v in state.items()}, "epoch": 3, "global_step": 10,
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 2e-4}]}]}, tmp_path / "lightning.ckpt")
    assert equal_to(load_checkpoint(create_backbone("restormer-tiny"), tmp_path / "lightning.ckpt"), state)

    torch.save({"params": {f"module.{k}": v for k, v in state.items()}, "params_ema": shifted}, tmp_path / "ddp.pth")
    assert equal_to(load_checkpoint(create_backbone("restormer-tiny"), tmp_path / "ddp.pth"), state)
    assert equal_to(load_checkpoint(create_backbone("restormer-tiny"), tmp_path / "ddp.pth", param_key="params_ema"),
                    shifted)

    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "plain.safetensors")
    assert equal_to(load_checkpoint(create_backbone("restormer-tiny"), tmp_path / "plain.safetensors"), state)

    with pytest.raises(CheckpointError, match="param_key 'ema' is not in the checkpoint"):
        load_checkpoint(create_backbone("restormer-tiny"), tmp_path / "ddp.pth", param_key="ema")


@pytest.mark.parametrize(("source", "target"), list(itertools.permutations(TINY, 2)))
def test_checkpoint_of_another_backbone_names_both(source, target, tiny_models, tmp_path):
    path = save_official_checkpoint(tiny_models[source], tmp_path / "other.pth")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(create_backbone(target), path)
    message = str(info.value)
    assert f"does not fit {FAMILY[target]}(" in message
    assert f"looks like a {FAMILY[source]} checkpoint" in message
    assert "missing from the checkpoint, e.g." in message or "unexpected key(s) in the checkpoint, e.g." in message
    assert len(message) < 2_000  # a few keys, not torch's list of every key


def test_same_backbone_other_config_is_reported_as_such(tiny_models, tmp_path):
    path = save_official_checkpoint(tiny_models["restormer-tiny"], tmp_path / "small.pth")
    with pytest.raises(CheckpointError, match="different sizes.*\n.*patch_embed.proj.weight: checkpoint \\(4, 3, 3, 3\\)"):
        load_checkpoint(create_backbone("restormer-tiny", dim=8), path)


def test_damaged_or_unsafe_files_give_clear_errors(tiny_models, tmp_path):
    model = tiny_models["nafnet-tiny"]
    good = save_official_checkpoint(model, tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        load_checkpoint(model, tmp_path / "truncated.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        load_checkpoint(model, tmp_path / "text.pth")
    (tmp_path / "truncated.safetensors").write_bytes(b"\x10\x00\x00")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(model, tmp_path / "truncated.safetensors")
    torch.save({"params": model.state_dict(), "config": torch.nn.Identity()}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match="torch.nn.modules.linear.Identity.*refuses to unpickle"):
        load_checkpoint(model, tmp_path / "pickled.pth")
    torch.save({"params": {"a": 1}}, tmp_path / "numbers.pth")
    with pytest.raises(CheckpointError, match="no state dict found"):
        load_checkpoint(model, tmp_path / "numbers.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(model, tmp_path / "missing.pth")


def test_registry_names_overrides_and_bad_input():
    assert set(list_backbones()) >= {"restormer", "nafnet", "promptir", *TINY}
    assert get_backbone_entry("nafnet").upstream_licence == "MIT"
    assert "non-commercial" in get_backbone_entry("promptir").upstream_licence
    assert create_backbone("restormer-tiny", dim=8).config["dim"] == 8
    with pytest.raises(ValueError, match="unknown backbone 'swinir'.*restormer"):
        create_backbone("swinir")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['width'\].*'dim'"):
        create_backbone("restormer-tiny", width=3)
    with pytest.raises(ValueError, match="decoder=True"):
        create_backbone("promptir-tiny").__class__(decoder=False)
    with pytest.raises(ValueError, match="LayerNorm_type"):
        create_backbone("restormer-tiny", LayerNorm_type="RMS")
