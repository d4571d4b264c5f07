"""Files of a published perceiver: resolving them (folder or Hub, offline-first), reading, writing, card.

A perceiver repo holds ``config.json``, ``model.safetensors`` (the prompt context only, never CLIP
weights) and ``README.md`` (the model card). Every failure names the repo and says what to do.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from .ops.checkpoint import atomic_write

logger = logging.getLogger(__name__)

SAFETENSORS_NAME = "model.safetensors"


def _not_a_repo_id(text: str) -> str | None:
    """Why ``text`` cannot be a Hub repo id ('org/name'), or None when it can."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if text.startswith(("/", ".", "~")) or "\\" in text or os.path.isabs(text):
        return "it is a file-system path"
    if text.count("/") != 1:
        return "a Hub repo id has the form 'org/name'"
    try:
        validate_repo_id(text)
    except HFValidationError as error:
        return str(error)
    return None


def resolve_files(
    repo_id_or_dir: str,
    filenames: Sequence[str],
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    force_download: bool = False,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> list[str]:
    """Local paths of ``filenames`` in a folder or a Hub repo (downloaded or taken from the cache).

    A string that names no existing folder and cannot be a repo id (a path, no 'org/name' form) fails at
    once, without any Hub request. One that could be either (``runs/perceiver``) is tried on the Hub (logged
    at INFO level first); if that fails too, the error says that no local folder of that name exists either.

    Raises ``NotADirectoryError`` for a file (a perceiver is a folder or a repo id), and ``FileNotFoundError``
    with a remedy for a missing folder file, a repo or file that does not exist, or a repo that is not
    cached while offline (``HF_HUB_OFFLINE=1`` / ``local_files_only``).
    """
    local = os.path.expanduser(repo_id_or_dir)
    if os.path.isdir(local):
        paths = [os.path.join(local, name) for name in filenames]
        missing = [name for name, path in zip(filenames, paths) if not os.path.isfile(path)]
        if missing:
            raise FileNotFoundError(
                f"folder {repo_id_or_dir!r} has no {missing}; pass a folder written by save_pretrained"
            )
        return paths
    if os.path.exists(local):
        hint = (" A prompt checkpoint of the Perceive-IR authors (quality_prompts_*.pth) is converted into one "
                "with `perceive-ir convert authors-prompts FILE --out DIR`." if local.endswith((".pth", ".pt")) else "")
        raise NotADirectoryError(
            f"{repo_id_or_dir!r} is a file, not a perceiver: expected a folder written by save_pretrained "
            f"(holding {', '.join(filenames)}) or a Hub repo id 'org/name'.{hint}"
        )
    no_folder = f"no local folder {repo_id_or_dir!r} exists (looked for {os.path.abspath(local)})"
    reason = _not_a_repo_id(repo_id_or_dir)
    if reason is not None:
        raise FileNotFoundError(f"folder {repo_id_or_dir!r} does not exist ({os.path.abspath(local)}), and it is "
                                f"not a Hub repo id: {reason}. Pass a folder written by save_pretrained or 'org/name'.")
    logger.info("%s; loading %r from the Hugging Face Hub", no_folder, repo_id_or_dir)

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    paths = []
    for name in filenames:
        try:
            paths.append(
                hf_hub_download(
                    repo_id_or_dir, name, revision=revision, cache_dir=cache_dir, force_download=force_download,
                    token=token, local_files_only=local_files_only,
                )
            )
        except RepositoryNotFoundError as error:
            raise FileNotFoundError(
                f"{no_folder}, and Hub repo {repo_id_or_dir!r} does not exist (or is private: log in with "
                "`hf auth login` or pass token=…); check the id, or pass a local folder written by save_pretrained"
            ) from error
        except RevisionNotFoundError as error:
            raise FileNotFoundError(f"{no_folder}, and Hub repo {repo_id_or_dir!r} has no revision {revision!r}"
                                    ) from error
        except LocalEntryNotFoundError as error:  # before EntryNotFoundError: it is a subclass
            raise FileNotFoundError(
                f"{no_folder}; as a Hub repo id, {name!r} of {repo_id_or_dir!r} is not in the local Hugging Face "
                "cache and downloading is off (HF_HUB_OFFLINE=1 or local_files_only=True) or the Hub cannot be "
                f"reached. Check the folder name, or run once with network access (unset HF_HUB_OFFLINE), or "
                f"`hf download {repo_id_or_dir}`."
            ) from error
        except EntryNotFoundError as error:
            raise FileNotFoundError(
                f"{no_folder}, and Hub repo {repo_id_or_dir!r} has no file {name!r}: it is not a perceive-components "
                "perceiver (expected config.json and model.safetensors)"
            ) from error
    return paths


def save_prompt_tensors(ctx: torch.Tensor, directory: Path) -> Path:
    """Write ``model.safetensors`` holding only ``prompt_learner.ctx`` (atomically)."""
    from safetensors.torch import save_file

    path = Path(directory) / SAFETENSORS_NAME
    tensor = ctx.detach().to("cpu", torch.float32).contiguous()
    with atomic_write(path) as tmp:
        save_file({"prompt_learner.ctx": tensor}, str(tmp), metadata={"format": "pt"})
    return path


def load_prompt_tensors(path: str) -> dict[str, torch.Tensor]:
    """Read a prompt safetensors file; a corrupt or truncated file raises ``ValueError``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(
            f"{path} is not a valid safetensors file (corrupt or truncated download?): {error}. "
            "Re-download with force_download=True or re-save the perceiver."
        ) from error


def _format_metrics(metrics: dict[str, Any]) -> str:
    if not metrics:
        return "Not recorded (run `perceive-ir stage1 audit` or `audit_perceiver(..., record=True)` before saving)."
    lines = ["| metric | value |", "|---|---|"]
    for key, value in metrics.items():
        if key == "per_task" and isinstance(value, dict):
            continue
        lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    per_task = metrics.get("per_task") or {}
    if per_task:
        names = sorted({k for row in per_task.values() for k in row})
        lines += ["", "| task | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for task, row in sorted(per_task.items()):
            cells = [f"{row[n]:.4f}" if isinstance(row.get(n), float) else str(row.get(n, "")) for n in names]
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_card(config: dict[str, Any], info: Any = None):
    """A ``huggingface_hub.ModelCard`` describing a perceiver: CLIP, prompts, training data and audit."""
    from huggingface_hub import ModelCard

    training = config.get("training") or {}
    training_lines = "\n".join(f"- **{k}**: {v}" for k, v in training.items()) or "- Not recorded."
    origin = config.get("origin") or {}
    tags = list(getattr(getattr(info, "model_card_data", None), "tags", None) or [])
    # Prompts converted from another release keep that release's terms, not this library's licence.
    licence = ["license: apache-2.0"]
    if origin.get("licence_link"):
        licence = ["license: other", "license_name: perceive-ir-authors-release",
                   f"license_link: {origin['licence_link']}"]
    header = "\n".join(
        ["---", "library_name: perceive-components", *licence, "tags:"]
        + [f"- {tag}" for tag in tags or ["perceive-ir"]]
        + ["---"]
    )
    antialias = "antialiased" if config.get("resize_antialias") else "no antialias"
    origin_section = ""
    if origin:
        origin_lines = "\n".join(f"- **{k}**: {v}" for k, v in origin.items())
        origin_section = f"\n## Source and licence\n{origin_lines}\n"
    text = f"""{header}

# Perceive-IR quality perceiver (learned prompts)

Learned CoOp prompts for the quality perceiver of *Perceive-IR: Learning to Perceive Degradation Better
for All-in-One Image Restoration* (IEEE TIP 2025, arXiv 2408.15994), in the format of
[perceive-components](https://pypi.org/project/perceive-components/). This repo holds only the prompt
context (`model.safetensors`, {config.get('n_ctx')} vectors × {len(config.get('tier_words', []))} tiers ×
width {config.get('text_width')}); the frozen CLIP is loaded by name from open_clip.

| field | value |
|---|---|
| CLIP | `{config.get('clip_model')}` / `{config.get('pretrained')}` |
| n_ctx | {config.get('n_ctx')} |
| tier words (worst → best) | {', '.join(config.get('tier_words', []))} |
| logit scale | {config.get('logit_scale')} |
| image size | {config.get('image_size')} |
| image preprocessing | clamp to [0, 1] → bicubic resize to the image size ({antialias}) → CLIP mean/std |

```python
from perceive_components import QualityPerceiver
perceiver = QualityPerceiver.from_pretrained("<this repo>")   # or a local folder
q = perceiver.score(images)   # (B,) in [0, 2], higher is better; images (B,3,H,W) in [0,1]
```
{origin_section}
## Training data
{training_lines}

## Audit (docs/method.md §1.3: tier accuracy, strict-triplet rate, monotonic rate)
{_format_metrics(config.get('audit') or {})}
"""
    return ModelCard(text)
