"""The method's equations (docs/method.md) written out in plain torch, for the pinning tests.

Every function here is a second, independent statement of one equation: it reads a module's *weights*
but never calls the module, and every constant of the method is a literal of this file (not imported
from the library), so a test comparing the library with these functions fails when either changes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# ------------------------------------------------------------------------------------------ constants (§1–§3)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)             # OpenAI CLIP, §1.1
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)                       # VGG (§2.2) and DINOv2 (§3.1) inputs
IMAGENET_STD = (0.229, 0.224, 0.225)
TIERS = ("terrible", "mediocre", "excellent")               # tier index = quality rank
TAU = 0.1                                                   # §2.3
OMEGA = (1 / 12, 1 / 6, 1 / 3, 1.0)                         # §2.2
VGG16_TAPS = {"relu1_2": 3, "relu2_2": 8, "relu3_1": 11, "relu3_3": 15}   # positions in VGG-16 `features`
W_EASY, EPSILON = 2.0, 1e-6
LAYERNORM_EPS = 1e-5


def normalise(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=images.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - m) / s


# ------------------------------------------------------------------------------------------ §1.1 perceiver
def clip_image_features(clip: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """v = normalize(E_img((clamp01(I) − μ)/σ)) for images already at the CLIP input size."""
    return F.normalize(clip.encode_image(normalise(images.clamp(0, 1), CLIP_MEAN, CLIP_STD)).float(), dim=-1)


def clip_text_features(clip: nn.Module, texts: list[str]) -> torch.Tensor:
    """T = normalize(encode_text(tokens)) through open_clip's own tokenizer and text tower."""
    import open_clip

    return F.normalize(clip.encode_text(open_clip.tokenize(texts)).float(), dim=-1)


def clip_scale(clip: nn.Module) -> float:
    """s = exp(CLIP's learned logit_scale): ≈ 100 for OpenAI CLIP, 1/0.07 for a freshly built (tiny) one."""
    return float(clip.logit_scale.detach().exp())


def tier_probabilities(image_features: torch.Tensor, text_features: torch.Tensor, scale: float) -> torch.Tensor:
    """p = softmax(s · v Tᵀ) over the tiers, ``(B, n_tiers)``."""
    return torch.softmax(scale * image_features.double() @ text_features.double().t(), dim=-1)


# ------------------------------------------------------------------------------------------ §2.2 perceptual
def vgg_taps(stack: nn.Sequential, images: torch.Tensor) -> list[torch.Tensor]:
    """relu1_2, relu2_2, relu3_1, relu3_3 of a VGG-16 ``features`` stack, float64, ImageNet-normalised input."""
    x = normalise(images.double().clamp(0, 1), IMAGENET_MEAN, IMAGENET_STD)
    taps = []
    for position, layer in enumerate(stack[: max(VGG16_TAPS.values()) + 1]):
        if isinstance(layer, nn.Conv2d):
            x = F.conv2d(x, layer.weight.detach().double(), layer.bias.detach().double(), padding=1)
        elif isinstance(layer, nn.ReLU):
            x = x.clamp_min(0)
        else:
            x = F.max_pool2d(x, 2)
        if position in VGG16_TAPS.values():
            taps.append(x)
    return taps


def perceptual_ratio(stack: nn.Sequential, restored: torch.Tensor, gt: torch.Tensor, degraded: torch.Tensor,
                     negatives: list[list[tuple[float, torch.Tensor]]] | None = None) -> torch.Tensor:
    """Per-sample L_dpl ``(B,)``; ``negatives[b]`` lists (w_j(b), P_j(b) (3, H, W)) of the valid proxies."""
    values = []
    for b in range(restored.shape[0]):
        r, g, l = (vgg_taps(stack, t[b : b + 1]) for t in (restored, gt, degraded))
        proxies = [(w, vgg_taps(stack, p[None])) for w, p in (negatives[b] if negatives else [])]
        total = 0.0
        for level, omega in enumerate(OMEGA):
            denominator = W_EASY * (r[level] - l[level]).abs().mean()
            for w, p in proxies:
                denominator = denominator + w * (r[level] - p[level]).abs().mean()
            total = total + omega * (r[level] - g[level]).abs().mean() / max(float(denominator), EPSILON)
        values.append(total)
    return torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in values])


# ------------------------------------------------------------------------------------------ §2.3 contrastive
def info_nce(anchor: torch.Tensor, positive: torch.Tensor, labels: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """Mean over anchors with a negative of −log(e^{z·z⁺/τ} / (e^{z·z⁺/τ} + Σ_{j: task_j ≠ task_i} e^{z·z_j/τ}))."""
    z, z_pos = anchor.double(), positive.double()
    losses = []
    for i in range(z.shape[0]):
        negatives = [j for j in range(z.shape[0]) if labels[j] != labels[i]]
        if negatives:
            logits = torch.stack([z[i] @ z_pos[i]] + [z[i] @ z[j] for j in negatives]) / tau
            losses.append(torch.logsumexp(logits, 0) - logits[0])
    return torch.stack(losses).mean()


def cfe_code_form(cfe: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Z = normalize(Linear(GAP(GELU∘Conv3×3,s2 ×4 (I)))) from the CFE's weights (the caller checks widths)."""
    convs = [m for m in cfe.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in cfe.modules() if isinstance(m, nn.Linear)]
    x = images.double()
    for conv in convs:
        x = F.gelu(F.conv2d(x, conv.weight.double(), conv.bias.double(), stride=2, padding=1))
    (linear,) = linears
    return F.normalize(F.linear(x.mean(dim=(2, 3)), linear.weight.double(), linear.bias.double()), dim=-1)


# ------------------------------------------------------------------------------------------ §3.1 SGM
def dinov2_cls_tokens(vit: nn.Module, images: torch.Tensor, blocks: tuple[int, ...], size: int) -> list[torch.Tensor]:
    """CLS token after each 1-based ``blocks`` entry, before the final norm, of the bicubic (no antialias)
    ``size``² resize, ImageNet-normalised; the ViT's blocks run one by one here."""
    x = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=False)
    x = normalise(x, IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        after = []
        for block in vit.blocks:
            tokens = block(tokens)
            after.append(tokens[:, 0])
    return [after[b - 1] for b in blocks]


# ------------------------------------------------------------------------------------------ §3.2 PGM
def film(pgm: nn.Module, x: torch.Tensor, prior: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
    """Y = X ⊙ (1 + γ) + β with [γ, β] = Linear(GELU(Linear([F; Z]))) (code form), X (B, C, H, W)."""
    first, last = [m for m in pgm.modules() if isinstance(m, nn.Linear)]
    e = torch.cat([t.double() for t in (prior, z) if t is not None], dim=1)
    out = F.linear(F.gelu(F.linear(e, first.weight.double(), first.bias.double())),
                   last.weight.double(), last.bias.double())
    channels = x.shape[1]
    gamma, beta = out[:, :channels, None, None], out[:, channels:, None, None]
    return x.double() * (1 + gamma) + beta


# ------------------------------------------------------------------------------------------ §3.3 PGCA / ETB
def layer_norm_2d(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-pixel LayerNorm over channels with the module's weight and bias."""
    x = x.double()
    mean = x.mean(dim=1, keepdim=True)
    variance = ((x - mean) ** 2).mean(dim=1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + LAYERNORM_EPS) * norm.weight.double().view(1, -1, 1, 1) \
        + norm.bias.double().view(1, -1, 1, 1)


def _conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    bias = None if conv.bias is None else conv.bias.double()
    return F.conv2d(x, conv.weight.double(), bias, padding=conv.kernel_size[0] // 2, groups=conv.groups)


def _transposed_attention(q, k, v, temperature: torch.Tensor) -> torch.Tensor:
    """softmax(τ_h · q̂ k̂ᵀ) v per head, q̂/k̂ L2-normalised over H·W; q, k, v (B, C, H, W)."""
    batch, channels, height, width = v.shape
    heads = temperature.numel()
    q, k, v = (t.reshape(batch, heads, channels // heads, height * width) for t in (q, k, v))
    q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    attention = torch.softmax(q @ k.transpose(-1, -2) * temperature.double().view(1, heads, 1, 1), dim=-1)
    return (attention @ v).reshape(batch, channels, height, width)


def pgca(module: nn.Module, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
    """PGCA(x, g): Q from the guidance g, K and V from the features x."""
    q = _conv(module.to_q[1], _conv(module.to_q[0], guidance.double()))
    k, v = _conv(module.to_kv[1], _conv(module.to_kv[0], x.double())).chunk(2, dim=1)
    return _conv(module.project_out, _transposed_attention(q, k, v, module.temperature))


def mdta(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    q, k, v = _conv(module.qkv_dwconv, _conv(module.qkv, x.double())).chunk(3, dim=1)
    return _conv(module.project_out, _transposed_attention(q, k, v, module.temperature))


def gdfn(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    content, gate = _conv(module.dwconv, _conv(module.project_in, x.double())).chunk(2, dim=1)
    return _conv(module.project_out, F.gelu(content) * gate)


def etb_code_form(etb: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """c = PGCA(LN(x), LN(Y)); x' = Y + MDTA(LN(c)); x'' = x' + GDFN(LN(x'))."""
    cross = pgca(etb.pgca, layer_norm_2d(etb.norm_x, x), layer_norm_2d(etb.norm_guidance, y))
    mid = y.double() + mdta(etb.mdta, layer_norm_2d(etb.norm_attn, cross))
    return mid + gdfn(etb.ffn, layer_norm_2d(etb.norm_ffn, mid))


def randomise_(module: nn.Module, seed: int) -> nn.Module:
    """Fill every parameter with seeded random values (norm weights, biases and temperatures included), so no
    identity-at-init hides a wrong wiring; temperatures stay positive."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            values = torch.rand(parameter.shape, generator=generator)
            parameter.copy_(0.5 + values if name.endswith("temperature") else 0.6 * values - 0.3)
    return module


# ------------------------------------------------------------------------------------------ set-ups
PROMPT_WORDS = "a photo of"  # three one-token words: with the tier word they fill n_ctx = 4


def perceiver_with_known_prompts():
    """``(clip, perceiver, T)``: a tiny-CLIP perceiver whose context reads "a photo of <tier word>" and the
    three text features T ``(3, D)`` of those sentences from open_clip's own ``encode_text``."""
    import open_clip

    from perceive_components import QualityPerceiver
    from perceive_components.tiny import tiny_clip

    clip = tiny_clip()
    perceiver = QualityPerceiver(clip_model="perceive-tiny-clip", pretrained=None, n_ctx=4, clip=clip)
    ids = open_clip.tokenize([PROMPT_WORDS])[0, 1:4]
    with torch.no_grad():
        perceiver.prompt_learner.ctx[:, :3] = clip.token_embedding.weight[ids]
    return clip, perceiver, clip_text_features(clip, [f"{PROMPT_WORDS} {word}" for word in TIERS])
