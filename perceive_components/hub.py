"""Files of a published perceiver: resolving them (folder or Hub, offline-first), reading, writing, card.

A perceiver repo holds ``config.json``, ``model.safetensors`` (the prompt context only, never CLIP
weights) and ``README.md`` (the model card). Every failure names the repo and says what to do.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from .ops.checkpoint import atomic_write

SAFETENSORS_NAME = "model.safetensors"


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

    Raises ``FileNotFoundError`` with a remedy for a missing folder file, a repo or file that does not
    exist, or a repo that is not cached while offline (``HF_HUB_OFFLINE=1`` / ``local_files_only``).
    """
    if os.path.isdir(repo_id_or_dir):
        paths = [os.path.join(repo_id_or_dir, name) for name in filenames]
        missing = [name for name, path in zip(filenames, paths) if not os.path.isfile(path)]
        if missing:
            raise FileNotFoundError(
                f"folder {repo_id_or_dir!r} has no {missing}; pass a folder written by save_pretrained"
            )
        return paths
    if repo_id_or_dir.startswith(("/", ".", "~")) or repo_id_or_dir.count("/") > 1:
        raise FileNotFoundError(f"folder {repo_id_or_dir!r} does not exist (and it is not a Hub repo id 'org/name')")

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
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
        except HFValidationError as error:
            raise FileNotFoundError(
                f"{repo_id_or_dir!r} is neither an existing folder nor a valid Hub repo id ('org/name'): {error}"
            ) from error
        except RepositoryNotFoundError as error:
            raise FileNotFoundError(
                f"Hub repo {repo_id_or_dir!r} does not exist (or is private: log in with `hf auth login` or pass "
                "token=…); check the id, or pass a local folder written by save_pretrained"
            ) from error
        except RevisionNotFoundError as error:
            raise FileNotFoundError(f"Hub repo {repo_id_or_dir!r} has no revision {revision!r}") from error
        except LocalEntryNotFoundError as error:  # before EntryNotFoundError: it is a subclass
            raise FileNotFoundError(
                f"{name!r} of {repo_id_or_dir!r} is not in the local Hugging Face cache and downloading is off "
                "(HF_HUB_OFFLINE=1 or local_files_only=True) or the Hub cannot be reached. Run once with network "
                f"access (unset HF_HUB_OFFLINE), or `hf download {repo_id_or_dir}`, or pass a local folder."
            ) from error
        except EntryNotFoundError as error:
            raise FileNotFoundError(
                f"Hub repo {repo_id_or_dir!r} has no file {name!r}: it is not a perceive-components perceiver "
                "(expected config.json and model.safetensors)"
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
    tags = list(getattr(getattr(info, "model_card_data", None), "tags", None) or [])
    header = "\n".join(
        ["---", "library_name: perceive-components", "license: apache-2.0", "tags:"]
        + [f"- {tag}" for tag in tags or ["perceive-ir"]]
        + ["---"]
    )
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

```python
from perceive_components import QualityPerceiver
perceiver = QualityPerceiver.from_pretrained("<this repo>")   # or a local folder
q = perceiver.score(images)   # (B,) in [0, 2], higher is better; images (B,3,H,W) in [0,1]
```

## Training data
{training_lines}

## Audit (SPEC §1.3: tier accuracy, strict-triplet rate, monotonic rate)
{_format_metrics(config.get('audit') or {})}
"""
    return ModelCard(text)
