"""Stage 1 as the authors run it (SPEC.md §1.2–1.3): fold models, medium images, gates, prompts, audit.

    python examples/stage1_recipe.py --data-root data/stage1/train --out runs/stage1 --audit-root data/stage1/test

The data roots have the layout ``ROOT/<task>/{degraded,clean}/`` (``examples/prepare_stage1_data.py`` builds
it from BSD400/WED, OTS, Rain100L, GoPro and LOL-v1). Steps, all through ``perceive_components.stage1``:

1. **Fold models and medium images** by ``build_triplets``: folds (K = ``--folds``, hash of the relative clean
   path) → ``OUT/pairs.jsonl``; for each fold k a fresh ``--backbone`` (default Restormer, from
   ``examples/backbones``) trained with L1 on the other folds — 128² crops with flips, batch 4, AdamW 2e-4
   cosine to 1e-6, bf16 on CUDA, 20,000 iterations, the authors' task repeat factors (``--restorer-repeat``),
   seed ``--seed`` + k — → ``OUT/folds/fold<k>.safetensors``; fold k rendered by its model (tiles 512,
   overlap 32, reflect padding, clamp) → ``OUT/medium/…``, ``OUT/triplets.jsonl``.
2. **Gates** (``medium_gates``): PSNR-improved rate and progress r per task → table, ``OUT/gates.json``.
3. **Prompts**: a ``QualityPerceiver`` (OpenAI ViT-B/32 QuickGELU, n_ctx 16) trained by ``train_prompts`` —
   AdamW 4e-5 cosine to 1e-6, 100,000 steps × 32 triplets, task-balanced — checkpoint ``OUT/prompts.ckpt``.
4. **Audit** (``audit_perceiver``) on the held-out fold (``--holdout-fold``: the prompts then train on the
   other folds) and/or a test set (``--audit-root``; its medium images are rendered by the fold models, which
   never saw it) → tables, ``OUT/audit_*.json``; the preferred audit (test set, else held-out fold, else the
   training triplets) is recorded in the perceiver, saved with ``save_pretrained`` to ``OUT/perceiver``.

Re-running the same command continues: finished fold models are loaded, an interrupted one resumes from
``OUT/folds/fold<k>.ckpt``, rendered images are kept, prompt training resumes from its checkpoint (a finished
run is not repeated), and changed settings that would mix two recipes in one folder are refused, as are stored
fold models and medium images made from other image contents (``--rebuild`` makes everything again).
``OUT/report.md`` collects the tables. Every number is a flag; a CPU smoke run: ``--backbone restormer-tiny
--restorer-steps 3 --restorer-crop 32 --prompt-steps 3 --clip tiny``.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from examples.train_support import parse_repeats  # noqa: E402
from perceive_components import QualityPerceiver  # noqa: E402
from perceive_components.ops.checkpoint import atomic_write  # noqa: E402
from perceive_components.stage1 import (  # noqa: E402
    TripletImages, audit_perceiver, build_triplets, fold_of, medium_gates, render_medium, scan_pairs, train_prompts,
    write_jsonl,
)

log = logging.getLogger("stage1_recipe")

# Authors' stage-1 task resampling for the fold models (their stage-1 config: denoise 3, dehaze 1, derain 120,
# deblur 50, lowlight 40). Their denoise entry is one clean image with a random σ; the prepared layout already
# holds three noisy files per clean image, so noise 1 here gives the same share.
DEFAULT_REPEATS = {"noise": 1, "haze": 1, "rain": 120, "blur": 50, "lowlight": 40}
TINY_CLIP_NAME = "tiny-random-clip"
TINY_CLIP_CFG = dict(  # 1.7 M parameters, 32² images: for CPU smoke runs and tests only
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=2, width=64, head_width=32, patch_size=8),
    text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),
    quick_gelu=True,
)
# Settings that define what is stored in OUT; a re-run with other values is refused (device, workers, progress
# and the audit choices may change freely; the fold models' precision, bf16, is recorded with them).
MEDIUM_KEYS = ("backbone", "folds", "tasks", "restorer_steps", "restorer_crop", "restorer_batch", "restorer_lr",
               "restorer_min_lr", "restorer_repeat", "tile", "overlap", "seed")
PROMPT_KEYS = ("clip", "clip_pretrained", "n_ctx", "tier_words", "prompt_steps", "prompt_batch", "prompt_lr",
               "prompt_min_lr", "prompt_weight_decay", "prompt_crop", "task_balanced", "holdout_fold", "seed")


# ----------------------------------------------------------------------------- building blocks
def build_tiny_clip(seed: int = 0) -> nn.Module:
    """A random open_clip CLIP of ``TINY_CLIP_CFG``, identical for the same ``seed`` (rebuild it to reload)."""
    import open_clip

    torch.manual_seed(seed)
    return open_clip.CLIP(**TINY_CLIP_CFG).eval()


def make_perceiver(args: argparse.Namespace) -> QualityPerceiver:
    if args.clip == "tiny":
        return QualityPerceiver(clip_model=TINY_CLIP_NAME, pretrained=None, n_ctx=args.n_ctx,
                                tier_words=args.tier_words, clip=build_tiny_clip(args.seed))
    return QualityPerceiver(clip_model=args.clip, pretrained=args.clip_pretrained or None, n_ctx=args.n_ctx,
                            tier_words=args.tier_words)


def backbone_factory(name: str) -> Callable[[], nn.Module]:
    from examples.backbones import create_backbone

    create_backbone(name)  # fail early on an unknown name
    return lambda: create_backbone(name)


def fold_repeats(args: argparse.Namespace, pairs: list[dict]) -> dict[str, int]:
    """Task repeat factors for the fold models: ``DEFAULT_REPEATS`` and ``--restorer-repeat``, for the tasks
    in the data. A task whose images all hash to one fold is never seen by that fold's model; it is named in
    a warning (``build_triplets`` gives each fold model the factors of the tasks it trains on)."""
    given = parse_repeats(args.restorer_repeat, "--restorer-repeat", "rain=120")
    folds: dict[str, set[int]] = {}
    for pair in pairs:
        folds.setdefault(pair["task"], set()).add(fold_of(pair["clean"], args.folds))
    unknown = sorted(set(given) - set(folds))
    if unknown:
        raise ValueError(f"--restorer-repeat names task(s) {unknown} that --data-root does not hold ({sorted(folds)})")
    one_fold = {task: min(found) for task, found in folds.items() if len(found) == 1}
    if one_fold:
        log.warning("a fold model never trains on a task whose images all hash to its own fold: %s; use more "
                    "images or fewer folds", ", ".join(f"{task} (fold {fold})" for task, fold in one_fold.items()))
    repeats = {**DEFAULT_REPEATS, **given}
    return {task: repeats[task] for task in sorted(folds) if task in repeats}


def check_settings(path: Path, section: str, settings: dict[str, Any], artifacts_exist: bool) -> None:
    """Refuse a re-run whose ``section`` settings differ from those that produced the stored artifacts."""
    stored = json.loads(path.read_text(encoding="utf-8")).get(section) if path.is_file() else None
    if stored is None or not artifacts_exist:
        return
    changed = {key: (stored.get(key), value) for key, value in settings.items() if stored.get(key) != value}
    if changed:
        details = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
        raise ValueError(f"{path.parent} holds {section} results made with other settings ({details}); "
                         "use another --out folder, or the same settings to continue")


def render_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    multiple = math.lcm(8, getattr(backbone_factory(args.backbone)(), "size_factor", 1))
    return dict(tile=args.tile or None, overlap=args.overlap, multiple=multiple)


# ----------------------------------------------------------------------------- steps
def medium_images(args: argparse.Namespace, pairs: list[dict], out: Path, device: torch.device,
                  amp: torch.dtype | None) -> Path:
    """Step 1 by ``build_triplets``: folds, fold models (trained, resumed or reused), medium images; returns
    ``OUT/triplets.jsonl``."""
    train_kwargs = dict(steps=args.restorer_steps, crop_size=args.restorer_crop, batch_size=args.restorer_batch,
                        lr=args.restorer_lr, min_lr=args.restorer_min_lr, amp_dtype=amp,
                        task_repeats=fold_repeats(args, pairs))
    return build_triplets(backbone_factory(args.backbone), pairs, args.data_root, out, k=args.folds,
                          train_kwargs=train_kwargs, render_kwargs=render_kwargs(args), device=device,
                          seed=args.seed, rebuild=args.rebuild, progress=args.progress)


def audit_set_images(args: argparse.Namespace, out: Path, device: torch.device) -> Path:
    """Medium images of the test set under ``--audit-root``, each rendered by the fold model its clean path
    hashes to (no fold model saw any test image); returns ``OUT/audit/triplets.jsonl``."""
    from safetensors.torch import load_file

    pairs = select_tasks(scan_pairs(args.audit_root), args.tasks, "--audit-root")
    factory, rendering = backbone_factory(args.backbone), render_kwargs(args)
    triplets = []
    for fold in range(args.folds):
        rows = [{**row, "fold": fold} for row in pairs if fold_of(row["clean"], args.folds) == fold]
        if rows:
            model = factory()
            model.load_state_dict(load_file(str(out / "folds" / f"fold{fold}.safetensors")), strict=True)
            triplets += render_medium(model, rows, args.audit_root, out / "audit", device=device,
                                      overwrite=args.rebuild, progress=args.progress, **rendering)
    triplets.sort(key=lambda row: row["degraded"])
    return write_jsonl(out / "audit" / "triplets.jsonl", triplets)


def select_tasks(pairs: list[dict], tasks: Sequence[str] | None, where: str) -> list[dict]:
    if not tasks:
        return pairs
    found = {pair["task"] for pair in pairs}
    missing = [task for task in tasks if task not in found]
    if missing:
        raise ValueError(f"{where} has no pairs for task(s) {missing}; it holds {sorted(found)}")
    return [pair for pair in pairs if pair["task"] in set(tasks)]


def write_history(path: Path, history: dict[str, list[float]]) -> None:
    with atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "loss", "accuracy"])
        writer.writerows([step, f"{loss:.6f}", f"{acc:.4f}"]
                         for step, (loss, acc) in enumerate(zip(history["loss"], history["accuracy"]), start=1))


# ----------------------------------------------------------------------------- tables
def format_gates(report: dict) -> str:
    band = report["band"]
    lines = [f"| task | n | PSNR improved | r in [{band[0]}, {band[1]}] | r p10 / median / p90 | gain dB | passed |",
             "|---|---|---|---|---|---|---|"]
    for task, row in [*report["per_task"].items(), ("overall", report["overall"])]:
        lines.append(f"| {task} | {row['n']} | {row['psnr_improved_rate']:.3f} | {row['r_in_band_rate']:.3f} | "
                     f"{row['r_p10']:.2f} / {row['r_median']:.2f} / {row['r_p90']:.2f} | "
                     f"{row['mean_psnr_gain_db']:.2f} | {row['passed']} |")
    return "\n".join(lines)


def format_audit(report: dict) -> str:
    lines = ["| task | triplets | accuracy | acc. terrible / mediocre / excellent | strict | monotonic "
             "| mean q (d/m/g) |",
             "|---|---|---|---|---|---|---|"]
    for task, row in [*report["per_task"].items(), ("overall", report)]:
        tiers = " / ".join(f"{v:.3f}" for v in row["accuracy_per_tier"])
        q = " / ".join(f"{v:.2f}" for v in row["mean_q"])
        lines.append(f"| {task} | {row['n_triplets']} | {row['accuracy']:.3f} | {tiers} | {row['strict']:.3f} | "
                     f"{row['monotonic']:.3f} | {q} |")
    gate = report["gate"]
    checks = ", ".join(f"{key} {value['value']:.3f} (≥ {value['threshold']})"
                       for key, value in gate.items() if key != "passed")
    lines.append(f"\nAuthors' gate {'PASSED' if gate['passed'] else 'not passed'}: {checks}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    amp = torch.bfloat16 if bf16 else None
    workers = args.workers if args.workers is not None else (8 if device.type == "cuda" else 0)
    if args.holdout_fold is not None and not 0 <= args.holdout_fold < args.folds:
        raise ValueError(f"--holdout-fold must be in [0, {args.folds}), got {args.holdout_fold}")

    settings_path = out / "recipe.json"
    settings = {section: {key: getattr(args, key) for key in keys}
                for section, keys in (("medium", MEDIUM_KEYS), ("prompts", PROMPT_KEYS))}
    settings["medium"]["bf16"] = bf16
    if args.rebuild:  # everything below is made again from the data
        (out / "prompts.ckpt").unlink(missing_ok=True)
    check_settings(settings_path, "medium", settings["medium"],
                   (out / "folds" / "settings.json").is_file() and not args.rebuild)
    check_settings(settings_path, "prompts", settings["prompts"], (out / "prompts.ckpt").is_file())
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(settings_path) as tmp:
        tmp.write_text(json.dumps(settings, indent=2, sort_keys=True), encoding="utf-8")

    pairs = select_tasks(scan_pairs(args.data_root), args.tasks, "--data-root")
    manifest = medium_images(args, pairs, out, device, amp)
    sections = [f"# Stage-1 recipe report\n\nData: `{args.data_root}`, {len(pairs)} pairs; fold models: "
                f"`{args.backbone}`, K = {args.folds}; output: `{out}`."]

    gates = medium_gates(TripletImages(manifest, args.data_root), band=tuple(args.gate_band),
                         min_improved=args.gate_min_improved, min_in_band=args.gate_min_in_band)
    (out / "gates.json").write_text(json.dumps(gates, indent=2, sort_keys=True), encoding="utf-8")
    gates_table = format_gates(gates)
    print(f"\nMedium-image gates (training data, medium images by the held-out fold models):\n{gates_table}")
    sections.append(f"## Medium-image gates\n\n{gates_table}")
    report: dict[str, Any] = {"gates": gates}
    failed = [task for task, row in gates["per_task"].items() if not row["passed"]]
    if failed:
        log.warning("medium-image gates not passed for %s: the tiers may be poorly separated", failed)
        if args.require_gates:
            raise ValueError(f"medium-image gates not passed for task(s) {failed} (--require-gates); "
                             f"see {out}/gates.json")
    if args.only_medium:
        return finish(out, sections, report)

    train_folds = None if args.holdout_fold is None else [f for f in range(args.folds) if f != args.holdout_fold]
    train_set = TripletImages(manifest, args.data_root, folds=train_folds)
    perceiver = make_perceiver(args)
    if args.clip == "tiny":
        (out / "tiny_clip.json").write_text(json.dumps({"name": TINY_CLIP_NAME, "seed": args.seed,
                                                        "open_clip.CLIP": TINY_CLIP_CFG}, indent=2))
    history = train_prompts(
        perceiver, train_set, steps=args.prompt_steps, batch_size=args.prompt_batch, lr=args.prompt_lr,
        min_lr=args.prompt_min_lr, weight_decay=args.prompt_weight_decay,
        crop_size=args.prompt_crop or perceiver.image_size[0], task_balanced=args.task_balanced, seed=args.seed,
        checkpoint=out / "prompts.ckpt", checkpoint_every=args.checkpoint_every, device=device,
        num_workers=workers, amp_dtype=amp, progress=args.progress)
    write_history(out / "prompt_history.csv", history)

    audit_sets: dict[str, TripletImages] = {}  # preferred first: recorded in the perceiver
    if args.audit_root:
        audit_sets["test"] = TripletImages(audit_set_images(args, out, device), args.audit_root)
    if args.holdout_fold is not None:
        audit_sets[f"holdout_fold{args.holdout_fold}"] = TripletImages(manifest, args.data_root,
                                                                        folds=[args.holdout_fold])
    if not audit_sets:
        log.warning("no --holdout-fold or --audit-root: auditing on the training triplets, which flatters the prompts")
        audit_sets["training"] = train_set
    report["audit"] = {}
    for name, triplets in audit_sets.items():
        result = audit_perceiver(perceiver, triplets, views=args.audit_views, device=device, record=False)
        (out / f"audit_{name}.json").write_text(json.dumps(result, indent=2, sort_keys=True), encoding="utf-8")
        table = format_audit(result)
        print(f"\nPerceiver audit on {name} ({args.audit_views} views):\n{table}")
        sections.append(f"## Perceiver audit: {name}\n\n{table}")
        report["audit"][name] = result
    recorded = next(iter(report["audit"]))
    perceiver.audit_metrics = {**report["audit"][recorded], "audit_set": recorded}
    perceiver_dir = Path(args.perceiver_out) if args.perceiver_out else out / "perceiver"
    perceiver.save_pretrained(perceiver_dir)
    print(f"\nSaved the perceiver (prompts + config + model card, audit on {recorded}) to {perceiver_dir}")
    return finish(out, sections, report)


def finish(out: Path, sections: list[str], report: dict[str, Any]) -> dict[str, Any]:
    (out / "report.md").write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="training data, ROOT/<task>/{degraded,clean}/")
    parser.add_argument("--out", required=True, help="run folder (fold models, medium images, checkpoints, report)")
    parser.add_argument("--tasks", nargs="+", metavar="TASK", help="use only these task folders (default: all)")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', …")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast for the fold models and the text tower (default: on CUDA only)")
    parser.add_argument("--seed", type=int, default=0, help="seed of fold model k is seed + k; prompts use seed")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars")

    medium = parser.add_argument_group("fold models and medium images (SPEC §1.2)")
    medium.add_argument("--backbone", default="restormer", help="examples/backbones registry name")
    medium.add_argument("--folds", type=int, default=2, help="K")
    medium.add_argument("--restorer-steps", type=int, default=20_000)
    medium.add_argument("--restorer-crop", type=int, default=128)
    medium.add_argument("--restorer-batch", type=int, default=4)
    medium.add_argument("--restorer-lr", type=float, default=2e-4)
    medium.add_argument("--restorer-min-lr", type=float, default=1e-6)
    medium.add_argument("--restorer-repeat", nargs="*", default=[], metavar="TASK=N",
                        help=f"task repeat factors for the fold models (default {DEFAULT_REPEATS}; others 1)")
    medium.add_argument("--tile", type=int, default=512, help="render tile size (0: whole images)")
    medium.add_argument("--overlap", type=int, default=32, help="render tile overlap")
    medium.add_argument("--gate-band", type=float, nargs=2, default=[0.25, 0.85], metavar=("LOW", "HIGH"))
    medium.add_argument("--gate-min-improved", type=float, default=0.90)
    medium.add_argument("--gate-min-in-band", type=float, default=0.50)
    medium.add_argument("--require-gates", action="store_true", help="stop if a task fails the medium-image gates")
    medium.add_argument("--only-medium", action="store_true", help="stop after the gates (no prompts, no audit)")
    medium.add_argument("--rebuild", action="store_true",
                        help="retrain the fold models, re-render the medium images and restart the prompts in --out "
                        "(stored results made from other images or settings are otherwise refused)")

    prompts = parser.add_argument_group("prompts and audit (SPEC §1.1, §1.3)")
    prompts.add_argument("--clip", default="ViT-B-32-quickgelu", help="open_clip model name, or 'tiny' (random, tests)")
    prompts.add_argument("--clip-pretrained", default="openai", help="open_clip weight tag ('' for none)")
    prompts.add_argument("--n-ctx", type=int, default=16)
    prompts.add_argument("--tier-words", nargs=3, default=["terrible", "mediocre", "excellent"])
    prompts.add_argument("--prompt-steps", type=int, default=100_000)
    prompts.add_argument("--prompt-batch", type=int, default=32, help="triplets per step (3× images)")
    prompts.add_argument("--prompt-lr", type=float, default=4e-5)
    prompts.add_argument("--prompt-min-lr", type=float, default=1e-6)
    prompts.add_argument("--prompt-weight-decay", type=float, default=0.0)
    prompts.add_argument("--prompt-crop", type=int, default=0, help="shared crop size (0: the CLIP input size)")
    prompts.add_argument("--task-balanced", action=argparse.BooleanOptionalAction, default=True)
    prompts.add_argument("--checkpoint-every", type=int, default=500)
    prompts.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: 8 on CUDA, 0 on CPU)")
    prompts.add_argument("--holdout-fold", type=int, default=None,
                         help="train the prompts without this fold and audit on it (default: train on all folds)")
    prompts.add_argument("--audit-root", help="test data ROOT/<task>/{degraded,clean}/ to audit on")
    prompts.add_argument("--audit-views", choices=("five", "center", "whole"), default="five")
    prompts.add_argument("--perceiver-out", help="where to save the perceiver (default: OUT/perceiver)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        raise SystemExit(f"stage1_recipe.py: error: {error}") from None
