"""CFE, SGM, PGM, PGCA/ETB and the Restormer-style blocks: parameter counts, math, shapes, errors."""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from perceive_components import CFE, ETB, PGCA, PGM, SGM
from perceive_components.modules import GDFN, MDTA, LayerNorm2d, PGCABlock, make_positive_view


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())



@pytest.fixture(scope="module")
def dinov2():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, depth=3, embed_dim=32,
                             num_heads=2, img_size=56, dynamic_img_size=True)


# ---------------------------------------------------------------------------------------------- counts
def test_parameter_counts_match_the_paper_configuration():
    assert n_params(CFE()) == 202_016
    assert [n_params(PGM(c)) for c in (48, 96, 192, 384)] == [95_424, 209_280, 492_288, 1_279_488]


# ---------------------------------------------------------------------------------------------- CFE
@pytest.mark.parametrize("form", ["code", "figure"])
def test_cfe_embedding_is_unit_norm_for_any_size(form):
    cfe = CFE(form=form)
    z = cfe(torch.rand(3, 3, 37, 53))
    assert z.shape == (3, 128) and z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cfe(torch.rand(2, 3, 32, 32)).dtype == torch.float32


def test_cfe_code_form_layers():
    cfe = CFE()
    convs = [m for m in cfe.encoder if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in convs] == [
        (3, 32, (2, 2)), (32, 64, (2, 2)), (64, 96, (2, 2)), (96, 128, (2, 2))]
    assert sum(isinstance(m, nn.GELU) for m in cfe.encoder) == 4
    x = torch.rand(2, 3, 32, 32)
    h = cfe.encoder(x)
    torch.testing.assert_close(cfe(x), F.normalize(cfe.projection(h), dim=-1))


def test_cfe_rejects_bad_input():
    with pytest.raises(ValueError, match="images must have 3 channels"):
        CFE()(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, H, W\)"):
        CFE(validate_inputs=False)(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="form"):
        CFE(form="paper")


def test_positive_view_is_a_flipped_crop_of_the_same_image():
    image = torch.arange(3 * 9 * 11, dtype=torch.float32).reshape(3, 9, 11)
    generator = torch.Generator().manual_seed(3)
    seen_flips = set()
    for _ in range(20):
        view = make_positive_view(image, (4, 5), generator=generator)
        assert view.shape == (3, 4, 5)
        matches = [
            (top, left, dims)
            for dims in ((), (-1,), (-2,), (-1, -2))
            for top in range(6) for left in range(7)
            if torch.equal((view.flip(dims) if dims else view), image[:, top:top + 4, left:left + 5])
        ]
        assert len(matches) == 1
        seen_flips.add(matches[0][2])
    assert len(seen_flips) > 1  # its own random flips


def test_positive_view_batches_lists_and_reproducibility():
    batch = torch.rand(4, 3, 20, 24)
    one = make_positive_view(batch, 16, generator=torch.Generator().manual_seed(0))
    two = make_positive_view(batch, 16, generator=torch.Generator().manual_seed(0))
    assert one.shape == (4, 3, 16, 16) and torch.equal(one, two)
    mixed = make_positive_view([torch.rand(3, 17, 30), torch.rand(3, 40, 16)], (16, 16))
    assert mixed.shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="exceeds"):
        make_positive_view(batch, 32)


# ---------------------------------------------------------------------------------------------- SGM
def test_sgm_returns_pre_norm_cls_tokens_of_the_chosen_blocks(dinov2):
    sgm = SGM(dinov2, blocks=(1, 3), image_size=56)
    images = torch.rand(2, 3, 50, 70)
    priors = sgm(images)
    x = F.interpolate(images, size=(56, 56), mode="bicubic", align_corners=False)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = dinov2.norm_pre(dinov2._pos_embed(dinov2.patch_embed(x)))
        reference = []
        for index, block in enumerate(dinov2.blocks):
            tokens = block(tokens)
            reference.append(tokens[:, 0])
    torch.testing.assert_close(priors[0], reference[0])
    torch.testing.assert_close(priors[1], reference[2])
    assert not torch.allclose(priors[1], dinov2.norm(reference[2][:, None])[:, 0])  # before the final norm
    assert all(p.shape == (2, 32) and not p.requires_grad for p in priors)


def test_sgm_is_frozen_out_of_state_dict_and_follows_to(dinov2):
    import copy

    sgm = SGM(copy.deepcopy(dinov2), blocks=2, image_size=56)
    assert sgm.blocks == (1, 3)
    assert list(sgm.parameters()) == [] and list(sgm.state_dict()) == []
    assert all(not p.requires_grad for p in sgm.encoder.parameters())
    sgm.train()
    assert not sgm.encoder.training
    sgm.to(torch.float64)
    assert next(sgm.encoder.parameters()).dtype == torch.float64
    assert sgm(torch.rand(1, 3, 20, 20, dtype=torch.float64))[0].dtype == torch.float64
    images = torch.rand(1, 3, 28, 28, requires_grad=True)
    assert not sgm.to(torch.float32)(images)[0].requires_grad


def test_sgm_spatial_maps_are_resized_per_level(dinov2):
    sgm = SGM(dinov2, blocks=(1, 1, 2, 3), image_size=56)
    out = sgm.extract(torch.rand(2, 3, 64, 64), map_sizes=[(64, 64), (32, 32), (16, 16), (8, 8)])
    assert [tuple(m.shape) for m in out.maps] == [(2, 32, 64, 64), (2, 32, 32, 32), (2, 32, 16, 16), (2, 32, 8, 8)]
    assert torch.equal(out.cls[0], out.cls[1])
    with pytest.raises(ValueError, match="map_sizes"):
        sgm.extract(torch.rand(1, 3, 8, 8), map_sizes=[(4, 4)])


def test_sgm_by_name_offline():
    sgm = SGM("vit_small_patch14_dinov2.lvd142m", pretrained=False, blocks=(1, 2), image_size=28,
              model_kwargs=dict(depth=2, embed_dim=16, num_heads=2))
    assert sgm.embed_dim == 16 and sgm.encoder.patch_embed.img_size == (28, 28)
    assert sgm(torch.rand(1, 3, 40, 40))[1].shape == (1, 16)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="pass it as model="):
        SGM("vit_small_patch14_dinov2.lvd142m", pretrained=True, image_size=28,
            model_kwargs=dict(depth=2, embed_dim=16, num_heads=2))
    assert time.perf_counter() - start < 20  # HF_HUB_OFFLINE=1: fails fast, no network retries


def test_sgm_rejects_bad_configurations(dinov2):
    import timm

    with pytest.raises(ValueError, match=r"blocks must be 1-based indices in \[1, 3\]"):
        SGM(dinov2, blocks=(0, 4), image_size=56)
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        SGM(dinov2, image_size=50)
    fixed = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, depth=1, embed_dim=16,
                              num_heads=2, img_size=42)
    with pytest.raises(ValueError, match="img_size=56 or dynamic_img_size=True"):
        SGM(fixed, image_size=56)
    with pytest.raises(TypeError, match="VisionTransformer"):
        SGM(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        SGM(dinov2, image_size=56)(torch.rand(3, 28, 28))


# ---------------------------------------------------------------------------------------------- PGM
def test_pgm_code_form_is_film():
    pgm = PGM(8, prior_dim=6, embed_dim=4)
    x, prior, z = torch.randn(2, 8, 5, 5), torch.randn(2, 6), torch.randn(2, 4)
    first, _, last = pgm.mlp
    gamma_beta = last(F.gelu(first(torch.cat([prior, z], dim=1))))
    gamma, beta = gamma_beta[:, :8, None, None], gamma_beta[:, 8:, None, None]
    torch.testing.assert_close(pgm(x, prior, z), x * (1 + gamma) + beta)
    tokens = x.flatten(2).transpose(1, 2)  # (B, N, C) layout gives the same result
    torch.testing.assert_close(pgm(tokens, prior, z), pgm(x, prior, z).flatten(2).transpose(1, 2))


@pytest.mark.parametrize("form", ["code", "figure"])
def test_pgm_zero_init_is_identity_and_still_trains(form):
    pgm = PGM(8, prior_dim=6, embed_dim=4, form=form, zero_init=True)
    x, prior, z = torch.randn(2, 8, 5, 5), torch.randn(2, 6), torch.randn(2, 4)
    y = pgm(x, prior, z)
    assert torch.equal(y, x)
    y.square().sum().backward()
    assert any(p.grad.abs().sum() > 0 for p in pgm.parameters())


def test_pgm_figure_form_is_gamma_x_plus_beta():
    pgm = PGM(4, prior_dim=3, embed_dim=2, form="figure")
    x, prior, z = torch.randn(2, 4, 3, 3), torch.randn(2, 3), torch.randn(2, 2)
    cond = torch.cat([prior, z], dim=1)

    def branch(seq):
        linear, conv = seq
        return (linear(cond) @ conv.weight[:, :, 0, 0].t() + conv.bias)[:, :, None, None]

    torch.testing.assert_close(pgm(x, prior, z), branch(pgm.gamma) * x + branch(pgm.beta))


def test_pgm_gradcheck_float64():
    pgm = PGM(3, prior_dim=2, embed_dim=2).double()
    inputs = (torch.randn(1, 3, 2, 2, dtype=torch.float64, requires_grad=True),
              torch.randn(1, 2, dtype=torch.float64, requires_grad=True),
              torch.randn(1, 2, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(pgm, inputs)


def test_pgm_errors():
    pgm = PGM(8)
    x = torch.randn(2, 8, 4, 4)
    with pytest.raises(ValueError, match=r"prior must have shape \(B, 768\), got \(2, 384\)"):
        pgm(x, torch.randn(2, 384), torch.randn(2, 128))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 8, H, W\)"):
        pgm(torch.randn(2, 9, 4, 4), torch.randn(2, 768), torch.randn(2, 128))
    with pytest.raises(ValueError, match="batch"):
        pgm(x, torch.randn(3, 768), torch.randn(3, 128))
    with pytest.raises(ValueError, match="prior_dim \\+ embed_dim > 0"):
        PGM(8, prior_dim=0, embed_dim=0)
    assert PGM(8, prior_dim=0)(x, None, torch.randn(2, 128)).shape == x.shape


# ---------------------------------------------------------------------------------------------- PGCA / ETB
def reference_channel_attention(q, k, v, heads, temperature):
    b, c, h, w = q.shape
    q, k, v = (t.reshape(b, heads, c // heads, h * w) for t in (q, k, v))
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    attention = torch.softmax(torch.einsum("bhin,bhjn->bhij", q, k) * temperature.view(1, heads, 1, 1), dim=-1)
    return torch.einsum("bhij,bhjn->bhin", attention, v).reshape(b, c, h, w)


def test_pgca_uses_guidance_as_query():
    torch.manual_seed(0)
    pgca = PGCA(8, heads=2)
    with torch.no_grad():
        pgca.temperature.copy_(torch.tensor([0.5, 2.0]).view(2, 1, 1))
    x, g = torch.randn(2, 8, 5, 6), torch.randn(2, 8, 5, 6)
    q = pgca.to_q(g)
    k, v = pgca.to_kv(x).chunk(2, dim=1)
    expected = pgca.project_out(reference_channel_attention(q, k, v, 2, pgca.temperature))
    torch.testing.assert_close(pgca(x, g), expected)
    assert not torch.allclose(pgca(x, g), pgca(x, torch.randn_like(g)))  # the query comes from g


def test_mdta_matches_reference_attention():
    torch.manual_seed(0)
    mdta = MDTA(6, heads=3)
    x = torch.randn(1, 6, 4, 7)
    q, k, v = mdta.qkv_dwconv(mdta.qkv(x)).chunk(3, dim=1)
    torch.testing.assert_close(mdta(x), mdta.project_out(reference_channel_attention(q, k, v, 3, mdta.temperature)))


def test_pgca_zero_init_and_heads_check():
    pgca = PGCA(8, heads=2, zero_init=True)
    assert torch.equal(pgca(torch.randn(1, 8, 3, 3), torch.randn(1, 8, 3, 3)), torch.zeros(1, 8, 3, 3))
    block = PGCABlock(8, heads=2, zero_init=True)
    g = torch.randn(1, 8, 3, 3)
    assert torch.equal(block(torch.randn(1, 8, 3, 3), g), g)
    with pytest.raises(ValueError, match="positive divisor of channels=8"):
        PGCA(8, heads=3)
    with pytest.raises(ValueError, match="guidance must have the shape of x"):
        PGCA(8)(torch.randn(1, 8, 3, 3), torch.randn(1, 8, 4, 4))


def test_pgca_gradcheck_float64():
    pgca = PGCA(4, heads=2).double()
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(1, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(pgca, (x, g))


@pytest.mark.parametrize("form", ["code", "figure"])
def test_etb_wiring(form):
    torch.manual_seed(0)
    etb = ETB(8, heads=2, form=form)
    x, y = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6)
    cross = etb.pgca(etb.norm_x(x), etb.norm_guidance(y))
    mid = y + (etb.mdta(etb.norm_attn(cross)) if form == "code" else cross)
    torch.testing.assert_close(etb(x, y), mid + etb.ffn(etb.norm_ffn(mid)))
    assert hasattr(etb, "mdta") == (form == "code")
    etb(x, y).sum().backward()
    assert all(p.grad is not None for p in etb.parameters())


def test_layernorm2d_matches_layer_norm_over_channels():
    norm = LayerNorm2d(5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-1, 1)
    x = torch.randn(2, 5, 3, 4)
    reference = F.layer_norm(x.permute(0, 2, 3, 1), (5,), norm.weight, norm.bias, eps=1e-5).permute(0, 3, 1, 2)
    torch.testing.assert_close(norm(x), reference)
    bias_free = LayerNorm2d(5, bias=False)
    torch.testing.assert_close(bias_free(x), x / torch.sqrt(x.var(1, keepdim=True, unbiased=False) + 1e-5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(x.bfloat16()).dtype == torch.bfloat16


def test_gdfn_hidden_width():
    gdfn = GDFN(48, expansion=2.66)
    assert gdfn.project_in.out_channels == 2 * int(48 * 2.66) and gdfn.project_out.in_channels == 127
    assert gdfn(torch.randn(1, 48, 4, 4)).shape == (1, 48, 4, 4)
