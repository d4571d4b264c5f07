"""SGM's position-embedding option: "hf" resamples the pretrained 37×37 grid as Hugging Face's Dinov2Model
does (transformers 4.57.6, the authors' pin), "timm" as timm does when it loads the weights at 224 px."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from perceive_components import SGM

NAME = "vit_small_patch14_dinov2.lvd142m"
KWARGS = {"depth": 2, "embed_dim": 32, "num_heads": 2}
MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)


def hf_interpolate_pos_encoding(position_embeddings: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """transformers' Dinov2Embeddings.interpolate_pos_encoding (4.57.6), for an input of ``height × width``:
    the CLS row kept, the square grid resized to (height // patch, width // patch) by plain bicubic in float32."""
    num_positions = position_embeddings.shape[1] - 1
    class_position, grid = position_embeddings[:, :1], position_embeddings[:, 1:]
    side = int(num_positions ** 0.5)
    dim = position_embeddings.shape[-1]
    grid = grid.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.to(torch.float32), size=(height // patch, width // patch), mode="bicubic",
                         align_corners=False).to(position_embeddings.dtype)
    return torch.cat((class_position, grid.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)


@pytest.fixture(scope="module")
def vit37() -> torch.nn.Module:
    """A tiny DINOv2-layout ViT at 518 px (37×37 grid) whose position embedding visibly matters."""
    torch.manual_seed(0)
    net = timm.create_model(NAME, pretrained=False, num_classes=0, **KWARGS).eval()
    with torch.no_grad():
        net.pos_embed.normal_()
        for name, parameter in net.named_parameters():
            if name.endswith("gamma"):  # LayerScale starts at 1e-5: open the residual branches
                parameter.fill_(1.0)
    return net


@pytest.fixture(scope="module")
def weight_file(vit37, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dinov2") / "dinov2.pth"
    torch.save(vit37.state_dict(), path)
    return path


def by_name(weight_file: Path, position_embedding: str, image_size: int = 224) -> SGM:
    return SGM(NAME, pretrained=True, blocks=(1, 2), image_size=image_size, position_embedding=position_embedding,
               model_kwargs={**KWARGS, "pretrained_cfg_overlay": {"file": str(weight_file)}})


def test_hf_grid_matches_transformers_interpolation(vit37, weight_file):
    assert tuple(vit37.patch_embed.grid_size) == (37, 37)
    expected = hf_interpolate_pos_encoding(vit37.pos_embed.detach(), 224, 224, 14)
    for sgm in (SGM(copy.deepcopy(vit37), blocks=(1, 2), image_size=224, position_embedding="hf"),
                by_name(weight_file, "hf")):
        assert sgm.encoder.pos_embed.shape == (1, 1 + 16 * 16, 32)
        assert (sgm.encoder.pos_embed - expected).abs().max() <= 1e-6
    timm_way = by_name(weight_file, "timm").encoder.pos_embed
    assert (timm_way - expected).abs().max() > 1e-2  # antialiased: not the grid the authors' network saw


def test_resampling_once_equals_hf_resampling_on_every_forward(vit37):
    """HF's forward: patch tokens + CLS, plus the grid resampled for this input size, then the blocks."""
    sgm = SGM(copy.deepcopy(vit37), blocks=(1, 2), image_size=224, position_embedding="hf")
    images = torch.rand(2, 3, 150, 190, generator=torch.Generator().manual_seed(0))
    x = (F.interpolate(images, size=(224, 224), mode="bicubic", align_corners=False) - MEAN) / STD
    with torch.no_grad():
        patches = vit37.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, 256, D), as Dinov2PatchEmbeddings
        tokens = torch.cat((vit37.cls_token.expand(2, -1, -1), patches), dim=1)
        tokens = vit37.norm_pre(tokens + hf_interpolate_pos_encoding(vit37.pos_embed, 224, 224, 14))
        reference = []
        for block in vit37.blocks:
            tokens = block(tokens)
            reference.append(tokens[:, 0])  # hidden_states[i][:, 0]: CLS after block i, before the final norm
        priors = sgm(images)
    for ours, theirs in zip(priors, reference):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_timm_way_is_what_timm_does_when_loading_at_224(weight_file):
    reference = timm.create_model(NAME, pretrained=True, num_classes=0, img_size=224,
                                  pretrained_cfg_overlay={"file": str(weight_file)}, **KWARGS).eval()
    sgm = by_name(weight_file, "timm")
    assert torch.equal(sgm.encoder.pos_embed, reference.pos_embed)
    images = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        tokens = reference.forward_intermediates(images.sub(MEAN).div(STD), indices=[0], norm=False,
                                                 intermediates_only=True, output_fmt="NLC",
                                                 return_prefix_tokens=True)
    torch.testing.assert_close(sgm(images)[0], tokens[0][1][:, 0])


def test_switching_later_equals_building_that_way(weight_file):
    hf, timm_way = by_name(weight_file, "hf"), by_name(weight_file, "timm")
    images = torch.rand(2, 3, 64, 80)
    switched = by_name(weight_file, "timm").set_position_embedding("hf")
    assert switched.position_embedding == "hf" and torch.equal(switched.encoder.pos_embed, hf.encoder.pos_embed)
    assert all(torch.equal(a, b) for a, b in zip(switched(images), hf(images)))
    switched.set_position_embedding("timm")
    assert torch.equal(switched.encoder.pos_embed, timm_way.encoder.pos_embed)
    assert list(switched.state_dict()) == []  # the kept source grid is no state


def test_position_embedding_choices_and_fixed_size_nets(vit37):
    with pytest.raises(ValueError, match=r"position_embedding must be one of \['timm', 'hf'\], got 'transformers'"):
        SGM(copy.deepcopy(vit37), image_size=224, position_embedding="transformers")
    with pytest.raises(ValueError, match="img_size=224 or dynamic_img_size=True"):
        SGM(copy.deepcopy(vit37), image_size=224)  # timm way: a built net must already take 224 px
    sgm = SGM(copy.deepcopy(vit37), image_size=56, position_embedding="hf")  # hf: any grid is resampled
    assert sgm.encoder.patch_embed.img_size == (56, 56) and sgm(torch.rand(1, 3, 30, 30))[0].shape == (1, 32)
    with pytest.raises(ValueError, match="position_embedding"):
        sgm.set_position_embedding("bilinear")
