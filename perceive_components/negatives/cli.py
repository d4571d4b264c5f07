"""``perceive-ir cache``: render proxy restorers into a render cache, or inspect one.

    perceive-ir cache render --cache runs/proxies --slot promptir --model mypkg.proxies:build_promptir \\
        --checkpoint promptir.ckpt --input-root data/train --manifest data/train.jsonl --device cuda
    perceive-ir cache inspect --cache runs/proxies --input-root data/train --manifest data/train.jsonl

Every entry records a fingerprint of its input's pixels: re-running ``render`` over inputs that changed since
(another data set with the same file names) stops with the list of them until ``--overwrite`` is given, and
``inspect`` with a data set lists missing, stale and unverified entries.

``--model`` names a callable ``MODULE:NAME`` (or ``path/to/file.py:NAME``) that returns the restorer as an
``nn.Module``; ``--checkpoint`` optionally loads weights into it strictly (safetensors, or a torch file
read with ``weights_only=True``; ``params``/``state_dict``/``model`` wrappers and a ``net.``/``module.``
prefix shared by every key are unwrapped).
"""
from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from ..ops.imports import load_callable
from .cache import FILE_FORMATS, RenderCache
from .items import items_from_folder, items_from_manifest

PROBLEMS = ("missing", "stale", "unverified")  # what ``inspect`` lists per slot (``RenderCache.problems``)
PRECISIONS = {"auto": "auto", "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``cache`` subcommand (``render``, ``inspect``) to the ``perceive-ir`` parser."""
    parser = subparsers.add_parser("cache", help="render proxy restorers once over a data set; inspect a cache",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="cache_command", required=True)

    render = commands.add_parser("render", help="render one proxy model into a cache slot (resumable)")
    render.add_argument("--cache", required=True, help="cache folder (created if missing)")
    render.add_argument("--slot", required=True, help="slot name: one negative k; several fold models may share it")
    render.add_argument("--model", required=True, help="MODULE:CALLABLE or file.py:CALLABLE returning the nn.Module")
    render.add_argument("--model-kwargs", default="{}", help="JSON object of keyword arguments for the callable")
    render.add_argument("--checkpoint", help="weights loaded strictly into the built model")
    _add_items_arguments(render, required=True)
    render.add_argument("--fold", type=int, help="render only the manifest rows of this fold")
    render.add_argument("--tasks", help="comma-separated tasks this slot covers (default: all tasks)")
    render.add_argument("--tile", type=int, default=512, help="tile size, 0 = whole images (default 512)")
    render.add_argument("--overlap", type=int, default=32)
    render.add_argument("--multiple", type=int, default=8, help="reflect-pad to this multiple (default 8)")
    render.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    render.add_argument("--precision", choices=sorted(PRECISIONS), default="auto", help="auto: bf16 on CUDA")
    render.add_argument("--format", choices=FILE_FORMATS, default="png", help="file format of a new cache")
    render.add_argument("--overwrite", action="store_true",
                        help="re-render entries that already exist (needed when their inputs changed)")
    render.set_defaults(func=run_render)

    inspect = commands.add_parser("inspect", help="slots, coverage, entry counts; missing and stale entries for a "
                                  "data set")
    inspect.add_argument("--cache", required=True)
    _add_items_arguments(inspect, required=False)
    inspect.set_defaults(func=run_inspect)
    return parser


def _add_items_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--input-root", required=required, help="folder of the degraded input images")
    parser.add_argument("--manifest", help='JSONL: {"input": path relative to --input-root, "task": …, "fold": …}')
    parser.add_argument("--task", help="task of every image under --input-root (without a manifest)")


def _items(args: argparse.Namespace):
    if args.manifest:
        if args.task:
            raise SystemExit("error: give either --manifest (tasks per row) or --task, not both")
        items = items_from_manifest(args.manifest, args.input_root)
    else:
        items = items_from_folder(args.input_root, args.task)
    fold = getattr(args, "fold", None)
    return items if fold is None else [item for item in items if item.fold == fold]


def build_model(spec: str, kwargs: dict) -> nn.Module:
    """Call ``MODULE:CALLABLE`` / ``file.py:CALLABLE`` with ``kwargs``; it must return an ``nn.Module``."""
    model = load_callable(spec, "--model")(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model {spec} returned {type(model).__name__}, not an nn.Module")
    return model


def load_weights(model: nn.Module, path: str) -> None:
    """Load a checkpoint into ``model`` with ``strict=True`` (no arbitrary unpickling)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("params", "params_ema", "state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    for prefix in ("net.", "module."):
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
    model.load_state_dict(state, strict=True)


def run_render(args: argparse.Namespace) -> int:
    model = build_model(args.model, json.loads(args.model_kwargs))
    if args.checkpoint:
        load_weights(model, args.checkpoint)
    model = model.to(args.device)
    cache = RenderCache(args.cache, create=True, file_format=args.format)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    counts = cache.render(args.slot, model, _items(args), tasks=tasks, tile=args.tile or None, overlap=args.overlap,
                          multiple=args.multiple, autocast_dtype=PRECISIONS[args.precision], overwrite=args.overwrite)
    print(json.dumps({"cache": str(cache.root), "slot": args.slot, **counts}))
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    cache = RenderCache(args.cache)
    report = cache.summary()
    if args.input_root:
        problems = cache.problems(_items(args), progress=True)
        for kind in PROBLEMS:
            report[kind] = {slot: {"count": len(found[kind]), "first": found[kind][:5]}
                            for slot, found in problems.items()}
    print(json.dumps(report, indent=2))
    return 1 if any(v["count"] for kind in PROBLEMS for v in report.get(kind, {}).values()) else 0
