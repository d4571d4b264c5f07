"""The main demo: the whole two-stage Perceive-IR pipeline, at tiny scale, on bundled public-domain images.

    python examples/demo.py --out outputs/demo          (`make demo` sets up and runs this)

Stage 1 (this file):

1. synthesise degraded versions (noise σ 25, haze, rain) of the bundled images → data/<task>/{degraded,clean}
2. split into 2 folds by the hash of the clean image's relative path
3. train a small fold restorer per fold on the other fold and render medium images (tiled)
4. report the medium-image gates (PSNR-improved rate, progress r)
5. learn the "terrible / mediocre / excellent" prompts on fold-0 triplets
6. audit the perceiver on the held-out fold-1 triplets (and on the training fold)
7. save the perceiver (prompts + config + model card) and a figure: q per tier, probabilities per triplet

Stage 2 (``demo_stage2.py``), on 9 of the images, 3 held out:

8. the stage-2 data layout and the held-out test sets
9. proxy negatives: the stage-1 fold models render the training inputs into a render cache
10. a small backbone (``restormer-tiny``) trained with the Perceive-IR recipe (adapter + QualityAwareLoss with
    the saved perceiver), and the same backbone bare with L1 for the same steps
11. both evaluated on the held-out images (PSNR/SSIM per set and average)

Then ``report.md`` (``demo_report.py``): the tables of both stages, sample grids and loss curves as PNG.

Real CLIP weights (OpenAI ViT-B/32) are used when they can be downloaded; otherwise (offline, as on the
development machines) a tiny *random* CLIP stands in, with a plain warning. DINOv2 and VGG are tiny random
networks unless ``--frozen-nets pretrained``. With random frozen networks and a few hundred steps the numbers
only show that the pipeline works, not what the method achieves.
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
from perceive_components.cli import format_audit  # noqa: E402
from perceive_components.data import add_gaussian_noise, add_haze, add_rain  # noqa: E402
from perceive_components.ops.io import list_images, read_image, write_image  # noqa: E402
from perceive_components.stage1 import (  # noqa: E402
    TripletImages, audit_perceiver, build_triplets, medium_gates, scan_pairs, train_prompts,
)

from demo_report import write_report  # noqa: E402
from examples.train_restormer_perceive import is_self_guided  # noqa: E402
from demo_stage2 import Stage2Settings, run_stage2  # noqa: E402

IMAGES = HERE / "data" / "demo_images"
TASKS = {
    "noise": lambda x, g: add_gaussian_noise(x, 25.0, g),
    "haze": lambda x, g: add_haze(x, 1.6, g),
    "rain": lambda x, g: add_rain(x, 0.7, g),
}
TINY_CLIP = dict(embed_dim=64, quick_gelu=True,
                 vision_cfg=dict(image_size=64, layers=2, width=96, head_width=32, patch_size=8),
                 text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))


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


def save_tiny_clip(clip: nn.Module, folder: Path) -> str:
    """Save a CLIP as an open_clip ``local-dir:`` model so the saved perceiver can rebuild it by name."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return f"local-dir:{folder.resolve()}"


def make_perceiver(force_tiny: bool, out: Path) -> tuple[QualityPerceiver, bool]:
    if not force_tiny and hub_reachable():
        try:
            return QualityPerceiver(), True  # OpenAI ViT-B/32 (QuickGELU) from the Hub
        except RuntimeError as error:
            warnings.warn(f"real CLIP weights could not be loaded ({error}); using a tiny random CLIP", stacklevel=1)
    else:
        reason = "--tiny-clip was given" if force_tiny else "the Hugging Face Hub is not reachable (or HF_HUB_OFFLINE=1)"
        warnings.warn(f"{reason}: this demo uses a tiny RANDOM CLIP instead of OpenAI ViT-B/32, so its numbers "
                      "only show that the pipeline runs, not what the method achieves", stacklevel=1)
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.CLIP(**TINY_CLIP)
    name = save_tiny_clip(clip, out / "tiny-random-clip")
    return QualityPerceiver(clip_model=name, pretrained=None, n_ctx=8, clip=clip), False


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


def stage1(args: argparse.Namespace, out: Path, device: torch.device) -> dict:
    """Steps 1-7 (module docstring); returns the gates, audits and whether the CLIP was the real one."""
    print("1) synthesising degraded images (noise σ25, haze, rain) ...")
    data = synthesise(out)
    pairs = scan_pairs(data)
    print(f"   {len(pairs)} pairs in {data}")

    print("2-3) two folds, a small restorer per fold, medium images ...")
    manifest = build_triplets(SmallRestorer, pairs, data, out / "stage1", k=2, device=device, progress=False,
                              train_kwargs=dict(steps=args.restorer_steps, crop_size=48, batch_size=8, lr=3e-3))
    all_triplets = TripletImages(manifest, data, in_memory=True)
    print("4) medium-image gates (authors: PSNR improved ≥ 0.90, progress r mostly in [0.25, 0.85]):")
    gates = medium_gates(all_triplets)
    for task, row in [*gates["per_task"].items(), ("overall", gates["overall"])]:
        print(f"   {task:<8} n={row['n']:>3}  improved {row['psnr_improved_rate']:.2f}  r median "
              f"{row['r_median']:.2f}  r in band {row['r_in_band_rate']:.2f}  +{row['mean_psnr_gain_db']:.2f} dB")

    perceiver, real = make_perceiver(args.tiny_clip, out)
    perceiver.to(device)
    crop = perceiver.image_size[0]
    train_set = TripletImages(manifest, data, folds=[0], in_memory=True)
    held_out = TripletImages(manifest, data, folds=[1], in_memory=True)
    print(f"5) learning prompts on {len(train_set)} fold-0 triplets ({'OpenAI ViT-B/32' if real else 'tiny random CLIP'},"
          f" {args.prompt_steps} steps) ...")
    train_prompts(perceiver, train_set, steps=args.prompt_steps, batch_size=12, lr=2e-3 if not real else 4e-4,
                  crop_size=crop, device=device, progress=False, checkpoint=out / "prompts.ckpt")
    print(f"6) audit on the {len(held_out)} held-out fold-1 triplets:")
    report = audit_perceiver(perceiver, held_out, views="five", device=device)
    print("   " + format_audit(report).replace("\n", "\n   "))
    train_report = audit_perceiver(perceiver, train_set, views="five", device=device, record=False)
    print(f"   (training fold: accuracy {train_report['accuracy']:.3f}, monotonic {train_report['monotonic']:.3f})")

    perceiver.save_pretrained(out / "perceiver")
    figure = out / "perceiver_demo.png"
    save_figure(perceiver, held_out, figure, f"Held-out triplets — {'OpenAI ViT-B/32' if real else 'tiny random CLIP'}")
    print(f"7) saved {out / 'perceiver'} (prompts, config, model card) and {figure}")
    return {"gates": gates, "audit": report, "train_audit": train_report, "real_clip": real}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/demo", help="output folder")
    parser.add_argument("--restorer-steps", type=int, default=500, help="stage 1: steps of each fold restorer")
    parser.add_argument("--prompt-steps", type=int, default=200, help="stage 1: prompt-learning steps")
    parser.add_argument("--tiny-clip", action="store_true", help="never try to download CLIP weights")
    defaults = Stage2Settings()
    parser.add_argument("--backbone", default=defaults.backbone, help="stage 2: an examples/backbones registry name")
    parser.add_argument("--stage2-steps", type=int, default=defaults.steps, help="stage 2: steps of each run")
    parser.add_argument("--stage2-batch", type=int, default=defaults.batch_size)
    parser.add_argument("--stage2-crop", type=int, default=defaults.crop_size)
    parser.add_argument("--stage2-lr", type=float, default=defaults.lr, help="stage 2: AdamW lr of both runs")
    parser.add_argument("--frozen-nets", choices=("tiny", "pretrained"), default=defaults.frozen,
                        help="stage 2: DINOv2 and VGG as tiny random nets (offline) or pretrained (downloads)")
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
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    out = Path(args.out)

    stage1_results = stage1(args, out, torch.device(args.device))
    seconds = {"stage 1": time.perf_counter() - started}
    settings = Stage2Settings(backbone=args.backbone, steps=args.stage2_steps, batch_size=args.stage2_batch,
                              crop_size=args.stage2_crop, lr=args.stage2_lr, frozen=args.frozen_nets,
                              device=args.device)
    stage2 = run_stage2(out, out / "data", out / "stage1", SmallRestorer, settings)
    seconds["stage 2"] = time.perf_counter() - started - seconds["stage 1"]
    (out / "report.json").write_text(json.dumps({**stage1_results, "stage2": stage2, "seconds": seconds}, indent=2,
                                                ensure_ascii=False), encoding="utf-8")
    command = "python examples/demo.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = write_report(out, **stage1_results, stage2=stage2, seconds=seconds, command=command.strip())
    print(f"12) wrote {report} (tables, grids, curves) and {out / 'report.json'}")
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
