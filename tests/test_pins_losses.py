"""Every default of the stage-2 losses (docs/method.md §2) pinned against the equations of method_reference.py.

Each test builds the library's object with its *defaults* and compares with a reference whose constants are
literals (λ, τ, ω, the VGG taps, w_easy, ε, 1.25 / 0.75, the CLIP logit scale and loss form), so changing any
one default fails the test that names it.
"""
from __future__ import annotations

import math

import pytest
import torch

import method_reference as ref
from perceive_components.guidance import Guidance
from perceive_components.losses import (
    CLIPAwareLoss,
    DegradationContrastiveLoss,
    DifficultyAdaptivePerceptualLoss,
    QualityAwareLoss,
    VGGFeatures,
    clip_aware_loss,
    degradation_contrastive_loss,
)
from perceive_components.ops.metrics import psnr
from perceive_components.tiny import tiny_vgg

CLIP_SIZE = 64  # the tiny CLIP's input size: images of this size skip the resize


def uniform(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def unit_rows(batch: int, dim: int, seed: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def dyadic_triplet(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """G with values k/8 in [1/4, 3/4] and two independent ±1 sign maps: G ± steps are exact in binary, so two
    images with the same step have exactly the same MSE (a PSNR tie) although their pixels differ."""
    generator = torch.Generator().manual_seed(seed)
    gt = torch.randint(2, 7, (batch, 3, 16, 16), generator=generator).double() / 8
    sign_r, sign_p = (torch.randint(0, 2, (batch, 3, 16, 16), generator=generator).double() * 2 - 1 for _ in range(2))
    return gt, sign_r, sign_p


# ---------------------------------------------------------------------------------------------- §2.3 τ
def test_contrastive_temperature_is_0_1():
    anchor, positive = unit_rows(6, 16, seed=1), unit_rows(6, 16, seed=2)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    expected = ref.info_nce(anchor, positive, labels, tau=0.1)
    torch.testing.assert_close(DegradationContrastiveLoss()(anchor, positive, labels).double(), expected)
    torch.testing.assert_close(degradation_contrastive_loss(anchor, positive, labels).double(), expected)


# ---------------------------------------------------------------------------------------------- §2.2 L_dpl
def test_vgg_default_taps_are_relu1_2_relu2_2_relu3_1_relu3_3_on_imagenet_normalised_input():
    features = VGGFeatures(tiny_vgg(), pretrained=False)
    assert features.taps == ("relu1_2", "relu2_2", "relu3_1", "relu3_3")
    assert features.tap_positions == (3, 8, 11, 15)
    images = uniform(2, 3, 16, 16, seed=3, dtype=torch.float64)
    for got, want in zip(features.double()(images), ref.vgg_taps(tiny_vgg(), images), strict=True):
        torch.testing.assert_close(got, want)


def test_dpl_defaults_omega_and_w_easy_without_proxies():
    stack = tiny_vgg()
    restored, gt, degraded = (uniform(2, 3, 16, 16, seed=s, dtype=torch.float64) for s in (4, 5, 6))
    loss = DifficultyAdaptivePerceptualLoss(stack, pretrained=False, reduction="none").double()
    torch.testing.assert_close(loss(restored, gt, degraded), ref.perceptual_ratio(stack, restored, gt, degraded))


def test_dpl_epsilon_floors_a_zero_denominator_at_1e_6():
    """R = L and no proxy: every denominator is 0, so L_dpl = Σ ω_l D(R_l, G_l) / ε."""
    stack = tiny_vgg()
    restored, gt = uniform(1, 3, 16, 16, seed=7, dtype=torch.float64), uniform(1, 3, 16, 16, seed=8,
                                                                                 dtype=torch.float64)
    loss = DifficultyAdaptivePerceptualLoss(stack, pretrained=False).double()
    r, g = ref.vgg_taps(stack, restored), ref.vgg_taps(stack, gt)
    expected = sum(w * (a - b).abs().mean() for w, a, b in zip((1 / 12, 1 / 6, 1 / 3, 1.0), r, g)) / 1e-6
    torch.testing.assert_close(loss(restored, gt, restored.clone()), expected)


def test_online_difficulty_tie_is_hard_1_25_and_a_better_proxy_is_0_75():
    """Per sample, PSNR(P) vs PSNR(R) of the same step: equal (sample 0) → 1.25, P better (1) → 0.75,
    P worse (2) → 1.25."""
    stack = tiny_vgg()
    gt, sign_r, sign_p = dyadic_triplet(3, seed=9)
    restored = gt + sign_r / 8
    proxy_step = torch.tensor([1 / 8, 1 / 16, 1 / 4], dtype=torch.float64).view(3, 1, 1, 1)
    proxy = gt + sign_p * proxy_step
    degraded = uniform(3, 3, 16, 16, seed=10, dtype=torch.float64)
    assert psnr(proxy[:1], gt[:1]).item() == psnr(restored[:1], gt[:1]).item()  # an exact tie
    loss = DifficultyAdaptivePerceptualLoss(stack, pretrained=False, reduction="none").double()
    expected = ref.perceptual_ratio(stack, restored, gt, degraded,
                                    [[(w, proxy[b])] for b, w in enumerate((1.25, 0.75, 1.25))])
    torch.testing.assert_close(loss(restored, gt, degraded, proxy[:, None]), expected)


def test_probe_difficulty_compares_with_the_model_psnr_and_a_tie_is_hard():
    """One model PSNR for the batch (the authors' rule): a proxy exactly at it → 1.25, above → 0.75,
    below → 1.25, whatever the restored image's own PSNR (here higher than every proxy's)."""
    stack = tiny_vgg()
    gt, sign_r, sign_p = dyadic_triplet(3, seed=11)
    restored = gt + sign_r / 32
    proxy = gt + sign_p * torch.tensor([1 / 8, 1 / 16, 1 / 4], dtype=torch.float64).view(3, 1, 1, 1)
    degraded = uniform(3, 3, 16, 16, seed=12, dtype=torch.float64)
    model_psnr = psnr(proxy[:1], gt[:1]).item()
    assert model_psnr == pytest.approx(10 * math.log10(64), abs=1e-9)
    loss = DifficultyAdaptivePerceptualLoss(stack, pretrained=False, difficulty="probe", reduction="none").double()
    expected = ref.perceptual_ratio(stack, restored, gt, degraded,
                                    [[(w, proxy[b])] for b, w in enumerate((1.25, 0.75, 1.25))])
    torch.testing.assert_close(loss(restored, gt, degraded, proxy[:, None], model_psnr=model_psnr), expected)


# ---------------------------------------------------------------------------------------------- §2.1 L_clip
def test_clip_loss_default_is_one_minus_p_excellent_at_the_perceivers_scale():
    clip, perceiver, text = ref.perceiver_with_known_prompts()
    scale = ref.clip_scale(clip)  # the CLIP's own scale: ≈ 100 for OpenAI CLIP, 1/0.07 for the tiny one
    assert perceiver.logit_scale == pytest.approx(scale, rel=1e-6) and scale != pytest.approx(1.0)
    restored = uniform(3, 3, CLIP_SIZE, CLIP_SIZE, seed=13)
    p = ref.tier_probabilities(ref.clip_image_features(clip, restored), text, scale)
    loss = CLIPAwareLoss(perceiver)
    torch.testing.assert_close(loss(restored).double(), (1 - p[:, 2]).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(clip_aware_loss(restored, perceiver).double(), (1 - p[:, 2]).mean(),
                               rtol=1e-5, atol=1e-6)


def test_clip_loss_options_logit_scale_1_and_nll():
    clip, perceiver, text = ref.perceiver_with_known_prompts()
    restored = uniform(3, 3, CLIP_SIZE, CLIP_SIZE, seed=14)
    features = ref.clip_image_features(clip, restored)
    authors = ref.tier_probabilities(features, text, 1.0)  # the authors' code: no logit scale
    torch.testing.assert_close(CLIPAwareLoss(perceiver, logit_scale=1.0)(restored).double(), (1 - authors[:, 2]).mean(),
                               rtol=1e-5, atol=1e-6)
    p = ref.tier_probabilities(features, text, ref.clip_scale(clip))
    torch.testing.assert_close(CLIPAwareLoss(perceiver, form="nll")(restored).double(), -p[:, 2].log().mean(),
                               rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- §2.4 total
def test_total_objective_is_l1_plus_0_1_cl_plus_0_05_clip_plus_0_1_dpl():
    clip, perceiver, text = ref.perceiver_with_known_prompts()
    stack = tiny_vgg()
    restored, gt, degraded = (uniform(2, 3, CLIP_SIZE, CLIP_SIZE, seed=s) for s in (15, 16, 17))
    anchor, positive, labels = unit_rows(2, 8, seed=18), unit_rows(2, 8, seed=19), torch.tensor([0, 1])
    criterion = QualityAwareLoss(perceiver, stack, vgg_pretrained=False)
    guidance = Guidance(None, anchor, positive)  # Z and Z⁺ as net.guide(degraded, positive=view) returns them
    total, terms = criterion(restored, gt, degraded, guidance=guidance, labels=labels)

    l1 = (restored.double() - gt.double()).abs().mean()
    contrastive = ref.info_nce(anchor, positive, labels)
    clip_term = (1 - ref.tier_probabilities(ref.clip_image_features(clip, restored), text,
                                            ref.clip_scale(clip))[:, 2]).mean()
    perceptual = ref.perceptual_ratio(stack, restored, gt, degraded).mean()
    expected = {"l1": l1, "contrastive": contrastive, "clip": clip_term, "perceptual": perceptual}
    for name, value in expected.items():
        torch.testing.assert_close(terms[name].double(), value, rtol=1e-5, atol=1e-6, msg=name)
    want = 1.0 * l1 + 0.1 * contrastive + 0.05 * clip_term + 0.1 * perceptual
    torch.testing.assert_close(total.double(), want, rtol=1e-5, atol=1e-6)
