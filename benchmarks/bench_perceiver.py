"""Scoring throughput of QualityPerceiver vs a bare CLIP ``encode_image`` of the same model, same run.

    python benchmarks/bench_perceiver.py [--device cuda] [--bf16] [--batch 32] [--repeats 20]

Both paths get the same batch of 224² images. The bare path is ``clip.encode_image`` on an
already-normalised tensor (the least work any scorer must do); ours is ``perceiver.score`` on [0, 1]
images: input validation, clamp, normalisation, image encoder, cached prompt features, softmax and q.
For reference it also times the scorer *without* the text-feature cache (text tower every call).
Timings alternate between the paths and report the median; the ratio is what the claim is about.
Architecture: ViT-B/32 (QuickGELU) with random weights — the same compute as the OpenAI weights, which
cannot be downloaded on the development machines.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perceive_components import QualityPerceiver  # noqa: E402
from timing import timer  # noqa: E402  (benchmarks/timing.py)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--bf16", action="store_true", help="run both paths under bf16 autocast")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    import open_clip

    device = torch.device(args.device)
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).to(device).eval()
    perceiver = QualityPerceiver(clip=clip, pretrained=None).to(device)
    uncached = QualityPerceiver(clip=clip, pretrained=None).to(device)
    perceiver.freeze_prompts()
    images = torch.rand(args.batch, 3, 224, 224, device=device)
    normalised = (images - perceiver.mean) / perceiver.std
    run = timer(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def bare():
        with torch.inference_mode(), autocast:
            clip.encode_image(normalised, normalize=True)

    def ours():
        with torch.inference_mode(), autocast:
            perceiver.score(images)

    def no_cache():  # what scoring costs when the three prompt features are re-encoded every call
        with torch.inference_mode(), autocast:
            features = uncached.encode_images(images)
            (uncached.logit_scale * features @ uncached.encode_prompts().t()).softmax(-1) @ uncached.tier_values

    for fn in (bare, ours, no_cache):
        fn()
        fn()
    times: dict[str, list[float]] = {"bare": [], "ours": [], "no_cache": []}
    for _ in range(args.repeats):
        for name, fn in (("bare", bare), ("ours", ours), ("no_cache", no_cache)):
            times[name].append(run(fn))
    median = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "machine": machine(device), "batch": args.batch, "bf16": args.bf16, "repeats": args.repeats,
        "images_per_s": {name: args.batch / t for name, t in median.items()},
        "throughput_ratio_ours_vs_bare": median["bare"] / median["ours"],
        "throughput_ratio_uncached_vs_bare": median["bare"] / median["no_cache"],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
