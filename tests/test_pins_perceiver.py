"""The quality perceiver's defaults (docs/method.md §1.1) pinned against open_clip's own tokenizer, text tower
and image tower: prompt layout, tier order, context init, CLIP preprocessing constants, logit scale, q score."""
from __future__ import annotations

import open_clip
import pytest
import torch

import method_reference as ref
from perceive_components import QualityPerceiver
from perceive_components.tiny import tiny_clip

CLIP_SIZE = 64  # the tiny CLIP's input size: images of this size skip the resize


def token_embedding(clip: torch.nn.Module, token_id: int) -> torch.Tensor:
    return clip.token_embedding.weight[token_id].detach()


def test_tiers_are_terrible_mediocre_excellent_and_the_last_context_vector_is_the_tier_word():
    clip = tiny_clip()
    perceiver = QualityPerceiver(clip_model="perceive-tiny-clip", pretrained=None, n_ctx=4, clip=clip)
    assert perceiver.tier_words == ("terrible", "mediocre", "excellent")
    for tier, word in enumerate(("terrible", "mediocre", "excellent")):
        word_id = int(open_clip.tokenize([word])[0, 1])
        assert torch.equal(perceiver.prompt_learner.ctx[tier, -1].detach(), token_embedding(clip, word_id)), word


def test_prompt_tokens_are_sos_context_eot_then_padding():
    clip = tiny_clip()
    perceiver = QualityPerceiver(clip_model="perceive-tiny-clip", pretrained=None, n_ctx=4, clip=clip)
    sos, eot = (int(t) for t in open_clip.tokenize([""])[0, :2])  # "" tokenizes to [SOS, EOT, 0, …]
    embeddings = perceiver.prompt_learner().detach()
    assert embeddings.shape == (3, 77, 64)
    ctx = perceiver.prompt_learner.ctx.detach()
    for tier in range(3):
        assert torch.equal(embeddings[tier, 0], token_embedding(clip, sos))
        assert torch.equal(embeddings[tier, 1:5], ctx[tier])
        assert torch.equal(embeddings[tier, 5], token_embedding(clip, eot))
        assert torch.equal(embeddings[tier, 6:], token_embedding(clip, 0).expand(71, -1))
    assert perceiver.prompt_learner.eot_index == 5


def test_prompt_features_equal_encode_text_of_the_sentence_the_context_spells():
    _, perceiver, text = ref.perceiver_with_known_prompts()  # context = "a photo of <tier word>"
    torch.testing.assert_close(perceiver.text_features(), text, rtol=0, atol=1e-5)


def test_context_starts_as_normal_0_02_draws():
    perceiver = QualityPerceiver(clip_model="perceive-tiny-clip", pretrained=None, n_ctx=16, clip=tiny_clip())
    drawn = perceiver.prompt_learner.ctx[:, :-1].detach()  # 3 × 15 × 64 draws (the last vector is the word)
    assert drawn.std().item() == pytest.approx(0.02, rel=0.1)
    assert abs(drawn.mean().item()) < 0.002


def test_image_side_clamps_and_normalises_with_the_openai_clip_mean_and_std():
    clip = tiny_clip()
    perceiver = QualityPerceiver(clip_model="perceive-tiny-clip", pretrained=None, n_ctx=4, clip=clip)
    images = torch.rand(3, 3, CLIP_SIZE, CLIP_SIZE, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1
    torch.testing.assert_close(perceiver.encode_images(images), ref.clip_image_features(clip, images),
                               rtol=1e-5, atol=1e-6)


def test_logits_probabilities_tier_and_q_score():
    """logits = s·v Tᵀ with s = exp(CLIP logit_scale); q = Σ_c c·p_c, higher is better."""
    clip, perceiver, text = ref.perceiver_with_known_prompts()
    images = torch.rand(4, 3, CLIP_SIZE, CLIP_SIZE, generator=torch.Generator().manual_seed(1))
    features = ref.clip_image_features(clip, images)
    logits = ref.clip_scale(clip) * features.double() @ text.double().t()
    p = ref.tier_probabilities(features, text, ref.clip_scale(clip))
    with torch.no_grad():
        torch.testing.assert_close(perceiver(images).double(), logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(perceiver.probabilities(images).double(), p, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(perceiver.score(images).double(), p[:, 0] * 0 + p[:, 1] * 1 + p[:, 2] * 2,
                                   rtol=1e-5, atol=1e-6)
        assert torch.equal(perceiver.predict(images), p.argmax(dim=1))
    assert perceiver.lower_better is False


def test_a_small_overshoot_is_scored_as_the_clamped_image():
    """Within the 1e-3 input tolerance, values past [0, 1] are clamped before CLIP (docs/method.md §1.1)."""
    _, perceiver, _ = ref.perceiver_with_known_prompts()
    images = torch.rand(2, 3, CLIP_SIZE, CLIP_SIZE, generator=torch.Generator().manual_seed(2))
    images[:, :, :8] = 1.0005
    images[:, :, -8:] = -0.0005
    with torch.no_grad():
        assert torch.equal(perceiver(images), perceiver(images.clamp(0, 1)))


def test_bf16_autocast_scoring_matches_float32_up_to_rounding():
    _, perceiver, _ = ref.perceiver_with_known_prompts()
    images = torch.rand(2, 3, CLIP_SIZE, CLIP_SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = perceiver(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = perceiver(images)
    assert half.dtype == torch.float32  # the 3-way head runs in float32
    assert (half - full).abs().max() < 0.03  # bf16 rounding (~0.01); another image moves the logits by ~0.15
