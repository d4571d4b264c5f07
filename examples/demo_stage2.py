"""Stage 2 of the demo (``examples/demo.py``): one small backbone trained with the Perceive-IR recipe and, as
the baseline, bare with L1 for the same steps; both evaluated on held-out images.

Everything runs through the example scripts' own functions, in this process:

1. **Data** (``make_layout``): the stage-1 images — the same files — in the stage-2 layout (docs/data.md):
   9 images per task for training, 3 held out (``HELD_OUT``: no crop of their source photographs is in the
   training split), and the held-out test sets in ``evaluate.py``'s layout: noise σ 15/25/50 (one fixed
   realisation each), haze, rain.
2. **Proxy negatives** (``make_proxy_cache``, full recipe only: L_dpl is their one user):
   ``prepare_proxy_inputs.prepare`` writes every training input (noise fixed by a seed) and its manifest; each
   stage-1 fold model renders the inputs of the fold it never trained on into the slot ``stage1`` of a render
   cache: K = 1 proxy negative per crop.
3. **Perceive-IR** (``train_restormer_perceive.main``): the backbone in ``PerceiveAdapter``. ``recipe="offline"``:
   CFE and PGMs with L1 + λ1·L_cl (``--no-sgm --clip-weight 0 --dpl-weight 0 --no-proxies``: the parts that learn
   without pretrained networks); ``"full"``: also SGM and λ2·L_clip + λ3·L_dpl with the stage-1 perceiver (loaded
   back from its saved folder), DINOv2 and VGG (``frozen``: ``"tiny"`` random networks or ``"pretrained"``).
   ``recipe_parts`` says what ran and why.
4. **Baseline** (``train_plain.main``): the same backbone, bare, L1; same steps, batch, crop, learning rate
   and seed, so both start from the same backbone weights (the adapter starts as the bare backbone).
5. **Evaluation** (``evaluate.main``; ``--run`` for the Perceive-IR run): whole images, fp32, PSNR/SSIM on
   8-bit RGB per set and their average; the restored images are kept for the report's grids.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from safetensors.torch import load_file
from torch import nn

from examples import evaluate, train_plain, train_restormer_perceive
from examples.prepare_proxy_inputs import INPUTS_FOLDER, prepare
from perceive_components import QualityPerceiver
from perceive_components.data import LAYOUTS, NOISE_SIGMAS, TASK_FOLDERS, PairedTestSet, find_pairs
from perceive_components.negatives import RenderCache, items_from_manifest
from perceive_components.ops.io import list_images, write_image
from perceive_components.stage1 import read_jsonl, write_jsonl

HELD_OUT = ("retina_0.png", "rocket_0.png", "rocket_1.png")
TASKS = LAYOUTS["3task"]
SLOT = "stage1"
NOISE_SEED = 0
RUNS = {"bare": "bare (L1)", "perceive-ir": "Perceive-IR"}  # run folder → row label
RECIPES = ("offline", "full")


@dataclass(frozen=True)
class Stage2Settings:
    """What both stage-2 runs share (defaults: about a minute each on one CPU thread)."""

    backbone: str = "restormer-tiny"
    steps: int = 150
    batch_size: int = 8
    crop_size: int = 64
    lr: float = 2e-3
    recipe: str = "offline"  # "offline": CFE + PGM, L1 + λ1·L_cl; "full": + SGM, λ2·L_clip, λ3·L_dpl (proxies)
    frozen: str = "tiny"  # CLIP, DINOv2 and VGG where the recipe uses them: tiny random nets, or "pretrained"
    device: str = "cpu"


@dataclass(frozen=True)
class Part:
    """One module or loss term of the Perceive-IR run: whether it ran, and why."""

    name: str
    ran: bool
    why: str


def recipe_parts(recipe: str, frozen: str) -> list[Part]:
    """What the Perceive-IR run of ``recipe`` uses, with the reason (the report's table)."""
    full, pretrained = recipe == "full", frozen == "pretrained"
    random_note = ("pretrained weights" if pretrained else
                   "with tiny RANDOM weights (--recipe full offline): the code path runs, but this is no objective")
    return [
        Part("L1(R, G)", True, "the restoration term, as in the bare run"),
        Part("CFE + λ1·L_cl (contrastive)", True, "learns from the data alone: L_cl pulls the embeddings of two crops "
             "of one degraded image together and pushes other degradations away"),
        Part("PGM (FiLM on every decoder level)", True, "learns from the data, driven by CFE's embedding; it starts "
             "at zero, so the adapter starts as the bare backbone"),
        Part("SGM (frozen DINOv2 priors)", full, random_note if full else
             "offline its DINOv2 could only be a random network, whose features are no semantic prior"),
        Part("λ2·L_clip (CLIP-aware, stage-1 perceiver)", full, random_note if full else
             "offline the perceiver's CLIP is random, so its quality score is no objective; its gradient leaves a "
             "fine periodic texture in the outputs"),
        Part("λ3·L_dpl (difficulty-adaptive perceptual) with proxy negatives", full, random_note if full else
             "offline its VGG-16 could only be random: distances in a random network are no objective (the same "
             "texture); the proxy negatives it compares against are not rendered"),
    ]


def make_layout(stage1_data: Path, root: Path, eval_root: Path) -> list[tuple[str, str]]:
    """Copy the stage-1 images to ``root/{train,test}/<task folders>`` and write the held-out test sets to
    ``eval_root/<set>/{degraded,target}/``; returns evaluate.py's ``(folder, label)`` of each set."""
    for task in TASKS:
        folders = TASK_FOLDERS[task]
        for clean in list_images(stage1_data / task / "clean"):
            split = root / ("test" if clean.name in HELD_OUT else "train")
            (split / folders.clean).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(clean, split / folders.clean / clean.name)  # same bytes: stage-1 folds match
            if folders.degraded is not None:
                (split / folders.degraded).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(stage1_data / task / "degraded" / clean.name, split / folders.degraded / clean.name)
    pairs = find_pairs(root / "test", TASKS, "test")
    test_sets = [(f"noise-sigma{sigma}", f"σ{sigma}", PairedTestSet(pairs["noise"], sigma, NOISE_SEED))
                 for sigma in NOISE_SIGMAS]
    test_sets += [(task, task, PairedTestSet(pairs[task])) for task in TASKS if task != "noise"]
    for folder, _, test_set in test_sets:
        for item in test_set:
            name = Path(item["path"]).name
            write_image(eval_root / folder / "degraded" / name, item["degraded"])
            write_image(eval_root / folder / "target" / name, item["target"])
    return [(folder, label) for folder, label, _ in test_sets]


def make_proxy_cache(root: Path, cache_dir: Path, stage1_dir: Path, stage1_data: Path,
                     restorer: Callable[[], nn.Module], device: str, crop_size: int) -> dict[str, int]:
    """Inputs + manifest by ``prepare_proxy_inputs.prepare``, then the stage-1 fold models render their folds."""
    inputs = cache_dir / INPUTS_FOLDER
    counts = prepare(root, inputs, layout="3task", noise_seed=NOISE_SEED, stage1_dir=str(stage1_dir),
                     stage1_data=str(stage1_data), crop_size=crop_size)
    # prepare() finds the fold by the clean file's bytes; here every task uses the same clean images (in
    # different folds per task), so the fold is looked up by task and file name instead.
    folds = {(row["task"], Path(row["clean"]).name): row["fold"] for row in read_jsonl(stage1_dir / "pairs.jsonl")}
    manifest = read_jsonl(inputs / "manifest.jsonl")
    for row in manifest:
        row["fold"] = folds[(row["task"], Path(row["input"]).name)]
    write_jsonl(inputs / "manifest.jsonl", manifest)
    cache = RenderCache(cache_dir, create=True)
    items = items_from_manifest(inputs / "manifest.jsonl", inputs)
    for fold in sorted({item.fold for item in items}):
        model = restorer()
        model.load_state_dict(load_file(str(stage1_dir / "folds" / f"fold{fold}.safetensors")), strict=True)
        rendered = cache.render(SLOT, model.to(device), [item for item in items if item.fold == fold], progress=False)
        counts[f"fold{fold}_rendered"] = rendered["rendered"]
    return counts


def train(settings: Stage2Settings, root: Path, cache_dir: Path | None, runs: Path,
          perceiver: QualityPerceiver | None) -> dict[str, float]:
    """Train the Perceive-IR run and the bare baseline; returns the seconds each took."""
    shared = ["--data", str(root), "--layout", "3task", "--repeat", "noise=1", "haze=1", "rain=1", "--no-val",
              "--backbone", settings.backbone, "--steps", str(settings.steps), "--batch-size", str(settings.batch_size),
              "--crop-size", str(settings.crop_size), "--lr", str(settings.lr), "--min-lr", str(settings.lr / 100),
              "--seed", "0", "--workers", "0", "--device", settings.device, "--resume", "never", "--no-tensorboard",
              "--log-every", str(max(1, settings.steps // 30)), "--ckpt-every", str(settings.steps)]
    seconds = {}
    started = time.perf_counter()
    terms = (["--proxy-cache", str(cache_dir)] if settings.recipe == "full" else
             ["--no-sgm", "--clip-weight", "0", "--dpl-weight", "0", "--no-proxies"])
    train_restormer_perceive.main(shared + ["--frozen", settings.frozen, *terms, "--no-bf16", "--out-dir",
                                            str(runs / "perceive-ir")], perceiver=perceiver)
    seconds["perceive-ir"] = time.perf_counter() - started
    started = time.perf_counter()
    train_plain.main(shared + ["--out-dir", str(runs / "bare")])
    seconds["bare"] = time.perf_counter() - started
    return seconds


def evaluate_runs(settings: Stage2Settings, eval_root: Path, specs: list[tuple[str, str]], runs: Path
                  ) -> dict[str, dict[str, tuple[float, float, int]]]:
    """``{row label: evaluate.summarise(...)}`` for the degraded inputs, the bare run and the Perceive-IR run."""
    sets = evaluate.discover_sets(eval_root, specs)
    summaries = {"degraded input": evaluate.summarise(evaluate.evaluate(nn.Identity(), sets),
                                                      [s.label for s in sets])}
    shared = ["--data-root", str(eval_root), "--sets", *[f"{folder}={label}" for folder, label in specs],
              "--device", settings.device, "--save-images"]
    for folder, label in RUNS.items():
        network = (["--run", str(runs / folder)] if folder == "perceive-ir" else
                   ["--backbone", settings.backbone, "--checkpoint", str(runs / folder / "model.safetensors")])
        summaries[label] = evaluate.main(network + shared + ["--label", label, "--out", str(runs / folder / "eval")])
    return summaries


def run_stage2(out: Path, stage1_data: Path, stage1_dir: Path, restorer: Callable[[], nn.Module],
               settings: Stage2Settings) -> dict:
    """The whole of stage 2 under ``out/stage2`` (remade from scratch); returns what the report needs."""
    folder = out / "stage2"
    if folder.exists():
        shutil.rmtree(folder)  # derived from stage 1 in seconds; a stale cache or run must not be reused
    root, eval_root, cache_dir, runs = folder / "data", folder / "eval", folder / "proxy-cache", folder / "runs"
    print(f"4) stage-2 data: {len(HELD_OUT)} held-out images ({', '.join(HELD_OUT)}), the rest for training ...")
    specs = make_layout(stage1_data, root, eval_root)
    full = settings.recipe == "full"
    cache_counts, perceiver = {}, None
    if full:
        print("5) proxy negatives: each stage-1 fold model renders the fold it never trained on ...")
        cache_counts = make_proxy_cache(root, cache_dir, stage1_dir, stage1_data, restorer, settings.device,
                                        settings.crop_size)
        print(f"   {cache_counts['inputs']} training inputs rendered into {cache_dir} (slot {SLOT!r})")
        perceiver = QualityPerceiver.from_pretrained(out / "perceiver")  # the saved stage-1 perceiver, as users do
    ran = [part.name for part in recipe_parts(settings.recipe, settings.frozen) if part.ran]
    print(f"6) training {settings.backbone} for {settings.steps} steps twice: Perceive-IR ({settings.recipe} recipe: "
          f"{'; '.join(ran)}) and bare with L1 ...")
    seconds = train(settings, root, cache_dir if full else None, runs, perceiver)
    print(f"   Perceive-IR {seconds['perceive-ir']:.0f} s, bare {seconds['bare']:.0f} s")
    print("7) evaluation on the held-out images (whole images, fp32, 8-bit PSNR/SSIM):")
    summaries = evaluate_runs(settings, eval_root, specs, runs)
    saved = {name: sum(t.numel() for t in load_file(str(runs / name / "model.safetensors")).values()) for name in RUNS}
    result = {"settings": asdict(settings), "held_out": list(HELD_OUT), "sets": specs, "cache": cache_counts,
              "parts": [asdict(part) for part in recipe_parts(settings.recipe, settings.frozen)],
              "train_seconds": seconds, "parameters": saved, "summaries": summaries,
              "runs": {name: str(runs / name) for name in RUNS}, "eval_root": str(eval_root)}
    (folder / "results.json").write_text(json.dumps(result, indent=2, ensure_ascii=False), encoding="utf-8")
    return result


__all__ = ["HELD_OUT", "RECIPES", "RUNS", "Part", "Stage2Settings", "evaluate_runs", "make_layout", "make_proxy_cache",
           "recipe_parts", "run_stage2", "train"]
