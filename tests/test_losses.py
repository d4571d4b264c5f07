"""Quality-aware losses (docs/method.md §2): each loss against a plain float64 re-computation written here,
gradients, the difficulty rule, conventions (reduction, loss_weight, frozen nets, autocast) and bad inputs."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from perceive_components.tiny import tiny_vgg
from perceive_components.losses import (
    CLIPAwareLoss,
    DegradationContrastiveLoss,
    DifficultyAdaptivePerceptualLoss,
    QualityAwareLoss,
    VGGFeatures,
    clip_aware_loss,
    degradation_contrastive_loss,
    difficulty_adaptive_perceptual_loss,
    difficulty_weights,
    info_nce_per_anchor,
    probe_psnr,
)
from perceive_components.ops.metrics import psnr

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
TAP_POSITIONS = (3, 8, 11, 15)  # relu1_2, relu2_2, relu3_1, relu3_3 in the VGG-16 layout
OMEGA = (1 / 12, 1 / 6, 1 / 3, 1.0)
HYPOTHESIS = settings(max_examples=15, deadline=None)



def tiny_vgg_stack(seed: int = 0) -> nn.Sequential:
    """The library's VGG-16 stand-in (``perceive_components.tiny.tiny_vgg``): VGG-16's layer layout, 4-6 channels,
    one conv beyond relu3_3 (which must never run)."""
    return tiny_vgg(seed)


def ref_taps(stack: nn.Sequential, image: torch.Tensor) -> list[torch.Tensor]:
    """Plain float64 re-computation of the four taps for ONE image (3, H, W)."""
    x = ((image[None].detach().double().clamp(0, 1) - IMAGENET_MEAN) / IMAGENET_STD)
    taps = []
    for position, layer in enumerate(stack):
        if isinstance(layer, nn.Conv2d):
            x = F.conv2d(x, layer.weight.detach().double(), layer.bias.detach().double(), padding=1)
        elif isinstance(layer, nn.ReLU):
            x = torch.relu(x)
        else:
            x = F.max_pool2d(x, 2)
        if position in TAP_POSITIONS:
            taps.append(x)
        if position == TAP_POSITIONS[-1]:
            return taps
    raise AssertionError("unreachable")


def ref_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double().clamp(0, 1) - b.double()) ** 2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-10))


def ref_dpl(stack, restored, gt, degraded, negatives, mask, *, difficulty="online", model_psnr=None,
            w_easy=2.0, eps=1e-6) -> list[float]:
    """Per-sample L_dpl with Python loops over samples, layers and negatives (float64)."""
    values = []
    for b in range(restored.shape[0]):
        r, g, l = (ref_taps(stack, t[b]) for t in (restored, gt, degraded))
        reference = ref_psnr(restored[b], gt[b]) if difficulty == "online" else model_psnr
        proxies = []
        for k in range(0 if negatives is None else negatives.shape[1]):
            if mask is None or bool(mask[b, k]):
                weight = 1.25 if ref_psnr(negatives[b, k], gt[b]) <= reference else 0.75
                proxies.append((weight, ref_taps(stack, negatives[b, k])))
        total = 0.0
        for level, omega in enumerate(OMEGA):
            positive = (r[level] - g[level]).abs().mean().item()
            denominator = w_easy * (r[level] - l[level]).abs().mean().item()
            for weight, p in proxies:
                denominator += weight * (r[level] - p[level]).abs().mean().item()
            total += omega * positive / max(denominator, eps)
        values.append(total)
    return values


def tiny_dpl(seed: int = 0, **kwargs) -> DifficultyAdaptivePerceptualLoss:
    return DifficultyAdaptivePerceptualLoss(tiny_vgg_stack(seed), **kwargs)


def images(*shape, seed=0, low=0.0, high=1.0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return (low + (high - low) * torch.rand(*shape, generator=generator, dtype=torch.float64)).to(dtype)


# ----------------------------------------------------------------------------------------------- DPL
@HYPOTHESIS
@given(batch=st.integers(1, 3), count=st.integers(0, 3), height=st.integers(8, 14), width=st.integers(8, 14),
       use_mask=st.booleans(), difficulty=st.sampled_from(["online", "probe"]), seed=st.integers(0, 10_000))
def test_dpl_equals_plain_float64_recomputation(batch, count, height, width, use_mask, difficulty, seed):
    stack = tiny_vgg_stack(seed % 7)
    loss = DifficultyAdaptivePerceptualLoss(stack, difficulty=difficulty, reduction="none").double()
    restored, gt, degraded = (images(batch, 3, height, width, seed=seed + i, dtype=torch.float64) for i in range(3))
    negatives = images(batch, count, 3, height, width, seed=seed + 3, dtype=torch.float64) if count else None
    mask = (torch.rand(batch, count, generator=torch.Generator().manual_seed(seed)) > 0.4) if use_mask and count else None
    model_psnr = 5.0 + (seed % 5) if difficulty == "probe" else None
    got = loss(restored, gt, degraded, negatives, mask, model_psnr=model_psnr)
    expected = ref_dpl(stack, restored, gt, degraded, negatives, mask, difficulty=difficulty, model_psnr=model_psnr)
    assert got.shape == (batch,)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_dpl_gradcheck_float64():
    features = VGGFeatures(tiny_vgg_stack(1)).double()
    restored = images(2, 3, 8, 8, seed=1, low=0.1, high=0.9, dtype=torch.float64).requires_grad_()
    gt, degraded = images(2, 3, 8, 8, seed=2, dtype=torch.float64), images(2, 3, 8, 8, seed=3, dtype=torch.float64)
    negatives = images(2, 2, 3, 8, 8, seed=4, dtype=torch.float64)
    mask = torch.tensor([[True, False], [True, True]])

    def ratio(x):
        return difficulty_adaptive_perceptual_loss(x, gt, degraded, negatives, mask, features=features, reduction="none")

    assert torch.autograd.gradcheck(ratio, (restored,), eps=1e-6, atol=1e-6, fast_mode=True)


def test_dpl_accelerator_path_matches_the_cpu_path(monkeypatch):
    """The accelerator branch of the distances (batched kernels) gives the CPU branch's values and gradients."""
    import perceive_components.losses.feature_distance as feature_distance

    features = VGGFeatures(tiny_vgg_stack(2)).double()
    restored = images(3, 3, 12, 12, seed=1, dtype=torch.float64).requires_grad_()
    others = [images(3, 3, 12, 12, seed=s, dtype=torch.float64) for s in (2, 3)]
    negatives, mask = images(3, 3, 3, 12, 12, seed=4, dtype=torch.float64), torch.rand(3, 3) > 0.3
    values, grads = [], []
    for vectorized in (False, True):
        monkeypatch.setattr(feature_distance, "_vectorized", lambda tensor: vectorized)
        restored.grad = None
        loss = difficulty_adaptive_perceptual_loss(restored, *others, negatives, mask, features=features)
        loss.backward()
        values.append(loss.detach())
        grads.append(restored.grad.clone())
    torch.testing.assert_close(values[0], values[1], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-15)


def test_dpl_is_zero_when_restored_equals_gt():
    gt = images(2, 3, 16, 16, seed=5)
    loss = tiny_dpl()(gt.clone(), gt, images(2, 3, 16, 16, seed=6), images(2, 2, 3, 16, 16, seed=7))
    assert loss.item() == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_moving_toward_gt_lowers_dpl(seed):
    loss = tiny_dpl(seed, reduction="none")
    gt, degraded = images(2, 3, 16, 16, seed=seed), images(2, 3, 16, 16, seed=seed + 10)
    negatives = (0.5 * gt[:, None] + 0.5 * images(2, 2, 3, 16, 16, seed=seed + 20)).clamp(0, 1)
    start = (0.7 * degraded + 0.3 * gt).requires_grad_()
    values = [loss((1 - t) * start.detach() + t * gt, gt, degraded, negatives) for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
    stacked = torch.stack(values)                          # (5, B)
    assert (stacked[1:] < stacked[:-1]).all(), stacked
    loss(start, gt, degraded, negatives).sum().backward()
    assert ((start.grad * (gt - start.detach())).flatten(1).sum(1) < 0).all()  # descent direction points to gt


def test_difficulty_rule_assigns_125_and_075_exactly():
    psnrs = torch.tensor([10.0, 20.0, 20.0, 30.0], dtype=torch.float64)
    assert difficulty_weights(psnrs, 20.0).tolist() == [1.25, 1.25, 1.25, 0.75]
    per_sample = torch.tensor([25.0, 15.0, 20.0, 31.0], dtype=torch.float64)
    assert difficulty_weights(psnrs, per_sample).tolist() == [1.25, 0.75, 1.25, 1.25]


def _features_identity(x):
    return [x]


def test_difficulty_rule_inside_the_loss_online_and_probe():
    """With identity features: L = D(R,G) / (2·D(R,L) + Σ w_j·D(R,P_j)), so the weights can be read back."""
    gt = torch.full((1, 3, 4, 4), 0.5, dtype=torch.float64)
    restored = gt + 0.1                                      # PSNR(R) = 20 dB
    degraded = gt - 0.3
    negatives = torch.stack([gt + 0.2, gt + 0.05, restored], dim=1)   # worse, better, equal -> 1.25, 0.75, 1.25
    common = dict(features=_features_identity, layer_weights=(1.0,), reduction="none")
    online = difficulty_adaptive_perceptual_loss(restored, gt, degraded, negatives, **common)
    d_pos, d_easy = 0.1, 0.4
    d_neg = torch.tensor([0.1, 0.05, 0.0], dtype=torch.float64)

    def expected(weights):
        return d_pos / (2 * d_easy + float((torch.tensor(weights, dtype=torch.float64) * d_neg).sum()))

    assert online.item() == pytest.approx(expected([1.25, 0.75, 1.25]), rel=1e-12)
    assert online.item() != pytest.approx(expected([0.75, 0.75, 0.75]), rel=1e-6)
    # probe rule: one scalar; exactly the PSNR of the first negative -> "<=" -> 1.25
    threshold = float(psnr(negatives[:, 0], gt))
    probe = difficulty_adaptive_perceptual_loss(restored, gt, degraded, negatives, difficulty="probe",
                                                model_psnr=threshold, **common)
    assert probe.item() == pytest.approx(expected([1.25, 0.75, 0.75]), rel=1e-12)


def test_dpl_without_negatives_uses_the_easy_negative_only():
    stack = tiny_vgg_stack(3)
    restored, gt, degraded = (images(2, 3, 12, 12, seed=s) for s in (1, 2, 3))
    empty = torch.zeros(2, 0, 3, 12, 12)
    loss = DifficultyAdaptivePerceptualLoss(stack, reduction="none")
    expected = torch.tensor(ref_dpl(stack, restored, gt, degraded, None, None), dtype=torch.float32)
    torch.testing.assert_close(loss(restored, gt, degraded), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss(restored, gt, degraded, empty), expected, rtol=1e-4, atol=1e-6)
    all_masked = loss(restored, gt, degraded, images(2, 3, 3, 12, 12), torch.zeros(2, 3, dtype=torch.bool))
    torch.testing.assert_close(all_masked, expected, rtol=1e-4, atol=1e-6)


def test_masked_out_negatives_are_never_run_through_vgg():
    features = VGGFeatures(tiny_vgg_stack())
    seen = []
    features.features[0].register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    restored, gt, degraded = (images(4, 3, 8, 8, seed=s) for s in (1, 2, 3))
    negatives = images(4, 4, 3, 8, 8, seed=4)
    negatives[:, 2:] = float("nan")                         # masked entries are never read, not even validated
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:, :2] = True
    mask[0, 1] = False
    difficulty_adaptive_perceptual_loss(restored, gt, degraded, negatives, mask, features=features)
    assert seen == [4 + 4 + 7, 4]                            # one no-grad pass [G; L; 7 valid P], one pass on R


def test_dpl_hard_clamp_vs_straight_through():
    stack = tiny_vgg_stack(4)
    gt, degraded = images(1, 3, 8, 8, seed=1), images(1, 3, 8, 8, seed=2)
    restored = images(1, 3, 8, 8, seed=3, low=1.05, high=1.2).requires_grad_()   # all pixels overshoot
    DifficultyAdaptivePerceptualLoss(stack, straight_through=False)(restored, gt, degraded).backward()
    assert restored.grad.abs().max() == 0
    restored.grad = None
    DifficultyAdaptivePerceptualLoss(stack)(restored, gt, degraded).backward()
    assert restored.grad.abs().max() > 0


def test_probe_psnr_helper():
    class Halfway(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(0.5))

        def forward(self, x):
            return x * self.scale

    model = Halfway().train()
    probe = [(images(2, 3, 8, 8, seed=s), images(2, 3, 8, 8, seed=s + 50)) for s in range(3)]
    expected = sum(ref_psnr(0.5 * d[i], g[i]) for d, g in probe for i in range(2)) / 6
    assert probe_psnr(model, probe) == pytest.approx(expected, rel=1e-6)
    assert model.training
    with pytest.raises(ValueError, match="probe is empty"):
        probe_psnr(model, [])
    with pytest.raises(ValueError, match="model_psnr"):
        tiny_dpl(difficulty="probe")(*(images(1, 3, 8, 8, seed=s) for s in range(3)))


# ----------------------------------------------------------------------------------------------- CLIP
def ref_clip_loss(perceiver, restored, *, form, scale) -> torch.Tensor:
    visual = perceiver.image_encoder
    x = restored.double().clamp(0, 1)
    if tuple(x.shape[-2:]) != tuple(perceiver.image_size):
        x = F.interpolate(x, size=perceiver.image_size, mode="bicubic", align_corners=False,
                          antialias=perceiver.resize_antialias)
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float64).view(1, 3, 1, 1)
    with torch.no_grad():
        v = visual.double()((x - mean) / std)
        visual.float()
    v = v / v.norm(dim=-1, keepdim=True)
    t = perceiver.text_features().double()
    p = torch.softmax(scale * v @ t.t(), dim=-1)[:, -1]
    return -torch.log(p) if form == "nll" else 1 - p


_PERCEIVERS = {}


def _shared_perceiver(clip):
    from perceive_components import QualityPerceiver

    if id(clip) not in _PERCEIVERS:
        torch.manual_seed(1)
        _PERCEIVERS[id(clip)] = QualityPerceiver(clip_model="tiny", pretrained=None, n_ctx=4, clip=clip)
    return _PERCEIVERS[id(clip)]


@HYPOTHESIS
@given(batch=st.integers(1, 3), size=st.sampled_from([16, 32, 40]), form=st.sampled_from(["one_minus_p", "nll"]),
       scale=st.sampled_from([None, 1.0, 30.0]), reduction=st.sampled_from(["none", "mean", "sum"]),
       seed=st.integers(0, 1000))
def test_clip_loss_equals_plain_recomputation(tiny_clip, batch, size, form, scale, reduction, seed):
    perceiver = _shared_perceiver(tiny_clip)
    loss = CLIPAwareLoss(perceiver, form, scale, reduction=reduction)
    restored = images(batch, 3, size, size, seed=seed)
    expected = ref_clip_loss(perceiver, restored, form=form, scale=perceiver.logit_scale if scale is None else scale)
    expected = {"none": expected, "mean": expected.mean(), "sum": expected.sum()}[reduction]
    torch.testing.assert_close(loss(restored).double(), expected, rtol=2e-5, atol=2e-6)


def test_clip_loss_gradients_reach_the_image_only(tiny_perceiver):
    loss = CLIPAwareLoss(tiny_perceiver)
    assert list(loss.parameters()) == [] and list(loss.state_dict()) == []
    assert tiny_perceiver.text_encoder_dropped
    restored = images(2, 3, 32, 32, seed=1, low=-0.2, high=1.2).requires_grad_()
    loss(restored).backward()
    outside = (restored.detach() < 0) | (restored.detach() > 1)
    assert restored.grad[outside].abs().sum() > 0          # straight-through clamp keeps pushing these pixels
    assert tiny_perceiver.prompt_learner.ctx.grad is None
    assert all(p.grad is None for p in tiny_perceiver.image_encoder.parameters())
    restored.grad = None
    CLIPAwareLoss(tiny_perceiver, straight_through=False)(restored).backward()
    assert restored.grad[outside].abs().sum() == 0


def test_clip_default_scale_is_the_perceivers(tiny_perceiver):
    restored = images(2, 3, 32, 32, seed=3)
    default = clip_aware_loss(restored, tiny_perceiver, reduction="none")
    explicit = clip_aware_loss(restored, tiny_perceiver, logit_scale=tiny_perceiver.logit_scale, reduction="none")
    authors = clip_aware_loss(restored, tiny_perceiver, logit_scale=1.0, reduction="none")
    torch.testing.assert_close(default, explicit)
    assert not torch.allclose(default, authors)
    assert (authors - 2 / 3).abs().max() < 0.1              # s = 1: logits within ±1, p stays near 1/3
    grads = []
    for scale in (None, 1.0):
        x = restored.clone().requires_grad_()
        clip_aware_loss(x, tiny_perceiver, logit_scale=scale).backward()
        grads.append(x.grad.norm())
    assert grads[1] < grads[0] / 3                          # … and the gradient almost vanishes


# ----------------------------------------------------------------------------------------------- contrastive
def ref_contrastive(anchor, positive, labels, temperature):
    """Per-anchor InfoNCE by loops (float64); the gradient stops at the negatives."""
    losses = []
    for i in range(anchor.shape[0]):
        negatives = [anchor[j].detach() for j in range(anchor.shape[0]) if int(labels[j]) != int(labels[i])]
        if not negatives:
            continue
        logits = torch.stack([anchor[i] @ positive[i]] + [anchor[i] @ n for n in negatives]) / temperature
        losses.append(-torch.log_softmax(logits, dim=0)[0])
    return losses


def unit_vectors(batch, dim, seed):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(batch, dim, generator=generator, dtype=torch.float64), dim=-1)


@HYPOTHESIS
@given(batch=st.integers(1, 8), dim=st.integers(2, 6), tasks=st.integers(1, 3),
       temperature=st.sampled_from([0.1, 0.5, 1.0]), seed=st.integers(0, 10_000))
def test_contrastive_equals_plain_recomputation(batch, dim, tasks, temperature, seed):
    anchor = unit_vectors(batch, dim, seed).requires_grad_()
    positive = unit_vectors(batch, dim, seed + 1).requires_grad_()
    labels = torch.randint(0, tasks, (batch,), generator=torch.Generator().manual_seed(seed))
    got = degradation_contrastive_loss(anchor, positive, labels, temperature=temperature)
    reference = ref_contrastive(anchor, positive, labels, temperature)
    expected = torch.stack(reference).mean() if reference else torch.zeros((), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert got.requires_grad                                   # "no valid anchor" still stays in the graph
    got.backward()
    grads = (anchor.grad.clone(), positive.grad.clone())
    anchor.grad = positive.grad = None
    if reference:
        expected.backward()
        torch.testing.assert_close(grads, (anchor.grad, positive.grad), rtol=1e-9, atol=1e-12)
    else:
        assert grads[0].abs().sum() == 0 and grads[1].abs().sum() == 0


def test_contrastive_gradcheck_float64():
    anchor = unit_vectors(5, 4, 1).requires_grad_()
    positive = unit_vectors(5, 4, 2).requires_grad_()
    bank = unit_vectors(7, 4, 3).requires_grad_()
    labels = torch.tensor([0, 1, 1, 2, 0])
    bank_labels = torch.tensor([0, 1, 2, 2, 0, 1, 1])
    bank_valid = torch.tensor([True, True, True, False, True, True, True])

    def loss(a, p, b):
        return info_nce_per_anchor(a, p, labels, b, bank_labels, bank_valid, 0.1)[0]

    assert torch.autograd.gradcheck(loss, (anchor, positive, bank))
    # the public loss: gradient w.r.t. the positives (the anchors double as detached negatives there)
    assert torch.autograd.gradcheck(
        lambda p: degradation_contrastive_loss(anchor.detach(), p, labels, reduction="none"), (positive,))


def test_contrastive_single_task_gives_zero_in_graph():
    anchor = unit_vectors(3, 4, 0).float().requires_grad_()
    with pytest.warns(UserWarning, match="no anchor had a negative"):  # said, not silent
        loss = DegradationContrastiveLoss()(anchor, anchor.detach().flip(0), torch.zeros(3, dtype=torch.long))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert anchor.grad.abs().sum() == 0


# ----------------------------------------------------------------------------------------------- conventions
def test_modules_equal_functionals_for_every_reduction(tiny_perceiver):
    restored, gt, degraded = (images(3, 3, 16, 16, seed=s) for s in range(3))
    negatives, mask = images(3, 2, 3, 16, 16, seed=9), torch.tensor([[True, False], [True, True], [False, False]])
    anchor, positive, labels = unit_vectors(3, 4, 0).float(), unit_vectors(3, 4, 1).float(), torch.tensor([0, 1, 1])
    features = VGGFeatures(tiny_vgg_stack())
    for reduction in ("none", "mean", "sum"):
        pairs = [
            (DifficultyAdaptivePerceptualLoss(features, reduction=reduction, loss_weight=2.5)(
                restored, gt, degraded, negatives, mask),
             difficulty_adaptive_perceptual_loss(restored, gt, degraded, negatives, mask, features=features,
                                                 reduction=reduction)),
            (CLIPAwareLoss(tiny_perceiver, reduction=reduction, loss_weight=2.5)(restored),
             clip_aware_loss(restored, tiny_perceiver, reduction=reduction)),
            (DegradationContrastiveLoss(reduction=reduction, loss_weight=2.5)(anchor, positive, labels),
             degradation_contrastive_loss(anchor, positive, labels, reduction=reduction)),
        ]
        for module_value, functional_value in pairs:
            torch.testing.assert_close(module_value, 2.5 * functional_value)
            assert module_value.shape == ((3,) if reduction == "none" else ())
        none = difficulty_adaptive_perceptual_loss(restored, gt, degraded, features=features, reduction="none")
        summed = difficulty_adaptive_perceptual_loss(restored, gt, degraded, features=features, reduction="sum")
        torch.testing.assert_close(none.sum(), summed)


def test_quality_aware_loss_is_the_weighted_sum(tiny_perceiver):
    features = VGGFeatures(tiny_vgg_stack())
    criterion = QualityAwareLoss(tiny_perceiver, features)
    assert list(criterion.parameters()) == [] and list(criterion.state_dict()) == []
    restored = images(3, 3, 16, 16, seed=0, low=-0.05, high=1.05).requires_grad_()
    gt, degraded = images(3, 3, 16, 16, seed=1), images(3, 3, 16, 16, seed=2)
    negatives, mask = images(3, 2, 3, 16, 16, seed=3), torch.tensor([[True, False], [True, True], [False, True]])
    anchor, positive, labels = unit_vectors(3, 4, 0).float(), unit_vectors(3, 4, 1).float(), torch.tensor([0, 1, 2])
    total, terms = criterion(restored, gt, degraded, negatives, mask, anchor=anchor, positive=positive, labels=labels)
    expected_terms = {
        "l1": (restored - gt).abs().mean(),
        "contrastive": degradation_contrastive_loss(anchor, positive, labels),
        "clip": clip_aware_loss(restored, tiny_perceiver),
        "perceptual": difficulty_adaptive_perceptual_loss(restored, gt, degraded, negatives, mask, features=features),
    }
    assert set(terms) == set(expected_terms) | {"total"}
    for name, value in expected_terms.items():
        torch.testing.assert_close(terms[name], value.detach())
        assert not terms[name].requires_grad
    expected = expected_terms["l1"] + 0.1 * expected_terms["contrastive"] + 0.05 * expected_terms["clip"] \
        + 0.1 * expected_terms["perceptual"]
    torch.testing.assert_close(total, expected)
    total.backward()
    assert restored.grad is not None and restored.grad.abs().sum() > 0
    # the network's Guidance carries Z and Z⁺: the same total as passing them by hand
    from perceive_components.guidance import Guidance

    guided, _ = criterion(restored, gt, degraded, negatives, mask, guidance=Guidance(None, anchor, positive),
                          labels=labels)
    torch.testing.assert_close(guided, total)
    no_positive = Guidance(None, anchor)
    unlabelled, unlabelled_terms = criterion(restored, gt, degraded, negatives, mask, guidance=no_positive)
    assert "contrastive" not in unlabelled_terms  # inference-style guidance, no labels: no L_cl
    with pytest.raises(ValueError, match="has no positive embedding"):
        criterion(restored, gt, degraded, negatives, mask, guidance=no_positive, labels=labels)
    with pytest.raises(ValueError, match="either as guidance= or as anchor="):
        criterion(restored, gt, degraded, guidance=no_positive, anchor=anchor, labels=labels)
    # L1 left to the caller; terms whose weight is 0 need no network at all
    total, terms = QualityAwareLoss(None, features, l1_weight=0, clip_weight=0)(restored, gt, degraded)
    assert set(terms) == {"perceptual", "total"}
    total, terms = QualityAwareLoss(clip_weight=0, perceptual_weight=0)(restored, gt, degraded)
    assert set(terms) == {"l1", "total"}


def test_quality_aware_loss_checks_every_input_in_one_host_sync(tiny_perceiver, monkeypatch):
    from perceive_components.ops import validation

    syncs = []
    monkeypatch.setattr(validation, "host_values", lambda stats: syncs.append(stats.shape) or stats.tolist())
    criterion = QualityAwareLoss(tiny_perceiver, VGGFeatures(tiny_vgg_stack()))
    restored, gt, degraded = images(2, 3, 16, 16, seed=0), images(2, 3, 16, 16, seed=1), images(2, 3, 16, 16, seed=2)
    negatives = images(2, 2, 3, 16, 16, seed=3)
    cfe = dict(anchor=unit_vectors(2, 4, 0).float(), positive=unit_vectors(2, 4, 1).float(), labels=torch.tensor([0, 1]))
    criterion(restored, gt, degraded, negatives, **cfe)
    # restored (checked by DPL and CLIP, reduced once), gt, degraded, the valid negatives, anchor and positive,
    # and L_cl's count of anchors with a negative: one (7, 2) read
    assert syncs == [torch.Size([7, 2])]
    bad = negatives.clone()
    bad[1, 0, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"negatives \(valid entries\) contains NaN"):
        criterion(restored, gt, degraded, bad, **cfe)
    with pytest.raises(ValueError, match=r"gt must hold values in \[0, 1\]"):  # the first failing check is named
        criterion(restored, gt * 2, degraded, bad, **cfe)


def test_quality_aware_loss_argument_errors(tiny_perceiver):
    features = VGGFeatures(tiny_vgg_stack())
    with pytest.raises(ValueError, match="perceiver is required"):
        QualityAwareLoss(None, features)
    with pytest.raises(ValueError, match="reduction"):
        QualityAwareLoss(tiny_perceiver, features, reduction="avg")
    with pytest.raises(ValueError, match="clip_weight"):
        QualityAwareLoss(tiny_perceiver, features, clip_weight=-1)
    criterion = QualityAwareLoss(tiny_perceiver, features)
    x = images(2, 3, 16, 16)
    with pytest.raises(ValueError, match="labels"):
        criterion(x, x, x, anchor=unit_vectors(2, 4, 0).float(), positive=unit_vectors(2, 4, 1).float())
    # a fixed batch format without proxies (K = 0) is accepted with the perceptual term off; K > 0 is not
    l1_only = QualityAwareLoss(clip_weight=0, perceptual_weight=0)
    empty, empty_mask = torch.zeros(2, 0, 3, 16, 16), torch.zeros(2, 0, dtype=torch.bool)
    assert set(l1_only(x, x, x, empty, empty_mask)[1]) == {"l1", "total"}
    with pytest.raises(ValueError, match="perceptual_weight is 0"):
        l1_only(x, x, x, torch.zeros(2, 1, 3, 16, 16), torch.ones(2, 1, dtype=torch.bool))
    # task names through a custom vocabulary reach the contrastive term
    from perceive_components.data import TaskVocabulary

    named = QualityAwareLoss(clip_weight=0, perceptual_weight=0, vocabulary=TaskVocabulary(["rain", "snow"]))
    anchor, positive = unit_vectors(2, 4, 0).float(), unit_vectors(2, 4, 1).float()
    by_name, _ = named(x, x, x, anchor=anchor, positive=positive, labels=["snow", "rain"])
    by_id, _ = named(x, x, x, anchor=anchor, positive=positive, labels=torch.tensor([1, 0]))
    torch.testing.assert_close(by_name, by_id)
    with pytest.raises(ValueError, match="hail"):
        named(x, x, x, anchor=anchor, positive=positive, labels=["hail", "rain"])


def test_frozen_networks_follow_to_and_stay_out_of_state_dict(tiny_perceiver):
    criterion = QualityAwareLoss(tiny_perceiver, VGGFeatures(tiny_vgg_stack()))
    assert len(criterion.state_dict()) == 0 and len(list(criterion.parameters())) == 0
    criterion = criterion.to("cpu").double()
    assert criterion.perceptual_loss.vgg.features[0].weight.dtype == torch.float64
    assert criterion.clip_loss.perceiver.prompt_learner.ctx.dtype == torch.float64
    criterion.float().train()
    assert not criterion.perceptual_loss.vgg.training and not criterion.clip_loss.perceiver.image_encoder.training
    x = images(2, 3, 16, 16)
    total, _ = criterion(x.requires_grad_(), x.detach(), x.detach() * 0.5)
    assert total.dtype == torch.float32


def _run_step(criterion, restored, gt, degraded, negatives, mask, anchor, positive, labels, autocast):
    restored = restored.clone().requires_grad_()
    device = restored.device.type
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        out = restored * 1.0  # stands in for a network output computed under autocast
        total, terms = criterion(out, gt, degraded, negatives, mask, anchor=anchor, positive=positive, labels=labels)
    total.backward()
    return total.detach(), restored.grad


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_bf16_autocast_around_the_step(tiny_clip, device):
    from perceive_components import QualityPerceiver

    torch.manual_seed(0)
    perceiver = QualityPerceiver(clip_model="tiny", pretrained=None, n_ctx=4, clip=tiny_clip)
    criterion = QualityAwareLoss(perceiver, VGGFeatures(tiny_vgg_stack())).to(device)
    batch = [images(3, 3, 32, 32, seed=s).to(device) for s in range(3)]
    negatives, mask = images(3, 2, 3, 32, 32, seed=5).to(device), torch.tensor([[1, 0], [1, 1], [0, 1]]).bool().to(device)
    cfe = (unit_vectors(3, 8, 0).float().to(device), unit_vectors(3, 8, 1).float().to(device),
           torch.tensor([0, 1, 2], device=device))
    full, full_grad = _run_step(criterion, *batch, negatives, mask, *cfe, autocast=False)
    half, half_grad = _run_step(criterion, *batch, negatives, mask, *cfe, autocast=True)
    assert half.dtype == torch.float32 and torch.isfinite(half) and torch.isfinite(half_grad).all()
    assert abs(half.item() - full.item()) < 0.02 * abs(full.item())
    assert F.cosine_similarity(half_grad.flatten(), full_grad.flatten(), dim=0) > 0.95
    tiny_clip.to("cpu")


# ----------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("case, error, pattern", [
    ("gt_shape", ValueError, "gt must have the same shape"),
    ("degraded_shape", ValueError, "degraded must have the same shape"),
    ("negatives_batch", ValueError, "negatives must have shape"),
    ("negatives_size", ValueError, "negatives must have shape"),
    ("negatives_rank", ValueError, "negatives must have shape"),
    ("mask_shape", ValueError, "mask must have shape"),
    ("mask_dtype", TypeError, "mask must have dtype torch.bool"),
    ("mask_without_negatives", ValueError, "mask was given without negatives"),
    ("restored_nan", ValueError, "restored contains NaN"),
    ("gt_inf", ValueError, "gt contains NaN or Inf"),
    ("negatives_nan", ValueError, "negatives .*NaN"),
    ("gt_range", ValueError, r"gt must hold values in \[0, 1\]"),
    ("restored_int", TypeError, "restored must be a floating-point"),
    ("restored_channels", ValueError, "restored must have 3 channels"),
])
def test_dpl_bad_inputs_name_the_argument(case, error, pattern):
    r, g, d = (images(2, 3, 8, 8, seed=s) for s in range(3))
    n, m = images(2, 2, 3, 8, 8, seed=4), torch.ones(2, 2, dtype=torch.bool)
    if case == "gt_shape":
        g = images(2, 3, 8, 9)
    elif case == "degraded_shape":
        d = images(1, 3, 8, 8)
    elif case == "negatives_batch":
        n = images(3, 2, 3, 8, 8)
    elif case == "negatives_size":
        n = images(2, 2, 3, 8, 6)
    elif case == "negatives_rank":
        n = images(2, 3, 8, 8)
    elif case == "mask_shape":
        m = torch.ones(2, 3, dtype=torch.bool)
    elif case == "mask_dtype":
        m = torch.ones(2, 2)
    elif case == "mask_without_negatives":
        n = None
    elif case == "restored_nan":
        r[0, 0, 0, 0] = float("nan")
    elif case == "gt_inf":
        g[1, 2, 3, 4] = float("inf")
    elif case == "negatives_nan":
        n[1, 0, 0, 0, 0] = float("nan")
    elif case == "gt_range":
        g = g * 3
    elif case == "restored_int":
        r = (r * 255).to(torch.uint8)
    elif case == "restored_channels":
        r = images(2, 1, 8, 8)
    with pytest.raises(error, match=pattern):
        difficulty_adaptive_perceptual_loss(r, g, d, n, m, features=VGGFeatures(tiny_vgg_stack()))


def test_constructor_and_contrastive_errors(tiny_perceiver):
    stack = tiny_vgg_stack()
    for build in (lambda: DifficultyAdaptivePerceptualLoss(stack, reduction="avg"),
                  lambda: CLIPAwareLoss(tiny_perceiver, reduction="max"),
                  lambda: DegradationContrastiveLoss(reduction=None)):
        with pytest.raises(ValueError, match="reduction must be one of"):
            build()
    with pytest.raises(ValueError, match="form must be one of"):
        CLIPAwareLoss(tiny_perceiver, form="log")
    with pytest.raises(ValueError, match="logit_scale"):
        CLIPAwareLoss(tiny_perceiver, logit_scale=-1.0)
    with pytest.raises(TypeError, match="perceiver must be a QualityPerceiver"):
        CLIPAwareLoss(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="difficulty must be one of"):
        DifficultyAdaptivePerceptualLoss(stack, difficulty="epoch")
    with pytest.raises(ValueError, match="taps must be ReLU names"):
        DifficultyAdaptivePerceptualLoss(stack, taps=("relu9_9",), layer_weights=(1.0,))
    with pytest.raises(ValueError, match="layer_weights needs one weight per tap"):
        DifficultyAdaptivePerceptualLoss(stack, layer_weights=(1.0, 1.0))
    with pytest.raises(ValueError, match="temperature"):
        DegradationContrastiveLoss(temperature=0)
    z = unit_vectors(3, 4, 0).float()
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        degradation_contrastive_loss(z, z, torch.zeros(3))
    with pytest.raises(ValueError, match="labels must have shape"):
        degradation_contrastive_loss(z, z, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="positive must be a floating tensor"):
        degradation_contrastive_loss(z, z[:2], torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="anchor contains NaN"):
        degradation_contrastive_loss(z * float("nan"), z, torch.zeros(3, dtype=torch.long))


# ----------------------------------------------------------------------------------------------- real VGG-16
@pytest.fixture(scope="session")
def vgg16_features():
    return VGGFeatures("vgg16.tv_in1k", pretrained=False)  # by name, random weights (no download)


def test_vgg16_taps_and_truncation(vgg16_features):
    assert vgg16_features.taps == ("relu1_2", "relu2_2", "relu3_1", "relu3_3")
    assert vgg16_features.tap_positions == (3, 8, 11, 15)
    assert len(vgg16_features.features) == 16
    assert sum(p.numel() for p in vgg16_features.parameters()) == 1_735_488
    x = images(1, 3, 24, 24)
    expected, h = [], (x - IMAGENET_MEAN.float()) / IMAGENET_STD.float()
    for position, layer in enumerate(vgg16_features.features):
        h = layer(h)
        if position in TAP_POSITIONS:
            expected.append(h.clone())
    for got, want in zip(vgg16_features(x), expected):
        torch.testing.assert_close(got, want)
    loss = DifficultyAdaptivePerceptualLoss(vgg16_features)
    assert list(loss.parameters()) == [] and list(loss.state_dict()) == []


def test_vgg_by_name_offline_fails_fast_with_a_remedy():
    with pytest.raises(RuntimeError, match="pass it as vgg="):
        VGGFeatures("vgg16.tv_in1k", pretrained=True)


# ----------------------------------------------------------------------------------------------- docs example
def test_docs_training_loop_example_runs(tiny_perceiver):
    text = (Path(__file__).parents[1] / "docs" / "losses.md").read_text(encoding="utf-8")
    code = re.search(r"<!-- example: training-loop -->\s*```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 12

    model = nn.Conv2d(3, 3, 3, padding=1)
    cfe = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    before = (model.weight.detach().clone(), cfe[0].weight.detach().clone())
    loader = [(images(2, 3, 32, 32, seed=s), images(2, 3, 32, 32, seed=s + 1), images(2, 3, 32, 32, seed=s + 2),
               images(2, 2, 3, 32, 32, seed=s + 3), torch.tensor([[True, False], [True, True]]),
               torch.tensor([0, 1])) for s in range(2)]
    params = list(model.parameters()) + list(cfe.parameters())
    namespace = dict(perceiver=tiny_perceiver, vgg=VGGFeatures(tiny_vgg_stack()), model=model, cfe=cfe,
                     loader=loader, optimizer=torch.optim.SGD(params, lr=0.1), device="cpu")
    exec(compile(code, "docs/losses.md", "exec"), namespace)
    assert not torch.equal(before[0], model.weight) and not torch.equal(before[1], cfe[0].weight)
