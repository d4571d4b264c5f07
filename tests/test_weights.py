"""Backbone weights into and out of a wrapped network (``perceive_components.weights``) and the freezing of
parameters a backbone's forward never uses (``freeze_unused_parameters``)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from perceive_components import (
    PerceiveAdapter, backbone_state_dict, freeze_unused_parameters, load_backbone_weights, load_weights,
)
from perceive_components.tiny import tiny_sgm
from perceive_components.weights import WeightsError
from test_adapter import ConcatUNet


def _trained_backbone(seed: int = 3) -> ConcatUNet:
    torch.manual_seed(seed)
    return ConcatUNet()


def _assert_same(module: nn.Module, state: dict) -> None:
    got = module.state_dict()
    assert list(got) == list(state)
    for key, value in state.items():
        assert torch.equal(got[key], value), key


LAYOUTS = {
    "basicsr": lambda sd: {"params": sd},
    "basicsr-ema-only": lambda sd: {"params_ema": sd},
    "lightning": lambda sd: {"state_dict": {f"net.{k}": v for k, v in sd.items()}, "epoch": 3},
    "authors": lambda sd: {"model": sd, "iteration": 100, "config": {"model": {"dim": 8}}},
    "ddp": lambda sd: {f"module.{k}": v for k, v in sd.items()},
    "compiled-ddp": lambda sd: {f"module._orig_mod.{k}": v for k, v in sd.items()},
    "plain": lambda sd: dict(sd),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_official_checkpoints_load_into_the_wrapped_network_without_renaming(layout, tmp_path):
    official = _trained_backbone().state_dict()
    path = tmp_path / "official.pth"
    torch.save(LAYOUTS[layout](official), path)
    torch.manual_seed(0)
    adapter = PerceiveAdapter(ConcatUNet(), sgm=tiny_sgm(blocks=3))
    before = {k: v.clone() for k, v in adapter.adapter_state_dict().items()}
    assert load_backbone_weights(adapter, path) is adapter
    _assert_same(adapter.backbone, official)
    for key, value in adapter.adapter_state_dict().items():  # the adapter's own weights are untouched
        assert torch.equal(value, before[key])
    bare = load_backbone_weights(ConcatUNet(), path)  # and into the bare backbone
    _assert_same(bare, official)


def test_adapter_and_lightning_checkpoints_export_the_bare_backbone(tmp_path):
    torch.manual_seed(0)
    adapter = PerceiveAdapter(_trained_backbone(), sgm=tiny_sgm(blocks=3), zero_init=False)
    expected = adapter.backbone.state_dict()
    for source in (adapter, adapter.state_dict(), {"state_dict": {f"net.{k}": v for k, v in adapter.state_dict().items()}},
                   {f"module.{k}": v for k, v in adapter.state_dict().items()}):
        exported = backbone_state_dict(source)
        bare = ConcatUNet()
        bare.load_state_dict(exported, strict=True)
        _assert_same(bare, expected)
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in adapter.state_dict().items()}, "epoch": 1}, path)
    assert set(backbone_state_dict(path)) == set(expected)
    # ... and back into a fresh adapter, the adapter's own weights with it
    fresh = PerceiveAdapter(ConcatUNet(), sgm=tiny_sgm(blocks=3))
    load_backbone_weights(fresh, path)
    _assert_same(fresh.backbone, expected)
    load_weights(fresh, path)  # the whole adapter: its own weights come back too
    _assert_same(fresh, adapter.state_dict())
    with pytest.raises(WeightsError, match="not the state of a PerceiveAdapter"):
        backbone_state_dict({"params": expected})


def test_checkpoints_that_do_not_fit_say_why(tmp_path):
    other = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(WeightsError, match="does not fit ConcatUNet under any key prefix"):
        load_backbone_weights(ConcatUNet(), {"params": other.state_dict()})
    resized = ConcatUNet(c=4).state_dict()
    with pytest.raises(WeightsError, match="another shape"):
        load_backbone_weights(ConcatUNet(), {"params": resized})
    with pytest.raises(WeightsError, match="no entry 'params_ema'"):
        load_backbone_weights(ConcatUNet(), {"params": ConcatUNet().state_dict()}, entry="params_ema")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        load_backbone_weights(ConcatUNet(), tmp_path / "junk.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(WeightsError, match="holds a list"):
        load_backbone_weights(ConcatUNet(), tmp_path / "list.pth")
    with pytest.raises(FileNotFoundError):
        load_backbone_weights(ConcatUNet(), tmp_path / "missing.pth")


class WithDeadLayers(ConcatUNet):
    """Registers layers its forward never calls, as PromptIR does (``chnl_reduce*``)."""

    def __init__(self) -> None:
        super().__init__()
        self.chnl_reduce = nn.Conv2d(32, 16, 1)
        self.reduce_noise_channel_1 = nn.Linear(4, 4)


def test_freeze_unused_parameters_finds_what_the_forward_never_uses():
    torch.manual_seed(0)
    net = WithDeadLayers()
    net.tail.weight.grad = torch.full_like(net.tail.weight, 7.0)  # accumulated gradients survive the probe
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    frozen = freeze_unused_parameters(net)
    assert torch.equal(torch.rand(3), expected_draw)  # the global RNG is left as it was
    assert frozen == ["chnl_reduce.weight", "chnl_reduce.bias", "reduce_noise_channel_1.weight",
                      "reduce_noise_channel_1.bias"]
    assert not any(p.requires_grad for n, p in net.named_parameters() if n in frozen)
    assert all(p.requires_grad for n, p in net.named_parameters() if n not in frozen)
    assert torch.equal(net.tail.weight.grad, torch.full_like(net.tail.weight, 7.0))
    assert all(p.grad is None for n, p in net.named_parameters() if n != "tail.weight")
    # inside an adapter: the wrapped network's dead layers, and nothing of the adapter itself
    adapter = PerceiveAdapter(WithDeadLayers(), sgm=tiny_sgm(blocks=3))
    assert freeze_unused_parameters(adapter) == [f"backbone.{name}" for name in frozen]
