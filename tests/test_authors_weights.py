"""The Perceive-IR authors' released weights: their prompt checkpoint converts to a perceiver that scores
exactly as their recipe does, wrong files fail clearly, and their network checkpoint evaluates in one command.

Everything is written by the tests in the authors' layouts on tiny random networks (nothing is downloaded).
"""
from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F

from examples import evaluate as ev
from examples.backbones import create_backbone, load_checkpoint, save_official_checkpoint
from perceive_components import QualityPerceiver
from perceive_components.cli import main
from perceive_components.convert import AuthorsCheckpointError, convert_authors_prompts
from perceive_components.ops.io import write_image
from perceive_components.tiny import TINY_CLIP_NAME, tiny_clip

TIERS = ("terrible", "mediocre", "excellent")
OPENAI_MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
OPENAI_STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)


class NotATensor:
    """A Python object torch.load(weights_only=True) must refuse to unpickle."""


def authors_prompt_checkpoint(clip, n_ctx: int = 4, seed: int = 0) -> dict:
    """What the authors' prompt training saves (their learner's state dict and run state), built on ``clip``."""
    generator = torch.Generator().manual_seed(seed)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=77)
    ids = tokenizer([" ".join(["X"] * n_ctx)] * 3)  # their placeholder prompt, tokenized for each tier
    with torch.no_grad():
        embedded = clip.token_embedding(ids)
        context = torch.randn(3, n_ctx, embedded.shape[-1], generator=generator) * 0.5
        context[:, -1] = clip.token_embedding(torch.tensor([tokenizer.encode(w)[0] for w in TIERS]))
    learner = {"context": context, "token_prefix": embedded[:, :1].clone(),
               "token_suffix": embedded[:, 1 + n_ctx:].clone(), "tokenized_prompts": ids}
    parameter = torch.nn.Parameter(context.clone())
    optimizer = torch.optim.AdamW([parameter], lr=4e-5)
    parameter.sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100_000, eta_min=1e-6)
    return {"prompt_learner": learner, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "iteration": 100_000, "quality_names": TIERS, "context_length": n_ctx, "batch_size_per_gpu": 32,
            "world_size": 1, "global_batch_size": 32, "task_balanced": True}


def authors_logits(clip, learner: dict, images: torch.Tensor) -> torch.Tensor:
    """The authors' scoring: plain bicubic to the CLIP size, CLIP mean/std; their text-side recipe."""
    size = clip.visual.image_size
    x = F.interpolate(images, size=size, mode="bicubic", align_corners=False)
    image_features = F.normalize(clip.visual((x - OPENAI_MEAN) / OPENAI_STD), dim=-1)
    prompts = torch.cat((learner["token_prefix"], learner["context"], learner["token_suffix"]), dim=1)
    x = prompts + clip.positional_embedding
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))  # open_clip 3.x: batch-first, no permute
    eot = learner["tokenized_prompts"].argmax(dim=-1)
    text_features = F.normalize(x[torch.arange(3), eot] @ clip.text_projection, dim=-1)
    return clip.logit_scale.exp() * image_features @ text_features.t()


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory, clip) -> Path:
    path = tmp_path_factory.mktemp("authors") / "quality_prompts_100000.pth"
    torch.save(authors_prompt_checkpoint(clip), path)
    return path


def test_converted_prompts_score_exactly_as_the_authors_recipe(prompt_file, clip, tmp_path):
    out = tmp_path / "perceiver"
    convert_authors_prompts(prompt_file, out, clip_model=TINY_CLIP_NAME, pretrained=None)
    loaded = QualityPerceiver.from_pretrained(out)  # rebuilds the tiny CLIP from its recorded name
    assert loaded.resize_antialias is False
    images = torch.rand(4, 3, 96, 80, generator=torch.Generator().manual_seed(1))  # downscaled to 64²
    learner = torch.load(prompt_file, weights_only=True)["prompt_learner"]
    with torch.no_grad():
        reference = authors_logits(clip, learner, images)
        torch.testing.assert_close(loaded(images), reference, atol=1e-4, rtol=1e-5)
        antialiased = QualityPerceiver.from_pretrained(out, resize_antialias=True)(images)
    assert (antialiased - reference).abs().max() > 1e-3  # the preprocessing matters: the check can fail

    config = json.loads((out / "config.json").read_text())
    assert config["resize_antialias"] is False and config["n_ctx"] == 4 and config["tier_words"] == list(TIERS)
    assert config["training"]["iteration"] == 100_000 and config["training"]["task_balanced"] is True
    assert config["origin"]["converted_from"] == "quality_prompts_100000.pth"
    card = (out / "README.md").read_text()
    for needle in ("quality_prompts_100000.pth", "**iteration**: 100000", "**task_balanced**: True",
                   "license: other", "license_link: https://github.com/House-yuyu/Perceive-IR",
                   "keep the authors' terms", "(no antialias)"):
        assert needle in card, needle


def test_cli_convert_writes_a_loadable_perceiver(prompt_file, tmp_path, capsys):
    out = tmp_path / "cli-perceiver"
    assert main(["convert", "authors-prompts", str(prompt_file), "--out", str(out), "--clip-model", TINY_CLIP_NAME,
                 "--pretrained", ""]) == 0
    assert "iteration 100000, task-balanced: True" in capsys.readouterr().out
    context = torch.load(prompt_file, weights_only=True)["prompt_learner"]["context"]
    assert torch.equal(QualityPerceiver.from_pretrained(out).prompt_learner.ctx.detach(), context)


def _write(tmp_path: Path, checkpoint: object, name: str = "prompts.pth") -> Path:
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path


def test_wrong_files_fail_with_what_was_expected_and_what_came(clip, tmp_path):
    good = authors_prompt_checkpoint(clip)

    def convert(checkpoint, **kwargs):
        return convert_authors_prompts(_write(tmp_path, checkpoint), tmp_path / "out", clip=clip,
                                       clip_model=TINY_CLIP_NAME, pretrained=None, **kwargs)

    with pytest.raises(AuthorsCheckpointError, match=r"expected a dict with keys .*got a Tensor"):
        convert(torch.zeros(3))
    with pytest.raises(AuthorsCheckpointError, match=r"quality_names must be \('terrible', 'mediocre', 'excellent'\) "
                       r"in this order .*got \('excellent', 'mediocre', 'terrible'\)"):
        convert({**good, "quality_names": TIERS[::-1]})
    with pytest.raises(AuthorsCheckpointError, match=r"context must have shape \(3, n_ctx=5, width\), "
                                                     r"got \(3, 4, 64\)"):
        convert({**good, "context_length": 5})
    long = authors_prompt_checkpoint(clip, n_ctx=76)
    with pytest.raises(AuthorsCheckpointError, match="n_ctx=76 does not fit 'perceive-tiny-clip'"):
        convert(long)
    narrow = authors_prompt_checkpoint(open_clip.CLIP(32, vision_cfg=dict(image_size=32, layers=1, width=64,
                                       head_width=32, patch_size=8), text_cfg=dict(context_length=77, vocab_size=49408,
                                       width=32, heads=2, layers=1)))
    with pytest.raises(AuthorsCheckpointError, match="text width 32 but 'perceive-tiny-clip' has text width 64"):
        convert(narrow)
    missing = {key: value for key, value in good.items() if key != "quality_names"}
    with pytest.raises(AuthorsCheckpointError, match=r"missing \['quality_names'\], it has \["):
        convert(missing)
    with pytest.raises(AuthorsCheckpointError, match="authors' network checkpoint"):
        convert({"model": {}, "iteration": 1, "config": {}})
    learner = {key: value for key, value in good["prompt_learner"].items() if key != "token_suffix"}
    with pytest.raises(AuthorsCheckpointError, match=r"prompt_learner must be a state dict of tensors"):
        convert({**good, "prompt_learner": learner})
    assert not (tmp_path / "out").exists()  # nothing is written for a refused file


def test_prompts_of_another_clip_or_layout_are_refused(clip, tmp_path):
    other = authors_prompt_checkpoint(tiny_clip(seed=1))  # same shapes, another CLIP's token embeddings
    with pytest.raises(AuthorsCheckpointError, match="token_prefix differs from 'perceive-tiny-clip'.s token "
                                                     "embeddings .* trained on another CLIP"):
        convert_authors_prompts(_write(tmp_path, other), tmp_path / "out", clip=clip, clip_model=TINY_CLIP_NAME,
                                pretrained=None)
    shifted = authors_prompt_checkpoint(clip)
    shifted["prompt_learner"]["tokenized_prompts"] = torch.roll(shifted["prompt_learner"]["tokenized_prompts"], 1, 1)
    with pytest.raises(AuthorsCheckpointError, match=r"tokenized_prompts .* are not CLIP's ids of "
                                                     r"'\[SOS\] X…X \[EOT\]"):
        convert_authors_prompts(_write(tmp_path, shifted), tmp_path / "out", clip=clip, clip_model=TINY_CLIP_NAME,
                                pretrained=None)


def test_files_needing_more_than_tensors_are_never_unpickled(clip, tmp_path):
    path = _write(tmp_path, {"prompt_learner": NotATensor()})
    with pytest.raises(AuthorsCheckpointError, match=r"weights_only=True\) refuses to unpickle .*NotATensor"):
        convert_authors_prompts(path, tmp_path / "out", clip=clip)
    (tmp_path / "truncated.pth").write_bytes(path.read_bytes()[:40])
    with pytest.raises(AuthorsCheckpointError, match="not a PyTorch checkpoint"):
        convert_authors_prompts(tmp_path / "truncated.pth", tmp_path / "out", clip=clip)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_authors_prompts(tmp_path / "absent.pth", tmp_path / "out", clip=clip)


# ------------------------------------------------------------------------------------ the authors' network
DINOV2_KWARGS = {"depth": 2, "embed_dim": 32, "num_heads": 2}


@pytest.fixture(scope="module")
def dinov2_file(tmp_path_factory) -> Path:
    """A tiny DINOv2-layout ViT at its 518-px, 37×37 grid whose position embedding matters (unit-scale grid,
    LayerScale at 1), saved as 'pretrained' weights for timm to load from a file."""
    torch.manual_seed(0)
    net = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, num_classes=0, **DINOV2_KWARGS)
    with torch.no_grad():
        net.pos_embed.normal_()
        for name, parameter in net.named_parameters():
            if name.endswith("gamma"):
                parameter.fill_(1.0)
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_tiny.pth"
    torch.save(net.state_dict(), path)
    return path


def test_the_authors_network_checkpoint_evaluates_in_one_command(dinov2_file, tmp_path):
    dinov2 = {**DINOV2_KWARGS, "pretrained_cfg_overlay": {"file": str(dinov2_file)}}
    torch.manual_seed(0)
    network = create_backbone("perceive-ir-net-tiny", dinov2_pretrained=True, dinov2_kwargs=dinov2)
    with torch.no_grad():
        for parameter in network.pgm.parameters():  # PGM starts as the identity: make the priors matter
            parameter.normal_(0.0, 0.5)
    checkpoint = save_official_checkpoint(network, tmp_path / "perceiveIR_tiny.pth")  # the authors' layout
    generator = torch.Generator().manual_seed(0)
    for index in range(2):
        clean = torch.rand(3, 32, 40, generator=generator)
        write_image(tmp_path / "data" / "setA" / "target" / f"im{index}.png", clean)
        write_image(tmp_path / "data" / "setA" / "degraded" / f"im{index}.png",
                    (clean + 0.1 * torch.randn(clean.shape, generator=generator)).clamp(0, 1))

    def command(*extra: str) -> dict:
        return ev.main(["--backbone", "perceive-ir-net-tiny", "--checkpoint", str(checkpoint), "--data-root",
                        str(tmp_path / "data"), "--device", "cpu", "--override", "dinov2_pretrained=True",
                        "--override", f"dinov2_kwargs={dinov2!r}", *extra])

    def reference(position_embedding: str) -> dict:
        model = create_backbone("perceive-ir-net-tiny", dinov2_pretrained=True, dinov2_kwargs=dinov2)
        load_checkpoint(model, checkpoint, sgm_position_embedding=position_embedding)
        assert model.sgm.position_embedding == position_embedding
        sets = ev.discover_sets(tmp_path / "data")
        return ev.summarise(ev.evaluate(model.eval(), sets), [s.label for s in sets])

    automatic, hf, as_timm = command(), reference("hf"), reference("timm")
    assert automatic == hf  # the authors' layout selects the Hugging Face way by itself
    assert hf != as_timm  # and it makes a difference here, so the check can fail
    assert command("--sgm-position-embedding", "timm") == as_timm  # the timm way stays selectable
    model = load_checkpoint(create_backbone("perceive-ir-net-tiny", dinov2_pretrained=True, dinov2_kwargs=dinov2),
                            checkpoint)
    assert model.config["dinov2_position_embedding"] == "hf"
