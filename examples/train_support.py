"""What every example training loop needs besides the model's forward pass and loss (docs/training.md).

- ``TrainConfig`` and its flags (``add_train_args``): AdamW, cosine learning rate, bf16, EMA, logs, checkpoints;
- ``distributed_job`` → ``DistEnv``: torchrun (NCCL on CUDA, gloo on CPU) or a single process, one code path,
  with the log on stderr and in ``<out-dir>/train.log`` (Python warnings included);
- ``ResumableBatchSampler`` + ``SeededDataset``: a data order that resumes at any step, one seed per draw (the
  library's ``TaskMixingBatchSampler`` with ``draw_seeds=True`` plugs in the same way);
- ``TrainingRun``: the optimiser, the learning rate (``CosineSchedule``), the EMA (``ModelEMA``), the step, the
  skipping of non-finite steps (decided by all processes together), atomic checkpoints (``CheckpointManager``)
  with exact resume, logs (``RunLog``: CSV, TensorBoard, ``curves.png``) and validation;
- ``EpochRecord``: a value measured once per epoch, kept so that a resumed run reuses it;
- ``claim_run_folder`` / ``read_net_spec`` / ``run_weights``: a run folder's ``net.json`` (how to rebuild its
  network) and its trained weights, for ``examples/evaluate.py --run``.

A script's loop (``examples/train_plain.py`` is the smallest)::

    with TrainingRun(model, config, env, steps_per_epoch=...) as run:   # resumes <out-dir>/checkpoints/latest
        batches = run.batches(loader)                                    # from the resumed step on
        while run.step < config.steps:
            loss, terms = ...  # forward and loss on next(batches), inside bf16 autocast
            loss.backward()
            run.update(loss, terms, torch.nn.utils.clip_grad_norm_(run.parameters, config.grad_clip or math.inf))
            if run.due(config.ckpt_every): run.save()
            if run.due(config.val_every): run.validate(val_sets)
        run.export_weights()
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from perceive_components.ops.checkpoint import atomic_write, load_state, rng_state, save_state, set_rng_state
from perceive_components.ops.io import write_image
from perceive_components.ops.metrics import psnr, ssim
from perceive_components.ops.tiling import pad_to_multiple

logger = logging.getLogger(__name__)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


# ------------------------------------------------------------------------------------------------- settings
def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """The loop's settings; defaults are the authors' stage 2 (docs/method.md §4): AdamW 2e-4, weight decay 1e-4,
    betas (0.9, 0.999), cosine decay to 1e-6 over the run, no warm-up, global batch 8."""

    out_dir: str = _opt("runs/train", "run folder: checkpoints/, logs, tensorboard/, grids/, curves.png")
    steps: int = _opt(500_000, "optimiser steps in the whole run (the cosine schedule ends there)")
    batch_size: int = _opt(8, "GLOBAL batch over all processes (split evenly between them)")
    lr: float = _opt(2e-4, "AdamW learning rate at step 0")
    min_lr: float = _opt(1e-6, "learning rate at the last step (cosine decay, no warm-up)")
    weight_decay: float = _opt(1e-4, "AdamW weight decay")
    betas: tuple[float, float] = _opt((0.9, 0.999), "AdamW betas")
    bf16: bool = _opt(False, "bf16 autocast around the forward pass and the loss (the authors train in bf16)")
    ema_decay: float = _opt(0.0, "EMA of the weights with this decay, e.g. 0.999 (0 = off; validation then uses EMA)")
    grad_clip: float = _opt(0.0, "clip the global gradient norm to this value (0 = off; the norm is logged anyway)")
    workers: int = _opt(4, "DataLoader worker processes per training process")
    seed: int = _opt(0, "seed of the data order, draws and per-process RNGs")
    log_every: int = _opt(10, "write a CSV/TensorBoard row every N steps")
    val_every: int = _opt(5000, "validate and redraw curves.png every N steps (and at the end; 0 = only at the end)")
    ckpt_every: int = _opt(5000, "write a checkpoint every N steps (and at the end)")
    keep_last: int = _opt(3, "keep the newest N checkpoints")
    resume: str = _opt("auto", "'auto' (from <out_dir>/checkpoints/latest if present), 'never', or a checkpoint path")
    max_nonfinite: int = _opt(5, "stop after this many non-finite steps in a row (each one is skipped)")
    device: str = _opt("auto", "'auto', 'cpu', 'cuda' (torchrun: cuda:LOCAL_RANK)")
    deterministic: bool = _opt(False, "deterministic kernels (bit-exact resume on GPU; slower)")
    tensorboard: bool = _opt(True, "write TensorBoard event files")
    plots: bool = _opt(True, "redraw curves.png (matplotlib) at every validation")
    val_max_images: int = _opt(0, "validate on at most N images per set (0 = all)")
    num_grids: int = _opt(4, "sample grids saved per validation set")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "ckpt_every", "keep_last", "max_nonfinite"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("workers", "val_every", "val_max_images", "num_grids"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError(f"grad_clip and weight_decay must be >= 0, got {self.grad_clip}, {self.weight_decay}")
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]


def add_train_args(parser: argparse.ArgumentParser, **defaults: Any) -> argparse.ArgumentParser:
    """One ``--flag`` per ``TrainConfig`` field (``out_dir`` → ``--out-dir``); ``defaults`` change a default."""
    group = parser.add_argument_group("training loop (docs/training.md)")
    for spec in dataclasses.fields(TrainConfig):
        default = defaults.pop(spec.name, spec.default)
        flag, text = "--" + spec.name.replace("_", "-"), f"{spec.metadata['help']} (default: {default})"
        if default is None:
            text = spec.metadata["help"] + " (default: set by the script)"
        if isinstance(spec.default, bool):
            group.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=spec.metadata["help"])
        elif isinstance(spec.default, tuple):
            group.add_argument(flag, default=default, nargs=len(spec.default), type=float, metavar="B", help=text)
        else:
            group.add_argument(flag, default=default, type=type(spec.default), help=text)
    if defaults:
        raise ValueError(f"unknown TrainConfig fields in defaults: {sorted(defaults)}")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{spec.name: getattr(args, spec.name) for spec in dataclasses.fields(TrainConfig)})


def parse_repeats(items: Sequence[str], flag: str = "--repeat", example: str = "rain=360") -> dict[str, int]:
    """``["rain=360", "noise=12"]`` → ``{"rain": 360, "noise": 12}``; ``ValueError`` naming ``flag`` otherwise."""
    repeats = {}
    for item in items:
        task, sep, factor = item.partition("=")
        if not task or not sep or not factor.isdigit() or int(factor) < 1:
            raise ValueError(f"{flag} takes TASK=N with N >= 1 (e.g. {example}), got {item!r}")
        repeats[task] = int(factor)
    return repeats


# ------------------------------------------------------------------------------------------------ processes
@dataclass(frozen=True)
class DistEnv:
    """This process in the job: ``rank`` of ``world_size``, and its device. Collectives are no-ops alone."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Mean of ``tensor`` over all processes (in place; returned)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= self.world_size
        return tensor

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_true(self, flag: torch.Tensor | bool) -> bool:
        """Whether ``flag`` holds on every process (one all-reduce): a decision all processes take together."""
        value = torch.as_tensor(flag, device=self.device).detach().to(torch.float32).reshape(())
        if self.distributed:
            dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (on every process)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0 only (a scan, a cache check), its result sent to every process. If it raises, every
        process raises (rank 0 the error itself, the others a ``RuntimeError`` quoting it), so none waits forever."""
        outcome: tuple[str, Any] = ("ok", None)
        error: BaseException | None = None
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except Exception as raised:  # every failure must reach the other processes
                error, outcome = raised, ("error", f"{type(raised).__name__}: {raised}")
        if self.distributed:
            box = [outcome]
            dist.broadcast_object_list(box, src=0)
            outcome = box[0]
        if error is not None:
            raise error
        if outcome[0] == "error":
            raise RuntimeError(f"rank 0 failed during set-up: {outcome[1]}")
        return outcome[1]


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``'auto'`` → this process's GPU if CUDA is available, else the CPU; ``'cuda'`` → ``cuda:LOCAL_RANK``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} was asked for, but CUDA is not available on this machine")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    return resolved


def init_distributed(device: str = "auto") -> DistEnv:
    """Join the torchrun process group (``WORLD_SIZE > 1`` in the environment) if there is one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if resolved.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
    return DistEnv(rank, world_size, local_rank, resolved)


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed_job(config: TrainConfig) -> Iterator[DistEnv]:
    """This process's part of a job: ``init_distributed`` (torchrun's process group, or one process), log records
    at INFO on rank 0 (WARNING elsewhere) to stderr and, on rank 0, also to ``<out_dir>/train.log`` with Python
    warnings (e.g. the contrastive loss's one-task warning); the group is left at the end, also on an error."""
    env = init_distributed(config.device)
    logging.basicConfig(level=logging.INFO if env.is_main else logging.WARNING, format=LOG_FORMAT)
    handler = None
    if env.is_main:
        Path(config.out_dir).mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(Path(config.out_dir) / "train.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.getLogger().addHandler(handler)
        logging.captureWarnings(True)
    try:
        yield env
    finally:
        if handler is not None:
            logging.captureWarnings(False)
            logging.getLogger().removeHandler(handler)
            handler.close()
        close_distributed()


def seed_process(seed: int, rank: int) -> None:
    """Seed Python, NumPy and torch (all devices) for process ``rank`` of a run with ``seed``."""
    mixed = int(np.random.SeedSequence([seed, rank, 7]).generate_state(1, dtype=np.uint64)[0] >> 1)
    random.seed(mixed)
    np.random.seed(mixed % 2**32)
    torch.manual_seed(mixed)


@contextlib.contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Run a block with Python, NumPy and torch (CPU) global RNGs seeded by ``seed``; restore them after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def move_to(batch: Any, device: torch.device) -> Any:
    """Tensors anywhere in nested dicts/lists/tuples → ``device``; everything else unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: move_to(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(value, device) for value in batch)
    return batch


# ----------------------------------------------------------------------------------------------- data order
def epoch_order(dataset_len: int, seed: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The permutation ``(N,)`` and per-position draw seeds ``(N,)`` of one epoch (int64), from (seed, epoch)."""
    mixed = int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)
    generator = torch.Generator().manual_seed(mixed)
    order = torch.randperm(dataset_len, generator=generator)
    return order, torch.randint(2**62, (dataset_len,), generator=generator, dtype=torch.int64)


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """This process's share of every global batch as ``(index, seed)`` keys, from step ``set_step(s)`` on.

    Epoch e is a permutation of the data and one 62-bit seed per position, from (seed, e) alone; global batch b
    of an epoch is positions [b·G, (b+1)·G) (the incomplete last one is dropped) and process r of W takes slice
    r of G/W. So the batches do not depend on the number of processes, and step s is batch s mod E of epoch
    s // E (E = ``steps_per_epoch``): resuming needs nothing but the step. Iteration never ends by itself.
    """

    def __init__(self, dataset_len: int, global_batch: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0) -> None:
        if global_batch <= 0 or global_batch % world_size:
            raise ValueError(f"batch_size (global) must be a positive multiple of the number of processes "
                             f"({world_size}), got {global_batch}")
        if dataset_len < global_batch:
            raise ValueError(f"the training set has {dataset_len} items, fewer than one global batch of {global_batch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.dataset_len, self.global_batch, self.rank, self.seed = dataset_len, global_batch, rank, seed
        self.local_batch = global_batch // world_size
        self.steps_per_epoch = dataset_len // global_batch
        self.start_step = 0

    def set_step(self, step: int) -> None:
        """Start the next iteration at global batch ``step`` (after ``step`` optimiser steps)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        self.start_step = step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, batch = divmod(self.start_step, self.steps_per_epoch)
        while True:
            order, seeds = epoch_order(self.dataset_len, self.seed, epoch)
            for index in range(batch, self.steps_per_epoch):
                first = index * self.global_batch + self.rank * self.local_batch
                yield [(int(order[p]), int(seeds[p])) for p in range(first, first + self.local_batch)]
            epoch, batch = epoch + 1, 0


class SeededDataset(Dataset):
    """``(index, seed)`` keys → items of ``dataset``: ``dataset.sample(index, generator)`` with a generator seeded
    by the key's seed when the data set has ``sample`` (the library's have), else ``dataset[index]`` with the
    global RNGs seeded by it (and restored). Crops, flips and noise then do not depend on the worker count."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._sample = getattr(dataset, "sample", None)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        if self._sample is not None:
            return self._sample(index, torch.Generator().manual_seed(seed))
        with seeded_global_rng(seed):
            return self.dataset[index]


def training_loader(dataset: Dataset, batch_sampler: Sampler, config: TrainConfig, env: DistEnv) -> DataLoader:
    """A DataLoader of ``dataset``'s draws keyed by ``batch_sampler`` (``(index, seed)`` lists); it has its own
    ``torch.Generator``, so creating an iterator never consumes the global RNG."""
    return DataLoader(SeededDataset(dataset), batch_sampler=batch_sampler, num_workers=config.workers,
                      pin_memory=env.device.type == "cuda", persistent_workers=config.workers > 0,
                      generator=torch.Generator())


# ------------------------------------------------------------------------------------- learning rate, EMA
class CosineSchedule:
    """Cosine decay to ``min_lr`` at the last step, no warm-up; a run extended at a resume continues from the rate
    it had (no warm restart):

        lr(s) = min_lr + (lr₀ − min_lr) · ½ · (1 + cos(π · (s − s₀) / (T − s₀)))        s₀ ≤ s ≤ T

    A run trained as planned has one segment (s₀ = 0, lr₀ = ``lr``, T = ``steps``). ``extend_to(T', s)`` (a resume
    with another ``--steps``) starts a segment at s with lr₀ = lr(s): continuous at s, ``min_lr`` at T'."""

    def __init__(self, lr: float, min_lr: float, steps: int) -> None:
        self.min_lr = float(min_lr)
        self.segments: list[tuple[int, float, int]] = [(0, float(lr), int(steps))]

    @property
    def end(self) -> int:
        return self.segments[-1][2]

    def lr_at(self, step: int) -> float:
        """The learning rate of the update that follows ``step`` finished steps."""
        start, first, end = next(segment for segment in reversed(self.segments) if segment[0] <= step)
        progress = min(1.0, (step - start) / max(end - start, 1))
        return self.min_lr + (first - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def extend_to(self, steps: int, at_step: int) -> None:
        if steps != self.end:
            self.segments.append((at_step, self.lr_at(at_step), steps))

    def state_dict(self) -> dict[str, Any]:
        return {"min_lr": self.min_lr, "segments": [list(segment) for segment in self.segments]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.min_lr = float(state["min_lr"])
        self.segments = [(int(s), float(lr), int(e)) for s, lr, e in state["segments"]]


class ModelEMA:
    """θ_ema ← decay · θ_ema + (1 − decay) · θ after every update (floating tensors of ``state_dict``; integer
    buffers are copied). ``swapped_in(model)`` runs a block with the EMA weights and restores the others exactly."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {name: value.detach().clone() for name, value in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        floats = [name for name, value in self.shadow.items() if value.is_floating_point()]
        torch._foreach_lerp_([self.shadow[n] for n in floats], [current[n].detach() for n in floats], 1.0 - self.decay)
        for name, value in self.shadow.items():
            if not value.is_floating_point():
                value.copy_(current[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state.keys() != self.shadow.keys():
            raise ValueError("the checkpoint's EMA weights do not match the model's state_dict keys")
        for name, value in state.items():
            self.shadow[name].copy_(value)

    @contextlib.contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        backup = {name: value.detach().clone() for name, value in model.state_dict().items()}
        model.load_state_dict(self.shadow)
        try:
            yield model
        finally:
            model.load_state_dict(backup)


# ---------------------------------------------------------------------------------------------- checkpoints
class CheckpointManager:
    """``<dir>/step_00001000.pt`` written atomically (``save_state``: temporary file, fsync, rename), and only then
    the pointer file ``<dir>/latest`` (replaced atomically too) switched to it; the newest ``keep_last`` are kept.
    A crash at any instant leaves ``latest`` naming a complete checkpoint."""

    POINTER = "latest"
    NAME = re.compile(r"^step_(\d+)\.pt$")

    def __init__(self, directory: str | os.PathLike, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.directory, self.keep_last = Path(directory), keep_last

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint files, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := self.NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names, or ``None`` if no checkpoint was ever completed."""
        pointer = self.directory / self.POINTER
        if not pointer.is_file():
            return None
        path = self.directory / pointer.read_text().strip()
        if not path.is_file():
            raise ValueError(f"{pointer} names {path.name}, which does not exist; resume from a file with "
                             "--resume PATH")
        return path

    def clean_up(self, resumed_step: int) -> None:
        """Delete what a crash left: temporaries of an unfinished write and checkpoints newer than the resumed one."""
        for stray in self.directory.glob(".*.tmp") if self.directory.is_dir() else ():
            stray.unlink(missing_ok=True)
        for path in self.checkpoints():
            if int(self.NAME.match(path.name).group(1)) > resumed_step:
                path.unlink(missing_ok=True)

    def save(self, state: dict[str, Any], step: int) -> Path:
        path = self.directory / f"step_{step:08d}.pt"
        save_state(state, path)
        with atomic_write(self.directory / self.POINTER) as tmp:
            tmp.write_text(path.name + "\n")
        for old in self.checkpoints()[: -self.keep_last]:
            if old != path:
                old.unlink(missing_ok=True)
        logger.info("checkpoint %s written", path)
        return path

    @staticmethod
    def load(path: str | os.PathLike) -> dict[str, Any]:
        return load_state(path)


# ------------------------------------------------------------------------------------------------------ logs
def read_rows(path: Path) -> list[dict[str, str]]:
    """The complete rows of a log CSV, as written (a row cut short by a crash is skipped)."""
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [row for row in rows if all(_is_number(value) for value in row.values())]


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


class CsvLog:
    """Append-only CSV with the header of its first row; at a resume, rows after the resumed step are dropped.
    Floats are written with ``repr`` (exact: a resumed run can be compared digit for digit)."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        kept = [row for row in read_rows(path) if int(row["step"]) <= resume_step]
        self.fields: list[str] | None = list(kept[0]) if kept else None
        if path.exists():
            with atomic_write(path) as tmp, open(tmp, "w", newline="") as handle:
                if self.fields:
                    writer = csv.DictWriter(handle, self.fields)
                    writer.writeheader()
                    writer.writerows(kept)
        self.rows = [{k: float(v) for k, v in row.items()} for row in kept]

    def append(self, row: Mapping[str, Any]) -> None:
        if self.fields is None:
            self.fields = list(row)
            with open(self.path, "w", newline="") as handle:
                csv.DictWriter(handle, self.fields).writeheader()
        elif list(row) != self.fields:
            raise ValueError(f"logged terms changed: {self.path.name} has columns {self.fields}, got {list(row)}; "
                             "log the same terms every step")
        with open(self.path, "a", newline="") as handle:
            text = {k: repr(float(v)) if isinstance(v, float) else str(v) for k, v in row.items()}
            csv.DictWriter(handle, self.fields).writerow(text)
        self.rows.append({k: float(v) for k, v in row.items()})


class RunLog:
    """``train_log.csv``, ``val_log.csv``, TensorBoard scalars (events after the resumed step are purged) and
    ``curves.png`` of a run (rank 0 only)."""

    def __init__(self, out_dir: Path, resume_step: int, tensorboard: bool = True) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        self.train = CsvLog(out_dir / "train_log.csv", resume_step)
        self.val = CsvLog(out_dir / "val_log.csv", resume_step)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"),
                                        purge_step=resume_step + 1 if resume_step else None)

    def log_train(self, row: Mapping[str, Any]) -> None:
        self.train.append(row)
        self._scalars("train", row)

    def log_val(self, row: Mapping[str, Any]) -> None:
        self.val.append(row)
        self._scalars("val", row)

    def _scalars(self, prefix: str, row: Mapping[str, Any]) -> None:
        if self.writer is not None:
            for key, value in row.items():
                if key != "step":
                    self.writer.add_scalar(f"{prefix}/{key}", float(value), int(row["step"]))
            self.writer.flush()

    def plot(self) -> Path | None:
        if not (self.train.rows or self.val.rows):
            return None
        return plot_curves(self.train.rows, self.val.rows, self.out_dir / "curves.png")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _smooth(values: list[float], weight: float = 0.9) -> list[float]:
    out, running = [], None
    for value in values:
        if math.isfinite(value):
            running = value if running is None else weight * running + (1 - weight) * value
        out.append(running if running is not None else math.nan)
    return out


def plot_curves(train_rows: list[dict[str, float]], val_rows: list[dict[str, float]], path: Path) -> Path:
    """One panel per training column (raw and smoothed; log scale for positive losses) and one per validation
    metric (a line per set, the average in black)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    not_plotted = ("step", "epoch", "skipped", "sec_per_step")
    train_keys = [k for k in (train_rows[0] if train_rows else {}) if k not in not_plotted]
    metrics = sorted({k.rpartition("/")[2] for k in (val_rows[0] if val_rows else {}) if k != "step"})
    panels = len(train_keys) + len(metrics)
    columns, rows = min(3, panels), math.ceil(panels / min(3, panels))
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 2.8 * rows), squeeze=False)
    axes = list(axes.flat)
    steps = [row["step"] for row in train_rows]
    for axis, key in zip(axes, train_keys):
        values = [row[key] for row in train_rows]
        axis.plot(steps, values, lw=0.8, alpha=0.4)
        if len(values) > 10 and key != "lr":
            axis.plot(steps, _smooth(values), lw=1.5)
        finite = [v for v in values if math.isfinite(v)]
        if key != "lr" and finite and min(finite) > 0:
            axis.set_yscale("log")
        axis.set_title(f"train: {key}", fontsize=9)
    for axis, metric in zip(axes[len(train_keys):], metrics):
        for key in (k for k in val_rows[0] if k.endswith("/" + metric)):
            average = key.startswith("avg/")
            axis.plot([row["step"] for row in val_rows], [row[key] for row in val_rows], marker="o", ms=3,
                      lw=2.0 if average else 1.0, color="black" if average else None, label=key.rpartition("/")[0])
        axis.legend(fontsize=7)
        axis.set_title(f"validation: {metric}", fontsize=9)
    for axis in axes[:panels]:
        axis.set_xlabel("step", fontsize=8)
        axis.grid(alpha=0.3)
    for axis in axes[panels:]:
        axis.axis("off")
    figure.tight_layout()
    with atomic_write(path) as tmp:
        figure.savefig(tmp, format="png", dpi=80)
    plt.close(figure)
    return path


# ------------------------------------------------------------------------------------------------ validation
def default_predict(model: nn.Module, degraded: torch.Tensor) -> torch.Tensor:
    return model(degraded)


@torch.no_grad()
def validate(model: nn.Module, val_sets: Mapping[str, Dataset], env: DistEnv, *,
             predict: Callable[[nn.Module, torch.Tensor], torch.Tensor] = default_predict, pad_multiple: int = 8,
             max_images: int = 0, num_grids: int = 0, grid_dir: Path | None = None) -> dict[str, float]:
    """``<set>/psnr``, ``<set>/ssim`` and their averages ``avg/…`` over sets: whole images, fp32, replicate-padded
    to ``pad_multiple`` and cropped back, metrics on the clamped float output (docs/method.md §4). Image i goes to
    rank i mod W and the sums are all-reduced. Rank 0 writes the first ``num_grids`` images of each set as
    ``<grid_dir>/<set>_<i>.png``: degraded | restored | ground truth."""
    was_training = model.training
    model.eval()
    results: dict[str, float] = {}
    for name, dataset in val_sets.items():
        count = len(dataset) if max_images <= 0 else min(max_images, len(dataset))
        sums = torch.zeros(3, dtype=torch.float64)  # psnr, ssim, images
        for index in range(env.rank, count, env.world_size):
            item = dataset[index]
            degraded, target = item["degraded"][None].to(env.device), item["target"][None].to(env.device)
            padded, (height, width) = pad_to_multiple(degraded, pad_multiple, mode="replicate")
            restored = predict(model, padded).float()[..., :height, :width].clamp(0, 1)
            sums += torch.tensor([psnr(restored, target).item(), ssim(restored, target).item(), 1.0],
                                 dtype=torch.float64)
            if env.is_main and grid_dir is not None and index < num_grids * env.world_size:
                spacer = torch.ones(3, height, 4, device=restored.device)
                grid = torch.cat([degraded[0], spacer, restored[0], spacer, target[0]], dim=-1)
                write_image(grid_dir / f"{name}_{index}.png", grid.cpu())
        sums = env.all_reduce_sum(sums.to(env.device)).cpu()
        results[f"{name}/psnr"], results[f"{name}/ssim"] = float(sums[0] / sums[2]), float(sums[1] / sums[2])
    if val_sets:
        results["avg/psnr"] = sum(results[f"{n}/psnr"] for n in val_sets) / len(val_sets)
        results["avg/ssim"] = sum(results[f"{n}/ssim"] for n in val_sets) / len(val_sets)
    model.train(was_training)
    return results


# ------------------------------------------------------------------------------------------------------ run
class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a NaN/Inf loss, loss term or gradient norm."""


CONFIG_KEYS_FOR_RESUME = ("batch_size", "lr", "min_lr", "weight_decay", "betas", "seed", "ema_decay")


class TrainingRun:
    """A run's state besides the model's forward: AdamW over ``model``'s trainable parameters, the learning rate,
    the EMA, the step and non-finite streak, checkpoints, logs and validation (module docstring).

    Build it after the model (the trainable parts only) and right before the loop: it moves the model to
    ``env.device`` and resumes from ``config.resume`` (the model, optimiser, schedule, EMA, every process's RNG
    states and those of ``generators``, the step), or seeds every process. ``steps_per_epoch`` numbers the epochs
    of the logs; ``data_record`` describes the data (a resume with other data warns). Use it as a context manager:
    leaving it closes the logs, also on an error.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, env: DistEnv, *, steps_per_epoch: int,
                 data_record: Mapping[str, Any] | None = None,
                 generators: Mapping[str, torch.Generator] | None = None) -> None:
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be a positive integer (the data hold fewer items than one global "
                             f"batch?), got {steps_per_epoch!r}")
        if config.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.model, self.config, self.env = model.to(env.device), config, env
        self.steps_per_epoch, self.data_record = steps_per_epoch, dict(data_record or {})
        self.generators, self.out_dir = dict(generators or {}), Path(config.out_dir)
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        if not self.parameters:
            raise ValueError("model has no trainable parameters (requires_grad=True); pass the trainable parts")
        self.optimizer = torch.optim.AdamW(self.parameters, lr=config.lr, betas=config.betas,
                                           weight_decay=config.weight_decay, fused=env.device.type == "cuda" or None)
        self.schedule = CosineSchedule(config.lr, config.min_lr, config.steps)
        self.ema = ModelEMA(model, config.ema_decay) if config.ema_decay > 0 else None
        self.checkpoints = CheckpointManager(self.out_dir / "checkpoints", config.keep_last)
        self.step, self.nonfinite, self.metrics = 0, 0, {}
        path = self._resume_path()
        if path is None:
            seed_process(config.seed, env.rank)
        else:
            self._load(path)
        self._set_lr()
        self.log = None
        if env.is_main:
            self.checkpoints.clean_up(self.step)
            self.log = RunLog(self.out_dir, self.step, config.tensorboard)
        self.progress = tqdm(total=config.steps, initial=self.step, disable=not env.is_main, desc="train",
                             dynamic_ncols=True)
        self._clock, self._since = time.perf_counter(), self.step

    def __enter__(self) -> "TrainingRun":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.close()
        if self.log is not None:
            self.log.close()

    # ---------------------------------------------------------------------------------- the loop's calls
    @property
    def epoch(self) -> int:
        """The epoch of the next step."""
        return self.step // self.steps_per_epoch

    def batches(self, loader: DataLoader) -> Iterator[Any]:
        """``loader``'s batches from the current step on (its batch sampler is set to the step)."""
        loader.batch_sampler.set_step(self.step)
        return iter(loader)

    def update(self, loss: torch.Tensor, terms: Mapping[str, Any], grad_norm: torch.Tensor) -> bool:
        """Finish a step after ``loss.backward()`` and clipping: average ``[loss, *terms, grad_norm]`` over the
        processes (one all-reduce); unless one of them is NaN/Inf, AdamW steps and the EMA follows; then the step
        count, the learning rate and the logs advance. The values are the same on every process, so every process
        takes the same decision. Returns whether the update was applied."""
        if "loss" in terms:
            raise ValueError("terms must not be named 'loss' (the total is logged as 'loss')")
        scalars = [torch.as_tensor(v, device=self.env.device).detach().float().reshape(())
                   for v in (loss, *terms.values(), grad_norm)]
        values = dict(zip(["loss", *terms, "grad_norm"], self.env.all_reduce_mean(torch.stack(scalars)).tolist()))
        applied = all(math.isfinite(v) for v in values.values())
        if applied:
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model)
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        self.step += 1
        self._set_lr()
        self.progress.update(1)
        if self.log is not None and (self.step % self.config.log_every == 0 or not applied):
            now = time.perf_counter()
            self.log.log_train({"step": self.step, "epoch": (self.step - 1) // self.steps_per_epoch, "lr": lr, **values,
                                "skipped": int(not applied),
                                "sec_per_step": (now - self._clock) / max(self.step - self._since, 1)})
            self._clock, self._since = now, self.step
            self.progress.set_postfix(loss=f"{values['loss']:.4g}")
        self.nonfinite = 0 if applied else self.nonfinite + 1
        if not applied:
            self._on_nonfinite({k: v for k, v in values.items() if not math.isfinite(v)})
        return applied

    def due(self, every: int) -> bool:
        """Whether the step just finished is a multiple of ``every`` (> 0) or the last one."""
        return (every > 0 and self.step % every == 0) or self.step == self.config.steps

    def save(self) -> None:
        """Write a checkpoint of the current step (every process must call it: the RNG states are gathered)."""
        per_rank = self.env.gather({"rng": rng_state(),
                                    "generators": {name: g.get_state() for name, g in self.generators.items()}})
        if self.env.is_main:
            self.checkpoints.save({
                "step": self.step, "nonfinite": self.nonfinite, "model_class": type(self.model).__qualname__,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "per_rank": per_rank, "world_size": self.env.world_size, "data": self.data_record,
                "config": dataclasses.asdict(self.config)}, self.step)

    def validate(self, val_sets: Mapping[str, Dataset],
                 predict: Callable[[nn.Module, torch.Tensor], torch.Tensor] = default_predict) -> dict[str, float]:
        """Validate (with the EMA weights if any) on a forked RNG, log, and redraw ``curves.png``."""
        if val_sets:
            devices = [self.env.device] if self.env.device.type == "cuda" else []
            weights = self.ema.swapped_in(self.model) if self.ema is not None else contextlib.nullcontext()
            with torch.random.fork_rng(devices=devices), weights:
                self.metrics = validate(self.model, val_sets, self.env, predict=predict,
                                        max_images=self.config.val_max_images, num_grids=self.config.num_grids,
                                        grid_dir=self.out_dir / "grids" / f"step_{self.step:08d}")
            if self.log is not None:
                self.log.log_val({"step": self.step, **self.metrics})
                logger.info("step %d validation%s: %s", self.step, " (EMA weights)" if self.ema else "",
                            ", ".join(f"{k} {v:.4f}" for k, v in self.metrics.items()))
        if self.log is not None and self.config.plots:
            self.log.plot()
        return self.metrics

    def export_weights(self) -> None:
        """``model.safetensors`` (and ``model_ema.safetensors``) in the run folder: the final weights."""
        if not self.env.is_main:
            return
        from safetensors.torch import save_file

        exports = {"model.safetensors": self.model.state_dict()}
        if self.ema is not None:
            exports["model_ema.safetensors"] = self.ema.state_dict()
        for name, weights in exports.items():
            with atomic_write(self.out_dir / name) as tmp:
                save_file({k: v.detach().contiguous().cpu().clone() for k, v in weights.items()}, str(tmp))

    # ------------------------------------------------------------------------------------------ internals
    def _set_lr(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule.lr_at(self.step)

    def _on_nonfinite(self, bad: dict[str, float]) -> None:
        logger.warning("rank %d: step %d skipped: non-finite %s (%d in a row, stop at %d)", self.env.rank, self.step,
                       bad, self.nonfinite, self.config.max_nonfinite)
        if self.nonfinite >= self.config.max_nonfinite:
            raise NonFiniteLossError(
                f"training stopped at step {self.step}: {self.nonfinite} consecutive steps had a non-finite loss, "
                f"loss term or gradient norm (last: {bad}); no update was applied on those steps. Last checkpoint: "
                f"{self.checkpoints.latest() or 'none'}. Lower --lr, set --grad-clip, try without --bf16, or check the "
                "data for bad images.")

    def _resume_path(self) -> Path | None:
        resume = self.config.resume
        if resume == "never":
            if self.checkpoints.latest() is not None:
                raise ValueError(f"{self.out_dir} already holds checkpoints; pass --resume auto to continue that run "
                                 "or choose another --out-dir")
            return None
        if resume == "auto":
            return self.checkpoints.latest()
        if not Path(resume).is_file():
            raise ValueError(f"resume must be 'auto', 'never' or an existing checkpoint file, got {resume!r}")
        return Path(resume)

    def _load(self, path: Path) -> None:
        state = CheckpointManager.load(path)
        if "schedule" not in state:
            raise ValueError(f"checkpoint {path} was written by an older trainer (no learning-rate schedule in it); "
                             "start a new run (--init-backbone can take the weights of its 'model' entry)")
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
        self.schedule.load_state_dict(state["schedule"])
        if self.ema is not None and state["ema"] is None:
            logger.warning("checkpoint %s has no EMA weights; the EMA restarts from the current weights", path)
        elif self.ema is not None:
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
        if self.schedule.end != self.config.steps and self.step < self.config.steps:
            self.schedule.extend_to(self.config.steps, self.step)
            logger.info("the run now ends at step %d (was %d): the learning rate decays from %.3g at step %d to %g",
                        self.config.steps, state["config"]["steps"], self.schedule.lr_at(self.step), self.step,
                        self.schedule.min_lr)
        if state["data"] != self.data_record:
            logger.warning("the training data changed since the checkpoint (%s → %s): the sample order will differ",
                           state["data"], self.data_record)
        old, new = state["config"], dataclasses.asdict(self.config)
        changed = {k: (old.get(k), new[k]) for k in CONFIG_KEYS_FOR_RESUME if old.get(k) != new[k]}
        if changed:
            logger.warning("settings differ from the checkpoint's (old, new): %s; the optimiser state and the learning "
                           "rate schedule come from the checkpoint", changed)
        if self.env.is_main:
            logger.info("resumed from %s at step %d", path, self.step)


class EpochRecord:
    """A value measured at the first step of each epoch (e.g. the probe PSNR of the "probe" difficulty rule), kept
    in ``path`` (JSON, written by rank 0) so that a run resumed mid-epoch reuses its epoch's value (exact resume).

    Every process reads the file once, from rank 0, when the record is made, and then decides from that copy, so
    all processes measure at the same steps (a measurement may be collective). ``fresh=True`` (a run starting at
    step 0) forgets the values of an earlier run in the folder."""

    def __init__(self, path: str | os.PathLike, env: DistEnv, *, fresh: bool) -> None:
        self.path, self.env = Path(path), env

        def recorded() -> dict[str, float]:
            return {} if fresh or not self.path.is_file() else json.loads(self.path.read_text())

        self.values: dict[str, float] = env.on_main(recorded)

    def value(self, epoch: int, measure: Callable[[], float]) -> float:
        """The recorded value of ``epoch``, or ``measure()`` (on every process) recorded now."""
        if str(epoch) not in self.values:
            self.values[str(epoch)] = float(measure())
            if self.env.is_main:
                with atomic_write(self.path) as tmp:
                    tmp.write_text(json.dumps(self.values, indent=1))
                logger.info("epoch %d: %s = %.4f", epoch, self.path.stem, self.values[str(epoch)])
        return self.values[str(epoch)]


NET_FILE = "net.json"


def claim_run_folder(out_dir: Path, spec: Mapping[str, Any], env: DistEnv) -> None:
    """Write ``<out_dir>/net.json`` (how to rebuild the run's network); refuse a folder whose checkpoints belong to
    another network, before anything is built."""
    path = out_dir / NET_FILE
    if path.is_file() and CheckpointManager(out_dir / "checkpoints").latest() is not None:
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = {key: (old.get(key), value) for key, value in spec.items() if old.get(key) != value}
        if changed:
            raise ValueError(f"{out_dir} holds checkpoints of another network (net.json: old, new = {changed}); use "
                             "another --out-dir, or the settings it was trained with")
    if env.is_main:
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(spec, indent=2), encoding="utf-8")


def read_net_spec(run_dir: str | os.PathLike, expected_format: str) -> dict[str, Any]:
    """A run folder's ``net.json`` (``claim_run_folder``), checked to be of ``expected_format``."""
    path = Path(run_dir) / NET_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a run folder of a training script that writes one")
    spec = json.loads(path.read_text(encoding="utf-8"))
    if spec.get("format") != expected_format:
        raise ValueError(f"{path} describes a network of format {spec.get('format')!r}, expected {expected_format!r}")
    return spec


def run_weights(run_dir: str | os.PathLike, weights: str = "auto", checkpoint: str | os.PathLike | None = None
                ) -> tuple[dict[str, torch.Tensor], str]:
    """A run's trained state dict and where it came from: its final ``model[_ema].safetensors``, or ``checkpoint``
    (a ``step_*.pt`` or the ``latest`` pointer). ``weights``: ``auto`` (EMA if the run kept it), ``model``, ``ema``."""
    from safetensors.torch import load_file

    if weights not in ("auto", "model", "ema"):
        raise ValueError(f"weights must be 'auto', 'model' or 'ema', got {weights!r}")
    if checkpoint is None:
        ema, plain = Path(run_dir) / "model_ema.safetensors", Path(run_dir) / "model.safetensors"
        path = ema if weights == "ema" or (weights == "auto" and ema.is_file()) else plain
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (written at the end of training); pass a training "
                                    f"checkpoint instead, e.g. {Path(run_dir) / 'checkpoints' / 'latest'}")
        return load_file(str(path)), str(path)
    path = Path(checkpoint)
    if path.name == CheckpointManager.POINTER:
        path = CheckpointManager(path.parent).latest() or path
    state = CheckpointManager.load(path)
    if "model" not in state:
        raise ValueError(f"{path} is not a training checkpoint of train_support (no 'model' entry)")
    use_ema = weights == "ema" or (weights == "auto" and state.get("ema") is not None)
    if use_ema and state.get("ema") is None:
        raise ValueError(f"{path} holds no EMA weights (the run had --ema-decay 0); use --weights model")
    return dict(state["ema"] if use_ema else state["model"]), f"{path} ({'ema' if use_ema else 'model'})"
