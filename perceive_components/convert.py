"""Convert the Perceive-IR authors' stage-1 prompt checkpoint into a perceiver folder (docs/authors-weights.md).

The authors' prompt training (House-yuyu/Perceive-IR, ``perceiveIR/train_stage1_prompts.py``) saves
``quality_prompts_<iteration>.pth`` with ``torch.save`` as a dict::

    prompt_learner      the learner's state dict:
                          context            (3, n_ctx, width)  tiers terrible, mediocre, excellent
                          token_prefix       (3, 1, width)      CLIP's embedding of [SOS]
                          token_suffix       (3, L-1-n_ctx, width)  embeddings of [EOT] [pad] …
                          tokenized_prompts  (3, L)             ids of "[SOS] X … X [EOT] 0 …" (n_ctx X's)
    iteration, quality_names, context_length, task_balanced, batch sizes, optimizer, scheduler

Their token layout is ours (``prompts.PromptLearner``): [SOS] ctx_1 … ctx_n [EOT] pad, the pads being
token id 0 and the feature taken at [EOT] (position n_ctx + 1); their text tower is CLIP's own, as ours.
So ``context`` becomes ``prompt_learner.ctx`` unchanged, and the other three tensors are only checked
against the target CLIP (the prefix and suffix must be its token embeddings), which also catches prompts
trained on another CLIP. Images: the authors resize with plain bicubic (no antialias), so the converted
perceiver records ``resize_antialias=False``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .perceiver import QualityPerceiver, create_clip
from .weights import WeightsError, load_torch_file

AUTHORS_TIERS = ("terrible", "mediocre", "excellent")
REQUIRED_KEYS = ("prompt_learner", "iteration", "quality_names", "context_length")
LEARNER_KEYS = ("context", "token_prefix", "token_suffix", "tokenized_prompts")
AUTHORS_RELEASE = "https://github.com/House-yuyu/Perceive-IR"
AUTHORS_CLIP = ("ViT-B-32-quickgelu", "openai")  # their clip.load("ViT-B/32"): OpenAI weights, QuickGELU
LICENCE_NOTE = (
    "follows the Perceive-IR authors' release: their repository's LICENSE file is Apache-2.0; neither its "
    "README nor the weight guide states separate terms for the weights (distributed on Baidu Netdisk), so "
    "the weights keep the authors' terms: ask them before redistributing"
)


class AuthorsCheckpointError(ValueError):
    """A file that is not (or does not fit) the authors' stage-1 prompt checkpoint."""


def read_authors_prompts(path: str | os.PathLike) -> dict[str, Any]:
    """Load and check the layout of an authors' prompt checkpoint (no CLIP needed); returns the dict.

    The file is read with ``torch.load(..., weights_only=True)``: tensors, numbers, strings, booleans,
    ``None`` and lists, tuples and dicts of them load (the authors' file, optimiser and scheduler states
    included, is only that); nothing else is unpickled. A file that needs more (a pickled class, a
    function) is refused with ``AuthorsCheckpointError`` naming the object, and is never executed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"authors' prompt checkpoint {str(path)!r} does not exist or is not a file")
    try:
        checkpoint = load_torch_file(path)
    except WeightsError as error:  # the authors' file holds only tensors and plain containers: this is another
        raise AuthorsCheckpointError(f"{path.name}: {error}") from error
    expected = f"a dict with keys {list(REQUIRED_KEYS)} (the authors' stage-1 quality_prompts_*.pth)"
    if not isinstance(checkpoint, Mapping):
        raise AuthorsCheckpointError(f"{path.name}: expected {expected}, got a {type(checkpoint).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in checkpoint]
    if missing:
        network = (" It looks like the authors' network checkpoint: evaluate it with examples/evaluate.py "
                   "--backbone perceive-ir-net --checkpoint FILE." if "model" in checkpoint else "")
        raise AuthorsCheckpointError(f"{path.name}: expected {expected}; missing {missing}, it has "
                                     f"{sorted(map(str, checkpoint))}.{network}")
    learner = checkpoint["prompt_learner"]
    if not isinstance(learner, Mapping) or sorted(learner) != sorted(LEARNER_KEYS) or not all(
            isinstance(value, torch.Tensor) for value in learner.values()):
        got = sorted(learner) if isinstance(learner, Mapping) else type(learner).__name__
        raise AuthorsCheckpointError(f"{path.name}: prompt_learner must be a state dict of tensors "
                                     f"{sorted(LEARNER_KEYS)}, got {got}")
    names = checkpoint["quality_names"]
    if not isinstance(names, (list, tuple)) or tuple(names) != AUTHORS_TIERS:
        raise AuthorsCheckpointError(f"{path.name}: quality_names must be {AUTHORS_TIERS} in this order (worst "
                                     f"first), got {names!r}")
    n_ctx, context = checkpoint["context_length"], learner["context"]
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
        raise AuthorsCheckpointError(f"{path.name}: context_length must be a positive int, got {n_ctx!r}")
    if context.ndim != 3 or tuple(context.shape[:2]) != (len(AUTHORS_TIERS), n_ctx):
        raise AuthorsCheckpointError(f"{path.name}: context must have shape (3, n_ctx={n_ctx}, width), got "
                                     f"{tuple(context.shape)}")
    if not context.is_floating_point() or not torch.isfinite(context).all():
        raise AuthorsCheckpointError(f"{path.name}: context must be finite floating-point values")
    return dict(checkpoint)


def _check_layout(learner: Mapping[str, torch.Tensor], perceiver: QualityPerceiver, source: str) -> None:
    """The authors' fixed tensors must be the target CLIP's own tokens and embeddings in our layout."""
    import open_clip

    ours = perceiver.prompt_learner
    n_ctx = ours.n_ctx
    length = ours.token_prefix.shape[1] + n_ctx + ours.token_suffix.shape[1]
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=length)
    expected_ids = tokenizer([" ".join(["X"] * n_ctx)] * len(AUTHORS_TIERS))  # [SOS] X … X [EOT] 0 …
    ids = learner["tokenized_prompts"]
    if tuple(ids.shape) != tuple(expected_ids.shape) or not torch.equal(ids.long(), expected_ids):
        raise AuthorsCheckpointError(
            f"{source}: tokenized_prompts {tuple(ids.shape)} are not CLIP's ids of '[SOS] X…X [EOT] pad' with "
            f"n_ctx={n_ctx} and context length {length} (expected {tuple(expected_ids.shape)} starting "
            f"{expected_ids[0, :n_ctx + 3].tolist()})"
        )
    for name, reference in (("token_prefix", ours.token_prefix), ("token_suffix", ours.token_suffix)):
        theirs = learner[name]
        if tuple(theirs.shape) != tuple(reference.shape):
            raise AuthorsCheckpointError(f"{source}: {name} has shape {tuple(theirs.shape)}, expected "
                                         f"{tuple(reference.shape)} for this CLIP")
        gap = float((theirs.float() - reference.float().cpu()).abs().max())
        if gap > 1e-5 * max(1.0, float(reference.abs().max())):
            raise AuthorsCheckpointError(
                f"{source}: {name} differs from {perceiver.clip_model!r}'s token embeddings by up to {gap:.3g}: the "
                f"prompts were trained on another CLIP. The authors used OpenAI ViT-B/32 "
                f"(--clip-model {AUTHORS_CLIP[0]} --pretrained {AUTHORS_CLIP[1]})."
            )


def convert_authors_prompts(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    clip: nn.Module | None = None,
    *,
    clip_model: str = AUTHORS_CLIP[0],
    pretrained: str | None = AUTHORS_CLIP[1],
    cache_dir: str | None = None,
) -> QualityPerceiver:
    """Convert ``quality_prompts_*.pth`` of the authors into a perceiver folder and return the perceiver.

    ``clip_model``/``pretrained`` name the CLIP the prompts target (default: the authors' OpenAI ViT-B/32)
    and are recorded in the config; ``clip=`` passes that CLIP already built. Checks, each a
    ``ValueError`` (``AuthorsCheckpointError``) naming what was expected and what came: a dict with the
    authors' keys, the tier names ``terrible, mediocre, excellent`` in that order, ``n_ctx`` that fits the
    CLIP's context length, the CLIP's text width, and prefix/suffix/ids that are the CLIP's own tokens in
    our layout. Writes ``out_dir`` with ``save_pretrained`` (safetensors, config with
    ``resize_antialias=False``, model card naming the source file, iteration, task balancing and licence);
    ``QualityPerceiver.from_pretrained(out_dir)`` loads it and ``push_to_hub`` publishes it.
    """
    checkpoint = read_authors_prompts(path)
    source = Path(path).name
    learner, n_ctx = checkpoint["prompt_learner"], checkpoint["context_length"]
    if clip is None:
        clip = create_clip(clip_model, pretrained, cache_dir)
    width = int(learner["context"].shape[-1])
    try:
        perceiver = QualityPerceiver(clip_model=clip_model, pretrained=pretrained, n_ctx=n_ctx,
                                     tier_words=AUTHORS_TIERS, clip=clip, resize_antialias=False)
    except ValueError as error:  # n_ctx too long for the CLIP's context
        raise AuthorsCheckpointError(f"{source}: context_length n_ctx={n_ctx} does not fit {clip_model!r}: {error}"
                                     ) from error
    if width != perceiver.text_width:
        raise AuthorsCheckpointError(
            f"{source}: the prompts have text width {width} but {clip_model!r} has text width {perceiver.text_width}; "
            f"convert with the CLIP they were trained with (the authors: --clip-model {AUTHORS_CLIP[0]} "
            f"--pretrained {AUTHORS_CLIP[1]})"
        )
    _check_layout(learner, perceiver, source)
    with torch.no_grad():
        perceiver.prompt_learner.ctx.copy_(learner["context"].to(perceiver.prompt_learner.ctx))
    perceiver.training_info = {
        "trained_by": "the Perceive-IR authors (stage-1 prompt training, 224² crops)",
        "iteration": int(checkpoint["iteration"]),
        "task_balanced": checkpoint.get("task_balanced", "not recorded"),
        **{key: checkpoint[key] for key in ("global_batch_size",) if key in checkpoint},
    }
    perceiver.origin = {"converted_from": source, "release": AUTHORS_RELEASE, "licence": LICENCE_NOTE,
                        "licence_link": AUTHORS_RELEASE}
    perceiver.save_pretrained(out_dir)
    return perceiver.eval()
