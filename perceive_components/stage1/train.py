"""Stage-1 prompt training (docs/method.md §1.3).

Only the prompt context learns. Each step draws a task-balanced batch of B triplets, crops each triplet
with one shared random window and flip, and minimises the three-way cross-entropy

    L = CE( s · v Tᵀ , [0]*B ⧺ [1]*B ⧺ [2]*B )     for the batch [I_d; I_m; I_g]

with s the perceiver's fixed logit scale (≈ 100). CLIP is frozen and no gradient is needed w.r.t. the
images, so image features are computed without autograd; only the text tower runs backward. The crops
reach CLIP through ``perceiver.encode_images``, i.e. the perceiver's own resize (antialiased or not, as its
``resize_antialias`` records), so the prompts are trained with the preprocessing they are later used with.
Defaults follow the authors: AdamW lr 4e-5 with PyTorch's default weight decay 0.01 (their optimiser is
``torch.optim.AdamW(params, lr=4e-5)``), cosine to 1e-6 (they run 100,000 steps of 32 triplets).

Runs are resumable: with ``checkpoint=`` the context, optimiser, scheduler and step are written
atomically every ``checkpoint_every`` steps and picked up again on the next call. Batches are a pure
function of ``(seed, step)``, so a resumed run sees exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import logging
import os
from collections import Counter, defaultdict
from pathlib import Path


import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..ops.checkpoint import load_state, save_state
from ..ops.validation import check_positive_int
from .data import check_triplet, dataset_tasks, shared_crop

logger = logging.getLogger(__name__)


def balanced_indices(tasks: list[str], batch_size: int, generator: torch.Generator) -> list[int]:
    """``batch_size`` indices with an equal share per task (remainder spread over random tasks)."""
    by_task: dict[str, list[int]] = defaultdict(list)
    for index, task in enumerate(tasks):
        by_task[task].append(index)
    names = sorted(by_task)
    share, extra = divmod(batch_size, len(names))
    bonus = set(torch.randperm(len(names), generator=generator)[:extra].tolist())
    picked = []
    for position, name in enumerate(names):
        pool = by_task[name]
        count = share + (position in bonus)
        picked += [pool[i] for i in torch.randint(0, len(pool), (count,), generator=generator).tolist()]
    return picked


class _StepBatches(Dataset):
    """Item ``step`` = the cropped batch of that step: ``(images (3B, 3, S, S), labels (3B,))``."""

    def __init__(self, triplets: Dataset, tasks: list[str], batch_size: int, crop_size: int, seed: int,
                 balanced: bool) -> None:
        self.triplets, self.tasks, self.batch_size = triplets, tasks, batch_size
        self.crop_size, self.seed, self.balanced = crop_size, seed, balanced

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, step: int):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        if self.balanced:
            indices = balanced_indices(self.tasks, self.batch_size, generator)
        else:
            indices = torch.randint(0, len(self.tasks), (self.batch_size,), generator=generator).tolist()
        tiers: list[list[torch.Tensor]] = [[], [], []]
        for index in indices:
            item = check_triplet(self.triplets[index], index)
            for tier, image in enumerate(shared_crop([item["low"], item["medium"], item["high"]],
                                                     self.crop_size, generator)):
                tiers[tier].append(image.float())
        images = torch.stack(tiers[0] + tiers[1] + tiers[2])
        labels = torch.arange(3).repeat_interleave(len(indices))
        return images, labels


def _run_signature(perceiver, triplets, steps, batch_size, lr, min_lr, weight_decay, crop_size, seed) -> dict:
    """What a resumable checkpoint must agree on; ``triplets`` is the data set's content fingerprint when it
    has one (``TripletImages.fingerprint``), so a checkpoint made on other triplets is not resumed."""
    fingerprint = getattr(triplets, "fingerprint", None)
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "min_lr": min_lr, "weight_decay": weight_decay,
            "crop_size": crop_size, "seed": seed, "n_triplets": len(triplets),
            "ctx_shape": list(perceiver.prompt_learner.ctx.shape),
            "triplets": fingerprint() if callable(fingerprint) else None}


def train_prompts(
    perceiver,
    triplets: Dataset,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 4e-5,
    min_lr: float = 1e-6,
    weight_decay: float = 0.01,
    crop_size: int = 224,
    task_balanced: bool = True,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Train the perceiver's prompt context on ``triplets``; returns per-step ``loss`` and ``accuracy``.

    Args:
        perceiver: a :class:`QualityPerceiver` with its text encoder (not frozen by ``freeze_prompts``).
        triplets: dataset of dicts ``low``/``medium``/``high`` ``(3, H, W)`` in [0, 1] (+ optional ``task``).
        steps, batch_size: optimisation steps and triplets per step (3 × batch_size images).
        lr, min_lr, weight_decay: AdamW (decoupled weight decay on the context), cosine from lr to min_lr.
        crop_size: shared random crop (upscaled first if an image is smaller); use the CLIP input size (the
            authors' 224) or the crops are resized by the perceiver's own preprocessing.
        task_balanced: equal share of each task in every batch (docs/method.md §1.3).
        checkpoint: file for resumable state; an existing file from the same run is resumed.
        amp_dtype: e.g. ``torch.bfloat16`` to run the text tower under autocast on GPU.
    """
    for value, name in ((steps, "steps"), (batch_size, "batch_size"), (crop_size, "crop_size"),
                        (checkpoint_every, "checkpoint_every")):
        check_positive_int(value, name)
    if len(triplets) == 0:
        raise ValueError("triplets is empty")
    if perceiver.text_encoder_dropped:
        raise ValueError("perceiver: its text encoder was dropped by freeze_prompts(); build or load a fresh one")
    device = torch.device(device) if device is not None else perceiver.prompt_learner.ctx.device
    perceiver.to(device).train()
    ctx = perceiver.prompt_learner.ctx
    ctx.requires_grad_(True)
    tasks = dataset_tasks(triplets)

    optimizer = torch.optim.AdamW([ctx], lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=min_lr)
    signature = _run_signature(perceiver, triplets, steps, batch_size, lr, min_lr, weight_decay, crop_size, seed)
    history: dict[str, list[float]] = {"loss": [], "accuracy": []}
    start = 0
    if checkpoint is not None and Path(checkpoint).is_file():
        state = load_state(checkpoint)
        if state.get("signature") != signature:
            raise ValueError(
                f"checkpoint {str(checkpoint)!r} belongs to a different run {state.get('signature')}; "
                f"this run is {signature}. Use another checkpoint path or the same settings."
            )
        with torch.no_grad():
            ctx.copy_(state["ctx"].to(device))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, history = int(state["step"]), state["history"]
        logger.info("resuming prompt training from step %d of %d (%s)", start, steps, checkpoint)

    def save(step: int) -> None:
        if checkpoint is not None:
            save_state({"ctx": ctx.detach().cpu(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "step": step, "history": history,
                        "signature": signature}, checkpoint)

    batches = DataLoader(_StepBatches(triplets, tasks, batch_size, crop_size, seed, task_balanced),
                         sampler=range(start, steps), batch_size=None, num_workers=num_workers,
                         pin_memory=device.type == "cuda", persistent_workers=False)
    bar = tqdm(batches, total=steps, initial=start, desc="prompts", disable=not progress, dynamic_ncols=True)
    step = start
    for images, labels in bar:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.no_grad():
            features = perceiver.encode_images(images)  # frozen CLIP, no gradient needed w.r.t. images
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = perceiver.logits_from_features(features)
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step += 1
        history["loss"].append(float(loss.detach()))
        history["accuracy"].append(float((logits.argmax(-1) == labels).float().mean()))
        bar.set_postfix(loss=f"{history['loss'][-1]:.3f}", acc=f"{history['accuracy'][-1]:.2f}")
        if step % checkpoint_every == 0 or step == steps:
            save(step)
    ctx.requires_grad_(False)
    perceiver.eval()
    counts = Counter(tasks)
    perceiver.training_info = {
        "triplets": len(triplets), "triplets_per_task": dict(sorted(counts.items())), "steps": steps,
        "batch_size": batch_size, "lr": lr, "min_lr": min_lr, "weight_decay": weight_decay,
        "crop_size": crop_size, "task_balanced": task_balanced, "seed": seed,
        "final_loss": history["loss"][-1] if history["loss"] else None,
        **({"triplets_sha256": signature["triplets"]} if signature["triplets"] else {}),
    }
    return history


