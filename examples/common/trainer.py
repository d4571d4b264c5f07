"""One small training loop for every example script (docs/training.md).

    trainer = Trainer(model, train_set, step_fn, TrainConfig(...), val_sets={"SOTS": ...})
    trainer.fit()

``model`` holds the trainable parts only (frozen networks live outside it or are held with
``FrozenHolder``); under torchrun it alone is wrapped in DDP. ``step_fn(model, batch) -> (loss, terms)``
runs the forward pass and the loss on one batch (already on the device, inside bf16 autocast if asked)
and returns the scalar loss and a dict of scalar terms to log; it must call the ``model`` it is given
(the DDP wrapper), so that gradients are synchronised.

Per step: forward + loss in autocast → backward → global grad norm (clipped if asked) → the loss, terms
and norm are averaged over processes → if any is non-finite the step is skipped on every process (no
optimiser/EMA update; stop after ``max_nonfinite`` in a row), else AdamW step and EMA update → cosine
scheduler step. The step counter also counts skipped steps, so the data position and the learning
rate stay functions of the step.

Exact resume: a checkpoint holds the model, optimiser, scheduler, EMA, every process's RNG states
(and any extra generators), the step and the non-finite streak; the data position is a function of the
step (``ResumableBatchSampler``), every draw has its own seed, and validation runs on a forked RNG, so a
resumed run continues with bit-identical losses on the same hardware and process count.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import re
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from perceive_components.ops.checkpoint import atomic_write, rng_state, set_rng_state

from .checkpoints import CheckpointManager
from .config import TrainConfig
from .distributed import DistEnv, close_distributed, init_distributed
from .ema import ModelEMA
from .logs import RunLog
from .sampling import ResumableBatchSampler, SeededDataset
from .validation import PredictFn, default_predict, validate

logger = logging.getLogger(__name__)
StepFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, Mapping[str, Any]] | torch.Tensor"]
CONFIG_KEYS_FOR_RESUME = ("steps", "batch_size", "lr", "min_lr", "weight_decay", "betas", "seed", "ema_decay")


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN/Inf loss, loss term or gradient norm."""


def move_to(batch: Any, device: torch.device) -> Any:
    """Tensors anywhere in nested dicts/lists/tuples → ``device``; everything else unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: move_to(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(value, device) for value in batch)
    return batch


def seed_process(seed: int, rank: int) -> None:
    """Seed Python, NumPy and torch (all devices) for process ``rank`` of a run with ``seed``."""
    mixed = int(np.random.SeedSequence([seed, rank, 7]).generate_state(1, dtype=np.uint64)[0] >> 1)
    random.seed(mixed)
    np.random.seed(mixed % 2**32)
    torch.manual_seed(mixed)


class Trainer:
    def __init__(self, model: nn.Module, train_set: Dataset, step_fn: StepFn, config: TrainConfig, *,
                 val_sets: Mapping[str, Dataset] | None = None, predict: PredictFn = default_predict,
                 collate_fn: Callable | None = None, generators: Mapping[str, torch.Generator] | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module holding the trainable parts, got {type(model).__name__}")
        if not callable(step_fn):
            raise TypeError(f"step_fn must be callable as step_fn(model, batch), got {type(step_fn).__name__}")
        self.model, self.train_set, self.step_fn, self.config = model, train_set, step_fn, config
        self.val_sets = dict(val_sets or {})
        self.predict, self.collate_fn = predict, collate_fn
        self.generators = dict(generators or {})
        self.step = 0
        self.out_dir = Path(config.out_dir)

    # ----------------------------------------------------------------------------------------- set-up
    def fit(self) -> dict[str, float]:
        """Train to ``config.steps``; returns the last validation metrics (empty without val sets)."""
        env = init_distributed(self.config.device)
        try:
            return self._fit(env)
        finally:
            close_distributed()

    def setup(self, env: DistEnv | None = None) -> None:
        """Build the optimiser, scheduler, EMA, sampler, data loader and checkpoint manager on ``env``
        (default: ``init_distributed(config.device)``); ``fit`` calls it. Call it yourself to drive the steps by
        hand (``batches`` and ``train_step``: profiling, a custom loop) — no logs, checkpoints or DDP then."""
        cfg = self.config
        env = env if env is not None else init_distributed(cfg.device)
        if cfg.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.env = env
        self.model.to(env.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model has no trainable parameters (requires_grad=True); pass the trainable parts")
        fused = env.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                           fused=fused or None)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=cfg.steps, eta_min=cfg.min_lr)
        self.ema = ModelEMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.sampler = ResumableBatchSampler(len(self.train_set), cfg.batch_size, rank=env.rank,
                                             world_size=env.world_size, seed=cfg.seed)
        self.loader = DataLoader(SeededDataset(self.train_set), batch_sampler=self.sampler, num_workers=cfg.workers,
                                 collate_fn=self.collate_fn, pin_memory=env.device.type == "cuda",
                                 persistent_workers=cfg.workers > 0, generator=torch.Generator())
        self.checkpoints = CheckpointManager(self.out_dir / "checkpoints", cfg.keep_last)
        self.net = self.model  # fit() wraps it in DDP under torchrun

    def _data_record(self) -> dict[str, int]:
        return {"dataset_len": len(self.train_set), "global_batch": self.config.batch_size,
                "steps_per_epoch": self.sampler.steps_per_epoch, "seed": self.config.seed}

    # ---------------------------------------------------------------------------------- checkpoints
    def _resume_path(self) -> Path | None:
        resume = self.config.resume
        if resume == "never":
            if self.checkpoints.latest() is not None:
                raise ValueError(f"{self.out_dir} already holds checkpoints; pass --resume auto to continue that run "
                                 "or choose another --out-dir")
            return None
        if resume == "auto":
            return self.checkpoints.latest()
        path = Path(resume)
        if not path.is_file():
            raise ValueError(f"resume must be 'auto', 'never' or an existing checkpoint file, got {resume!r}")
        return path

    def _state(self) -> dict[str, Any]:
        generators = {name: g.get_state() for name, g in self.generators.items()}
        per_rank = self.env.gather({"rng": rng_state(), "generators": generators})
        return {
            "step": self.step, "nonfinite": self.nonfinite, "model_class": type(self.model).__qualname__,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
            "per_rank": per_rank, "world_size": self.env.world_size, "data": self._data_record(),
            "config": self.config.to_dict(),
        }

    def _load(self, path: Path) -> None:
        state = CheckpointManager.load(path)
        model_class = type(self.model).__qualname__
        if state.get("model_class") != model_class:
            raise ValueError(f"checkpoint {path} was written for a {state.get('model_class')!r} model, but this run "
                             f"trains a {model_class!r}; use another --out-dir or --resume never")
        try:
            self.model.load_state_dict(state["model"], strict=True)
        except RuntimeError as error:
            raise ValueError(f"checkpoint {path} does not fit this model (written for another backbone or "
                             f"configuration?): {error}") from error
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            if state["ema"] is None:
                logger.warning("checkpoint %s has no EMA weights; the EMA restarts from the current weights", path)
            else:
                self.ema.load_state_dict(state["ema"])
        self.step, self.nonfinite = int(state["step"]), int(state["nonfinite"])
        if state["world_size"] == self.env.world_size:
            mine = state["per_rank"][self.env.rank]
            set_rng_state(mine["rng"])
            for name, generator in self.generators.items():
                generator.set_state(mine["generators"][name])
        else:
            logger.warning("checkpoint was written by %d processes, this run has %d: RNG streams restart (the data "
                           "order still continues exactly)", state["world_size"], self.env.world_size)
            seed_process(self.config.seed + self.step, self.env.rank)
        self._warn_if_changed(state)
        if self.env.is_main:
            logger.info("resumed from %s at step %d", path, self.step)

    def _warn_if_changed(self, state: dict[str, Any]) -> None:
        if state["data"] != self._data_record():
            logger.warning("the training data changed since the checkpoint (%s → %s): the sample order will differ",
                           state["data"], self._data_record())
        old, new = state["config"], self.config.to_dict()
        changed = {k: (old.get(k), new[k]) for k in CONFIG_KEYS_FOR_RESUME if old.get(k) != new[k]}
        if changed:
            logger.warning("settings differ from the checkpoint's (old, new): %s; the optimiser/scheduler state "
                           "comes from the checkpoint", changed)

    def _save(self) -> None:
        state = self._state()  # collective: every process takes part
        if self.env.is_main:
            self.checkpoints.save(state, self.step)

    # ----------------------------------------------------------------------------------------- loop
    def batches(self) -> Iterator[Any]:
        """Training batches from the current step's position on, epoch after epoch (after ``setup``)."""
        epoch, offset = self.sampler.position(self.step)
        while True:
            self.sampler.set_position(epoch, offset)
            yield from self.loader
            epoch, offset = epoch + 1, 0

    def _fit(self, env: DistEnv) -> dict[str, float]:
        cfg = self.config
        self.setup(env)
        self.step, self.nonfinite = 0, 0
        path = self._resume_path()
        if path is not None:
            self._load(path)
        else:
            seed_process(cfg.seed, env.rank)
        if env.is_main:
            self.checkpoints.clean_up(self.step)
        self.net = nn.parallel.DistributedDataParallel(
            self.model, device_ids=[env.device.index] if env.device.type == "cuda" else None) if env.distributed else self.model
        self.log = RunLog(self.out_dir, self.step, cfg.tensorboard) if env.is_main else None
        metrics: dict[str, float] = {}
        progress = tqdm(total=cfg.steps, initial=self.step, disable=not env.is_main, desc="train", dynamic_ncols=True)
        batches = self.batches()
        try:
            self.net.train()
            clock = time.perf_counter()
            since = self.step
            while self.step < cfg.steps:
                values, names, lr = self.train_step(next(batches))
                self.step += 1
                progress.update(1)
                skipped = not all(math.isfinite(v) for v in values)
                if env.is_main and (self.step % cfg.log_every == 0 or skipped):
                    now = time.perf_counter()
                    row = {"step": self.step, "epoch": (self.step - 1) // self.sampler.steps_per_epoch, "lr": lr,
                           **dict(zip(names, values)), "skipped": int(skipped),
                           "sec_per_step": (now - clock) / max(self.step - since, 1)}
                    clock, since = now, self.step
                    self.log.log_train(row)
                    progress.set_postfix(loss=f"{values[0]:.4g}")
                if skipped:
                    self._on_nonfinite(dict(zip(names, values)))
                else:
                    self.nonfinite = 0
                last = self.step == cfg.steps
                if self.step % cfg.ckpt_every == 0 or last:
                    self._save()
                if (cfg.val_every and self.step % cfg.val_every == 0) or last:
                    if self.val_sets:
                        metrics = self._validate()
                    if env.is_main and cfg.plots:
                        self.log.plot()
            self._export_weights()
        finally:
            batches.close()  # shuts the DataLoader workers down
            progress.close()
            if self.log is not None:
                self.log.close()
        return metrics

    def train_step(self, batch: Any) -> tuple[list[float], list[str], float]:
        """One optimisation step on ``batch`` (docs/training.md, "The step"): returns the process-averaged
        ``[loss, *terms, grad_norm]``, their names and the learning rate used. A non-finite value skips the
        update; ``fit`` counts such steps, this method alone does not. ``self.step`` is left to the caller."""
        cfg, env = self.config, self.env
        batch = move_to(batch, env.device)
        lr = self.optimizer.param_groups[0]["lr"]
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            output = self.step_fn(self.net, batch)
        loss, terms = (output, {}) if isinstance(output, torch.Tensor) else output
        if "loss" in terms:
            raise ValueError("step_fn's terms must not be named 'loss' (the total is logged as 'loss')")
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        scalars = [torch.as_tensor(v, device=env.device).detach().float().reshape(()) for v in (loss, *terms.values())]
        values = env.all_reduce_mean(torch.stack([*scalars, grad_norm.detach().float()])).tolist()
        if all(math.isfinite(v) for v in values):
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # a skipped first step calls the scheduler before the optimiser
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            self.scheduler.step()
        return values, ["loss", *terms, "grad_norm"], lr

    def _on_nonfinite(self, values: dict[str, float]) -> None:
        self.nonfinite += 1
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if self.env.is_main:
            logger.warning("step %d skipped: non-finite %s (%d in a row, stop at %d)", self.step, bad, self.nonfinite,
                           self.config.max_nonfinite)
        if self.nonfinite >= self.config.max_nonfinite:
            latest = self.checkpoints.latest()
            raise NonFiniteLossError(
                f"training stopped at step {self.step}: {self.nonfinite} consecutive steps had a non-finite loss, "
                f"loss term or gradient norm (last: {bad}); no update was applied on those steps. Last checkpoint: "
                f"{latest or 'none'}. Lower --lr, set --grad-clip, try without --bf16, or check the data for bad images.")

    def _validate(self) -> dict[str, float]:
        cfg, env = self.config, self.env
        grid_dir = self.out_dir / "grids" / f"step_{self.step:08d}"
        devices = [env.device] if env.device.type == "cuda" else []
        weights = self.ema.swapped_in(self.model) if self.ema is not None else contextlib.nullcontext()
        with torch.random.fork_rng(devices=devices), weights:
            metrics = validate(self.model, self.val_sets, env, predict=self.predict, max_images=cfg.val_max_images,
                               num_grids=cfg.num_grids, grid_dir=grid_dir)
        if env.is_main:
            self.log.log_val({"step": self.step, **metrics})
            logger.info("step %d validation%s: %s", self.step, " (EMA weights)" if self.ema else "",
                        ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def _export_weights(self) -> None:
        """``model.safetensors`` (and ``model_ema.safetensors``): the final weights, for inference."""
        if not self.env.is_main:
            return
        from safetensors.torch import save_file

        exports = {"model.safetensors": self.model.state_dict()}
        if self.ema is not None:
            exports["model_ema.safetensors"] = self.ema.state_dict()
        for name, weights in exports.items():
            with atomic_write(self.out_dir / name) as tmp:
                save_file({k: v.detach().contiguous().cpu().clone() for k, v in weights.items()}, str(tmp))
