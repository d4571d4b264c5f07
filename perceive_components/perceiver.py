"""QualityPerceiver: frozen CLIP + learned "terrible / mediocre / excellent" prompts (docs/method.md §1.1).

    v      = normalize( E_img( normalize_clip( resize_224( clamp01(I) ) ) ) )
    logits = s · v Tᵀ            s = exp(CLIP logit_scale) ≈ 100, fixed; T: (3, D) prompt features
    p      = softmax(logits)     tier = argmax p      q = Σ_c c · p_c ∈ [0, 2]  (higher is better)

``resize_224`` is bicubic, antialiased or not as the prompts were trained (``resize_antialias``, recorded
in the config): plain bicubic by default, as the authors' prompts; configs written by version 0.1 carry
no such key and were trained with antialias, so they load with ``resize_antialias=True``.

Only the prompt context is trainable and only it is saved; the CLIP comes from open_clip by name or is
passed in as an instance. Once the prompts are fixed the three text features are cached, so scoring
costs one image-encoder pass (``freeze_prompts()`` also drops the text tower).
"""
from __future__ import annotations

import json
import logging
import math
import numbers
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from .hub import load_prompt_tensors, model_card, resolve_files, save_prompt_tensors
from .ops.frozen import FrozenHolder
from .ops.validation import check_images, check_positive_int, deferred_value_checks
from .prompts import PromptLearner, TextEncoder, tier_token_ids

logger = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_TIER_WORDS = ("terrible", "mediocre", "excellent")
CONFIG_FORMAT = "perceive-components/quality-perceiver"
CONFIG_KEYS = ("clip_model", "pretrained", "n_ctx", "tier_words", "logit_scale", "resize_antialias")
LEGACY_RESIZE_ANTIALIAS = True  # configs without "resize_antialias" (version 0.1) were trained antialiased


def create_clip(clip_model: str, pretrained: str | None, cache_dir: str | None = None) -> nn.Module:
    """Build an open_clip model by name and tag, forcing QuickGELU where the weights need it.

    ``"perceive-tiny-clip"`` (no tag) is the library's seeded random stand-in (``perceive_components.tiny``).

    Raises ``RuntimeError`` with a remedy when the weights cannot be fetched (offline, no network).
    """
    import open_clip

    from .tiny import TINY_CLIP_NAME, tiny_clip

    pretrained = pretrained or None  # "" from a command line means no pretrained tag
    if clip_model == TINY_CLIP_NAME:
        if pretrained is not None:
            raise ValueError(f"{TINY_CLIP_NAME!r} is a random stand-in with no pretrained weights; got "
                             f"pretrained={pretrained!r}")
        return tiny_clip()
    kwargs: dict[str, Any] = {"pretrained": pretrained, "cache_dir": cache_dir}
    if pretrained and not clip_model.startswith(("hf-hub:", "local-dir:")):
        tag_cfg = open_clip.get_pretrained_cfg(clip_model, pretrained)
        if tag_cfg.get("quick_gelu") and "quickgelu" not in clip_model.lower():
            kwargs["force_quick_gelu"] = True  # OpenAI weights with GELU silently give wrong features
    try:
        model = open_clip.create_model(clip_model, **kwargs)
    except RuntimeError as error:
        raise RuntimeError(
            f"could not load CLIP {clip_model!r} with pretrained={pretrained!r}: {error}. "
            "Download it once with network access (with HF_HUB_OFFLINE unset), point HF_HOME at a cache that "
            "holds it, or build the model yourself and pass it as clip=…"
        ) from error
    return model


def check_logit_scale(value: object, name: str = "logit_scale") -> float:
    """``value`` as a float if it is a finite number > 0, else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0 (CLIP's is exp(4.6052) = 100), got {value!r}")
    return float(value)


def _preprocess_constants(clip: nn.Module) -> tuple[tuple[int, int], tuple[float, ...], tuple[float, ...]]:
    visual = clip.visual
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    size = cfg.get("size", getattr(visual, "image_size", 224))
    size = (size, size) if isinstance(size, int) else tuple(size)
    return size, tuple(cfg.get("mean", OPENAI_MEAN)), tuple(cfg.get("std", OPENAI_STD))


class QualityPerceiver(
    FrozenHolder,
    PyTorchModelHubMixin,
    library_name="perceive-components",
    license="apache-2.0",
    tags=["image-quality-assessment", "image-restoration", "perceive-ir", "clip", "prompt-learning"],
    paper_url="https://arxiv.org/abs/2408.15994",
):
    """Frozen CLIP with learned tier prompts; ``forward(images (B,3,H,W) in [0,1]) -> logits (B, n_tiers)``.

    Args:
        clip_model / pretrained: open_clip model name and weight tag (default OpenAI ViT-B/32 with
            QuickGELU). Ignored for building when ``clip`` is given, but recorded in the config.
        n_ctx: learnable context vectors per tier (16).
        tier_words: one BPE token each, worst first (tier index = quality rank).
        clip: an already-built open_clip model to use instead of loading by name (offline, tiny tests).
        logit_scale: fixed logit scale s > 0; ``None`` takes CLIP's ``exp(logit_scale)``.
        resize_antialias: antialias the bicubic resize to the CLIP input size. Prompts must be used with the
            preprocessing they were trained with; ``False`` (plain bicubic) is the authors' and the default.
    """

    lower_better = False  # q: higher is better

    def __init__(
        self,
        clip_model: str = "ViT-B-32-quickgelu",
        pretrained: str | None = "openai",
        n_ctx: int = 16,
        tier_words: Sequence[str] = DEFAULT_TIER_WORDS,
        clip: nn.Module | None = None,
        logit_scale: float | None = None,
        cache_dir: str | None = None,
        resize_antialias: bool = False,
    ) -> None:
        super().__init__()
        import open_clip

        check_positive_int(n_ctx, "n_ctx")
        tier_words = tuple(tier_words)
        if len(tier_words) < 2:
            raise ValueError(f"tier_words needs at least two tiers, got {tier_words!r}")
        if not isinstance(resize_antialias, bool):
            raise TypeError(f"resize_antialias must be True or False, got {resize_antialias!r}")
        if logit_scale is not None:
            logit_scale = check_logit_scale(logit_scale)
        if clip is None:
            clip = create_clip(clip_model, pretrained, cache_dir)
        elif not isinstance(clip, nn.Module) or not hasattr(clip, "visual"):
            raise TypeError(f"clip must be an open_clip model (with .visual), got {type(clip).__name__}")
        text_encoder = TextEncoder(clip)
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=text_encoder.context_length)
        word_ids = tier_token_ids(tier_words, tokenizer)
        device = clip.visual.parameters().__next__().device

        self.clip_model, self.pretrained, self.tier_words = clip_model, pretrained, tier_words
        self.text_width = text_encoder.width
        if logit_scale is None:
            raw = getattr(clip, "logit_scale", None)
            logit_scale = check_logit_scale(float(raw.detach().exp()) if raw is not None else 100.0,
                                            "the CLIP's exp(logit_scale) (pass logit_scale=… to override)")
        self.logit_scale = logit_scale
        self.resize_antialias = resize_antialias
        self.image_size, mean, std = _preprocess_constants(clip)
        mean_t, std_t = torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)
        self.register_buffer("inv_std", 1.0 / std_t, persistent=False)
        self.register_buffer("shift", -mean_t / std_t, persistent=False)
        self.register_buffer("tier_values", torch.arange(len(tier_words), dtype=torch.float32, device=device),
                             persistent=False)

        self.prompt_learner = PromptLearner(
            text_encoder, word_ids, n_ctx, tokenizer.sot_token_id, tokenizer.eot_token_id
        )
        self.hold_frozen("image_encoder", clip.visual)
        self.hold_frozen("text_encoder", text_encoder)
        self._cached_text: torch.Tensor | None = None
        self._cache_key: tuple | None = None
        self.training_info: dict[str, Any] = {}
        self.audit_metrics: dict[str, Any] = {}
        self.origin: dict[str, Any] = {}  # where converted prompts come from (file, release, licence)

    # ------------------------------------------------------------------ text side
    def config(self) -> dict[str, Any]:
        """The JSON config written next to the prompt tensors."""
        return {
            "format": CONFIG_FORMAT,
            "clip_model": self.clip_model,
            "pretrained": self.pretrained,
            "n_ctx": self.prompt_learner.n_ctx,
            "tier_words": list(self.tier_words),
            "logit_scale": self.logit_scale,
            "resize_antialias": self.resize_antialias,
            "text_width": self.text_width,
            "image_size": list(self.image_size),
            "training": self.training_info,
            "audit": self.audit_metrics,
            "origin": self.origin,
        }

    def encode_prompts(self) -> torch.Tensor:
        """Run the frozen text tower on the current context: ``(n_tiers, D)``, L2-normalised."""
        if self.text_encoder_dropped:
            raise RuntimeError(
                "the text encoder was dropped by freeze_prompts() and the prompt context changed since (or the "
                "cache was lost); reload the perceiver to re-encode its prompts"
            )
        return self.text_encoder(self.prompt_learner(), self.prompt_learner.eot_index)

    @property
    def text_encoder_dropped(self) -> bool:
        return "text_encoder" not in self._frozen_nets

    def _ctx_key(self) -> tuple:
        ctx = self.prompt_learner.ctx
        return (ctx.data_ptr(), ctx._version, ctx.device, ctx.dtype)

    def text_features(self) -> torch.Tensor:
        """Prompt features ``(n_tiers, D)``: live (with gradient) while the context trains, else cached.

        The cache is keyed on the context tensor's identity and version counter, so any optimiser step or
        ``load_state_dict`` invalidates it.
        """
        if self.prompt_learner.ctx.requires_grad and torch.is_grad_enabled():
            return self.encode_prompts()
        if self._cached_text is None or self._cache_key != self._ctx_key():
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable in autograd later
                self._cached_text = self.encode_prompts()
            self._cache_key = self._ctx_key()
        return self._cached_text

    def freeze_prompts(self, drop_text_encoder: bool = True) -> "QualityPerceiver":
        """Fix the prompts for scoring or as a loss: no gradients, cached features, optionally no text tower."""
        self.prompt_learner.requires_grad_(False)
        self.text_features()
        if drop_text_encoder:
            self.hold_frozen("text_encoder", None)
        return self.eval()

    def _apply(self, fn, recurse: bool = True):
        fresh = self._cached_text is not None and self._cache_key == self._ctx_key()
        result = super()._apply(fn, recurse)
        if fresh:  # move a valid cache along (it may be all that is left once the text tower is dropped)
            self._cached_text = fn(self._cached_text).float()
            self._cache_key = self._ctx_key()
        else:
            self._cached_text = None
        return result

    # ------------------------------------------------------------------ image side
    def encode_images(self, images: torch.Tensor, *, straight_through: bool = False) -> torch.Tensor:
        """CLIP features ``(B, D)``, L2-normalised, of images in [0, 1] (validated by the caller).

        ``straight_through=True`` clamps in the forward pass but lets the gradient through unchanged, so a
        loss on the features still pushes out-of-range pixels (docs/method.md §2.1).
        """
        x = images.float()
        clamped = x.clamp(0.0, 1.0)
        x = x + (clamped - x).detach() if straight_through else clamped
        x = torch.addcmul(self.shift, self.resize(x), self.inv_std)  # (x − mean) / std in one kernel
        features = self.image_encoder(x)
        return F.normalize(features.float(), dim=-1)

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """Bicubic resize ``(B, 3, H, W) -> (B, 3, *image_size)``, aspect not kept (docs/method.md §1.1).

        A no-op when the size already matches. Antialiased only if ``resize_antialias`` (the preprocessing
        the prompts were trained with). Stage-1 training, scoring and the CLIP-aware loss all come through
        here, so training and use always match.
        """
        if tuple(images.shape[-2:]) == self.image_size:
            return images
        return F.interpolate(images, size=self.image_size, mode="bicubic", align_corners=False,
                             antialias=self.resize_antialias)

    def logits_from_features(self, image_features: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        """``s · v Tᵀ`` in float32 (also under autocast): ``(B, D)`` features → ``(B, n_tiers)`` logits."""
        scale = self.logit_scale if scale is None else scale
        text = self.text_features()
        with torch.autocast(image_features.device.type, enabled=False):
            return scale * image_features.float() @ text.float().t()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Tier logits ``(B, n_tiers)`` (logit scale applied) for images ``(B, 3, H, W)`` in [0, 1]."""
        with deferred_value_checks():  # the value check's sync comes after the encoder is queued
            check_images(images, "images")
            return self.logits_from_features(self.encode_images(images))

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """Tier probabilities ``(B, n_tiers)``."""
        return self(images).softmax(dim=-1)

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted tier index ``(B,)``: 0 = terrible … n_tiers-1 = excellent."""
        return self(images).argmax(dim=-1)

    def score(self, images: torch.Tensor) -> torch.Tensor:
        """Quality score q = Σ_c c·p_c ``(B,)`` in [0, n_tiers-1]; higher is better."""
        return self.probabilities(images) @ self.tier_values

    # ------------------------------------------------------------------ Hub
    def _save_pretrained(self, save_directory: Path) -> None:
        """Write prompts, config and a fresh model card (the card always reflects the current config)."""
        directory = Path(save_directory)
        save_prompt_tensors(self.prompt_learner.ctx, directory)
        (directory / "config.json").write_text(json.dumps(self.config(), indent=2, sort_keys=True))
        self.generate_model_card().save(directory / "README.md")

    def generate_model_card(self, *args, **kwargs):
        return model_card(self.config(), self._hub_mixin_info)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        clip: nn.Module | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        force_download: bool = False,
        token: str | bool | None = None,
        local_files_only: bool = False,
        **overrides: Any,
    ) -> "QualityPerceiver":
        """Load prompts from a Hub repo id or a folder written by ``save_pretrained`` (strict).

        Files are resolved (and validated) before any CLIP is built, so a missing or broken repo fails fast.
        With ``HF_HUB_OFFLINE=1`` a cached repo loads without any request. ``clip=`` supplies the CLIP
        instead of loading it by the name in the config; ``overrides`` replace config values. A config
        without ``resize_antialias`` (written by version 0.1) loads with ``resize_antialias=True``.
        """
        config_path, weights_path = resolve_files(
            str(pretrained_model_name_or_path), ("config.json", "model.safetensors"),
            revision=revision, cache_dir=cache_dir, force_download=force_download, token=token,
            local_files_only=local_files_only,
        )
        config = _read_config(config_path)
        tensors = load_prompt_tensors(weights_path)
        kwargs = {key: config[key] for key in CONFIG_KEYS if key in config}
        kwargs.setdefault("resize_antialias", LEGACY_RESIZE_ANTIALIAS)
        kwargs.update(overrides)
        perceiver = cls(clip=clip, **kwargs)
        perceiver._load_context(tensors, config, str(pretrained_model_name_or_path))
        perceiver.training_info = dict(config.get("training") or {})
        perceiver.audit_metrics = dict(config.get("audit") or {})
        perceiver.origin = dict(config.get("origin") or {})
        return perceiver.eval()

    def _load_context(self, tensors: dict[str, torch.Tensor], config: dict, source: str) -> None:
        expected = {"prompt_learner.ctx"}
        if set(tensors) != expected:
            raise ValueError(
                f"{source}: model.safetensors must hold exactly {sorted(expected)}, got {sorted(tensors)}"
            )
        ctx = tensors["prompt_learner.ctx"]
        target = self.prompt_learner.ctx
        if tuple(ctx.shape) != tuple(target.shape):
            saved_width = config.get("text_width", ctx.shape[-1])
            raise ValueError(
                f"{source}: the saved prompts have shape {tuple(ctx.shape)} (n_tiers, n_ctx, text width) but this "
                f"perceiver expects {tuple(target.shape)}: config says n_ctx={config.get('n_ctx')} and text width "
                f"{saved_width}, the CLIP in use has text width {self.text_width}. Use the CLIP the prompts were "
                f"trained with ({config.get('clip_model')!r}, {config.get('pretrained')!r}) and an unmodified config."
            )
        if not torch.isfinite(ctx).all():
            raise ValueError(f"{source}: the saved prompt context contains NaN or Inf")
        with torch.no_grad():
            target.copy_(ctx.to(target.dtype))


def _read_config(path: str) -> dict:
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a readable JSON config: {error}") from error
    if not isinstance(config, dict) or config.get("format", CONFIG_FORMAT) != CONFIG_FORMAT:
        raise ValueError(f"{path} is not a perceive-components quality-perceiver config")
    missing = [key for key in ("clip_model", "n_ctx", "tier_words") if key not in config]
    if missing:
        raise ValueError(f"{path} is missing {missing}")
    if config.get("logit_scale") is not None:
        check_logit_scale(config["logit_scale"], f"{path}: logit_scale")
    if not isinstance(config.get("resize_antialias", False), bool):
        raise ValueError(f"{path}: resize_antialias must be true or false, got {config['resize_antialias']!r}")
    return config
