"""A short real training run of the stage-2 recipe next to the bare baseline, on the same card, in one process.

Runs ``examples/train_plain.py`` (bare Restormer + L1) and ``examples/train_restormer_perceive.py`` (Restormer in
PerceiveAdapter with DINOv2-B, CFE, PGM; L1 + L_cl + L_clip (CLIP ViT-B/32) + L_dpl (VGG-16) with K proxy
negatives read from a render cache) for ``--steps`` steps each, with the same data, crop, batch and precision,
and records the median step time (from the runs' own ``train_log.csv``, first ``--warmup`` steps dropped), the
peak device memory of each run and the card. Everything it needs is made on the spot, offline:

1. a small 3-task data root from the bundled demo images (``examples/make_synthetic_layout.py``, ``--size``²);
2. the proxy inputs (``examples/prepare_proxy_inputs.py``, fixed-seed noise) and a render cache with ``--proxies``
   slots, each rendered by a seeded random ``restormer-tiny`` (stand-ins: the step reads a cache entry per slot,
   whatever rendered it);
3. frozen networks with random weights (``--frozen random``: DINOv2-B, CLIP ViT-B/32, VGG-16 at full size, the
   compute of the pretrained ones) and untrained prompts. The losses' values mean nothing; the cost is real.

    python benchmarks/bench_stage2_run.py --device cuda --steps 200 --out /tmp/stage2-bench    # GPU, bf16
    python benchmarks/bench_stage2_run.py --tiny --steps 6 --crop-size 32 --batch-size 4 --size 48 --no-bf16 \\
        --warmup 2 --log-every 1 --out /tmp/stage2-smoke                                          # CPU smoke test

Writes ``<out>/results.json`` and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples import make_synthetic_layout, prepare_proxy_inputs, train_plain, train_restormer_perceive  # noqa: E402
from examples.backbones import create_backbone  # noqa: E402
from perceive_components.negatives import RenderCache, items_from_manifest  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="work folder (data, cache, runs, results.json)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20, help="first steps left out of the median")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop-size", type=int, default=256)
    parser.add_argument("--size", type=int, default=320, help="side of the synthetic images")
    parser.add_argument("--proxies", type=int, default=4, help="K render-cache slots")
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--tiny", action="store_true", help="tiny backbones and frozen nets (CPU smoke test)")
    return parser.parse_args()


def prepare(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    data, cache = work / "data", work / "cache"
    if not (data / "train").is_dir():
        make_synthetic_layout.make_layout(ROOT / "examples" / "data" / "demo_images", data, size=args.size)
    prepare_proxy_inputs.prepare(data, cache / "inputs", noise_seed=0, crop_size=args.crop_size)
    items = items_from_manifest(cache / "inputs" / "manifest.jsonl", cache / "inputs")
    store = RenderCache(cache, create=True)
    for k in range(args.proxies):
        torch.manual_seed(100 + k)
        proxy = create_backbone("restormer-tiny").to(args.device)
        store.render(f"proxy{k}", proxy, items, tile=None, progress=False)
    return data, cache


def step_stats(run_dir: Path, warmup: int) -> dict[str, float]:
    with open(run_dir / "train_log.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if int(row["step"]) > warmup]
    times = [float(row["sec_per_step"]) for row in rows]
    return {"median_s": statistics.median(times), "min_s": min(times), "logged_rows": len(times),
            "skipped_steps": sum(int(row["skipped"]) for row in rows)}


def timed_run(main, argv: list[str], run_dir: Path, device: str, warmup: int) -> dict[str, float]:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    main(argv)
    stats = step_stats(run_dir, warmup)
    if device.startswith("cuda"):
        stats["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return stats


def main() -> None:
    args = parse_args()
    work = Path(args.out)
    data, cache = prepare(args, work)
    common = ["--data", str(data), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
              "--crop-size", str(args.crop_size), "--workers", str(args.workers), "--device", args.device,
              "--log-every", str(args.log_every), "--val-every", "0", "--no-val", "--ckpt-every", str(10 * args.steps),
              "--no-plots", "--no-tensorboard", "--resume", "never", "--bf16" if args.bf16 else "--no-bf16"]
    backbone = "restormer-tiny" if args.tiny else "restormer"
    plain_dir, perceive_dir = work / "run-plain", work / "run-perceive"
    for run_dir in (plain_dir, perceive_dir):  # fresh runs (data and cache are reused)
        shutil.rmtree(run_dir, ignore_errors=True)
    plain = timed_run(train_plain.main, [*common, "--backbone", backbone, "--out-dir", str(plain_dir)],
                      plain_dir, args.device, args.warmup)
    perceive = timed_run(train_restormer_perceive.main,
                         [*common, "--backbone", backbone, "--frozen", "tiny" if args.tiny else "random",
                          "--proxy-cache", str(cache), "--out-dir", str(perceive_dir)],
                         perceive_dir, args.device, args.warmup)
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "CPU"
    results = {"card": card, "torch": torch.__version__, "device": args.device, "bf16": args.bf16,
               "steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size, "crop": args.crop_size,
               "proxies": args.proxies, "backbone": backbone, "plain": plain, "perceive": perceive,
               "step_time_ratio": perceive["median_s"] / plain["median_s"]}
    if "peak_memory_gib" in plain:
        results["peak_memory_ratio"] = perceive["peak_memory_gib"] / plain["peak_memory_gib"]
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\n{card}, torch {torch.__version__}, {args.steps} steps, batch {args.batch_size}, {args.crop_size}², "
          f"{'bf16' if args.bf16 else 'fp32'}, K = {args.proxies} cached proxies; median over steps > {args.warmup}\n")
    print("| run | s/step (median) | peak memory (GiB) |\n|---|---|---|")
    for name, stats in (("bare Restormer + L1 (train_plain.py)", plain),
                        ("Perceive-IR recipe (train_restormer_perceive.py)", perceive)):
        print(f"| {name} | {stats['median_s']:.4f} | {stats.get('peak_memory_gib', float('nan')):.2f} |")
    ratio = f"| ratio | {results['step_time_ratio']:.3f}x | {results.get('peak_memory_ratio', float('nan')):.3f}x |"
    print(ratio)


if __name__ == "__main__":
    main()
