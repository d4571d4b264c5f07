"""PerceiveAdapter on three structurally different tiny backbones (all offline, random, CPU)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from perceive_components import PerceiveAdapter
from perceive_components.modules import SGM, make_positive_view
from perceive_components.tiny import tiny_dinov2


# ---------------------------------------------------------------------------------------------- backbones
def conv(c_in: int, c_out: int, k: int = 3, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2 if stride == 1 else 0)


class ConcatUNet(nn.Module):
    """Classic U-Net: strided-conv downs, transposed-conv ups, concatenated skips (levels: mid, dec2, dec1)."""

    def __init__(self, c: int = 8, up: str = "transpose") -> None:
        super().__init__()

        def upsample(c_in: int, c_out: int) -> nn.Module:
            if up == "transpose":
                return nn.ConvTranspose2d(c_in, c_out, 2, stride=2)
            return nn.Sequential(conv(c_in, 4 * c_out, 5), nn.PixelShuffle(2))  # its conv outweighs the stage

        self.head = conv(3, c)
        self.enc1 = nn.Sequential(conv(c, c), nn.ReLU())
        self.down1 = conv(c, 2 * c, 2, stride=2)
        self.enc2 = nn.Sequential(conv(2 * c, 2 * c), nn.ReLU())
        self.down2 = conv(2 * c, 4 * c, 2, stride=2)
        self.mid = nn.Sequential(conv(4 * c, 4 * c), nn.ReLU(), conv(4 * c, 4 * c))
        self.up2 = upsample(4 * c, 2 * c)
        self.dec2 = nn.Sequential(conv(4 * c, 2 * c), nn.ReLU(), conv(2 * c, 2 * c))
        self.up1 = upsample(2 * c, c)
        self.dec1 = nn.Sequential(conv(2 * c, c), nn.ReLU(), conv(c, c))
        self.tail = conv(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(self.head(x))
        e2 = self.enc2(self.down1(e1))
        m = self.mid(self.down2(e2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return x + self.tail(d1)


class GatedBlock(nn.Module):
    """NAFNet-style block: depthwise conv, simple gate, pooled channel attention, residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.expand = nn.Conv2d(c, 2 * c, 1)
        self.dw = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.sca = nn.Conv2d(c, c, 1)
        self.project = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.dw(self.expand(x)).chunk(2, dim=1)
        y = a * b
        return x + self.project(y * self.sca(self.pool(y)))


class AddSkipNet(nn.Module):
    """NAFNet-like: ModuleLists of stages, pixel-shuffle ups, *added* skips, internal padding to 8."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width]
        self.intro = conv(3, width)
        self.encoders = nn.ModuleList(GatedBlock(w) for w in widths)
        self.downs = nn.ModuleList(nn.Conv2d(w, 2 * w, 2, stride=2) for w in widths)
        self.middle_blks = nn.Sequential(GatedBlock(8 * width), GatedBlock(8 * width))
        self.ups = nn.ModuleList(
            nn.Sequential(nn.Conv2d(2 * w, 4 * w, 1, bias=False), nn.PixelShuffle(2)) for w in reversed(widths)
        )
        self.decoders = nn.ModuleList(GatedBlock(w) for w in reversed(widths))
        self.ending = conv(width, 3)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        x = F.pad(image, (0, (-width) % 8, 0, (-height) % 8))
        inp = x
        x = self.intro(x)
        skips = []
        for encoder, down in zip(self.encoders, self.downs):
            x = encoder(x)
            skips.append(x)
            x = down(x)
        x = self.middle_blks(x)
        for decoder, up, skip in zip(self.decoders, self.ups, reversed(skips)):
            x = decoder(up(x) + skip)
        return (self.ending(x) + inp)[..., :height, :width]


class TokenBottleneckNet(nn.Module):
    """Half-resolution conv head, a token MLP bottleneck on (B, N, C), pixel-shuffle up, global residual."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, c, 4, stride=2, padding=1)
        self.mixer = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))
        self.up = nn.Sequential(nn.Conv2d(c, 12, 3, padding=1), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.head(x)
        b, c, h, w = f.shape
        tokens = f.flatten(2).transpose(1, 2)
        tokens = tokens + self.mixer(tokens)
        return x + self.up(tokens.transpose(1, 2).reshape(b, c, h, w))


EXPECTED_LEVELS = {
    ConcatUNet: [("mid", 32, 4), ("dec2", 32, 2), ("dec1", 16, 1)],
    AddSkipNet: [("middle_blks", 64, 8), ("decoders.0", 32, 4), ("decoders.1", 16, 2), ("decoders.2", 8, 1)],
}


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def dinov2():
    return tiny_dinov2()  # the library's stand-in: 2 blocks, width 32, 56² input


def make_adapter(backbone: nn.Module, dinov2: nn.Module, **kwargs) -> PerceiveAdapter:
    kwargs.setdefault("sgm", dinov2)
    if isinstance(kwargs["sgm"], nn.Module) and not isinstance(kwargs["sgm"], SGM):
        kwargs.setdefault("sgm_kwargs", {"image_size": 56})
    return PerceiveAdapter(backbone, **kwargs)


def images(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


BACKBONES = [
    pytest.param(ConcatUNet, None, id="concat-unet"),
    pytest.param(AddSkipNet, None, id="add-skip-nafnet-like"),
    pytest.param(TokenBottleneckNet, {"mixer": 16}, id="token-bottleneck-only"),
]


# ---------------------------------------------------------------------------------------------- discovery
@pytest.mark.parametrize("net_cls, kwargs", [(ConcatUNet, {}), (ConcatUNet, {"up": "shuffle"}), (AddSkipNet, {})])
def test_discovery_finds_the_decoder_levels(net_cls, kwargs, dinov2, caplog):
    torch.manual_seed(0)
    with caplog.at_level("INFO", logger="perceive_components.adapter"):
        adapter = make_adapter(net_cls(**kwargs), dinov2)
    got = [(level.name, level.channels, level.scale) for level in adapter.levels]
    assert got == EXPECTED_LEVELS[net_cls]
    assert "discovered levels" in caplog.text and got[0][0] in caplog.text
    # coarse level gets the deepest DINOv2 block, the finest level block 1
    assert adapter.level_blocks()[0] == max(adapter.sgm.blocks) and adapter.level_blocks()[-1] == 1
    assert adapter.multiple == got[0][2]


def test_user_levels_override_discovery_and_are_ordered_by_execution(dinov2):
    adapter = make_adapter(ConcatUNet(), dinov2, levels=["dec1", "mid"])
    assert [level.name for level in adapter.levels] == ["mid", "dec1"]
    assert [level.channels for level in adapter.levels] == [32, 16]


# ---------------------------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("net_cls, levels", BACKBONES)
def test_zero_init_wrapped_equals_bare_backbone_and_keys_unchanged(net_cls, levels, dinov2):
    torch.manual_seed(0)
    backbone = net_cls()
    bare = copy.deepcopy(backbone)
    keys_before = list(backbone.state_dict().keys())
    adapter = make_adapter(backbone, dinov2, levels=levels)
    x = images()
    with torch.no_grad():
        assert torch.equal(adapter(x), bare(x))
    assert list(adapter.backbone.state_dict().keys()) == keys_before
    own = set(adapter.adapter_state_dict())
    assert set(adapter.state_dict()) == {f"backbone.{k}" for k in keys_before} | own
    assert all(k.startswith("perceive.") for k in own)
    # an official checkpoint of the bare backbone still loads strictly
    adapter.backbone.load_state_dict(bare.state_dict(), strict=True)
    # frozen DINOv2: in neither state_dict() nor parameters()
    frozen = {id(p) for p in adapter.sgm.encoder.parameters()}
    assert frozen and not frozen & {id(p) for p in adapter.parameters()}
    assert not any(k.startswith("sgm") or "encoder.blocks" in k for k in adapter.state_dict())


@pytest.mark.parametrize("net_cls, levels", BACKBONES)
def test_gradients_reach_backbone_cfe_pgm_and_sgm_stays_frozen(net_cls, levels, dinov2):
    torch.manual_seed(0)
    adapter = make_adapter(net_cls(), dinov2, levels=levels, zero_init=False)
    x = images(size=32)
    positive = make_positive_view(images(size=48, seed=2), 32, generator=torch.Generator().manual_seed(0))
    guidance = adapter.guide(x, positive=positive)
    out = adapter(x, guidance=guidance)
    assert out.shape == x.shape
    z, z_pos = guidance.embedding, guidance.positive_embedding
    assert z.shape == z_pos.shape == (2, 128)
    (out.square().mean() + (z * z_pos).sum()).backward()
    for name, param in adapter.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(p.grad is None and not p.requires_grad for p in adapter.sgm.encoder.parameters())


@pytest.mark.parametrize("pgca", [False, True])
def test_every_trainable_parameter_gets_a_gradient_ddp_friendly(pgca, dinov2):
    """With zero-init, grads may be zero but no parameter is left out of the graph (no unused params)."""
    adapter = make_adapter(ConcatUNet(), dinov2, pgca=pgca)
    x = images()
    adapter(x, guidance=adapter.guide(x, positive=x.flip(-1))).mean().backward()
    unused = [name for name, p in adapter.named_parameters() if p.grad is None]
    assert not unused
    assert any("pgca" in name for name, _ in adapter.named_parameters()) == pgca


def test_pgca_zero_init_is_identity_and_trains(dinov2):
    torch.manual_seed(0)
    backbone = AddSkipNet()
    bare = copy.deepcopy(backbone)
    adapter = make_adapter(backbone, dinov2, pgca=True)
    x = images()
    with torch.no_grad():
        assert torch.equal(adapter(x), bare(x))
    adapter(x).mean().backward()
    assert all(block.attn.project_out.weight.grad.abs().sum() > 0 for block in adapter.perceive["pgca"].values())


def test_positive_view_runs_as_one_cfe_batch(dinov2):
    adapter = make_adapter(ConcatUNet(), dinov2)
    calls = []
    adapter.perceive["cfe"].register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    x = images()
    guidance = adapter.guide(x, positive=x.flip(-1))
    assert calls == [4]
    assert torch.allclose(guidance.positive_embedding, adapter.perceive["cfe"](x.flip(-1)), atol=1e-6)
    assert torch.allclose(guidance.embedding, adapter.perceive["cfe"](x), atol=1e-6)
    adapter(x, guidance=guidance)
    assert calls == [4, 2, 2]  # the forward reuses Z; only the two direct calls above ran the CFE again


def test_backbone_called_alone_runs_bare(dinov2):
    torch.manual_seed(0)
    backbone = ConcatUNet()
    bare = copy.deepcopy(backbone)
    adapter = make_adapter(backbone, dinov2, zero_init=False)
    x = images()
    with torch.no_grad():
        assert torch.equal(adapter.backbone(x), bare(x))
        assert not torch.allclose(adapter(x), bare(x))
        adapter.remove_hooks()
        assert torch.equal(adapter(x), bare(x))


def test_deepcopy_and_pickle_rebind_the_hooks(dinov2, tmp_path):
    """EMA copies (copy.deepcopy) and torch.save/load get hooks that act on the *copy*."""
    adapter = make_adapter(ConcatUNet(), dinov2, zero_init=False)
    x = images()
    with torch.no_grad():
        reference = adapter(x)
        ema = copy.deepcopy(adapter)
        assert torch.equal(ema(x), reference)
        for parameter in ema.perceive["pgm"].parameters():
            parameter.mul_(2)
        assert not torch.allclose(ema(x), reference)
        assert torch.equal(adapter(x), reference)
        torch.save(adapter, tmp_path / "adapter.pt")
        restored = torch.load(tmp_path / "adapter.pt", weights_only=False)
        assert torch.equal(restored(x), reference)


def test_given_guidance_matches_and_is_checked(dinov2):
    adapter = make_adapter(ConcatUNet(), dinov2, zero_init=False)
    x = images()
    with torch.no_grad():
        guidance = adapter.guide(x)
        assert guidance.positive_embedding is None and len(guidance.priors) == 3
        torch.testing.assert_close(guidance.embedding, adapter.perceive["cfe"](x), rtol=0, atol=0)
        for got, want in zip(guidance.priors, adapter.sgm(x)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert torch.equal(adapter(x, guidance=guidance), adapter(x))
        with pytest.raises(ValueError, match=r"guidance.embedding must have shape \(2, 128\)"):
            adapter(x, guidance=guidance._replace(embedding=guidance.embedding[:, :64]))
        with pytest.raises(ValueError, match=r"guidance.priors\[0\] must have shape \(1, 32\)"):
            adapter(x[:1], guidance=guidance)  # the guidance of another batch
        with pytest.raises(TypeError, match="Guidance returned by .guide"):
            adapter(x, guidance={"priors": guidance.priors})
        one = adapter.guide(x[:1])
        tiles = one.expand(3)  # one image's guidance for a batch of its tiles
        assert tiles.embedding.shape == (3, 128) and all(prior.shape == (3, 32) for prior in tiles.priors)
        assert torch.equal(tiles.priors[2][2], one.priors[2][0])
        with pytest.raises(ValueError, match="repeats the guidance of one image, got a batch of 2"):
            guidance.expand(3)
        for old in ("positive", "priors", "embedding"):  # the 0.1 keywords say where they went
            with pytest.raises(TypeError, match="adapter.guide"):
                adapter(x, **{old: None})


def test_candidates_table_names_the_levels():
    table = PerceiveAdapter.candidates(ConcatUNet())
    assert "dec2" in table and "1/2" in table and "auto-discovery picks: mid, dec2, dec1" in table
    assert "auto-discovery picks: none" in PerceiveAdapter.candidates(TokenBottleneckNet())


def test_bf16_autocast_training_step(dinov2):
    adapter = make_adapter(AddSkipNet(), dinov2, pgca=True, zero_init=False)
    x = images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        guidance = adapter.guide(x, positive=x.flip(-2))
        out = adapter(x, guidance=guidance)
        loss = (out.float() - x).abs().mean() + (guidance.embedding * guidance.positive_embedding).sum()
    loss.backward()
    assert guidance.embedding.dtype == torch.float32
    with torch.no_grad():  # the same computation as in float32, up to bf16 rounding
        full = adapter(x, guidance=adapter.guide(x, positive=x.flip(-2)))
    assert (out.float() - full).abs().max() < 0.05
    bf16_grads = {name: p.grad.clone() for name, p in adapter.named_parameters()}
    adapter.zero_grad()
    guidance = adapter.guide(x, positive=x.flip(-2))
    loss = (adapter(x, guidance=guidance) - x).abs().mean() + (guidance.embedding * guidance.positive_embedding).sum()
    loss.backward()
    errors = {name: float((bf16_grads[name] - p.grad).norm() / p.grad.norm())
              for name, p in adapter.named_parameters()}
    assert max(errors.values()) < 0.25, errors  # bf16 rounding (a few %; single temperatures more), not a bug
    stacked = torch.cat([p.grad.flatten() for p in adapter.parameters()])
    assert (torch.cat([g.flatten() for g in bf16_grads.values()]) - stacked).norm() < 0.05 * stacked.norm()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_to_device_and_dtype_after_construction(device, dinov2):
    adapter = make_adapter(ConcatUNet(), copy.deepcopy(dinov2), zero_init=False)
    adapter.to(device=device, dtype=torch.float64)
    assert next(adapter.sgm.encoder.parameters()).dtype == torch.float64
    x = images().to(device, torch.float64)
    guidance = adapter.guide(x)
    out = adapter(x, guidance=guidance)
    assert out.dtype == torch.float64 and out.device.type == device
    assert guidance.embedding.dtype == torch.float64 and guidance.priors[0].dtype == torch.float64
    with pytest.raises(TypeError, match="float32 but the adapter's weights are torch.float64"):
        adapter(x.float())


def test_torch_compile_smoke(dinov2):
    """Dynamo captures the whole hooked forward (CFE, DINOv2, hooks, PGM) as one graph: fullgraph=True.

    backend="eager" checks the capture without code generation, which would take minutes on 2 CPU cores;
    the inductor path is timed by benchmarks/bench_adapter.py --compile.
    """
    torch.manual_seed(0)
    adapter = make_adapter(ConcatUNet(), dinov2, zero_init=False, validate_inputs=False)
    x = images()
    expected = adapter(x)
    compiled = torch.compile(adapter, backend="eager", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.mean().backward()
    assert all(p.grad is not None for p in adapter.perceive.parameters())
    guidance = adapter.guide(x, positive=x.flip(-1))  # explicit guidance through the compiled module
    torch.testing.assert_close(compiled(x, guidance=guidance), expected, rtol=1e-5, atol=1e-5)


def test_save_and_load_adapter_weights(tmp_path, dinov2):
    torch.manual_seed(0)
    backbone = ConcatUNet()
    trained = make_adapter(copy.deepcopy(backbone), dinov2, pgca=True, zero_init=False)
    path = tmp_path / "adapter.safetensors"
    trained.save_adapter(path)
    fresh = make_adapter(copy.deepcopy(backbone), dinov2, pgca=True, zero_init=True)
    fresh.load_adapter(path)
    for key, value in trained.adapter_state_dict().items():
        assert torch.equal(fresh.adapter_state_dict()[key], value), key
    x = images()
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))
    other = make_adapter(copy.deepcopy(backbone), dinov2, levels=["mid"], pgca=True)
    with pytest.raises(ValueError, match="levels"):
        other.load_adapter(path)


# ---------------------------------------------------------------------------------------------- explicit guidance
def _reference_forward(adapter: PerceiveAdapter, backbone: nn.Module, x: torch.Tensor, positive: torch.Tensor):
    """The method written out by hand on a copy of the backbone: Z, Z⁺ = CFE, F = SGM, and each level input
    X_l replaced by PGM_l(X_l, F_l, Z) through hooks of our own (coarse level ← deepest block)."""
    cfe, pgms = adapter.perceive["cfe"], adapter.perceive["pgm"]
    z, z_positive = cfe(x), cfe(positive)
    priors = adapter.sgm(x)[::-1]
    modules = dict(backbone.named_modules())
    handles = [modules[level.name].register_forward_pre_hook(
        lambda module, args, level=level, prior=prior: (pgms[level.name.replace(".", "_")](args[0], prior, z),))
        for level, prior in zip(adapter.levels, priors)]
    try:
        return backbone(x), z, z_positive
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("net_cls, levels", BACKBONES[:2])
def test_explicit_guidance_equals_the_method_written_out(net_cls, levels, dinov2):
    torch.manual_seed(0)
    adapter = make_adapter(net_cls(), dinov2, levels=levels, zero_init=False)
    twin = copy.deepcopy(adapter)
    x, positive = images(), images(seed=3)
    guidance = adapter.guide(x, positive=positive)
    out = adapter(x, guidance=guidance)
    (out.square().mean() + (guidance.embedding * guidance.positive_embedding).sum()).backward()
    ref, z, z_positive = _reference_forward(twin, twin.backbone, x, positive)
    (ref.square().mean() + (z * z_positive).sum()).backward()
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(guidance.embedding, z, rtol=1e-6, atol=1e-6)
    for (name, p), (_, q) in zip(adapter.named_parameters(), twin.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-6, msg=name)
    assert not [name for name in dir(adapter) if name.startswith("last_")]


def test_shared_hooks_use_the_calling_copy_and_threads_do_not_mix(dinov2):
    """DataParallel replicas share the backbone's hook objects; each must modulate with its own weights.
    ``_replicate_for_data_parallel`` (what DataParallel's ``replicate`` calls on every module) with other PGM
    weights stands in for a replica on another device: same backbone and hook objects, other adapter."""
    import threading

    adapter = make_adapter(ConcatUNet(), dinov2, zero_init=False)
    replica = adapter._replicate_for_data_parallel()
    replica.perceive = copy.deepcopy(adapter.perceive)
    with torch.no_grad():
        for parameter in replica.perceive["pgm"].parameters():
            parameter.mul_(3)
    x = images()
    with torch.no_grad():
        own, other = adapter(x), replica(x)
        assert not torch.allclose(own, other)
        outputs = {}
        threads = [threading.Thread(target=lambda n=n, m=m: outputs.__setitem__(n, [m(x) for _ in range(5)]))
                   for n, m in (("own", adapter), ("other", replica))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert all(torch.equal(o, own) for o in outputs["own"]) and all(torch.equal(o, other) for o in outputs["other"])


class Checkpointed(nn.Module):
    """Calls ``inner`` (a hooked level module: its pre-hook then runs inside the checkpoint)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.inner, x, use_reentrant=False)


def test_activation_checkpointing_of_the_guided_call_and_inside_levels(dinov2):
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    adapter = make_adapter(AddSkipNet(), dinov2, zero_init=False)
    x = images()
    guidance = adapter.guide(x, positive=x.flip(-1))
    plain = adapter(x, guidance=guidance)
    plain.square().mean().backward()
    expected = [p.grad.clone() for p in adapter.parameters()]
    adapter.zero_grad()
    guidance = adapter.guide(x, positive=x.flip(-1))
    out = checkpoint(adapter, x, guidance=guidance, use_reentrant=False)
    out.square().mean().backward()
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    for got, want in zip((p.grad for p in adapter.parameters()), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)

    # blocks checkpointed inside a level: the level hook runs outside the checkpoint, nothing changes
    adapter.zero_grad()
    decoder = adapter.backbone.decoders[0]
    original_forward = decoder.forward
    decoder.forward = lambda y: checkpoint(original_forward, y, use_reentrant=False)
    try:
        out = adapter(x, guidance=adapter.guide(x, positive=x.flip(-1)))
        out.square().mean().backward()
    finally:
        del decoder.forward
    for got, want in zip((p.grad for p in adapter.parameters()), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_checkpoint_enclosing_a_level_module_is_refused_not_silently_bare(dinov2):
    adapter = make_adapter(AddSkipNet(), dinov2, zero_init=False)
    decoders = adapter.backbone.decoders
    decoders[0] = Checkpointed(decoders[0])  # the backbone now checkpoints the hooked module's whole call
    out = adapter(images())
    with pytest.raises(RuntimeError, match="recomputed an activation checkpoint"):
        out.square().mean().backward()


# ---------------------------------------------------------------------------------------------- bad inputs
def test_size_not_multiple_of_factor_raises_or_pads(dinov2):
    adapter = make_adapter(ConcatUNet(), dinov2)
    with pytest.raises(ValueError, match="multiples of 4"):
        adapter(images(size=30))
    torch.manual_seed(0)
    backbone = ConcatUNet()
    bare = copy.deepcopy(backbone)
    padded = make_adapter(backbone, dinov2, pad=True)  # zero-init: the bare U-Net on the padded image
    x = torch.rand(1, 3, 30, 37)
    with torch.no_grad():  # replicate-padded at the bottom/right to multiples of 4, cropped back
        assert torch.equal(padded(x), bare(F.pad(x, (0, 3, 0, 2), mode="replicate"))[..., :30, :37])


def test_level_channel_mismatch_raises(dinov2):
    with pytest.raises(ValueError, match="given 99 channels but its input has 16"):
        make_adapter(ConcatUNet(), dinov2, levels={"dec1": 99})


def test_unknown_level_lists_candidates(dinov2):
    with pytest.raises(ValueError, match="not modules of ConcatUNet") as info:
        make_adapter(ConcatUNet(), dinov2, levels=["decoder1"])
    message = str(info.value)
    assert "Candidate decoder levels" in message and "dec1" in message and "mid" in message


def test_wrong_prior_width_raises(dinov2):
    adapter = make_adapter(ConcatUNet(), dinov2)
    x = images()
    guidance = adapter.guide(x)
    with pytest.raises(ValueError, match=r"priors\[0\] must have shape \(2, 32\)"):
        adapter(x, guidance=guidance._replace(priors=(torch.zeros(2, 16),) * 3))
    with pytest.raises(ValueError, match="must hold 3 tensors"):
        adapter(x, guidance=guidance._replace(priors=(torch.zeros(2, 32),)))


def test_non_finite_input_raises(dinov2):
    adapter = make_adapter(ConcatUNet(), dinov2)
    x = images()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        adapter(x)
    with pytest.raises(TypeError, match="floating-point"):
        adapter((images() * 255).to(torch.uint8))


def test_sgm_block_count_must_match_levels(dinov2):
    sgm = SGM(dinov2, blocks=(1, 2), image_size=56)
    with pytest.raises(ValueError, match="2 priors .* 3 levels"):
        PerceiveAdapter(ConcatUNet(), sgm=sgm)


def test_pgca_on_token_level_raises(dinov2):
    with pytest.raises(ValueError, match="pgca=True needs"):
        make_adapter(TokenBottleneckNet(), dinov2, levels=["mixer"], pgca=True)


def test_trace_failure_explains_itself():
    class NeedsSixteen(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            if x.shape[-1] % 16:
                raise ValueError("size must be a multiple of 16")
            return self.conv(x)

    with pytest.raises(RuntimeError, match="example_input"):
        PerceiveAdapter(NeedsSixteen(), sgm=None, trace_size=40)
    adapter = PerceiveAdapter(NeedsSixteen(), sgm=None, trace_size=48)
    assert [level.name for level in adapter.levels] == ["conv"]


def test_cfe_only_and_sgm_only_ablations(dinov2):
    x = images()
    cfe_only = make_adapter(ConcatUNet(), dinov2, sgm=None, zero_init=False)
    assert cfe_only.sgm is None and cfe_only(x).shape == x.shape
    sgm_only = make_adapter(ConcatUNet(), dinov2, cfe=None, zero_init=False)
    assert sgm_only(x).shape == x.shape and sgm_only.guide(x).embedding is None
    assert cfe_only.guide(x).priors is None
    with pytest.raises(ValueError, match="needs a CFE"):
        sgm_only.guide(x, positive=x)
    with pytest.raises(ValueError, match="both None"):
        PerceiveAdapter(ConcatUNet(), cfe=None, sgm=None)
