"""Inference overhead of PerceiveAdapter (SGM with DINOv2-B + CFE + PGM) on the default Restormer.

Measures, in one run and on one machine, the time of the bare Restormer and of the same Restormer
wrapped by ``PerceiveAdapter`` (interleaved in a random order each round, so both see the same load),
and reports the ratio of medians (target <= 1.25x at 256², batch 1), the ratio of minima (robust on a
shared machine) and the ratio expected from the separately timed parts, (bare + SGM + CFE) / bare. The DINOv2-B is timm ``vit_base_patch14_dinov2.lvd142m`` built with
``pretrained=False``: the same network and compute as the pretrained one, without the download.

Run from the repository root:

    python benchmarks/bench_adapter.py                                  # CPU, fp32, wall clock
    python benchmarks/bench_adapter.py --threads 1 --clock process      # CPU work, robust on a shared machine
    python benchmarks/bench_adapter.py --device cuda --bf16             # GPU, bf16 autocast
    python benchmarks/bench_adapter.py --device cuda --compile          # GPU, torch.compile (inductor) on both
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perceive_components import PerceiveAdapter  # noqa: E402
from perceive_components.modules import SGM  # noqa: E402
from timing import timer  # noqa: E402  (benchmarks/timing.py)

DINOV2_B = "vit_base_patch14_dinov2.lvd142m"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--size", type=int, default=256, help="square input size (default 256)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast around both forwards")
    parser.add_argument("--compile", action="store_true", help="torch.compile (inductor) both models first")
    parser.add_argument("--repeats", type=int, default=None, help="timed pairs (default 5 on CPU, 50 on GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed pairs (default 1 on CPU, 10 on GPU)")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="wall time (default; CUDA-synchronised on GPU) or this process's CPU time "
                             "(CPU only: with --threads 1 it leaves out time the OS gave to other jobs)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    measure = timer(device, args.clock)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from examples.backbones.restormer import Restormer
    except ImportError as error:
        raise SystemExit(f"cannot import examples.backbones.restormer ({error}); run from the repository root") from error

    torch.manual_seed(0)
    bare = Restormer().eval()
    n_backbone = sum(p.numel() for p in bare.parameters())
    sgm = SGM(DINOV2_B, pretrained=False)  # blocks (1, 4, 8, 12), 224², same compute as the real weights
    adapter = PerceiveAdapter(copy.deepcopy(bare), sgm=sgm).eval()
    n_adapter = sum(p.numel() for p in adapter.adapter_parameters())
    bare.to(device)
    adapter.to(device)
    images = torch.rand(args.batch, 3, args.size, args.size, device=device)

    run_bare, run_adapter = bare, adapter
    if args.compile:
        run_bare, run_adapter = torch.compile(bare), torch.compile(adapter)
    parts = {
        "bare": lambda: run_bare(images),
        "adapter": lambda: run_adapter(images),
        "sgm": lambda: adapter.sgm(images),
        "cfe": lambda: adapter.perceive["cfe"](images),
    }
    on_gpu = device.type == "cuda"
    repeats = args.repeats or (50 if on_gpu else 5)
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 1)
    times: dict[str, list[float]] = {name: [] for name in parts}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    order = random.Random(0)
    with torch.inference_mode(), autocast:
        for step in range(warmup + repeats):
            names = list(parts)
            order.shuffle(names)  # interleaved, random order: every method sees the same background load
            for name in names:
                elapsed = measure(parts[name])
                if step >= warmup:
                    times[name].append(elapsed)
    median = {name: statistics.median(values) for name, values in times.items()}
    fastest = {name: min(values) for name, values in times.items()}
    per_round = [a / b for a, b in zip(times["adapter"], times["bare"])]
    result = {
        "device": torch.cuda.get_device_name(device) if on_gpu else f"cpu ({torch.get_num_threads()} threads)",
        "input": [args.batch, 3, args.size, args.size], "bf16": args.bf16, "compile": args.compile,
        "clock": args.clock,
        "repeats": repeats, "warmup": warmup, "backbone_params": n_backbone, "adapter_params": n_adapter,
        "levels": [level.name for level in adapter.levels],
        "median_s": median, "min_s": fastest, "samples_s": times,
        "ratio_adapter_vs_bare": median["adapter"] / median["bare"],
        "ratio_of_min": fastest["adapter"] / fastest["bare"],
        "ratio_per_round_median": statistics.median(per_round),
        "ratio_expected_from_parts": (median["bare"] + median["sgm"] + median["cfe"]) / median["bare"],
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    print(
        f"| {result['device']}, {args.clock} clock | {args.batch}×3×{args.size}² | {'bf16' if args.bf16 else 'fp32'}"
        f"{' + compile' if args.compile else ''} | {median['bare'] * 1e3:.1f} | {median['adapter'] * 1e3:.1f} "
        f"| {median['sgm'] * 1e3:.1f} | {median['cfe'] * 1e3:.1f} | **{result['ratio_adapter_vs_bare']:.3f}×** "
        f"| {result['ratio_of_min']:.3f}× | {result['ratio_expected_from_parts']:.3f}× |"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
