"""Prepare the inputs of a proxy render cache for stage 2: every distinct degraded training image, at the
key the training items use, with the stage-1 fold of each (docs/training.md, "Proxy negatives").

    python examples/prepare_proxy_inputs.py --data /data/allinone --layout 3task --noise-seed 0 \\
        --cache runs/proxy-cache --stage1-dir runs/stage1 --stage1-data /data/stage1/train

writes ``<cache>/inputs/``:

- ``<key>``: a symlink to each degraded training file (``haze/hazy/…``, ``rain/rainy/…``) and, for synthetic
  noise, the one fixed realisation per (image, σ) of ``--noise-seed`` as a lossless PNG ``noise/sigma25/<name>.png``
  (the training set draws exactly these images when it gets the same ``--noise-seed``);
- ``manifest.jsonl``: ``{"input": key, "task": …, "fold": k}`` for ``perceive-ir cache render --manifest``;
- ``settings.json``: layout, σ's, noise seed (the training scripts read the seed from here).

Folds: the stage-1 fold restorer k was trained on every fold but k, so it renders fold k. A training image
gets the fold of the stage-1 pair whose clean file has the same bytes (``--stage1-dir``/pairs.jsonl under
``--stage1-data``), whatever the two layouts call it; images stage 1 never saw get the hash fold of their
key. Then render each fold model into one slot::

    for k in 0 1; do perceive-ir cache render --cache runs/proxy-cache --slot stage1 \\
        --model examples.backbones:create_backbone --model-kwargs '{"name": "restormer"}' \\
        --checkpoint runs/stage1/folds/fold$k.safetensors --fold $k \\
        --input-root runs/proxy-cache/inputs --manifest runs/proxy-cache/inputs/manifest.jsonl; done
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm.auto import tqdm  # noqa: E402

from perceive_components.data import LAYOUTS, NOISE_SIGMAS, AllInOneTrainSet  # noqa: E402
from perceive_components.ops.checkpoint import atomic_write  # noqa: E402
from perceive_components.ops.io import write_image  # noqa: E402
from perceive_components.stage1 import fold_of, read_jsonl, write_jsonl  # noqa: E402

log = logging.getLogger("prepare_proxy_inputs")

NOISE_PREFIX = "noise/sigma"
INPUTS_FOLDER = "inputs"  # <cache>/inputs/: the inputs, manifest.jsonl and settings.json written here


def cache_key(path: str) -> str:
    """Render-cache key of a training item's ``path``: itself, or a PNG name for synthesised noise
    (``noise/sigma25/x.png`` stays, ``noise/sigma25/x.jpg`` becomes ``noise/sigma25/x.jpg.png``)."""
    if path.startswith(NOISE_PREFIX) and not path.lower().endswith(".png"):
        return f"{path}.png"
    return path


def task_of_key(path: str) -> str:
    """``'haze/hazy/0001_0.8_0.2.jpg'`` → ``'haze'`` (every key starts with its task folder)."""
    return path.partition("/")[0]


def recorded_noise_seed(cache: str | os.PathLike) -> int | None:
    """The noise seed a cache's inputs were written with (``<cache>/inputs/settings.json``), if recorded."""
    path = Path(cache) / INPUTS_FOLDER / "settings.json"
    return json.loads(path.read_text(encoding="utf-8")).get("noise_seed") if path.is_file() else None


def file_digest(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stage1_folds(stage1_dir: Path, stage1_data: Path) -> tuple[dict[str, int], int]:
    """{sha1 of a stage-1 clean file: its fold} and K, from ``<stage1_dir>/pairs.jsonl``."""
    rows = read_jsonl(stage1_dir / "pairs.jsonl", required=("clean", "fold"))
    fold_by_clean = {row["clean"]: int(row["fold"]) for row in rows}
    folds = {file_digest(stage1_data / clean): fold
             for clean, fold in tqdm(sorted(fold_by_clean.items()), desc="hash stage-1 clean images")}
    return folds, max(fold_by_clean.values()) + 1


def prepare(data: str | os.PathLike, out: str | os.PathLike, *, layout: str = "3task", noise_seed: int = 0,
            sigmas: Sequence[int] = NOISE_SIGMAS, stage1_dir: str | None = None, stage1_data: str | None = None,
            folds: int = 2, crop_size: int = 256) -> dict[str, int]:
    """Write the inputs, manifest and settings (module docstring); returns counts for the report.

    ``crop_size``: the training crop; clean images smaller than it are resized to hold it before the noise
    (the authors' rule), so the noisy inputs depend on it."""
    train_set = AllInOneTrainSet(data, layout, sigmas=sigmas, noise_seed=noise_seed, crop_size=crop_size)
    out = Path(out)
    by_digest: dict[str, int] = {}
    if stage1_dir:
        if not stage1_data:
            raise ValueError("--stage1-dir needs --stage1-data, the stage-1 data root its pairs.jsonl is relative to")
        by_digest, folds = stage1_folds(Path(stage1_dir), Path(stage1_data))
    noise_keys: dict[str, list[str]] = {}  # clean image name → its noisy keys, one per σ
    for key in train_set.cache_keys():
        if key.startswith(NOISE_PREFIX):
            noise_keys.setdefault(key.split("/", 2)[2], []).append(key)
    rows, counts = [], {"inputs": 0, "matched_stage1": 0, "hash_fold": 0}
    for task in train_set.tasks:
        for pair in tqdm(train_set.pairs[task], desc=f"{task} inputs"):
            fold = by_digest.get(file_digest(pair.clean)) if by_digest else None
            counts["matched_stage1" if fold is not None else "hash_fold"] += 1
            if fold is None:
                fold = fold_of(pair.key, folds)
            keys = [pair.key] if pair.degraded is not None else noise_keys[pair.key.removeprefix("noise/clean/")]
            for key in keys:
                target = out / cache_key(key)
                if pair.degraded is None:
                    if not target.is_file():
                        write_image(target, train_set.degraded_image(key))
                elif not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.symlink_to(pair.degraded.resolve())
                rows.append({"input": cache_key(key), "task": task_of_key(key), "fold": fold})
    counts["inputs"] = len(rows)
    write_jsonl(out / "manifest.jsonl", rows)
    settings = {"layout": list(train_set.tasks), "sigmas": list(train_set.sigmas), "noise_seed": noise_seed,
                "crop_size": crop_size,
                "data": str(Path(data).resolve()), "folds": folds, **counts}
    with atomic_write(out / "settings.json") as tmp:
        tmp.write_text(json.dumps(settings, indent=2), encoding="utf-8")
    if by_digest and counts["hash_fold"]:
        log.warning("%d training image(s) match no stage-1 clean image by content: they get the hash fold of their "
                    "path (no fold model trained on them, so any fold is right)", counts["hash_fold"])
    return counts


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="stage-2 data root holding train/ (docs/data.md)")
    parser.add_argument("--layout", default="3task", choices=sorted(LAYOUTS))
    parser.add_argument("--cache", required=True, help=f"render cache folder; inputs go to <cache>/{INPUTS_FOLDER}/")
    parser.add_argument("--noise-seed", type=int, default=0, help="seed of the fixed noise realisations")
    parser.add_argument("--sigmas", type=int, nargs="+", default=list(NOISE_SIGMAS))
    parser.add_argument("--crop-size", type=int, default=256, help="the training --crop-size (small clean images "
                        "are resized to hold it before the noise)")
    parser.add_argument("--stage1-dir", help="stage-1 output folder (pairs.jsonl with the folds)")
    parser.add_argument("--stage1-data", help="the stage-1 data root (pairs.jsonl paths are relative to it)")
    parser.add_argument("--folds", type=int, default=2, help="K when there is no --stage1-dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    counts = prepare(args.data, Path(args.cache) / INPUTS_FOLDER, layout=args.layout, noise_seed=args.noise_seed,
                     sigmas=args.sigmas, stage1_dir=args.stage1_dir, stage1_data=args.stage1_data, folds=args.folds,
                     crop_size=args.crop_size)
    print(json.dumps(counts))
    return counts


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"prepare_proxy_inputs.py: error: {error}") from None
