"""The ``perceive-ir`` command: score images with a perceiver and run stage 1 from the shell.

    perceive-ir score IMG… --perceiver ORG/NAME|DIR [--json]
    perceive-ir convert authors-prompts FILE --out DIR [--clip-model NAME --pretrained TAG]
    perceive-ir stage1 run --data-root ROOT --out DIR --restorer MODULE:FACTORY [...]   (all of stage 1)
    perceive-ir stage1 split ROOT --out pairs.jsonl [--folds 2]
    perceive-ir stage1 render --pairs pairs.jsonl --root ROOT --out DIR --restorer MODULE:FACTORY [--rebuild] [...]
    perceive-ir stage1 gates --triplets DIR/triplets.jsonl --root ROOT [--json]
    perceive-ir stage1 train-prompts --triplets DIR/triplets.jsonl --root ROOT --out PERCEIVER_DIR [...]
    perceive-ir stage1 audit --perceiver DIR --triplets DIR/triplets.jsonl --root ROOT [--json] [--record]
    perceive-ir cache render|inspect …   (proxy negatives rendered once to disk; see docs/negatives.md)

Exit codes: 0 success, 1 a failure while running (unreadable file, bad data), 2 bad arguments.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

EXIT_FAILURE, EXIT_USAGE = 1, 2


class CommandError(Exception):
    """A failure to report as ``perceive-ir: error: …`` with exit code 1."""


# ----------------------------------------------------------------------------- helpers
def _device(name: str | None):
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_perceiver(source: str, clip_model: str | None, pretrained: str | None):
    from .perceiver import QualityPerceiver

    if pretrained is not None and not clip_model:
        raise CommandError(f"--pretrained {pretrained!r} only applies with --clip-model (the perceiver's config names "
                           "its CLIP and tag); pass both, e.g. --clip-model ViT-B-32-quickgelu --pretrained openai")
    overrides = {}
    if clip_model:
        overrides["clip_model"] = clip_model
        overrides["pretrained"] = pretrained
    return QualityPerceiver.from_pretrained(source, **overrides)


def _warn_if_audit_failed(perceiver) -> None:
    """One stderr line when the perceiver's recorded audit did not pass the authors' gate."""
    gate = (perceiver.audit_metrics or {}).get("gate") or {}
    if gate.get("passed") is not False:
        return
    failed = [f"{name} {check['value']:.2f} < {check['threshold']}" for name, check in gate.items()
              if isinstance(check, dict) and check["value"] < check["threshold"]]
    print(f"perceive-ir: warning: this perceiver's recorded audit did not pass the authors' gate ({', '.join(failed)}"
          "); its tiers and q may not separate degraded from restored images", file=sys.stderr)


def _factory(spec: str, kwargs_json: str | None) -> Callable:
    """``package.module:callable`` or ``path/to/file.py:callable`` → a zero-argument model factory."""
    from .ops.imports import load_callable

    factory = load_callable(spec, "--restorer")
    try:
        kwargs = json.loads(kwargs_json) if kwargs_json else {}
    except json.JSONDecodeError as error:
        raise CommandError(f"--restorer-kwargs is not valid JSON: {error}") from error
    return lambda: factory(**kwargs)


def _task_repeats(items: Sequence[str]) -> dict[str, float]:
    """``["rain=120", "blur=50"]`` → ``{"rain": 120.0, "blur": 50.0}``; ``CommandError`` naming the bad item."""
    repeats = {}
    for item in items:
        task, _, value = item.partition("=")
        try:
            repeats[task] = float(value)
        except ValueError:
            raise CommandError(f"--restorer-repeat takes TASK=N items (e.g. rain=120), got {item!r}") from None
        if not task or not repeats[task] > 0:
            raise CommandError(f"--restorer-repeat takes TASK=N items with N > 0 (e.g. rain=120), got {item!r}")
    return repeats


def _print_json(value) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


# ----------------------------------------------------------------------------- score
def cmd_score(args) -> None:
    import torch

    from .ops.io import read_image

    device = _device(args.device)
    perceiver = _load_perceiver(args.perceiver, args.clip_model, args.pretrained).freeze_prompts().to(device)
    _warn_if_audit_failed(perceiver)
    rows = []
    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start : start + args.batch_size]
        images = []
        for path in paths:
            try:
                images.append(perceiver.resize(read_image(path)[None])[0])
            except (FileNotFoundError, ValueError) as error:
                raise CommandError(f"cannot score {path!r}: {error}") from error
        with torch.no_grad():
            probs = perceiver.probabilities(torch.stack(images).clamp(0, 1).to(device)).cpu()
        for path, p in zip(paths, probs):
            tier = int(p.argmax())
            rows.append({"image": path, "tier": perceiver.tier_words[tier], "tier_index": tier,
                         "probabilities": dict(zip(perceiver.tier_words, [round(float(v), 6) for v in p])),
                         "q": round(float(p @ perceiver.tier_values.cpu()), 6)})
    if args.json:
        _print_json(rows)
        return
    words = perceiver.tier_words
    width = max(len("image"), *(len(r["image"]) for r in rows))
    print(f"{'image':<{width}}  {'tier':<10} " + " ".join(f"p({w})".rjust(max(11, len(w) + 3)) for w in words) + "      q")
    for r in rows:
        probs = " ".join(f"{r['probabilities'][w]:.3f}".rjust(max(11, len(w) + 3)) for w in words)
        print(f"{r['image']:<{width}}  {r['tier']:<10} {probs}  {r['q']:.3f}")


# ----------------------------------------------------------------------------- convert
def cmd_convert_authors_prompts(args) -> None:
    from .convert import convert_authors_prompts

    perceiver = convert_authors_prompts(args.file, args.out, clip_model=args.clip_model,
                                        pretrained=args.pretrained or None)
    info = perceiver.training_info
    print(f"converted {Path(args.file).name} (iteration {info['iteration']}, task-balanced: {info['task_balanced']})"
          f" to {args.out}; load it with QualityPerceiver.from_pretrained({str(args.out)!r})")


# ----------------------------------------------------------------------------- stage 1
def cmd_run(args) -> None:
    from .stage1 import MediumSettings, PromptSettings, run_stage1

    medium = MediumSettings(
        folds=args.folds, steps=args.restorer_steps, crop_size=args.restorer_crop, batch_size=args.restorer_batch,
        lr=args.restorer_lr, min_lr=args.restorer_min_lr, task_repeats=_task_repeats(args.restorer_repeat),
        tile=args.tile or None, overlap=args.overlap)
    prompts = PromptSettings(
        clip_model=args.clip_model, pretrained=args.pretrained or None, n_ctx=args.n_ctx,
        tier_words=tuple(args.tier_words), steps=args.prompt_steps, batch_size=args.prompt_batch, lr=args.prompt_lr,
        min_lr=args.prompt_min_lr, weight_decay=args.prompt_weight_decay, crop_size=args.prompt_crop,
        task_balanced=args.task_balanced, holdout_fold=args.holdout_fold)
    result = run_stage1(
        args.data_root, args.out, _factory(args.restorer, args.restorer_kwargs), medium=medium, prompts=prompts,
        tasks=args.tasks, audit_root=args.audit_root, audit_views=args.audit_views, gate_band=tuple(args.gate_band),
        gate_min_improved=args.gate_min_improved, gate_min_in_band=args.gate_min_in_band,
        require_gates=args.require_gates, only_medium=args.only_medium, rebuild=args.rebuild, seed=args.seed,
        device=args.device, bf16=args.bf16, workers=args.workers, checkpoint_every=args.checkpoint_every,
        perceiver_out=args.perceiver_out, restorer_name=args.restorer + (f" {args.restorer_kwargs}"
                                                                         if args.restorer_kwargs else ""),
        progress=args.progress)
    print(result.report.read_text(encoding="utf-8"))
    print(f"wrote {result.report}")


def cmd_split(args) -> None:
    from .stage1 import assign_folds, scan_pairs, write_jsonl

    rows = assign_folds(scan_pairs(args.root), args.folds)
    write_jsonl(args.out, rows)
    sizes = {fold: sum(1 for r in rows if r["fold"] == fold) for fold in range(args.folds)}
    print(f"wrote {len(rows)} pairs in {args.folds} folds {sizes} to {args.out}")


def cmd_render(args) -> None:
    import torch

    from .stage1 import build_triplets, read_jsonl

    pairs = read_jsonl(args.pairs, required=("degraded", "clean"))
    manifest = build_triplets(
        _factory(args.restorer, args.restorer_kwargs), pairs, args.root, args.out, k=args.folds,
        train_kwargs=dict(steps=args.steps, crop_size=args.crop_size, batch_size=args.batch_size, lr=args.lr,
                          amp_dtype=torch.bfloat16 if args.bf16 else None),
        render_kwargs=dict(tile=args.tile or None, overlap=args.overlap), device=_device(args.device),
        rebuild=args.rebuild,
    )
    print(f"wrote {manifest}")


def _triplets(args):
    from .stage1 import TripletImages

    return TripletImages(args.triplets, args.root, args.medium_root)


def cmd_gates(args) -> None:
    from .stage1 import gates_table, medium_gates

    report = medium_gates(_triplets(args))
    if args.json:
        _print_json(report)
        return
    print(gates_table(report))


def cmd_train_prompts(args) -> None:
    import torch

    from .perceiver import QualityPerceiver
    from .stage1 import train_prompts

    if args.init:
        perceiver = QualityPerceiver.from_pretrained(args.init)
    else:
        perceiver = QualityPerceiver(clip_model=args.clip_model, pretrained=args.pretrained or None, n_ctx=args.n_ctx)
    crop = args.crop_size or perceiver.image_size[0]
    train_prompts(perceiver, _triplets(args), steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                  min_lr=args.min_lr, weight_decay=args.weight_decay, crop_size=crop, checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
                  device=_device(args.device), num_workers=args.workers,
                  amp_dtype=torch.bfloat16 if args.bf16 else None, seed=args.seed)
    perceiver.save_pretrained(args.out)
    print(f"saved perceiver prompts to {args.out}")


def cmd_audit(args) -> None:
    from .stage1 import audit_perceiver, audit_table

    perceiver = _load_perceiver(args.perceiver, args.clip_model, args.pretrained)
    report = audit_perceiver(perceiver, _triplets(args), views=args.views, device=_device(args.device),
                             progress=not args.json)
    if args.record:
        if not Path(args.perceiver).is_dir():
            raise CommandError("--record needs --perceiver to be a local folder (the audit is written into it)")
        perceiver.save_pretrained(args.perceiver)
    if args.json:
        _print_json(report)
        return
    print(audit_table(report))


# ----------------------------------------------------------------------------- parser
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _add_perceiver_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--perceiver", required=True, help="Hub repo id (org/name) or folder from save_pretrained")
    parser.add_argument("--clip-model", help="override the CLIP name recorded in the perceiver config")
    parser.add_argument("--pretrained", help="override the CLIP weight tag (with --clip-model)")


def _add_triplet_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--triplets", required=True, help="triplets.jsonl written by `stage1 render`")
    parser.add_argument("--root", required=True, help="data root the degraded/clean paths are relative to")
    parser.add_argument("--medium-root", help="folder the medium paths are relative to (default: the manifest's)")


def _add_run_parser(steps) -> None:
    """``perceive-ir stage1 run``: every flag of ``run_stage1``, defaults the authors' (docs/reproduce.md §2)."""
    run = steps.add_parser("run", help="all of stage 1 with the authors' defaults: fold models, medium images, gates, "
                           "prompts, audit, perceiver, report (resumable)",
                           description="All of stage 1 (perceive_components.stage1.run_stage1); re-running the same "
                           "command continues where it stopped, and other settings in the same --out are refused.")
    run.add_argument("--data-root", required=True, help="training data, ROOT/<task>/{degraded,clean}/")
    run.add_argument("--out", required=True, help="run folder (fold models, medium images, checkpoints, report)")
    run.add_argument("--restorer", required=True, help="fold-model factory: 'module:callable' or 'file.py:callable', "
                     "e.g. examples.backbones:Restormer (the authors' fold model)")
    run.add_argument("--restorer-kwargs", help="JSON keyword arguments for the factory")
    run.add_argument("--tasks", nargs="+", metavar="TASK", help="use only these task folders (default: all)")
    run.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    run.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                     help="bf16 autocast for the fold models and the text tower (default: on CUDA only)")
    run.add_argument("--seed", type=int, default=0, help="fold model k uses seed + k; the prompts use seed")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")

    medium = run.add_argument_group("fold models and medium images (docs/method.md §1.2)")
    medium.add_argument("--folds", type=_positive_int, default=2, help="K")
    medium.add_argument("--restorer-steps", type=_positive_int, default=20_000)
    medium.add_argument("--restorer-crop", type=_positive_int, default=128)
    medium.add_argument("--restorer-batch", type=_positive_int, default=4)
    medium.add_argument("--restorer-lr", type=float, default=2e-4)
    medium.add_argument("--restorer-min-lr", type=float, default=1e-6)
    medium.add_argument("--restorer-repeat", nargs="*", default=[], metavar="TASK=N",
                        help="task repeat factors over the authors' (noise 1, haze 1, rain 120, blur 50, lowlight 40; "
                        "others 1)")
    medium.add_argument("--tile", type=int, default=512, help="render tile size (0: whole images)")
    medium.add_argument("--overlap", type=int, default=32, help="render tile overlap")
    medium.add_argument("--gate-band", type=float, nargs=2, default=[0.25, 0.85], metavar=("LOW", "HIGH"))
    medium.add_argument("--gate-min-improved", type=float, default=0.90)
    medium.add_argument("--gate-min-in-band", type=float, default=0.50)
    medium.add_argument("--require-gates", action="store_true", help="stop if a task fails the medium-image gates")
    medium.add_argument("--only-medium", action="store_true", help="stop after the gates (no prompts, no audit)")
    medium.add_argument("--rebuild", action="store_true", help="retrain the fold models, re-render the medium images "
                        "and restart the prompts in --out (results of other images or settings are otherwise refused)")

    prompts = run.add_argument_group("prompts and audit (docs/method.md §1.1, §1.3)")
    prompts.add_argument("--clip-model", default="ViT-B-32-quickgelu",
                         help="open_clip name; perceive-tiny-clip (with --pretrained '') for smoke runs")
    prompts.add_argument("--pretrained", default="openai", help="open_clip weight tag ('' for none)")
    prompts.add_argument("--n-ctx", type=_positive_int, default=16)
    prompts.add_argument("--tier-words", nargs=3, default=["terrible", "mediocre", "excellent"])
    prompts.add_argument("--prompt-steps", type=_positive_int, default=100_000)
    prompts.add_argument("--prompt-batch", type=_positive_int, default=32, help="triplets per step (3x images)")
    prompts.add_argument("--prompt-lr", type=float, default=4e-5)
    prompts.add_argument("--prompt-min-lr", type=float, default=1e-6)
    prompts.add_argument("--prompt-weight-decay", type=float, default=0.01, help="AdamW's default, as the authors")
    prompts.add_argument("--prompt-crop", type=_positive_int, help="shared crop size (default: the CLIP input size)")
    prompts.add_argument("--task-balanced", action=argparse.BooleanOptionalAction, default=True)
    prompts.add_argument("--checkpoint-every", type=_positive_int, default=500)
    prompts.add_argument("--workers", type=int, help="prompt-batch loader processes (default: 8 on CUDA, 0 on CPU)")
    prompts.add_argument("--holdout-fold", type=int, help="train the prompts without this fold and audit on it")
    prompts.add_argument("--audit-root", help="test data ROOT/<task>/{degraded,clean}/ to audit on")
    prompts.add_argument("--audit-views", choices=("five", "center", "whole"), default="five")
    prompts.add_argument("--perceiver-out", help="where to save the perceiver (default: OUT/perceiver)")
    run.set_defaults(func=cmd_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perceive-ir", description="Perceive-IR components from the shell.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    score = commands.add_parser("score", help="quality tier, probabilities and q for images")
    score.add_argument("images", nargs="+", metavar="IMAGE")
    _add_perceiver_args(score)
    score.add_argument("--json", action="store_true", help="print JSON instead of a table")
    score.add_argument("--batch-size", type=_positive_int, default=32)
    score.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    score.set_defaults(func=cmd_score)

    convert = commands.add_parser("convert", help="convert released weights into this library's format")
    kinds = convert.add_subparsers(dest="convert_command", required=True, metavar="KIND")
    authors = kinds.add_parser("authors-prompts", help="the Perceive-IR authors' stage-1 quality_prompts_*.pth")
    authors.add_argument("file", help="e.g. weight/stage1/quality_prompts_100000.pth")
    authors.add_argument("--out", required=True, help="perceiver folder to write (save_pretrained layout)")
    authors.add_argument("--clip-model", default="ViT-B-32-quickgelu", help="the CLIP the prompts were trained on")
    authors.add_argument("--pretrained", default="openai", help="its weight tag ('' for none)")
    authors.set_defaults(func=cmd_convert_authors_prompts)

    stage1 = commands.add_parser("stage1", help="stage 1: folds, medium images, prompt training, audit")
    steps = stage1.add_subparsers(dest="stage1_command", required=True, metavar="STEP")

    _add_run_parser(steps)

    split = steps.add_parser("split", help="pair ROOT/<task>/{degraded,clean} images and assign K folds")
    split.add_argument("root")
    split.add_argument("--out", required=True, help="pairs manifest to write (.jsonl)")
    split.add_argument("--folds", type=_positive_int, default=2)
    split.set_defaults(func=cmd_split)

    render = steps.add_parser("render", help="train fold restorers and render medium images")
    render.add_argument("--pairs", required=True)
    render.add_argument("--root", required=True)
    render.add_argument("--out", required=True)
    render.add_argument("--restorer", required=True, help="model factory: 'module:callable' or 'file.py:callable'")
    render.add_argument("--restorer-kwargs", help="JSON keyword arguments for the factory")
    render.add_argument("--folds", type=_positive_int, default=2)
    render.add_argument("--steps", type=_positive_int, default=20_000)
    render.add_argument("--crop-size", type=_positive_int, default=128)
    render.add_argument("--batch-size", type=_positive_int, default=4)
    render.add_argument("--lr", type=float, default=2e-4)
    render.add_argument("--tile", type=int, default=512, help="tile size (0: whole images)")
    render.add_argument("--overlap", type=int, default=32)
    render.add_argument("--bf16", action="store_true")
    render.add_argument("--device")
    render.add_argument("--rebuild", "--overwrite", action="store_true", dest="rebuild",
                        help="retrain every fold model and re-render every medium image in --out (stored results "
                        "made from other images or settings are otherwise refused)")
    render.set_defaults(func=cmd_render)

    gates = steps.add_parser("gates", help="per-task sanity gates of the medium images")
    _add_triplet_args(gates)
    gates.add_argument("--json", action="store_true")
    gates.set_defaults(func=cmd_gates)

    train = steps.add_parser("train-prompts", help="learn the tier prompts on triplets")
    _add_triplet_args(train)
    train.add_argument("--out", required=True, help="folder for the trained perceiver (save_pretrained)")
    train.add_argument("--clip-model", default="ViT-B-32-quickgelu")
    train.add_argument("--pretrained", default="openai")
    train.add_argument("--n-ctx", type=_positive_int, default=16)
    train.add_argument("--init", help="start from this perceiver (repo id or folder) instead of fresh prompts")
    train.add_argument("--steps", type=_positive_int, default=100_000)
    train.add_argument("--batch-size", type=_positive_int, default=32)
    train.add_argument("--lr", type=float, default=4e-5)
    train.add_argument("--min-lr", type=float, default=1e-6, help="end of the cosine decay")
    train.add_argument("--weight-decay", type=float, default=0.01, help="AdamW's (the authors use its default, 0.01)")
    train.add_argument("--crop-size", type=_positive_int, help="default: the CLIP input size")
    train.add_argument("--checkpoint", help="resumable state file")
    train.add_argument("--checkpoint-every", type=_positive_int, default=500)
    train.add_argument("--workers", type=int, default=0)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--bf16", action="store_true")
    train.add_argument("--device")
    train.set_defaults(func=cmd_train_prompts)

    audit = steps.add_parser("audit", help="tier accuracy, strict and monotonic rates per task")
    _add_perceiver_args(audit)
    _add_triplet_args(audit)
    audit.add_argument("--views", choices=("five", "center", "whole"), default="five")
    audit.add_argument("--json", action="store_true")
    audit.add_argument("--record", action="store_true", help="write the audit into the perceiver folder")
    audit.add_argument("--device")
    audit.set_defaults(func=cmd_audit)

    from .negatives.cli import register as register_cache

    register_cache(commands)  # perceive-ir cache render|inspect
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        code = args.func(args)
    except (CommandError, FileNotFoundError, ValueError, TypeError, RuntimeError, OSError) as error:
        print(f"perceive-ir: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
