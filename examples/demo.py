"""The main demo: the two-stage Perceive-IR pipeline, at tiny scale, on bundled public-domain images.

    python examples/demo.py --out outputs/demo          (`make demo` sets up and runs this)

**What runs** (``--recipe``). Offline, CLIP, DINOv2 and VGG can only be random networks, and through a random
network the CLIP-aware and perceptual terms are no objective (they leave a periodic texture in the outputs) and
SGM's priors carry no semantics. So ``--recipe auto`` (default) runs:

- ``offline`` when pretrained weights are missing: the Perceive-IR parts that learn from the data alone — the
  adapter's CFE and PGMs with L1 + λ1·L_cl — against the bare backbone; stage 1 runs with the library's tiny
  random CLIP (it shows that stage 1 runs; the stage-2 run does not use its perceiver);
- ``full`` when OpenAI CLIP ViT-B/32, DINOv2-B and VGG-16 are in the Hugging Face cache or the Hub answers:
  everything, with those weights (much slower on a CPU).

``--recipe full --weights tiny`` runs everything offline on tiny random networks. ``report.md`` lists which
modules and terms ran and why, and explains every row a reader would question.

Stage 1 (``perceive_components.stage1.run_stage1``, the library's one way to run it):

1. synthesise degraded versions (noise σ 25, haze, rain) of the bundled images → data/<task>/{degraded,clean}
2. ``run_stage1``: 2 folds by the hash of each clean image's relative path, a small restorer per fold trained on
   the other fold renders its medium images, the gates, prompts learned on fold 0, audit on the held-out fold 1,
   the perceiver saved (``perceiver/``) and the stage-1 report (``stage1/report.md``)
3. a figure of the held-out audit: q per tier, probabilities per triplet

Stage 2 (``demo_stage2.py``), on 9 of the images, 3 held out: the stage-2 layout and test sets, proxy negatives
(full recipe), a small backbone (``restormer-tiny``) trained with the Perceive-IR recipe and bare with L1 for the
same steps, both evaluated on the held-out images. Then ``report.md`` (``demo_report.py``).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)] + ([str(HERE)] if str(HERE) not in sys.path else [])  # checkout, no install

from perceive_components import QualityPerceiver  # noqa: E402
from perceive_components.data import add_gaussian_noise, add_haze, add_rain  # noqa: E402
from perceive_components.ops.io import list_images, read_image, write_image  # noqa: E402
from perceive_components.stage1 import (  # noqa: E402
    MediumSettings, PromptSettings, TripletImages, audit_perceiver, run_stage1,
)
from perceive_components.tiny import TINY_CLIP_NAME  # noqa: E402

from demo_report import write_report  # noqa: E402
from examples.train_restormer_perceive import is_self_guided  # noqa: E402
from demo_stage2 import RECIPES, Stage2Settings, run_stage2  # noqa: E402

IMAGES = HERE / "data" / "demo_images"
TASKS = {
    "noise": lambda x, g: add_gaussian_noise(x, 25.0, g),
    "haze": lambda x, g: add_haze(x, 1.6, g),
    "rain": lambda x, g: add_rain(x, 0.7, g),
}
# The pretrained frozen networks of the full recipe: how open_clip / timm name them (their Hub repos are looked up).
CLIP_NAME, CLIP_TAG = "ViT-B-32-quickgelu", "openai"
DINOV2_NAME, VGG_NAME = "vit_base_patch14_dinov2.lvd142m", "vgg16.tv_in1k"
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors", "pytorch_model.bin")


class GatedBlock(nn.Module):
    """conv → GELU → scaled by a global-pool gate (sees image-wide statistics: haze vs noise), residual."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(width, width, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv(x))
        return x + y * self.gate(y)


class SmallRestorer(nn.Module):
    """A small all-in-one restorer (≈ 9 k parameters), a CPU stand-in for the authors' Restormer fold models.

    The last convolution starts at zero, so the untrained model is the identity.
    """

    def __init__(self, width: int = 16, blocks: int = 3) -> None:
        super().__init__()
        self.head = nn.Conv2d(3, width, 3, padding=1)
        self.body = nn.Sequential(*[GatedBlock(width) for _ in range(blocks)])
        self.tail = nn.Conv2d(width, 3, 3, padding=1)
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.tail(self.body(self.head(x)))


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when downloads can work: not forced offline and huggingface.co answers on port 443."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def pretrained_repos() -> dict[str, str]:
    """The Hugging Face repo of each pretrained frozen network, as open_clip and timm resolve them."""
    import open_clip
    from timm.models import get_pretrained_cfg

    return {"CLIP ViT-B/32 (OpenAI)": open_clip.get_pretrained_cfg(CLIP_NAME, CLIP_TAG)["hf_hub"].rstrip("/"),
            "DINOv2-B/14": get_pretrained_cfg(DINOV2_NAME).hf_hub_id,
            "VGG-16": get_pretrained_cfg(VGG_NAME).hf_hub_id}


def pretrained_status(cache_dir: str | os.PathLike | None = None, reachable: bool | None = None) -> dict[str, str]:
    """For each pretrained frozen network: ``"cached"`` (weights in the Hugging Face cache), ``"downloadable"``
    (not cached, the Hub answers) or ``"missing"``. Nothing is downloaded."""
    from huggingface_hub import try_to_load_from_cache

    reachable = hub_reachable() if reachable is None else reachable
    status = {}
    for network, repo in pretrained_repos().items():
        cached = any(isinstance(try_to_load_from_cache(repo, name, cache_dir=cache_dir), str) for name in WEIGHT_FILES)
        status[network] = "cached" if cached else ("downloadable" if reachable else "missing")
    return status


def choose(recipe: str, weights: str, status: dict[str, str]) -> tuple[str, str]:
    """``(recipe, weights)`` with ``"auto"`` resolved: pretrained weights and the full recipe when every network
    is cached or downloadable, else tiny random networks and the offline recipe."""
    available = all(state != "missing" for state in status.values())
    weights = ("pretrained" if available else "tiny") if weights == "auto" else weights
    if weights == "pretrained" and not available:
        missing = [network for network, state in status.items() if state == "missing"]
        raise ValueError(f"--weights pretrained: no cached weights and no Hub for {missing}; use --weights tiny")
    recipe = ("full" if weights == "pretrained" else "offline") if recipe == "auto" else recipe
    return recipe, weights


def synthesise(out: Path, seed: int = 0) -> Path:
    """Write data/<task>/{clean,degraded}/<name>.png for every bundled image and task."""
    data = out / "data"
    generator = torch.Generator().manual_seed(seed)
    for path in list_images(IMAGES):
        clean = read_image(path)[None]
        for task, degrade in TASKS.items():
            write_image(data / task / "clean" / path.name, clean[0])
            write_image(data / task / "degraded" / path.name, degrade(clean, generator)[0])
    return data


def save_figure(perceiver: QualityPerceiver, triplets: TripletImages, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    qs, probs, tasks = [], [], []
    with torch.no_grad():
        for index in range(len(triplets)):
            item = triplets[index]
            batch = torch.stack([item["low"], item["medium"], item["high"]])
            p = perceiver.probabilities(batch.to(perceiver.tier_values.device)).cpu()
            probs.append(p)
            qs.append((p @ perceiver.tier_values.cpu()).tolist())
            tasks.append(item["task"])
    qs_t, probs_t = torch.tensor(qs), torch.stack(probs)  # (N, 3), (N, 3 images, 3 tiers)
    names = ["degraded", "medium", "clean"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 2.2]})
    colours = {"noise": "tab:blue", "haze": "tab:orange", "rain": "tab:green"}
    for tier in range(3):
        for task in sorted(set(tasks)):
            values = [qs_t[i, tier] for i in range(len(tasks)) if tasks[i] == task]
            jitter = torch.linspace(-0.15, 0.15, len(values))
            left.scatter(tier + jitter, values, s=18, alpha=0.8, color=colours.get(task),
                         label=task if tier == 0 else None)
        left.hlines(qs_t[:, tier].mean(), tier - 0.3, tier + 0.3, color="black")
    left.set_xticks(range(3), names)
    left.set_ylabel("quality score q = Σ c·p_c  (0 … 2)")
    left.set_ylim(-0.05, 2.05)
    left.set_title("q per true tier (bar: mean)")
    left.legend(fontsize=8)
    stacked = probs_t.reshape(-1, 3)
    x = torch.arange(len(stacked))
    bottom = torch.zeros(len(stacked))
    for tier, (word, colour) in enumerate(zip(perceiver.tier_words, ["tab:red", "gold", "tab:green"])):
        right.bar(x, stacked[:, tier], bottom=bottom, color=colour, label=f"p({word})", width=0.9)
        bottom += stacked[:, tier]
    right.set_xticks(x, [f"{tasks[i // 3][0]}{i // 3}:{'dmc'[i % 3]}" for i in range(len(stacked))],
                     rotation=90, fontsize=6)
    right.set_ylabel("probability")
    right.set_title("tier probabilities per image (d = degraded, m = medium, c = clean)")
    right.legend(fontsize=8, loc="upper right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def stage1(args: argparse.Namespace, out: Path, device: torch.device, weights: str) -> dict:
    """Steps 1-3 (module docstring); returns the gates, the audits and which CLIP the perceiver used."""
    print("1) synthesising degraded images (noise σ25, haze, rain) ...")
    data = synthesise(out)
    real = weights == "pretrained"
    clip = "OpenAI CLIP ViT-B/32" if real else f"the library's tiny random CLIP ({TINY_CLIP_NAME})"
    print(f"2) stage 1 by run_stage1: two folds, a small restorer per fold, medium images, gates, prompts on {clip} "
          "learned on fold 0, audit on fold 1 ...")
    if not real:
        warnings.warn("no pretrained CLIP weights (--weights tiny, or none cached and no Hub): the perceiver uses a "
                      "tiny RANDOM CLIP, so its audit shows that stage 1 runs, not what prompts on CLIP achieve",
                      stacklevel=1)
    clip_settings = dict(clip_model=CLIP_NAME, pretrained=CLIP_TAG, lr=4e-4) if real else \
        dict(clip_model=TINY_CLIP_NAME, pretrained=None, lr=2e-3)
    result = run_stage1(
        data, out / "stage1", SmallRestorer, restorer_name="examples/demo.py:SmallRestorer",
        medium=MediumSettings(steps=args.restorer_steps, crop_size=48, batch_size=8, lr=3e-3,
                              task_repeats={"rain": 1}),  # 12 images per task: no resampling
        prompts=PromptSettings(n_ctx=8, steps=args.prompt_steps, batch_size=12, holdout_fold=1, **clip_settings),
        device=device, perceiver_out=out / "perceiver", rebuild=args.rebuild, progress=False)
    print("   " + result.report.read_text(encoding="utf-8").replace("\n", "\n   "))
    perceiver, audit = result.perceiver, result.audits["holdout_fold1"]
    train_audit = audit_perceiver(perceiver, TripletImages(result.triplets, data, folds=[0]), device=device,
                                  record=False)
    print(f"   (training fold: accuracy {train_audit['accuracy']:.3f}, monotonic {train_audit['monotonic']:.3f})")
    figure = out / "perceiver_demo.png"
    save_figure(perceiver, TripletImages(result.triplets, data, folds=[1]), figure, f"Held-out triplets — {clip}")
    print(f"3) saved {result.perceiver_dir} (prompts, config, model card), {result.report} and {figure}")
    return {"gates": result.gates, "audit": audit, "train_audit": train_audit, "real_clip": real}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/demo", help="output folder")
    parser.add_argument("--recipe", choices=("auto", *RECIPES), default="auto",
                        help="offline: the parts that learn without pretrained networks (CFE + PGM, L1 + λ1·L_cl); "
                        "full: everything (SGM, L_clip, L_dpl with proxies); auto: full when pretrained weights are "
                        "cached or downloadable, else offline")
    parser.add_argument("--weights", choices=("auto", "pretrained", "tiny"), default="auto",
                        help="CLIP, DINOv2 and VGG: pretrained (cached, or downloaded), tiny random networks, or auto "
                        "(pretrained when all are cached or the Hub answers)")
    parser.add_argument("--restorer-steps", type=int, default=500, help="stage 1: steps of each fold restorer")
    parser.add_argument("--prompt-steps", type=int, default=200, help="stage 1: prompt-learning steps")
    parser.add_argument("--rebuild", action="store_true", help="stage 1: make everything again in OUT/stage1 (other "
                        "settings than the stored results' are otherwise refused)")
    defaults = Stage2Settings()
    parser.add_argument("--backbone", default=defaults.backbone, help="stage 2: an examples/backbones registry name")
    parser.add_argument("--stage2-steps", type=int, default=defaults.steps, help="stage 2: steps of each run")
    parser.add_argument("--stage2-batch", type=int, default=defaults.batch_size)
    parser.add_argument("--stage2-crop", type=int, default=defaults.crop_size)
    parser.add_argument("--stage2-lr", type=float, default=defaults.lr, help="stage 2: AdamW lr of both runs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (the demo's models are small: 1 is fastest on a busy machine)")
    args = parser.parse_args(argv)
    try:
        if is_self_guided(args.backbone):
            parser.error(f"--backbone {args.backbone}: the paper's network has no bare version to compare with; "
                         "choose a backbone that PerceiveAdapter wraps (restormer, nafnet, promptir, or their -tiny)")
    except ValueError as error:  # unknown name: say so now, not after stage 1
        parser.error(str(error))
    status = pretrained_status(reachable=None if args.weights != "tiny" else False)
    try:
        recipe, weights = choose(args.recipe, args.weights, status)
    except ValueError as error:
        parser.error(str(error))
    if weights == "pretrained" and "downloadable" not in status.values():
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True  # all cached: load them without asking the Hub
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    out = Path(args.out)
    print(f"recipe {recipe!r}, weights {weights!r} (pretrained weights: "
          f"{', '.join(f'{name} {state}' for name, state in status.items())})")

    stage1_results = stage1(args, out, torch.device(args.device), weights)
    seconds = {"stage 1": time.perf_counter() - started}
    settings = Stage2Settings(backbone=args.backbone, steps=args.stage2_steps, batch_size=args.stage2_batch,
                              crop_size=args.stage2_crop, lr=args.stage2_lr, recipe=recipe,
                              frozen="pretrained" if weights == "pretrained" else "tiny", device=args.device)
    stage2 = run_stage2(out, out / "data", out / "stage1", SmallRestorer, settings)
    seconds["stage 2"] = time.perf_counter() - started - seconds["stage 1"]
    choice = {"recipe": recipe, "weights": weights, "pretrained": status}
    (out / "report.json").write_text(json.dumps({**stage1_results, **choice, "stage2": stage2, "seconds": seconds},
                                                indent=2, ensure_ascii=False), encoding="utf-8")
    command = "python examples/demo.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = write_report(out, **stage1_results, **choice, stage2=stage2, seconds=seconds, command=command.strip())
    print(f"wrote {report} (tables, grids, curves) and {out / 'report.json'}")
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
