"""Cost of QualityAwareLoss (fwd+bwd) against the bare network passes it cannot avoid.

At 128² crops, batch 4, K = 4 proxy negatives, one run measures (every round times each case once;
each ratio is taken within a round, so both sides see the same load, and the median over rounds is
reported with its range):

- ``ours``: ``QualityAwareLoss`` forward + backward (L1 + L_cl + L_clip + L_dpl, all negatives valid);
- the bare passes: CLIP image fwd+bwd on the output (bicubic resize to 224, normalisation, ViT-B/32),
  VGG fwd+bwd on the output (ImageNet normalisation, VGG-16 up to relu3_3), and ONE no-grad VGG fwd on
  the concatenated ground truth, degraded input and valid negatives. Target: ours <= 1.10x their sum;
- masked-out negatives cost nothing: K = 4 all masked vs no negatives; 2 of 4 valid vs K = 2;
- for scale, a straightforward DPL in the style of the authors' code (one VGG call per image group,
  every proxy run through VGG whatever its mask).

The networks are the real architectures with random weights (open_clip ``ViT-B-32-quickgelu`` with
``pretrained=None``; timm ``vgg16.tv_in1k`` with ``pretrained=False``): the same compute as the
pretrained ones, without a download.

    python benchmarks/bench_losses.py                                    # CPU, fp32, wall clock
    python benchmarks/bench_losses.py --threads 1 --clock cpu --repeats 9  # shared CPU: CPU time of one thread
    python benchmarks/bench_losses.py --device cuda --bf16               # GPU, bf16 autocast around every case
    python benchmarks/bench_losses.py --device cuda                      # GPU, fp32
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perceive_components import QualityAwareLoss, QualityPerceiver  # noqa: E402
from perceive_components.losses import VGGFeatures  # noqa: E402
from timing import round_ratio, timer  # noqa: E402  (benchmarks/timing.py)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--proxies", type=int, default=4, help="K, proxy negatives per sample")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast around every case")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7 on CPU, 50 on GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 1 on CPU, 10 on GPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: perf_counter (+ CUDA sync); cpu: this process's CPU time, robust on a shared "
                             "CPU when used with --threads 1 (CPU only)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    return parser.parse_args()


def build(device: torch.device):
    import open_clip

    clip = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None)
    perceiver = QualityPerceiver(clip_model="ViT-B-32-quickgelu", pretrained=None, clip=clip)
    vgg = VGGFeatures("vgg16.tv_in1k", pretrained=False)
    criterion = QualityAwareLoss(perceiver, vgg).to(device)
    return criterion, criterion.clip_loss.perceiver, criterion.perceptual_loss.vgg


def count_gflop(fn: Callable[[], None]) -> float:
    """Matmul/convolution GFLOP of one call, forward and backward (torch.utils.flop_counter): noise-free."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def peak_memory(fn: Callable[[], None], device: torch.device) -> float:
    """MiB allocated at the peak of one call, above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    timed = timer(device, args.clock)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (50 if on_gpu else 5)
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 1)
    torch.manual_seed(0)
    criterion, perceiver, vgg = build(device)
    b, k, s = args.batch, args.proxies, args.size

    def rand(*shape):
        return torch.rand(*shape, device=device)

    gt, degraded = rand(b, 3, s, s), rand(b, 3, s, s)
    output = (0.5 * gt + 0.5 * degraded).requires_grad_()
    negatives = rand(b, k, 3, s, s)
    anchor, positive = F.normalize(rand(b, 128) - 0.5, dim=-1), F.normalize(rand(b, 128) - 0.5, dim=-1)
    labels = torch.arange(b, device=device) % 3
    all_valid = torch.ones(b, k, dtype=torch.bool, device=device)
    none_valid = torch.zeros_like(all_valid)
    half_valid = all_valid.clone()
    half_valid[:, k // 2 :] = False
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext

    def step(negs, mask):
        def run():
            output.grad = None
            with autocast():
                total, _ = criterion(output, gt, degraded, negs, mask, anchor=anchor, positive=positive, labels=labels)
            total.backward()
        return run

    def bare_clip():
        output.grad = None
        with autocast():
            x = F.interpolate(output, size=perceiver.image_size, mode="bicubic", align_corners=False, antialias=True)
            features = perceiver.image_encoder((x - perceiver.mean) / perceiver.std)
        features.float().sum().backward()

    def bare_vgg_grad():
        output.grad = None
        with autocast():
            taps = vgg(output)
        sum(t.float().mean() for t in taps).backward()

    def bare_vgg_rest(count):
        def run():
            with torch.no_grad(), autocast():
                vgg(torch.cat([gt, degraded, negatives[:, :count].flatten(0, 1)]))
        return run

    def dpl_ours():
        output.grad = None
        with autocast():
            loss = criterion.perceptual_loss(output, gt, degraded, negatives, half_valid).mean()
        loss.backward()

    def straightforward():  # authors'-code style: separate VGG calls, every proxy through VGG
        output.grad = None
        with autocast():
            taps_r = vgg(output.clamp(0, 1))
            with torch.no_grad():
                groups = [vgg(gt), vgg(degraded)] + [vgg(negatives[:, j]) for j in range(k)]
            total = 0.0
            for level, weight in enumerate((1 / 12, 1 / 6, 1 / 3, 1.0)):
                def dist(other):
                    return (taps_r[level].float() - other[level].float()).abs().mean(dim=(1, 2, 3))
                den = 2.0 * dist(groups[1])
                for j in range(k):
                    den = den + half_valid[:, j].float() * dist(groups[2 + j])
                total = total + weight * dist(groups[0]) / den.clamp_min(1e-6)
        total.mean().backward()

    cases: dict[str, Callable[[], None]] = {
        "ours_K4_all_valid": step(negatives, all_valid),
        "bare_clip_fwd_bwd": bare_clip,
        "bare_vgg_fwd_bwd": bare_vgg_grad,
        f"bare_vgg_nograd_{2 * b + b * k}_images": bare_vgg_rest(k),
        "ours_K4_all_masked": step(negatives, none_valid),
        "ours_no_negatives": step(None, None),
        "ours_K4_half_masked": step(negatives, half_valid),
        "ours_K2_all_valid": step(negatives[:, : k // 2].contiguous(), all_valid[:, : k // 2].contiguous()),
        "dpl_ours_half_masked": dpl_ours,
        "dpl_straightforward_half_masked": straightforward,
    }

    for _ in range(warmup):
        for fn in cases.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            samples[name].append(timed(fn))
    median = {name: statistics.median(values) for name, values in samples.items()}
    peak_mib = {name: peak_memory(fn, device) for name, fn in cases.items()} if on_gpu else {}
    gflop = {name: count_gflop(fn) for name, fn in cases.items()}

    rest = f"bare_vgg_nograd_{2 * b + b * k}_images"
    bare = median["bare_clip_fwd_bwd"] + median["bare_vgg_fwd_bwd"] + median[rest]
    definitions = {  # label: (numerator cases, denominator cases), compared round by round
        "ours / sum of bare passes (target <= 1.10)":
            (["ours_K4_all_valid"], ["bare_clip_fwd_bwd", "bare_vgg_fwd_bwd", rest]),
        "K=4 all masked / no negatives (masked cost nothing: ~1.00)": (["ours_K4_all_masked"], ["ours_no_negatives"]),
        "K=4 half masked / K=2 all valid (~1.00)": (["ours_K4_half_masked"], ["ours_K2_all_valid"]),
        "straightforward DPL / our DPL, K=4 half masked (speed-up)":
            (["dpl_straightforward_half_masked"], ["dpl_ours_half_masked"]),
    }
    ratios = {label: round_ratio(samples, numerator, denominator)
              for label, (numerator, denominator) in definitions.items()}
    name = torch.cuda.get_device_name(device) if on_gpu else "CPU"
    print(f"device: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, {s}² crops, batch {b}, K = {k}, {repeats} rounds "
          f"(medians, {args.clock} clock), random-weight ViT-B/32 CLIP and VGG-16")
    memory_header = (" peak MiB |", "---|") if on_gpu else ("", "")
    print(f"\n| case | median ms | GFLOP |{memory_header[0]}\n|---|---|---|{memory_header[1]}")
    for case, value in median.items():
        memory = f" {peak_mib[case]:.0f} |" if on_gpu else ""
        print(f"| {case} | {1000 * value:.1f} | {gflop[case]:.2f} |{memory}")
    bare_gflop = sum(gflop[c] for c in ("bare_clip_fwd_bwd", "bare_vgg_fwd_bwd", rest))
    print(f"| sum of bare passes | {1000 * bare:.1f} | {bare_gflop:.2f} |{' |' if on_gpu else ''}")
    print("\n| ratio (time: per round, same load) | median | min – max | GFLOP ratio |\n|---|---|---|---|")
    for label, (mid, low, high) in ratios.items():
        numerator, denominator = definitions[label]
        flop_ratio = sum(gflop[c] for c in numerator) / sum(gflop[c] for c in denominator)
        print(f"| {label} | {mid:.3f}x | {low:.3f} – {high:.3f} | {flop_ratio:.4f} |")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "bf16": args.bf16, "size": s, "batch": b, "proxies": k,
                                         "repeats": repeats, "clock": args.clock, "threads": torch.get_num_threads(),
                                         "median_s": median, "bare_sum_s": bare, "peak_mib": peak_mib, "gflop": gflop,
                                         "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
