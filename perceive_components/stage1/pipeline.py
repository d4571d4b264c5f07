"""The whole of stage 1 in one call, with the authors' settings as defaults (docs/method.md §1.2–1.3).

    from perceive_components.stage1 import run_stage1
    result = run_stage1("data/stage1/train", "runs/stage1", restorer=my_restorer_factory,
                        audit_root="data/stage1/test")

or from the shell ``perceive-ir stage1 run --data-root … --out … --restorer MODULE:FACTORY``. Steps, each one a
building block of this package (and a ``perceive-ir stage1`` command of its own):

1. ``build_triplets``: K folds by the hash of each relative clean path → ``OUT/pairs.jsonl``; for each fold k a
   fresh ``restorer()`` trained with L1 on the other folds (seed + k) → ``OUT/folds/fold<k>.safetensors``; fold k
   rendered by its model → ``OUT/medium/…``, ``OUT/triplets.jsonl``.
2. ``medium_gates``: PSNR-improved rate and progress r per task → ``OUT/gates.json``.
3. ``train_prompts`` on the triplets of every fold but ``holdout_fold`` → ``OUT/prompts.ckpt``,
   ``OUT/prompt_history.csv``.
4. ``audit_perceiver`` on the test set under ``audit_root`` (its medium images rendered by the fold model its
   clean path hashes to, which never saw it → ``OUT/audit/``) and on the held-out fold → ``OUT/audit_<set>.json``;
   without either, on the training triplets (with a warning: that flatters the prompts).
5. ``save_pretrained`` → ``OUT/perceiver`` with the preferred audit (test set, else held-out fold, else training);
   every table in ``OUT/report.md``.

Calling it again with the same arguments continues where it stopped: finished fold models are reused, an
interrupted one resumes from its checkpoint, rendered images are kept, prompt training resumes from
``OUT/prompts.ckpt`` and a finished run is not repeated. ``OUT/recipe.json`` records the settings that shaped
what is stored (the fold models' architecture, :class:`MediumSettings`, :class:`PromptSettings`, seed, bf16); a
call with other ones is refused with the list of changes, as is anything stored that was made from other image
contents (``rebuild=True`` makes everything again).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..ops.checkpoint import atomic_write
from ..ops.validation import check_choice, check_positive_int
from .audit import VIEWS, audit_perceiver
from .data import TripletImages
from .fingerprints import architecture_sha256
from .folds import fold_of
from .gates import BAND, medium_gates
from .manifest import scan_pairs, write_jsonl
from .render import build_triplets, render_medium
from .report import audit_table, gates_table
from .train import train_prompts

logger = logging.getLogger(__name__)

# The authors' stage-1 task resampling of the fold models (their config: denoise 3, dehaze 1, derain 120, deblur 50,
# lowlight 40). Their denoise entry is one clean image with a random σ; a layout with three noisy files per clean
# image (examples/prepare_stage1_data.py's default) already gives noise that share at 1.
AUTHORS_TASK_REPEATS: dict[str, float] = {"noise": 1, "haze": 1, "rain": 120, "blur": 50, "lowlight": 40}
RECORD_FILE = "recipe.json"


@dataclass(frozen=True)
class MediumSettings:
    """Fold models and medium images (docs/method.md §1.2); the defaults are the authors'.

    ``task_repeats`` overrides the authors' factors (``AUTHORS_TASK_REPEATS``) per task; a task named in neither
    is drawn with factor 1. ``tile=None`` renders whole images.
    """

    folds: int = 2
    steps: int = 20_000
    crop_size: int = 128
    batch_size: int = 4
    lr: float = 2e-4
    min_lr: float = 1e-6
    task_repeats: Mapping[str, float] = field(default_factory=dict)
    tile: int | None = 512
    overlap: int = 32

    def __post_init__(self) -> None:
        for name in ("folds", "steps", "crop_size", "batch_size"):
            check_positive_int(getattr(self, name), f"MediumSettings.{name}")
        if self.folds < 2:
            raise ValueError(f"MediumSettings.folds must be at least 2 (each fold is rendered by a model trained on "
                             f"the others), got {self.folds}")
        if self.tile is not None:
            check_positive_int(self.tile, "MediumSettings.tile")


@dataclass(frozen=True)
class PromptSettings:
    """The perceiver's CLIP and prompts, and their training (docs/method.md §1.1, §1.3); the defaults are the
    authors' (AdamW with its default weight decay 0.01). ``clip_model="perceive-tiny-clip", pretrained=None`` is
    the library's seeded random CLIP (smoke runs); ``crop_size=None`` crops at the CLIP input size;
    ``holdout_fold`` is left out of prompt training and audited on."""

    clip_model: str = "ViT-B-32-quickgelu"
    pretrained: str | None = "openai"
    n_ctx: int = 16
    tier_words: tuple[str, ...] = ("terrible", "mediocre", "excellent")
    steps: int = 100_000
    batch_size: int = 32
    lr: float = 4e-5
    min_lr: float = 1e-6
    weight_decay: float = 0.01
    crop_size: int | None = None
    task_balanced: bool = True
    holdout_fold: int | None = None

    def __post_init__(self) -> None:
        for name in ("n_ctx", "steps", "batch_size"):
            check_positive_int(getattr(self, name), f"PromptSettings.{name}")
        if self.crop_size is not None:
            check_positive_int(self.crop_size, "PromptSettings.crop_size")
        if len(self.tier_words) != 3:
            raise ValueError(f"PromptSettings.tier_words must name 3 tiers (worst first), got {list(self.tier_words)}")


@dataclass
class Stage1Result:
    """What :func:`run_stage1` made: paths, the gates, the audits (preferred first) and the trained perceiver
    (``None`` with ``only_medium``)."""

    triplets: Path
    gates: dict[str, Any]
    audits: dict[str, dict[str, Any]]
    perceiver: Any
    perceiver_dir: Path | None
    report: Path


def run_stage1(
    data_root: str | os.PathLike,
    out: str | os.PathLike,
    restorer: Callable[[], nn.Module],
    *,
    medium: MediumSettings = MediumSettings(),
    prompts: PromptSettings = PromptSettings(),
    tasks: Sequence[str] | None = None,
    audit_root: str | os.PathLike | None = None,
    audit_views: str = "five",
    gate_band: tuple[float, float] = BAND,
    gate_min_improved: float = 0.90,
    gate_min_in_band: float = 0.50,
    require_gates: bool = False,
    only_medium: bool = False,
    rebuild: bool = False,
    seed: int = 0,
    device: str | torch.device | None = None,
    bf16: bool | None = None,
    workers: int | None = None,
    checkpoint_every: int = 500,
    perceiver_out: str | os.PathLike | None = None,
    restorer_name: str | None = None,
    progress: bool = True,
) -> Stage1Result:
    """Run stage 1 on ``data_root`` (``ROOT/<task>/{degraded,clean}/``) into ``out`` (module docstring).

    Args:
        restorer: zero-argument factory of a fresh fold model (an ``nn.Module`` mapping ``(B, 3, H, W)`` to the
            same shape); the authors use Restormer. Its ``size_factor`` attribute, if any, joins the render padding.
        medium, prompts: the settings of steps 1 and 3–5 (defaults: the authors').
        tasks: use only these task folders (default: all, also under ``audit_root``).
        audit_root: a test set in the same layout; audit_views: ``"five"`` crops (authors), ``"center"``, ``"whole"``.
        gate_band, gate_min_improved, gate_min_in_band: the medium-image gates; ``require_gates`` stops with a
            ``ValueError`` when a task fails them; ``only_medium`` stops after the gates.
        rebuild: retrain the fold models, re-render every medium image and restart the prompts.
        seed: fold model k trains with seed + k; the prompts with ``seed``.
        device: default CUDA when available; bf16: autocast for the fold models and the text tower (default: on
            CUDA); workers: prompt-batch loader processes (default 8 on CUDA, 0 on CPU).
        perceiver_out: where to save the perceiver (default ``out/perceiver``).
        restorer_name: how the report names the restorer (default: the factory's module and name).
    """
    if not callable(restorer):
        raise TypeError(f"restorer must be a zero-argument factory of an nn.Module, got {type(restorer).__name__}")
    for value, name, kind in ((medium, "medium", MediumSettings), (prompts, "prompts", PromptSettings)):
        if not isinstance(value, kind):
            raise TypeError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
    if prompts.holdout_fold is not None and not 0 <= prompts.holdout_fold < medium.folds:
        raise ValueError(f"PromptSettings.holdout_fold must be in [0, {medium.folds}) for {medium.folds} folds, "
                         f"got {prompts.holdout_fold}")
    check_choice(audit_views, "audit_views", VIEWS)
    check_positive_int(checkpoint_every, "checkpoint_every")
    out = Path(out)
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda" if bf16 is None else bool(bf16)
    amp = torch.bfloat16 if bf16 else None
    workers = (8 if device.type == "cuda" else 0) if workers is None else workers

    pairs = _select_tasks(scan_pairs(data_root), tasks, "data_root")
    try:
        example = restorer()
    except TypeError as error:  # e.g. a factory that needs arguments
        raise TypeError(f"restorer: calling the factory with no arguments failed: {error}") from error
    if not isinstance(example, nn.Module):
        raise TypeError(f"restorer() must return an nn.Module, got {type(example).__name__}")
    repeats = _task_repeats(pairs, medium.task_repeats)
    name = restorer_name or f"{getattr(restorer, '__module__', '?')}:{getattr(restorer, '__qualname__', restorer)}"
    settings = {
        "medium": {**asdict(medium), "task_repeats": repeats, "restorer_architecture": architecture_sha256(example),
                   "tasks": sorted({pair["task"] for pair in pairs}), "seed": seed, "bf16": bf16},
        "prompts": {**asdict(prompts), "seed": seed},
    }
    settings = json.loads(json.dumps(settings))  # as stored: tuples become lists
    record = out / RECORD_FILE
    if rebuild:  # everything below is made again from the data
        (out / "prompts.ckpt").unlink(missing_ok=True)
    _check_recorded(record, "medium", settings["medium"], (out / "folds" / "settings.json").is_file() and not rebuild)
    _check_recorded(record, "prompts", settings["prompts"], (out / "prompts.ckpt").is_file())
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(record) as tmp:
        tmp.write_text(json.dumps({**settings, "restorer": name}, indent=2, sort_keys=True), encoding="utf-8")

    rendering = dict(tile=medium.tile, overlap=medium.overlap, multiple=math.lcm(8, getattr(example, "size_factor", 1)))
    train_kwargs = dict(steps=medium.steps, crop_size=medium.crop_size, batch_size=medium.batch_size, lr=medium.lr,
                        min_lr=medium.min_lr, amp_dtype=amp, task_repeats=repeats)
    manifest = build_triplets(restorer, pairs, data_root, out, k=medium.folds, train_kwargs=train_kwargs,
                              render_kwargs=rendering, device=device, seed=seed, rebuild=rebuild, progress=progress)
    counts = {task: sum(pair["task"] == task for pair in pairs) for task in settings["medium"]["tasks"]}
    sections = [f"# Stage-1 report\n\nData `{data_root}`: {len(pairs)} pairs "
                f"({', '.join(f'{task} {n}' for task, n in counts.items())}); fold models `{name}`, K = {medium.folds}, "
                f"{medium.steps} steps each; prompts on `{prompts.clip_model}` ({prompts.pretrained or 'no weights'}), "
                f"{prompts.steps} steps; output `{out}`."]

    gates = medium_gates(TripletImages(manifest, data_root), band=tuple(gate_band), min_improved=gate_min_improved,
                         min_in_band=gate_min_in_band)
    (out / "gates.json").write_text(json.dumps(gates, indent=2, sort_keys=True), encoding="utf-8")
    sections.append(f"## Medium-image gates\n\nMedium images of the training data, each by the fold model that never "
                    f"saw it.\n\n{gates_table(gates)}")
    failed = [task for task, row in gates["per_task"].items() if not row["passed"]]
    if failed:
        logger.warning("medium-image gates not passed for %s: the tiers may be poorly separated", failed)
        if require_gates:
            raise ValueError(f"medium-image gates not passed for task(s) {failed} (require_gates); see {out}/gates.json")
    if only_medium:
        return Stage1Result(manifest, gates, {}, None, None, _write_report(out, sections))

    perceiver = _build_perceiver(prompts, seed)
    holdout = prompts.holdout_fold
    train_folds = None if holdout is None else [fold for fold in range(medium.folds) if fold != holdout]
    train_set = TripletImages(manifest, data_root, folds=train_folds)
    history = train_prompts(
        perceiver, train_set, steps=prompts.steps, batch_size=prompts.batch_size, lr=prompts.lr,
        min_lr=prompts.min_lr, weight_decay=prompts.weight_decay, crop_size=prompts.crop_size or perceiver.image_size[0],
        task_balanced=prompts.task_balanced, seed=seed, checkpoint=out / "prompts.ckpt",
        checkpoint_every=checkpoint_every, device=device, num_workers=workers, amp_dtype=amp, progress=progress)
    _write_history(out / "prompt_history.csv", history)
    sections.append(f"## Prompt training\n\n{len(train_set)} triplets"
                    f"{'' if holdout is None else f' (fold {holdout} held out)'}, {prompts.steps} steps of "
                    f"{prompts.batch_size}; last step: loss {history['loss'][-1]:.4f}, accuracy "
                    f"{history['accuracy'][-1]:.3f} (`prompt_history.csv`).")

    audit_sets: dict[str, TripletImages] = {}  # preferred first: recorded in the perceiver
    if audit_root is not None:
        audit_pairs = _select_tasks(scan_pairs(audit_root), tasks, "audit_root")
        audit_manifest = _render_audit_set(restorer, audit_pairs, audit_root, out, medium.folds, rendering, device,
                                           rebuild, progress)
        audit_sets["test"] = TripletImages(audit_manifest, audit_root)
    if holdout is not None:
        audit_sets[f"holdout_fold{holdout}"] = TripletImages(manifest, data_root, folds=[holdout])
    if not audit_sets:
        logger.warning("no holdout_fold or audit_root: auditing on the training triplets, which flatters the prompts")
        audit_sets["training"] = train_set
    audits = {}
    for set_name, triplets in audit_sets.items():
        audits[set_name] = audit_perceiver(perceiver, triplets, views=audit_views, device=device, record=False)
        (out / f"audit_{set_name}.json").write_text(json.dumps(audits[set_name], indent=2, sort_keys=True),
                                                    encoding="utf-8")
        sections.append(f"## Perceiver audit: {set_name}\n\n{len(triplets)} triplets, {audit_views} views.\n\n"
                        f"{audit_table(audits[set_name])}")
    preferred = next(iter(audits))
    perceiver.audit_metrics = {**audits[preferred], "audit_set": preferred}
    perceiver_dir = Path(perceiver_out) if perceiver_out is not None else out / "perceiver"
    perceiver.save_pretrained(perceiver_dir)
    sections.append(f"Perceiver (prompts, config, model card with the audit on {preferred}): `{perceiver_dir}`; load it "
                    f"with `QualityPerceiver.from_pretrained({str(perceiver_dir)!r})`.")
    return Stage1Result(manifest, gates, audits, perceiver, perceiver_dir, _write_report(out, sections))


def _select_tasks(pairs: list[dict], tasks: Sequence[str] | None, where: str) -> list[dict]:
    if not tasks:
        return pairs
    found = {pair["task"] for pair in pairs}
    missing = [task for task in tasks if task not in found]
    if missing:
        raise ValueError(f"{where} has no pairs for task(s) {missing}; it holds {sorted(found)}")
    return [pair for pair in pairs if pair["task"] in set(tasks)]


def _task_repeats(pairs: list[dict], overrides: Mapping[str, float]) -> dict[str, float]:
    """Factor per task of the data: ``overrides``, else the authors', else 1 (left out: build_triplets' default)."""
    present = {pair["task"] for pair in pairs}
    unknown = sorted(set(overrides) - present)
    if unknown:
        raise ValueError(f"MediumSettings.task_repeats names task(s) {unknown} that the data does not hold "
                         f"({sorted(present)})")
    merged = {**AUTHORS_TASK_REPEATS, **overrides}
    return {task: merged[task] for task in sorted(present) if task in merged}


def _check_recorded(path: Path, section: str, settings: dict[str, Any], artifacts_exist: bool) -> None:
    """Refuse a call whose ``section`` settings differ from those that made the stored results."""
    stored = json.loads(path.read_text(encoding="utf-8")).get(section) if path.is_file() else None
    if stored is None or not artifacts_exist:
        return
    changed = {key: (stored.get(key), value) for key, value in settings.items() if stored.get(key) != value}
    if changed:
        details = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in sorted(changed.items()))
        raise ValueError(f"{path.parent} holds {section} results made with other settings ({details}); use another "
                         "output folder, the same settings to continue, or rebuild")


def _build_perceiver(prompts: PromptSettings, seed: int):
    """A fresh ``QualityPerceiver`` of ``prompts`` with its context drawn from ``seed`` (the caller's RNG kept)."""
    from ..perceiver import QualityPerceiver

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return QualityPerceiver(clip_model=prompts.clip_model, pretrained=prompts.pretrained, n_ctx=prompts.n_ctx,
                                tier_words=prompts.tier_words)


def _render_audit_set(restorer: Callable[[], nn.Module], pairs: list[dict], audit_root: str | os.PathLike, out: Path,
                      folds: int, rendering: dict[str, Any], device: torch.device, rebuild: bool,
                      progress: bool) -> Path:
    """Medium images of a test set, each by the fold model its clean path hashes to (none saw any test image);
    returns ``out/audit/triplets.jsonl``."""
    from safetensors.torch import load_file

    triplets = []
    for fold in range(folds):
        rows = [{**row, "fold": fold} for row in pairs if fold_of(row["clean"], folds) == fold]
        if rows:
            model = restorer()
            model.load_state_dict(load_file(str(out / "folds" / f"fold{fold}.safetensors")), strict=True)
            triplets += render_medium(model, rows, audit_root, out / "audit", device=device, overwrite=rebuild,
                                      progress=progress, **rendering)
    triplets.sort(key=lambda row: row["degraded"])
    return write_jsonl(out / "audit" / "triplets.jsonl", triplets)


def _write_history(path: Path, history: dict[str, list[float]]) -> None:
    with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "loss", "accuracy"])
        writer.writerows([step, f"{loss:.6f}", f"{accuracy:.4f}"]
                         for step, (loss, accuracy) in enumerate(zip(history["loss"], history["accuracy"]), start=1))


def _write_report(out: Path, sections: list[str]) -> Path:
    path = out / "report.md"
    with atomic_write(path) as tmp:
        tmp.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return path
