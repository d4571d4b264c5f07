"""QualityPerceiver: the CoOp text path, scoring outputs, caching and input validation (docs/method.md §1.1)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from perceive_components import QualityPerceiver


def test_coop_text_path_equals_encode_text(tiny_clip):
    """With the context set to real token embeddings, the prompt path reproduces CLIP's encode_text."""
    import open_clip

    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=77)
    for text in ("a photo of dogs", "excellent"):
        ids = tokenizer([text])
        n_ctx = int((ids[0] != 0).sum()) - 2
        perceiver = QualityPerceiver(clip_model="tiny", pretrained=None, n_ctx=n_ctx, clip=tiny_clip)
        with torch.no_grad():
            real = tiny_clip.token_embedding(ids[0, 1 : 1 + n_ctx])
            perceiver.prompt_learner.ctx.copy_(real.expand(3, -1, -1))
            ours = perceiver.encode_prompts()
            reference = tiny_clip.encode_text(ids, normalize=True)
        assert torch.allclose(ours, reference.expand(3, -1), atol=1e-5), (ours - reference).abs().max()


def test_last_context_vector_starts_as_tier_word(tiny_clip):
    import open_clip

    perceiver = QualityPerceiver(clip_model="tiny", pretrained=None, n_ctx=4, clip=tiny_clip)
    tokenizer = open_clip.tokenizer.SimpleTokenizer()
    for tier, word in enumerate(perceiver.tier_words):
        expected = tiny_clip.token_embedding.weight[tokenizer.encode(word)[0]]
        assert torch.equal(perceiver.prompt_learner.ctx[tier, -1].detach(), expected.detach())
    assert perceiver.prompt_learner.ctx[:, :-1].std().item() == pytest.approx(0.02, rel=0.3)


def test_only_prompts_are_state_and_parameters(tiny_perceiver):
    assert list(tiny_perceiver.state_dict()) == ["prompt_learner.ctx"]
    assert [name for name, _ in tiny_perceiver.named_parameters()] == ["prompt_learner.ctx"]
    assert not any(p.requires_grad for p in tiny_perceiver.image_encoder.parameters())
    tiny_perceiver.train()
    assert not tiny_perceiver.image_encoder.training  # frozen CLIP never leaves eval mode


def test_outputs_shapes_ranges_and_consistency(tiny_perceiver):
    images = torch.rand(5, 3, 40, 56)
    with torch.no_grad():
        logits = tiny_perceiver(images)
        probs = tiny_perceiver.probabilities(images)
        q = tiny_perceiver.score(images)
        tier = tiny_perceiver.predict(images)
    assert logits.shape == (5, 3) and probs.shape == (5, 3) and q.shape == (5,) and tier.shape == (5,)
    assert torch.allclose(probs.sum(-1), torch.ones(5))
    assert torch.allclose(q, probs[:, 1] + 2 * probs[:, 2])
    assert ((q >= 0) & (q <= 2)).all()
    assert torch.equal(tier, logits.argmax(-1))
    assert tiny_perceiver.lower_better is False
    # logits are s · cos: bounded by the logit scale
    assert logits.abs().max() <= tiny_perceiver.logit_scale + 1e-4


def test_text_feature_cache_follows_prompt_updates_and_devices(tiny_perceiver):
    with torch.no_grad():
        before = tiny_perceiver.text_features().clone()
    optimizer = torch.optim.AdamW([tiny_perceiver.prompt_learner.ctx], lr=1e-1)
    loss = tiny_perceiver(torch.rand(2, 3, 32, 32)).logsumexp(-1).mean()
    loss.backward()
    optimizer.step()
    tiny_perceiver.to("cpu")  # moving must not resurrect a stale cache
    with torch.no_grad():
        after = tiny_perceiver.text_features()
        assert not torch.allclose(before, after)
        assert torch.allclose(after, tiny_perceiver.encode_prompts())


def test_freeze_prompts_drops_text_tower_and_keeps_scores(tiny_clip):
    perceiver = QualityPerceiver(clip_model="tiny", pretrained=None, n_ctx=4, clip=tiny_clip)
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = perceiver.score(images)
    perceiver.freeze_prompts()
    assert perceiver.text_encoder_dropped
    assert not perceiver.prompt_learner.ctx.requires_grad
    perceiver.to(torch.float64).to(torch.float32)  # the cache survives device/dtype moves
    with torch.no_grad():
        assert torch.allclose(perceiver.score(images), expected, atol=1e-6)
    # gradients still reach the images (the CLIP-aware loss relies on this)
    x = images.clone().requires_grad_(True)
    perceiver(x)[:, 2].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_straight_through_clamp_passes_gradient_outside_range(tiny_perceiver):
    x = torch.full((1, 3, 32, 32), 1.2, requires_grad=True)
    tiny_perceiver.encode_images(x, straight_through=True).sum().backward()
    assert x.grad.abs().sum() > 0
    y = torch.full((1, 3, 32, 32), 1.2, requires_grad=True)
    tiny_perceiver.encode_images(y).sum().backward()
    assert y.grad.abs().sum() == 0  # a hard clamp kills it: that is why the loss uses straight-through


def test_bf16_autocast_scoring(tiny_perceiver):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = tiny_perceiver(torch.rand(2, 3, 32, 32))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "images, error, message",
    [
        (torch.rand(3, 32, 32), ValueError, "4 dimensions|dimensions"),
        (torch.rand(2, 1, 32, 32), ValueError, "3 channels"),
        (torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8), TypeError, "floating-point"),
        (torch.full((2, 3, 32, 32), float("nan")), ValueError, "NaN or Inf"),
        (torch.full((2, 3, 32, 32), float("inf")), ValueError, "NaN or Inf"),
        (torch.full((2, 3, 32, 32), 255.0), ValueError, r"\[0, 1\]"),
        (torch.full((2, 3, 32, 32), -0.5), ValueError, r"\[0, 1\]"),
        (torch.rand(0, 3, 32, 32), ValueError, "empty batch"),
        ([[0.5]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_images_raise_clear_errors(tiny_perceiver, images, error, message):
    with pytest.raises(error, match=message) as info:
        tiny_perceiver(images)
    assert "images" in str(info.value)


def test_small_overshoot_is_tolerated(tiny_perceiver):
    images = torch.rand(1, 3, 32, 32) * 1.0005
    assert torch.isfinite(tiny_perceiver(images)).all()


@pytest.mark.parametrize("words, message", [
    (("terrible", "so-so", "excellent"), "single token"),
    (("terrible", "mediocre", "excellent photo"), "single token"),
    (("terrible", "", "excellent"), "non-empty"),
    (("excellent",), "at least two"),
])
def test_tier_words_must_be_single_tokens(tiny_clip, words, message):
    with pytest.raises(ValueError, match=message):
        QualityPerceiver(clip_model="tiny", pretrained=None, n_ctx=4, tier_words=words, clip=tiny_clip)


def test_bad_constructor_arguments(tiny_clip):
    with pytest.raises(ValueError, match="n_ctx"):
        QualityPerceiver(clip_model="tiny", pretrained=None, n_ctx=0, clip=tiny_clip)
    with pytest.raises(ValueError, match="context length"):
        QualityPerceiver(clip_model="tiny", pretrained=None, n_ctx=80, clip=tiny_clip)
    with pytest.raises(TypeError, match="open_clip model"):
        QualityPerceiver(clip_model="tiny", pretrained=None, clip=torch.nn.Linear(2, 2))


def test_offline_default_clip_fails_fast_with_remedy():
    import time

    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="clip=") as info:
        QualityPerceiver()  # ViT-B-32-quickgelu / openai: not cached, HF_HUB_OFFLINE=1
    assert time.perf_counter() - start < 10
    assert "ViT-B-32-quickgelu" in str(info.value)


# ------------------------------------------------------------------ preprocessing the prompts were trained with
OPENAI_MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
OPENAI_STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)


def clip_features(clip, images: torch.Tensor, antialias: bool) -> torch.Tensor:
    """CLIP features of images resized bicubically to the tiny CLIP's 64², with or without antialias."""
    x = F.interpolate(images, size=(64, 64), mode="bicubic", align_corners=False, antialias=antialias)
    return F.normalize(clip.visual((x - OPENAI_MEAN) / OPENAI_STD), dim=-1)


@pytest.mark.parametrize("antialias", [False, True])
def test_resize_applies_the_recorded_antialias(tiny_clip, antialias):
    perceiver = QualityPerceiver(clip_model="tiny", pretrained=None, n_ctx=4, clip=tiny_clip,
                                 resize_antialias=antialias)
    images = torch.rand(2, 3, 80, 72)
    expected = F.interpolate(images, size=(64, 64), mode="bicubic", align_corners=False, antialias=antialias)
    assert torch.equal(perceiver.resize(images), expected)
    assert perceiver.config()["resize_antialias"] is antialias


def test_new_perceivers_resize_as_the_authors_and_check_the_flag(tiny_clip):
    assert QualityPerceiver(clip_model="tiny", pretrained=None, n_ctx=4, clip=tiny_clip).resize_antialias is False
    with pytest.raises(TypeError, match="resize_antialias must be True or False, got 'yes'"):
        QualityPerceiver(clip_model="tiny", pretrained=None, n_ctx=4, clip=tiny_clip, resize_antialias="yes")


@pytest.mark.parametrize("antialias", [False, True])
def test_clip_aware_loss_sees_images_through_the_perceivers_preprocessing(tiny_clip, antialias):
    from perceive_components.losses import clip_aware_loss

    torch.manual_seed(0)
    perceiver = QualityPerceiver(clip_model="tiny", pretrained=None, n_ctx=4, clip=tiny_clip,
                                 resize_antialias=antialias).freeze_prompts(drop_text_encoder=False)
    images = torch.rand(3, 3, 80, 72, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = perceiver.logit_scale * clip_features(tiny_clip, images, antialias) @ perceiver.text_features().t()
        expected = 1 - logits.softmax(-1)[:, 2]
        torch.testing.assert_close(clip_aware_loss(images, perceiver, reduction="none"), expected)


@pytest.mark.parametrize("antialias", [False, True])
def test_prompt_training_sees_images_through_the_perceivers_preprocessing(tiny_clip, antialias):
    from perceive_components.stage1 import TensorTriplets, train_prompts
    from perceive_components.stage1.train import _StepBatches

    generator = torch.Generator().manual_seed(0)
    triplets = TensorTriplets(*(torch.rand(4, 3, 48, 48, generator=generator) for _ in range(3)), ["a", "b"] * 2)
    torch.manual_seed(0)
    perceiver = QualityPerceiver(clip_model="tiny", pretrained=None, n_ctx=4, clip=tiny_clip,
                                 resize_antialias=antialias)
    images, labels = _StepBatches(triplets, triplets.tasks, 2, 48, seed=0, balanced=True)[0]  # step 0's batch
    with torch.no_grad():
        logits = perceiver.logit_scale * clip_features(tiny_clip, images, antialias) @ perceiver.encode_prompts().t()
        expected = F.cross_entropy(logits, labels).item()
    history = train_prompts(perceiver, triplets, steps=1, batch_size=2, crop_size=48, progress=False)
    assert history["loss"][0] == pytest.approx(expected, abs=1e-5)


# ------------------------------------------------------------------ logit scale and tier words
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 0.0, -100.0, True, "100"])
def test_logit_scale_must_be_finite_and_positive(tiny_clip, scale):
    with pytest.raises(ValueError, match="logit_scale must be a finite number > 0") as info:
        QualityPerceiver(clip_model="tiny", pretrained=None, n_ctx=4, clip=tiny_clip, logit_scale=scale)
    assert repr(scale) in str(info.value)


def test_a_clip_with_a_broken_logit_scale_is_refused(tiny_clip):
    import copy

    broken = copy.deepcopy(tiny_clip)
    with torch.no_grad():
        broken.logit_scale.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"the CLIP's exp\(logit_scale\) .* must be a finite number > 0"):
        QualityPerceiver(clip_model="tiny", pretrained=None, n_ctx=4, clip=broken)
    assert QualityPerceiver(clip_model="tiny", pretrained=None, n_ctx=4, clip=broken, logit_scale=50).logit_scale == 50


@pytest.mark.parametrize("words, repeated", [
    (("terrible", "terrible", "excellent"), "'terrible' and 'terrible'"),
    (("bad", "good", "Good"), "'good' and 'Good'"),
])
def test_tier_words_must_be_distinct(tiny_clip, words, repeated):
    with pytest.raises(ValueError, match=f"tier_words must be distinct tokens: {repeated} are the same CLIP token"):
        QualityPerceiver(clip_model="tiny", pretrained=None, n_ctx=4, tier_words=words, clip=tiny_clip)
