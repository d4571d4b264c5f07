"""One training step of the Perceive-IR recipe against the work it cannot avoid, in one run on one machine.

The step under test (a) is the recipe's own: the objects of ``examples/train_restormer_perceive.py``
(``build_network``, ``build_criterion``, ``training_data``, ``perceive_loss``) driven by the scripts' step
(``StepRunner.train_step``: bf16 autocast if asked, forward, ``QualityAwareLoss``, backward, gradient norm,
``TrainingRun.update``: fused AdamW on CUDA, cosine learning rate). Network: the default Restormer (26.1 M) in
``PerceiveAdapter``
(DINOv2-B + CFE + PGM), all four losses, K = 4 proxy negatives read from a real ``RenderCache`` (files
rendered beforehand, read back with each crop's box and flips by the training loader). Against it:

- (b) the sum of the bare passes that step must make, each timed alone: backbone fwd+bwd (bare Restormer,
  L1), DINOv2-B fwd at 224² (no grad), CLIP ViT-B/32 image fwd+bwd on the output, VGG-16 (to relu3_3)
  fwd+bwd on the output, one no-grad VGG pass on [ground truth; degraded; valid negatives].
  Target (a) / (b) <= 1.10;
- (c) a bare Restormer + L1 step (``train_plain.py``'s loss, the same step around it), with the floor
  of (a) / (c) that operation counts allow (matmul + convolution FLOPs, ``torch.utils.flop_counter``);
- (d) peak memory of (a) / (c) (CUDA only): what the run holds (weights of every network, AdamW state,
  the inputs) plus the peak a step allocates above that (``max_memory_allocated``). Target <= 1.30 at batch 8;
- (e) the same step with the proxies run online at every step, as the authors do (``ProxyNegatives``: frozen,
  no grad, bf16 autocast on CUDA; stand-ins: the example Restormer, PromptIR, NAFNet and a second Restormer
  at their default configs). Target: (e) / (a) >= 2.

Every round reads a fresh batch from the loader (in this process, timed on its own: training overlaps it in
DataLoader workers) and runs every case once, in a shuffled order; each ratio is taken within a round (same
load) and the median over rounds is reported with its range. The first call of every case runs under the
FLOP counter and doubles as a warm-up. All networks have random weights (DINOv2-B ``pretrained=False``,
CLIP ``ViT-B-32-quickgelu`` ``pretrained=None``, VGG-16 ``pretrained=False``: ``--frozen random``; untrained
prompts): the compute of the pretrained ones, no download. The loss values mean nothing; the cost is real.
The data (synthetic 3-task layout from the bundled demo images) and the render cache (K slots rendered by
seeded random ``restormer-tiny`` models) are made on the spot.

    python benchmarks/bench_train_step.py --device cuda --bf16                      # GPU: batch 8, 256², ~2 min
    python benchmarks/bench_train_step.py --size 128 --threads 1 --clock cpu --repeats 5  # shared CPU, batch 1
    python benchmarks/bench_train_step.py --size 256 --flops-only                  # exact FLOP ratios at 256²
    python benchmarks/bench_train_step.py --size 64 --batch 1 --repeats 1           # CPU smoke run (~1-2 min)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from examples import make_synthetic_layout, prepare_proxy_inputs  # noqa: E402
from examples import train_restormer_perceive as script  # noqa: E402
from examples.backbones import create_backbone  # noqa: E402
from examples.train_support import (  # noqa: E402
    ResumableBatchSampler, TrainingRun, config_from_args, init_distributed, move_to, seeded_global_rng,
    training_loader,
)
from perceive_components import freeze_unused_parameters  # noqa: E402
from perceive_components.negatives import ProxyNegatives, RenderCache, items_from_manifest  # noqa: E402
from perceive_components.ops.frozen import FrozenHolder  # noqa: E402
from timing import round_ratio, timer  # noqa: E402  (benchmarks/timing.py)

ONLINE_PROXIES = ("restormer", "promptir", "nafnet", "restormer")
BARE_PASSES = ("bare_backbone_fwd_bwd", "bare_dinov2_fwd", "bare_clip_fwd_bwd", "bare_vgg_fwd_bwd",
               "bare_vgg_nograd_rest")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast around every case (the recipe's --bf16)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 8 on CUDA, 1 on CPU)")
    parser.add_argument("--size", type=int, default=256, help="square crop size (default 256)")
    parser.add_argument("--proxies", type=int, default=4, help="K, cached proxy negatives per sample (default 4)")
    parser.add_argument("--online-proxies", default=",".join(ONLINE_PROXIES),
                        help="example backbones run online in case (e) (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 20 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed rounds after the FLOP-counting one (default 3 on CUDA, 0 on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: perf_counter (CUDA-synchronised); cpu: this process's CPU time (CPU only; "
                             "steadier on a shared CPU with --threads 1)")
    parser.add_argument("--cache-format", choices=("png", "npy"), default="png", help="render-cache file format")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the data, cache and run (kept; default: a temporary folder, removed)")
    parser.add_argument("--seed", type=int, default=0, help="order of the cases in each round")
    parser.add_argument("--flops-only", action="store_true",
                        help="count the FLOPs of every case once and stop (no timing): the exact ratios at any size")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    return parser.parse_args()


# ------------------------------------------------------------------------------------------ set-up
def prepare_data(work: Path, image_size: int, proxies: int, file_format: str, device: torch.device,
                 crop_size: int) -> tuple[Path, Path]:
    """A 3-task data root of ``image_size``² images and a render cache with ``proxies`` slots, its noisy inputs
    made for ``crop_size`` crops (smaller images are resized to the crop before the noise)."""
    data, cache = work / "data", work / "cache"
    if not (data / "train").is_dir():
        make_synthetic_layout.make_layout(ROOT / "examples" / "data" / "demo_images", data, size=image_size)
    prepare_proxy_inputs.prepare(data, cache / "inputs", noise_seed=0, crop_size=crop_size)
    items = items_from_manifest(cache / "inputs" / "manifest.jsonl", cache / "inputs")
    store = RenderCache(cache, create=True, file_format=file_format)
    for k in range(proxies):
        torch.manual_seed(100 + k)
        store.render(f"proxy{k}", create_backbone("restormer-tiny").to(device), items, tile=None, progress=False)
    return data, cache


def l1_step(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """L1(R, G): the bare backbone's objective (``examples/train_plain.py``)."""
    return F.l1_loss(model(batch["degraded"]).float(), batch["target"])


class PerceiveStep:
    """``step(net, batch) -> (loss, terms)``: the script's forward pass and loss (``perceive_loss``), one process."""

    def __init__(self, criterion: nn.Module, env: Any) -> None:
        self.criterion, self.env = criterion, env

    def __call__(self, net: nn.Module, batch: dict[str, Any]):
        return script.perceive_loss(net, net, self.criterion, batch, self.env, script.TERMS)


class StepRunner:
    """The scripts' optimisation step on one process (forward and loss in autocast, backward, gradient norm,
    ``TrainingRun.update``), without the loop, checkpoints and validation around it: what is timed."""

    def __init__(self, run: TrainingRun, loader: Any, step_fn: Callable, bf16: bool) -> None:
        self.run, self.loader, self.step_fn, self.bf16 = run, loader, step_fn, bf16
        self.model, self.optimizer = run.model, run.optimizer

    def batches(self):
        return self.run.batches(self.loader)

    def train_step(self, batch: dict[str, Any]) -> None:
        with torch.autocast(self.run.env.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            output = self.step_fn(self.model, batch)
        loss, terms = (output, {}) if isinstance(output, torch.Tensor) else output
        loss.backward()
        self.run.update(loss, terms, torch.nn.utils.clip_grad_norm_(self.run.parameters, math.inf))


def build_trainers(args: argparse.Namespace, data: Path, cache: Path, run_dir: Path) -> tuple[StepRunner, StepRunner]:
    """The recipe's step (as ``train_restormer_perceive.main`` builds it) and the bare Restormer + L1 one."""
    argv = ["--data", str(data), "--frozen", "random", "--proxy-cache", str(cache), "--crop-size", str(args.size),
            "--batch-size", str(args.batch), "--workers", "0", "--device", args.device, "--out-dir", str(run_dir),
            "--bf16" if args.bf16 else "--no-bf16", "--no-val", "--no-tensorboard", "--no-plots"]
    recipe_args = script.build_parser().parse_args(argv)
    config = config_from_args(recipe_args)
    env = init_distributed(config.device)
    net = script.build_network({"format": script.NET_FORMAT, "backbone": "restormer", "adapter": True, "pgca": False,
                                "frozen": "random", "seed": config.seed})
    freeze_unused_parameters(net)
    dataset, _, _ = script.training_data(recipe_args, env)
    with seeded_global_rng(config.seed):
        criterion = script.build_criterion(recipe_args).to(env.device)
    sampler = ResumableBatchSampler(len(dataset), config.batch_size, seed=config.seed)
    loader = training_loader(dataset, sampler, config, env)
    perceive = StepRunner(TrainingRun(net, config, env, steps_per_epoch=sampler.steps_per_epoch), loader,
                          PerceiveStep(criterion, env), config.bf16)
    torch.manual_seed(config.seed)
    plain_config = dataclasses.replace(config, out_dir=str(run_dir / "plain"))
    plain = StepRunner(TrainingRun(create_backbone("restormer"), plain_config, env,
                                   steps_per_epoch=sampler.steps_per_epoch), loader, l1_step, config.bf16)
    return perceive, plain


class OnlineProxiesStep:
    """The recipe's step with the negatives computed by ``proxies`` from the degraded batch (authors' way)."""

    def __init__(self, proxies: ProxyNegatives, step: PerceiveStep) -> None:
        self.proxies, self.step = proxies, step

    def __call__(self, net: nn.Module, batch: dict[str, Any]):
        negatives, mask = self.proxies(batch["degraded"], batch["task"])
        return self.step(net, {**batch, "negatives": negatives, "negative_mask": mask})


def held_bytes(*objects: Any) -> int:
    """Bytes of the distinct tensors held by modules (frozen nets included), optimisers and tensors."""
    seen: dict[int, int] = {}

    def add(tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()

    def add_module(module: nn.Module) -> None:
        for sub in module.modules():
            for tensor in [*sub.parameters(recurse=False), *sub.buffers(recurse=False)]:
                add(tensor)
            if isinstance(sub, FrozenHolder):
                for net in sub._frozen_nets.values():
                    add_module(net)

    for obj in objects:
        if isinstance(obj, nn.Module):
            add_module(obj)
        elif isinstance(obj, torch.optim.Optimizer):
            for state in obj.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor):
                        add(value)
        elif isinstance(obj, torch.Tensor):
            add(obj)
    return sum(seen.values())


def conv_backward_flop(grad_out_shape: list[int], x_shape: list[int], w_shape: list[int], _bias: Any, _stride: Any,
                       _padding: Any, _dilation: Any, transposed: bool, _output_padding: Any, _groups: int,
                       output_mask: list[bool], out_shape: Any = None, **kwargs: Any) -> int:
    """FLOPs of ``aten.convolution_backward``: each requested gradient (input, weight) costs what the forward did,
    2·B·prod(spatial)·prod(w_shape), with ``w_shape`` ``(C_out, C_in / groups, k…)``.

    Replaces torch's formula, which counts the weight gradient of a grouped convolution ``groups`` times over
    (torch 2.14: 24x too much for a depthwise 3x3 at 48 channels, so Restormer's fwd+bwd read 25x its forward).
    """
    spatial = x_shape[2:] if transposed else grad_out_shape[2:]
    forward = 2 * x_shape[0] * math.prod(spatial) * math.prod(w_shape)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_gflop(fn: Callable[[], None]) -> float:
    """Matmul/convolution GFLOP of one call, forward and backward (``torch.utils.flop_counter`` with the
    corrected ``conv_backward_flop``): noise-free."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flop}
                         ) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def step_peak(fn: Callable[[], None], device: torch.device) -> int:
    """Bytes allocated at the peak of one call above what was allocated before it (CUDA)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    timed = timer(device, args.clock)  # built first: refuses a CPU clock on a GPU before the minutes of set-up
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch = args.batch or (8 if on_gpu else 1)
    repeats = args.repeats or (20 if on_gpu else 3)
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 0)
    with tempfile.TemporaryDirectory(prefix="bench-train-step-") as tmp:
        work = args.work or Path(tmp)
        setup_start = time.perf_counter()
        data, cache = prepare_data(work, args.size + 64, args.proxies, args.cache_format, device, args.size)
        perceive, plain = build_trainers(args, data, cache, work / "run")
        torch.manual_seed(1)
        names = [name.strip() for name in args.online_proxies.split(",") if name.strip()]
        proxies = ProxyNegatives({f"{name}_{j}": create_backbone(name) for j, name in enumerate(names)},
                                 multiple=8).to(device)
        setup_s = time.perf_counter() - setup_start
        results = run_cases(args, perceive, plain, proxies, device, timed, repeats, warmup)
    report(args, results, device, repeats, warmup, setup_s, len(names))
    print(f"\n(whole run: {time.perf_counter() - setup_start:.0f} s)")


def run_cases(args: argparse.Namespace, perceive: StepRunner, plain: StepRunner, proxies: ProxyNegatives,
              device: torch.device, timed: Callable[[Callable[[], object]], float], repeats: int, warmup: int
              ) -> dict[str, Any]:
    on_gpu = device.type == "cuda"
    cached_step = perceive.step_fn
    online_step = OnlineProxiesStep(proxies, cached_step)
    net, criterion, bare = perceive.model, cached_step.criterion, plain.model
    sgm, perceiver, vgg = net.sgm, criterion.clip_loss.perceiver, criterion.perceptual_loss.vgg
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)  # noqa: E731
    batches = perceive.batches()
    current: dict[str, Any] = {}

    def next_batch() -> None:
        current["batch"] = batch = move_to(next(batches), device)
        current["output"] = (0.5 * (batch["target"] + batch["degraded"])).requires_grad_()  # R for the bare losses

    def recipe_step(step_fn: Callable) -> Callable[[], None]:
        def run() -> None:
            perceive.step_fn = step_fn
            perceive.train_step(current["batch"])
        return run

    def bare_backbone() -> None:
        with autocast():
            loss = l1_step(bare, current["batch"])
        loss.backward()
        bare.zero_grad(set_to_none=True)

    @torch.no_grad()
    def bare_dinov2() -> None:
        images = current["batch"]["degraded"]
        with autocast():
            x = F.interpolate(images, size=(sgm.image_size,) * 2, mode="bicubic", align_corners=False)
            sgm.encoder.forward_features((x - sgm.mean) / sgm.std)

    def bare_clip() -> None:
        output = current["output"]
        output.grad = None
        with autocast():
            features = perceiver.image_encoder((perceiver.resize(output) - perceiver.mean) / perceiver.std)
        features.float().sum().backward()

    def bare_vgg_grad() -> None:
        output = current["output"]
        output.grad = None
        with autocast():
            taps = vgg(output)
        sum(t.float().mean() for t in taps).backward()

    @torch.no_grad()
    def bare_vgg_rest() -> None:
        batch = current["batch"]
        valid = batch["negatives"][batch["negative_mask"]]
        with autocast():
            vgg(torch.cat([batch["target"], batch["degraded"], valid]))

    cases: dict[str, Callable[[], None]] = {
        "recipe_step_cached": recipe_step(cached_step),
        "recipe_step_online_proxies": recipe_step(online_step),
        "bare_restormer_l1_step": lambda: plain.train_step(current["batch"]),
        "bare_backbone_fwd_bwd": bare_backbone,
        "bare_dinov2_fwd": bare_dinov2,
        "bare_clip_fwd_bwd": bare_clip,
        "bare_vgg_fwd_bwd": bare_vgg_grad,
        "bare_vgg_nograd_rest": bare_vgg_rest,
    }

    next_batch()
    valid_negatives = int(current["batch"]["negative_mask"].sum())
    gflop = {name: count_gflop(fn) for name, fn in cases.items()}  # also the first warm-up round
    if args.flops_only:
        return {"samples": {}, "gflop": gflop, "memory": {}, "valid_negatives": valid_negatives}
    for _ in range(warmup):
        next_batch()
        for fn in cases.values():
            fn()
    order = random.Random(args.seed)
    samples: dict[str, list[float]] = {name: [] for name in ["data_batch", *cases]}
    for _ in range(repeats):
        samples["data_batch"].append(timed(next_batch))
        names = list(cases)
        order.shuffle(names)
        for name in names:
            samples[name].append(timed(cases[name]))
    memory: dict[str, dict[str, float]] = {}
    if on_gpu:
        inputs = [v for v in current["batch"].values() if isinstance(v, torch.Tensor)]
        plain_inputs = [current["batch"]["degraded"], current["batch"]["target"]]
        held = {"recipe_step_cached": held_bytes(net, criterion, perceive.optimizer, *inputs),
                "recipe_step_online_proxies": held_bytes(net, criterion, proxies, perceive.optimizer, *inputs),
                "bare_restormer_l1_step": held_bytes(bare, plain.optimizer, *plain_inputs)}
        for name, hold in held.items():
            peak = step_peak(cases[name], device)
            memory[name] = {"held_gib": hold / 2**30, "step_peak_gib": peak / 2**30, "total_gib": (hold + peak) / 2**30}
    return {"samples": samples, "gflop": gflop, "memory": memory, "valid_negatives": valid_negatives}


def per_round(samples: dict[str, list[float]], numerator: list[str], denominator: list[str]) -> tuple[float, ...]:
    return round_ratio(samples, numerator, denominator) if samples else (math.nan,) * 3  # none: --flops-only


def report(args: argparse.Namespace, results: dict[str, Any], device: torch.device, repeats: int, warmup: int,
           setup_s: float, online: int) -> None:
    samples, gflop, memory = results["samples"], results["gflop"], results["memory"]
    median = {name: statistics.median(values) for name, values in samples.items()}
    on_gpu = device.type == "cuda"
    card = torch.cuda.get_device_name(device) if on_gpu else (platform.processor() or platform.machine() or "CPU")
    a, c, e = "recipe_step_cached", "bare_restormer_l1_step", "recipe_step_online_proxies"
    timing = "FLOP count only" if args.flops_only else \
        f"{repeats} rounds (+ 1 FLOP-counting + {warmup} warm-up), {args.clock} clock, medians"
    print(f"\n{card}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, {args.size}² crops, batch {args.batch}, K = {args.proxies} "
          f"cached negatives ({results['valid_negatives']} valid in the batch), {online} online proxies; "
          f"{timing}; set-up "
          f"{setup_s:.0f} s. Random weights for every network (DINOv2-B, CLIP ViT-B/32, VGG-16, Restormer, proxies).")
    def cell(values: dict[str, float], name: str, scale: float) -> str:
        return f"{scale * values[name]:.1f}" if name in values else "–"

    print("\n| case | median ms | GFLOP |\n|---|---|---|")
    for name in dict.fromkeys([*median, *gflop]):
        print(f"| {name} | {cell(median, name, 1000)} | {cell(gflop, name, 1)} |")
    bare_sum = sum(median[name] for name in BARE_PASSES) if median else math.nan
    bare_gflop = sum(gflop[name] for name in BARE_PASSES)
    print(f"| (b) sum of the bare passes | {1000 * bare_sum:.1f} | {bare_gflop:.1f} |")
    ratios = {
        "(a) recipe step / (b) sum of bare passes": (per_round(samples, [a], list(BARE_PASSES)),
                                                     gflop[a] / bare_gflop, "<= 1.10"),
        "(c) recipe step / bare Restormer + L1 step": (per_round(samples, [a], [c]), gflop[a] / gflop[c],
                                                       f"FLOP floor {gflop[a] / gflop[c]:.3f}"),
        "(e) online proxies / recipe step (speed-up)": (per_round(samples, [e], [a]), gflop[e] / gflop[a], ">= 2"),
    }
    print("\n| ratio (time per round, same load) | median | min – max | FLOP ratio | target |\n|---|---|---|---|---|")
    for label, ((mid, low, high), flop_ratio, target) in ratios.items():
        print(f"| {label} | {mid:.3f}x | {low:.3f} – {high:.3f} | {flop_ratio:.3f} | {target} |")
    if memory:
        print("\n| step | held GiB (weights, AdamW state, inputs) | step peak above held, GiB | total GiB |\n"
              "|---|---|---|---|")
        for name, row in memory.items():
            print(f"| {name} | {row['held_gib']:.2f} | {row['step_peak_gib']:.2f} | {row['total_gib']:.2f} |")
        total = memory[a]["total_gib"] / memory[c]["total_gib"]
        above = memory[a]["step_peak_gib"] / memory[c]["step_peak_gib"]
        print(f"\n(d) peak memory, recipe step / bare Restormer + L1 step: {total:.3f}x total (target <= 1.30), "
              f"{above:.3f}x step peak above held")
    else:
        print("\n(d) peak memory: measured on CUDA only (max_memory_allocated); run with --device cuda")
    if args.json:
        args.json.write_text(json.dumps({
            "device": card, "torch": torch.__version__, "bf16": args.bf16, "size": args.size, "batch": args.batch,
            "proxies": args.proxies, "online_proxies": args.online_proxies, "repeats": repeats, "warmup": warmup,
            "clock": args.clock, "threads": torch.get_num_threads(), "median_s": median, "samples_s": samples,
            "bare_sum_s": bare_sum, "gflop": gflop, "memory": memory,
            "ratios": {label: {"median": r[0], "min": r[1], "max": r[2], "flop_ratio": f, "target": t}
                       for label, (r, f, t) in ratios.items()}}, indent=2))


if __name__ == "__main__":
    main()
