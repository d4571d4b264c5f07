"""The guidance modules' defaults and roles (docs/method.md §2.3, §3) pinned against method_reference.py: CFE
widths and normalisation, SGM blocks / input / constants, which DINOv2 block guides which level (adapter and the
paper's network), PGM's FiLM form and zero-init, PGCA's query (guidance) and key/value (features) in PGCA,
the adapter's PGCABlock and ETB."""
from __future__ import annotations

import inspect

import torch
from torch import nn

import method_reference as ref
from perceive_components import CFE, ETB, PGCA, PGM, SGM, PerceiveAdapter
from perceive_components.guidance import Guidance
from perceive_components.modules import PGCABlock
from perceive_components.tiny import tiny_dinov2

LEVELS = ["mid", "dec3", "dec2", "dec1"]  # coarse to fine, as the adapter orders them


def distinct_block_dinov2(depth: int):
    """A tiny random DINOv2 whose blocks each change the tokens: LayerScale 1 instead of DINOv2's 1e-5 init, with
    which every random block is nearly the identity and the CLS tokens of all blocks agree to ~1e-6 (no test could
    then tell one block from another)."""
    return tiny_dinov2(depth=depth, init_values=1.0)


def block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU())


class FourLevelUNet(nn.Module):
    """Three strided downs, a bottleneck ``mid`` (1/8) and decoders ``dec3`` (1/4), ``dec2`` (1/2), ``dec1`` (1)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.head = block(3, c)
        self.downs = nn.ModuleList(nn.Conv2d(c * 2**i, c * 2 ** (i + 1), 2, stride=2) for i in range(3))
        self.mid = block(8 * c, 8 * c)
        self.ups = nn.ModuleList(nn.ConvTranspose2d(c * 2 ** (i + 1), c * 2**i, 2, stride=2) for i in range(3))
        self.dec3, self.dec2, self.dec1 = block(8 * c, 4 * c), block(4 * c, 2 * c), block(2 * c, c)
        self.tail = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.head(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = self.mid(skips.pop())
        for up, decoder in zip(reversed(self.ups), (self.dec3, self.dec2, self.dec1)):
            y = decoder(torch.cat([up(y), skips.pop()], dim=1))
        return x + self.tail(y)


def images(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def adapter_and_bare_twin(**kwargs) -> tuple[PerceiveAdapter, nn.Module, nn.Module]:
    """An adapter on a 4-level U-Net with a 12-block tiny DINOv2, the same U-Net bare, and the DINOv2."""
    torch.manual_seed(0)
    backbone = FourLevelUNet()
    torch.manual_seed(0)
    bare = FourLevelUNet()
    vit = distinct_block_dinov2(12)
    if kwargs.get("sgm", vit) is vit:
        kwargs.update(sgm=vit, sgm_kwargs={"image_size": 56})
    adapter = PerceiveAdapter(backbone, LEVELS, **kwargs)
    return adapter, bare, vit


def run_with_level_inputs(bare: nn.Module, x: torch.Tensor, replace: dict) -> torch.Tensor:
    """Run ``bare`` with each level's input X replaced by ``replace[name](X)`` (hooks of this test's own)."""
    modules = dict(bare.named_modules())
    handles = [modules[name].register_forward_pre_hook(lambda _, args, f=f: (f(args[0]).float(),))
               for name, f in replace.items()]
    try:
        with torch.no_grad():
            return bare(x)
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------- §2.3 CFE
def test_cfe_code_form_widths_strides_and_unit_norm_embedding():
    cfe = CFE()
    convs = [m for m in cfe.modules() if isinstance(m, nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(32, 3, 3, 3), (64, 32, 3, 3), (96, 64, 3, 3), (128, 96, 3, 3)]
    assert [(c.stride, c.padding) for c in convs] == [((2, 2), (1, 1))] * 4
    assert [tuple(m.weight.shape) for m in cfe.modules() if isinstance(m, nn.Linear)] == [(128, 128)]
    assert sum(p.numel() for p in cfe.parameters()) == 202_016
    x = images(3, 37, 53, seed=0)
    z = cfe(x)
    torch.testing.assert_close(z.double(), ref.cfe_code_form(cfe, x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))


# ---------------------------------------------------------------------------------------------- §3.1 SGM
def test_sgm_default_blocks_are_1_4_8_12_cls_tokens_before_the_final_norm():
    vit = distinct_block_dinov2(12)
    sgm = SGM(vit, image_size=56)
    assert sgm.blocks == (1, 4, 8, 12)
    x = images(2, 40, 60, seed=1)
    for got, want in zip(sgm(x), ref.dinov2_cls_tokens(vit, x, (1, 4, 8, 12), 56), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sgm_default_input_is_a_224_bicubic_resize_with_imagenet_mean_and_std():
    vit = distinct_block_dinov2(2)
    sgm = SGM(vit, blocks=(1, 2))
    assert sgm.image_size == 224
    x = images(2, 300, 260, seed=2)  # larger than 224: an antialiased resize would differ
    for got, want in zip(sgm(x), ref.dinov2_cls_tokens(vit, x, (1, 2), 224), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- levels ← blocks
def test_adapter_gives_the_bottleneck_the_deepest_block_and_full_resolution_block_1():
    adapter, bare, vit = adapter_and_bare_twin(zero_init=False)
    assert adapter.sgm.blocks == (1, 4, 8, 12)
    assert adapter.level_blocks() == [12, 8, 4, 1]
    x = images(2, 32, 32, seed=3)
    priors = ref.dinov2_cls_tokens(vit, x, (12, 8, 4, 1), 56)  # coarse level first
    z = ref.cfe_code_form(adapter.perceive["cfe"], x)
    pgms = adapter.perceive["pgm"]
    expected = run_with_level_inputs(bare, x, {
        name: (lambda h, name=name, prior=prior: ref.film(pgms[name], h, prior, z))
        for name, prior in zip(LEVELS, priors)})
    with torch.no_grad():
        torch.testing.assert_close(adapter(x), expected, rtol=1e-4, atol=1e-5)


def test_adapter_pgca_step_takes_the_level_input_as_key_value_and_the_pgm_output_as_query():
    """X_l ← Y_l + PGCA(LN(X_l), LN(Y_l)) with Y_l = PGM_l(X_l, F_l, Z)."""
    adapter, bare, vit = adapter_and_bare_twin(zero_init=False, pgca=True)
    ref.randomise_(adapter.perceive["pgca"], seed=4)
    x = images(2, 32, 32, seed=5)
    priors = ref.dinov2_cls_tokens(vit, x, (12, 8, 4, 1), 56)
    z = ref.cfe_code_form(adapter.perceive["cfe"], x)
    pgms, pgcas = adapter.perceive["pgm"], adapter.perceive["pgca"]

    def level(h, name, prior):
        y = ref.film(pgms[name], h, prior, z)
        step = pgcas[name]
        return y + ref.pgca(step.attn, ref.layer_norm_2d(step.norm_x, h), ref.layer_norm_2d(step.norm_guidance, y))

    expected = run_with_level_inputs(bare, x, {
        name: (lambda h, name=name, prior=prior: level(h, name, prior)) for name, prior in zip(LEVELS, priors)})
    with torch.no_grad():
        torch.testing.assert_close(adapter(x), expected, rtol=1e-4, atol=1e-5)


def test_adapter_ablations_modulate_with_z_alone_or_the_prior_alone():
    """cfe=None: e = F_l;  sgm=None: e = Z (docs/method.md §3.2, prior_dim=0 / embed_dim=0)."""
    for without in ("cfe", "sgm"):
        adapter, bare, vit = adapter_and_bare_twin(zero_init=False, **{without: None})
        x = images(2, 32, 32, seed=13)
        z = ref.cfe_code_form(adapter.perceive["cfe"], x) if without == "sgm" else None
        priors = ref.dinov2_cls_tokens(vit, x, (12, 8, 4, 1), 56) if without == "cfe" else [None] * 4
        pgms = adapter.perceive["pgm"]
        expected = run_with_level_inputs(bare, x, {
            name: (lambda h, name=name, prior=prior: ref.film(pgms[name], h, prior, z))
            for name, prior in zip(LEVELS, priors)})
        with torch.no_grad():
            torch.testing.assert_close(adapter(x), expected, rtol=1e-4, atol=1e-5, msg=f"without {without}")


def test_adapter_default_zero_init_starts_as_the_bare_backbone():
    adapter, bare, _ = adapter_and_bare_twin(pgca=True)
    x = images(2, 32, 32, seed=6)
    with torch.no_grad():
        assert torch.equal(adapter(x), bare(x))


def test_paper_net_default_dinov2_blocks_are_1_4_8_12():
    from examples.backbones.perceive_ir_net import CONFIGS, PerceiveIRNet

    assert inspect.signature(PerceiveIRNet).parameters["dinov2_blocks"].default == (1, 4, 8, 12)
    assert CONFIGS["default"]["dinov2_blocks"] == (1, 4, 8, 12)


def test_paper_net_guides_latent_with_f4_and_decoder_level_l_with_f_l():
    from examples.backbones.perceive_ir_net import CONFIGS, PerceiveIRNet

    tiny = CONFIGS["tiny"]
    torch.manual_seed(0)
    net = PerceiveIRNet(**{**tiny, "dinov2_kwargs": {**tiny["dinov2_kwargs"], "init_values": 1.0}}).eval()
    x = images(2, 32, 32, seed=7)
    guide = net.guide(x)  # priors finest first: the tiny net's blocks (1, 1, 2, 2)
    for got, want in zip(guide.priors, ref.dinov2_cls_tokens(net.sgm.encoder, x, (1, 1, 2, 2), 56), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    generator = torch.Generator().manual_seed(8)
    priors = tuple(torch.randn(2, 32, generator=generator) for _ in range(4))  # distinct F_1 … F_4
    z = torch.nn.functional.normalize(torch.randn(2, 128, generator=generator), dim=1)
    seen = {}
    handles = [getattr(net, name).register_forward_pre_hook(
        lambda _, args, name=name: seen.__setitem__(name, args)) for name in ("latent", "decoder3", "decoder2",
                                                                                "decoder1")]
    try:
        with torch.no_grad():
            net(x, guidance=Guidance(priors, z))
    finally:
        for handle in handles:
            handle.remove()
    for name, index, channels in (("latent", 3, 64), ("decoder3", 2, 32), ("decoder2", 1, 16), ("decoder1", 0, 8)):
        level_input, modulated = seen[name]
        assert level_input.shape[1] == channels, name
        torch.testing.assert_close(modulated.double(), ref.film(net.pgm[index], level_input, priors[index], z),
                                   rtol=1e-5, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------- §3.2 PGM
def test_pgm_is_film_x_times_one_plus_gamma_plus_beta_of_the_prior_then_z():
    pgm = PGM(6, prior_dim=5, embed_dim=4)
    x = torch.randn(2, 6, 3, 4)
    prior, z = torch.randn(2, 5), torch.randn(2, 4)
    torch.testing.assert_close(pgm(x, prior, z).double(), ref.film(pgm, x, prior, z), rtol=1e-5, atol=1e-6)
    widths = [(m.in_features, m.out_features) for m in PGM(8).modules() if isinstance(m, nn.Linear)]
    assert widths == [(768 + 128, 16), (16, 16)]


def test_pgm_zero_init_is_the_identity():
    x = torch.randn(2, 6, 3, 4)
    pgm = PGM(6, prior_dim=5, embed_dim=4, zero_init=True)
    assert torch.equal(pgm(x, torch.randn(2, 5), torch.randn(2, 4)), x)


# ---------------------------------------------------------------------------------------------- §3.3 PGCA / ETB
def test_pgca_takes_the_query_from_the_guidance_and_keys_values_from_the_features():
    module = ref.randomise_(PGCA(8, heads=2), seed=9)
    x, g = torch.randn(2, 8, 5, 6), torch.randn(2, 8, 5, 6)
    torch.testing.assert_close(module(x, g).double(), ref.pgca(module, x, g), rtol=1e-5, atol=1e-6)


def test_pgca_block_is_y_plus_pgca_of_ln_x_as_key_value_and_ln_y_as_query():
    step = ref.randomise_(PGCABlock(8, heads=2), seed=10)
    x, y = torch.randn(2, 8, 5, 6), torch.randn(2, 8, 5, 6)
    expected = y.double() + ref.pgca(step.attn, ref.layer_norm_2d(step.norm_x, x),
                                     ref.layer_norm_2d(step.norm_guidance, y))
    torch.testing.assert_close(step(x, y).double(), expected, rtol=1e-5, atol=1e-6)


def test_etb_default_is_the_authors_code_form():
    etb = ref.randomise_(ETB(8, heads=2), seed=11)
    x, y = torch.randn(2, 8, 5, 6), torch.randn(2, 8, 5, 6)
    torch.testing.assert_close(etb(x, y).double(), ref.etb_code_form(etb, x, y), rtol=1e-5, atol=1e-5)

