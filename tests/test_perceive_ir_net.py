"""The paper's own network (docs/method.md §3.4): exact size and the authors' key layout, wiring, gradients, the
frozen DINOv2, checkpoints in the authors' format, bf16 and input errors."""
from __future__ import annotations

import copy
import hashlib

import pytest
import torch

from perceive_components.guidance import Guidance
from examples.backbones import (
    CheckpointError, create_backbone, get_backbone_entry, list_backbones, load_checkpoint, save_official_checkpoint,
)

PAPER_PARAMETERS = 33_901_111
# sha256 (first 16 hex digits) of the sorted "key:shape" lines of the authors' PerceiveIR state dict
# (House-yuyu/Perceive-IR, src/perceiveIR/model.py at commit c7f79d4), computed once from their code for the
# default config and for PerceiveIR(dim=8, blocks=(1,1,1,1), heads=(1,1,2,2), refinement_blocks=1,
# semantic_dim=32). Equal digests mean their checkpoints hold exactly our tensors under upstream_key_map().
AUTHORS_LAYOUT = {"perceive-ir-net": "364d3903230dd609", "perceive-ir-net-tiny": "cfc73cda3fc4b2c9"}


def layout_digest(state: dict[str, torch.Tensor]) -> str:
    lines = "\n".join(f"{key}:{tuple(value.shape)}" for key, value in sorted(state.items()))
    return hashlib.sha256(lines.encode()).hexdigest()[:16]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())



@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_backbone("perceive-ir-net-tiny").eval()


def test_default_config_has_the_authors_parameter_count_and_key_layout():
    with torch.device("meta"):  # no weights, no memory: DINOv2-B built with pretrained=False
        model = create_backbone("perceive-ir-net", dinov2_pretrained=False)
    assert n_params(model) == PAPER_PARAMETERS
    assert n_params(model.cfe) == 202_016
    assert [n_params(pgm) for pgm in model.pgm] == [95_424, 209_280, 492_288, 1_279_488]
    own = model.state_dict()
    key_map = model.upstream_key_map()
    assert list(key_map) == list(own) and len(set(key_map.values())) == len(key_map)
    assert all(key_map[key] == key for key in set(key_map) & set(key_map.values()))  # no name means two things
    assert layout_digest({key_map[key]: value for key, value in own.items()}) == AUTHORS_LAYOUT["perceive-ir-net"]
    # The DINOv2-B (86 M parameters) exists but is held frozen outside parameters() and state_dict().
    assert model.sgm.blocks == (1, 4, 8, 12) and model.sgm.embed_dim == 768
    assert n_params(model.sgm.encoder) > 80_000_000
    assert not any(key.startswith("sgm") for key in own)
    assert list(model.decoder_levels().values()) == [384, 192, 96, 48]


def test_tiny_forward_shapes_and_embeddings(tiny):
    for height, width in [(32, 32), (48, 64)]:
        images = torch.rand(2, 3, height, width)
        with torch.no_grad():
            guidance = tiny.guide(images)
            restored = tiny(images, guidance=guidance)
            assert restored.shape == images.shape
            torch.testing.assert_close(guidance.embedding, tiny.cfe(images))
            torch.testing.assert_close(restored, tiny(images))
        assert guidance.embedding.shape == (2, 128) and guidance.positive_embedding is None
        torch.testing.assert_close(guidance.embedding.norm(dim=1), torch.ones(2))
    images = torch.rand(2, 3, 32, 32)
    for positive in (torch.rand(2, 3, 32, 32), torch.rand(2, 3, 24, 40)):  # one CFE batch, or two
        with torch.no_grad():
            guidance = tiny.guide(images, positive)
            torch.testing.assert_close(guidance.positive_embedding, tiny.cfe(positive))
            torch.testing.assert_close(guidance.embedding, tiny.cfe(images))
    assert not [name for name in dir(tiny) if name.startswith("last_")]


def test_every_trainable_parameter_gets_a_gradient_and_dinov2_none():
    """DDP without find_unused_parameters: the output alone reaches every parameter (CFE via the PGMs)."""
    torch.manual_seed(0)
    model = create_backbone("perceive-ir-net-tiny")
    model(torch.rand(2, 3, 32, 32)).square().mean().backward()
    no_grad = [key for key, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert any(key.startswith("cfe.") for key, _ in model.named_parameters())
    assert all(p.grad is None and not p.requires_grad for p in model.sgm.encoder.parameters())


def test_each_level_is_guided_by_one_pgm_output_shared_by_its_etbs():
    torch.manual_seed(0)
    model = create_backbone("perceive-ir-net-tiny", blocks=(1, 2, 2, 3)).eval()
    images = torch.rand(2, 3, 32, 32)
    seen: dict[str, list] = {}
    handles = []
    for level in model.decoder_levels():
        stage = getattr(model, level)
        handles.append(stage.register_forward_pre_hook(
            lambda module, args, level=level: seen.setdefault(level, []).append(("stage", args[0]))))
        for block in stage.blocks:
            handles.append(block.register_forward_pre_hook(
                lambda module, args, level=level: seen[level].append(("etb", args[1]))))
    priors = [torch.randn(2, 32) for _ in range(4)]  # distinct (a random tiny DINOv2's blocks barely differ)
    with torch.no_grad():
        z = model.cfe(images)
        model(images, guidance=Guidance(tuple(priors), z))
    for handle in handles:
        handle.remove()
    for index, level in zip((3, 2, 1, 0), model.decoder_levels()):  # latent ← F_4 (deepest) … decoder1 ← F_1
        (kind, stage_input), *etb_calls = seen[level]
        assert kind == "stage" and len(etb_calls) == len(getattr(model, level).blocks)
        expected = model.pgm[index](stage_input, priors[index], z)
        assert all(guidance is etb_calls[0][1] for _, guidance in etb_calls)  # Y computed once per level
        torch.testing.assert_close(etb_calls[0][1], expected)


def test_given_guidance_gives_the_same_output(tiny):
    images = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        reference = tiny(images)
        again = tiny(images, guidance=Guidance(tuple(tiny.sgm(images)), tiny.cfe(images)))
    torch.testing.assert_close(again, reference)
    without_sgm = create_backbone("perceive-ir-net-tiny", dinov2=None)
    without_sgm.load_state_dict(tiny.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(without_sgm(images, guidance=tiny.guide(images)), reference)
    with pytest.raises(ValueError, match="dinov2=None: build the Guidance yourself"):
        without_sgm(images)


def test_dinov2_is_frozen_out_of_state_dict_and_follows_the_model():
    model = create_backbone("perceive-ir-net-tiny")
    assert not any(key.startswith("sgm") for key in model.state_dict())
    assert not any(key.startswith("sgm") for key, _ in model.named_parameters())
    model.train()
    assert model.training and not model.sgm.encoder.training
    model.double()
    assert next(model.sgm.encoder.parameters()).dtype == torch.float64
    with torch.no_grad():
        assert model(torch.rand(1, 3, 16, 16, dtype=torch.float64)).dtype == torch.float64


def test_checkpoint_round_trip_in_the_authors_layout(tiny, tmp_path):
    path = save_official_checkpoint(tiny, tmp_path / "perceive_ir.pth")
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"model", "iteration", "config"}
    assert raw["config"] == {"model": {"dim": 8, "blocks": [1, 1, 1, 1], "heads": [1, 1, 2, 2], "refinement_blocks": 1}}
    assert layout_digest(raw["model"]) == AUTHORS_LAYOUT["perceive-ir-net-tiny"]
    assert {"cfe.body.0.weight", "pgm.0.affine.2.bias", "encoder1.0.norm1.body.weight",
            "encoder1.0.attention.qkv_dw.weight", "latent.blocks.0.attention.q.1.weight",
            "latent.blocks.0.mdta.project.weight", "decoder1.blocks.0.guidance_norm.body.bias",
            "down1.body.0.bias"} <= set(raw["model"])

    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        reference = tiny(images)
        guidance = tiny.guide(images)  # the tiny DINOv2 is random: share its priors (a real one is pretrained)
    torch.manual_seed(1)
    fresh = load_checkpoint(create_backbone("perceive-ir-net-tiny").eval(), path)
    with torch.no_grad():
        assert not torch.equal(fresh.guide(images).priors[0], guidance.priors[0])
        assert torch.equal(fresh(images, guidance=guidance), reference)

    # The authors' training checkpoint adds optimiser, scheduler and training state: still weights_only-safe.
    optimizer = torch.optim.AdamW(fresh.parameters(), lr=2e-4)
    fresh(images).mean().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10, eta_min=1e-6)
    torch.save({"model": raw["model"], "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "iteration": 5000, "config": {"name": "run", "model": raw["config"]["model"]},
                "training_state": {"probe_hash": "ab12", "epoch_reference_psnr": 30.5}}, tmp_path / "training.pth")
    load_checkpoint(fresh, tmp_path / "training.pth")
    with torch.no_grad():
        assert torch.equal(fresh(images, guidance=guidance), reference)

    # Our own key names (e.g. weights exported by the training loop) load as well.
    from safetensors.torch import save_file

    save_file({key: value.contiguous() for key, value in tiny.state_dict().items()}, str(tmp_path / "own.safetensors"))
    torch.manual_seed(2)
    other = load_checkpoint(create_backbone("perceive-ir-net-tiny").eval(), tmp_path / "own.safetensors")
    with torch.no_grad():
        assert torch.equal(other(images, guidance=guidance), reference)


def test_checkpoints_of_other_backbones_or_sizes_are_refused_clearly(tiny, tmp_path):
    restormer = save_official_checkpoint(create_backbone("restormer-tiny"), tmp_path / "restormer.pth")
    with pytest.raises(CheckpointError, match="looks like a Restormer checkpoint, not a Perceive-IR net one"):
        load_checkpoint(create_backbone("perceive-ir-net-tiny"), restormer)
    ours = save_official_checkpoint(tiny, tmp_path / "perceive_ir.pth")
    with pytest.raises(CheckpointError, match="looks like a Perceive-IR net checkpoint, not a Restormer one"):
        load_checkpoint(create_backbone("restormer-tiny"), ours)
    with pytest.raises(CheckpointError, match="same Perceive-IR net layout but different sizes"):
        load_checkpoint(create_backbone("perceive-ir-net-tiny", dim=16), ours)


def test_bf16_autocast_training_step(tiny):
    model = copy.deepcopy(tiny).train()  # same weights and the same (random) DINOv2
    images = torch.rand(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        guidance = model.guide(images, torch.rand(2, 3, 32, 32))
        restored = model(images, guidance=guidance)
        loss = (restored - images).abs().mean() + (guidance.embedding * guidance.positive_embedding).sum()
    assert restored.shape == images.shape and torch.isfinite(restored).all()
    assert guidance.embedding.dtype == torch.float32
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        assert (restored.float() - tiny(images)).abs().max() < 0.1  # bf16 rounding, not another computation


def test_bad_inputs_and_configs_raise_clear_errors(tiny):
    images = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match="multiples of 8, got 30x45.*pad_to_multiple"):
        tiny(torch.rand(1, 3, 30, 45))
    with pytest.raises(ValueError, match=r"degraded must have shape \(B, 3, H, W\), got \(2, 1, 32, 32\)"):
        tiny(torch.rand(2, 1, 32, 32))
    with pytest.raises(TypeError, match="floating-point.*torch.uint8"):
        tiny(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="positive must have the batch size of degraded"):
        tiny.guide(images, torch.rand(3, 3, 32, 32))
    z = torch.rand(2, 128)
    with pytest.raises(ValueError, match="priors must hold 4 tensors"):
        tiny(images, guidance=Guidance((torch.rand(2, 32),) * 3, z))
    with pytest.raises(ValueError, match=r"priors\[2\] must have shape \(2, 32\) .*got \(2, 768\)"):
        tiny(images, guidance=Guidance((torch.rand(2, 32),) * 2 + (torch.rand(2, 768),) * 2, z))
    with pytest.raises(ValueError, match=r"guidance.embedding must have shape \(2, 128\)"):
        tiny(images, guidance=Guidance((torch.rand(2, 32),) * 4, torch.rand(2, 64)))
    with pytest.raises(TypeError, match="guidance must be the Guidance"):
        tiny(images, images)
    with pytest.raises(ValueError, match="pass semantic_dim=32"):
        create_backbone("perceive-ir-net-tiny", semantic_dim=768)
    with pytest.raises(ValueError, match="4 priors"):
        create_backbone("perceive-ir-net-tiny", dinov2_blocks=(1, 2))
    with pytest.raises(ValueError, match="blocks and heads need 4 entries"):
        create_backbone("perceive-ir-net-tiny", blocks=(1, 1, 1))
    with pytest.raises(ValueError, match="positive divisor of channels=8"):
        create_backbone("perceive-ir-net-tiny", heads=(3, 1, 2, 2))
    with pytest.raises(TypeError, match="dinov2 must be"):
        create_backbone("perceive-ir-net-tiny", dinov2=3)


def test_registry_entries():
    assert {"perceive-ir-net", "perceive-ir-net-tiny"} <= set(list_backbones())
    entry = get_backbone_entry("perceive-ir-net")
    assert entry.config["dinov2"] == "vit_base_patch14_dinov2.lvd142m" and entry.config["dinov2_pretrained"]
    assert "Apache-2.0" in entry.upstream_licence


def test_doc_examples_of_the_section_run():
    """The ```python blocks of docs/backbones.md's section on this network run, in order (downloads skipped)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "backbones.md").read_text()
    section = text[text.index("## The paper's own network"):text.index("## Licences")]
    blocks = [block for block in re.findall(r"```python\n(.*?)```", section, re.S)
              if "not run in tests" not in block.splitlines()[0]]
    assert len(blocks) >= 3
    namespace: dict = {}
    torch.manual_seed(0)
    for block in blocks:
        exec(compile(block, "docs/backbones.md", "exec"), namespace)
    assert namespace["restored"].shape == (2, 3, 32, 32) and namespace["tile"].shape == (1, 3, 32, 32)
    with torch.no_grad():
        image = torch.rand(1, 3, 32, 32)
        torch.testing.assert_close(namespace["copy"].eval()(image), namespace["model"].eval()(image))
