"""Evaluate a restoration backbone on paired test sets with the field's protocol (docs/method.md §4, table of §5).

Protocol: full image in fp32 (TF32 off), replicate-pad bottom/right to a multiple of 8 (and of the
backbone's ``size_factor``), crop back, clamp to [0, 1], then PSNR and SSIM on the float RGB output (no 8-bit
rounding, no border crop; SSIM = scikit-image's ``structural_similarity`` defaults), as the authors' and
PromptIR's evaluators do. Each set reports the mean over its images; "average" is the mean of the
set means. ``--tile`` runs large images in overlapping tiles blended with linear ramps
(``perceive_components.ops.tiling.tiled_apply``): the whole image stays in CPU memory and only
``--tile-batch`` tiles at a time go through the model, so device memory is bounded by the tile size.

Data layout (one folder per set; a degraded image and its target share the file name, the suffix may
differ)::

    <root>/<set>/degraded/<name>.<png|jpg|…>
    <root>/<set>/target/<name>.<png|jpg|…>

Examples::

    python examples/evaluate.py --backbone promptir --checkpoint ckpt/model.ckpt --data-root data/test \\
        --protocol 3task --out results/promptir
    python examples/evaluate.py --backbone nafnet --checkpoint NAFNet-SIDD-width32.pth --data-root data/test \\
        --sets SIDD=SIDD --tile 512 --overlap 32 --device cuda
    python examples/evaluate.py --run runs/restormer-3task --data-root data/test --protocol 3task
    python examples/evaluate.py --backbone perceive-ir-net --checkpoint weight/perceiveIR_3task.pth \
        --data-root data/test --protocol 3task   # the authors' network (docs/authors-weights.md)

``--run`` evaluates a network trained by ``examples/train_restormer_perceive.py`` (any ``--backbone``): the backbone
wrapped in ``PerceiveAdapter`` or the paper's network, rebuilt from the run's ``net.json`` with its frozen
DINOv2, and loaded with the run's final weights (``--weights``: EMA when the run kept one) or a training
checkpoint (``--checkpoint <run>/checkpoints/latest``). Tiled, such a network gets its guidance (DINOv2
priors, CFE embedding) from the whole image once, shared by every tile.

The table is printed and written to ``<out>/table.md``, with ``summary.csv`` (per set) and
``per_image.csv``. See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import ast
import csv
import logging
import math
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from perceive_components.guidance import Guidance  # noqa: E402
from perceive_components.ops.io import IMAGE_SUFFIXES, list_images, read_image, write_image  # noqa: E402
from perceive_components.ops.metrics import SSIM_WINDOWS, psnr, ssim  # noqa: E402
from perceive_components.ops.tiling import tiled_apply  # noqa: E402

log = logging.getLogger("evaluate")

# Standard test sets (docs/method.md §4) as (folder name, column label), in the column order of docs/method.md §5.
PROTOCOLS: dict[str, list[tuple[str, str]]] = {
    "3task": [("CBSD68-sigma15", "σ15"), ("CBSD68-sigma25", "σ25"), ("CBSD68-sigma50", "σ50"),
              ("SOTS-outdoor", "SOTS"), ("Rain100L", "Rain100L")],
    "5task": [("CBSD68-sigma25", "σ25"), ("SOTS-outdoor", "SOTS"), ("Rain100L", "Rain100L"),
              ("GoPro", "GoPro"), ("LOL", "LOL")],
}
LAYOUT_HELP = "expected <root>/<set>/degraded/<name> and <root>/<set>/target/<name> (same names, any image suffix)"


@dataclass(frozen=True)
class EvalSet:
    """One test set: its folder name, the column label of the table, and its (name, degraded, target) triples."""

    name: str
    label: str
    pairs: tuple[tuple[str, Path, Path], ...]


@dataclass(frozen=True)
class ImageScore:
    set_label: str
    image: str
    psnr: float
    ssim: float


def parse_set_specs(specs: Sequence[str]) -> list[tuple[str, str]]:
    """``['CBSD68-sigma15=σ15', 'Rain100L']`` → ``[('CBSD68-sigma15', 'σ15'), ('Rain100L', 'Rain100L')]``."""
    parsed = []
    for spec in specs:
        name, _, label = spec.partition("=")
        if not name:
            raise ValueError(f"--sets entries must be NAME or NAME=LABEL, got {spec!r}")
        parsed.append((name, label or name))
    return parsed


def _images_by_stem(folder: Path) -> dict[str, Path]:
    return {path.relative_to(folder).with_suffix("").as_posix(): path for path in list_images(folder)}


def discover_sets(root: str | Path, specs: Sequence[tuple[str, str]] | None = None) -> list[EvalSet]:
    """Pair the images of each set; raise ``ValueError`` listing everything missing (layout: module docstring).

    ``specs`` are ``(folder name, label)`` pairs; ``None`` takes every sub-folder of ``root`` (sorted).
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"evaluation data root {str(root)!r} does not exist; {LAYOUT_HELP}")
    if specs is None:
        specs = [(path.name, path.name) for path in sorted(root.iterdir()) if path.is_dir()]
        if not specs:
            raise ValueError(f"no set folders under {str(root)!r}; {LAYOUT_HELP}")
    problems: list[str] = []
    sets = []
    for name, label in specs:
        folders = {kind: root / name / kind for kind in ("degraded", "target")}
        absent = [str(folder) for folder in folders.values() if not folder.is_dir()]
        if absent:
            problems.append(f"set {name!r}: missing folder(s) {', '.join(absent)}")
            continue
        degraded, target = (_images_by_stem(folders[kind]) for kind in ("degraded", "target"))
        unpaired = {"degraded image(s) without a target": sorted(set(degraded) - set(target)),
                    "target image(s) without a degraded image": sorted(set(target) - set(degraded))}
        for what, stems in unpaired.items():
            if stems:
                problems.append(f"set {name!r}: {len(stems)} {what}, e.g. {', '.join(stems[:3])}")
        if not degraded and not target:
            problems.append(f"set {name!r}: no images ({', '.join(IMAGE_SUFFIXES)}) in {folders['degraded']}")
        pairs = tuple((stem, degraded[stem], target[stem]) for stem in sorted(set(degraded) & set(target)))
        sets.append(EvalSet(name, label, pairs))
    if problems:
        raise ValueError(f"evaluation data under {str(root)!r} is incomplete ({LAYOUT_HELP}):\n  - "
                         + "\n  - ".join(problems))
    return sets


def _repeat_batch(value: Any, count: int) -> Any:
    """A batch-1 tensor, ``Guidance`` (or a list of them) expanded to ``count`` rows."""
    if isinstance(value, Guidance):
        return value.expand(count)
    if isinstance(value, torch.Tensor):
        return value.expand(count, *value.shape[1:])
    return [_repeat_batch(item, count) for item in value]


def whole_image_guidance(net: nn.Module, images: torch.Tensor) -> dict[str, Any]:
    """``{"guidance": net.guide(images)}`` of whole images, passed with each of their tiles to ``net``."""
    return {"guidance": net.guide(images)}


def restore_image(model: Callable[..., torch.Tensor], degraded: torch.Tensor, *, multiple: int = 8,
                  device: torch.device | str = "cpu", tile: int | None = None, overlap: int = 32,
                  tile_batch: int = 1, pad_mode: str = "replicate",
                  guidance: Callable[[torch.Tensor], dict[str, Any]] | None = None) -> torch.Tensor:
    """Restore ``degraded (1, 3, H, W)`` (on the CPU) and return the result on the CPU, clamped to [0, 1].

    Whole image (``tile=None``): the padded image goes to ``device`` at once. Tiled: the image stays on
    the CPU and ``tile_batch`` crops of ``tile × tile`` at a time travel to ``device``; with ``guidance``
    (whole image → keyword arguments of ``model``, e.g. priors and embedding) each tile gets the whole
    image's guidance.
    """
    device = torch.device(device)
    with torch.inference_mode():
        if tile is None:
            restored = tiled_apply(model, degraded.to(device), tile=None, multiple=multiple, pad_mode=pad_mode)
        else:
            extra = guidance(degraded.to(device)) if guidance is not None else {}

            def run_tiles(crops: torch.Tensor) -> torch.Tensor:
                return model(crops.to(device), **{k: _repeat_batch(v, crops.shape[0]) for k, v in extra.items()})

            restored = tiled_apply(run_tiles, degraded, tile=tile, overlap=overlap, multiple=multiple,
                                   pad_mode=pad_mode, tile_batch=tile_batch, out_device="cpu")
    return restored.float().cpu().clamp(0, 1)


def score_pair(restored: torch.Tensor, target: torch.Tensor, ssim_window: str = "skimage") -> tuple[float, float]:
    """PSNR and SSIM of one ``(1, 3, H, W)`` pair (``restored`` already clamped), on the float values.

    ``ssim_window='skimage'``: ``skimage.metrics.structural_similarity`` defaults (7×7 uniform window, sample
    covariance), as the authors' and PromptIR's evaluators call it. ``'gaussian'``: 11×11 Gaussian window,
    σ 1.5, valid region (Wang et al.; BasicSR); slightly different values.
    """
    return float(psnr(restored, target)[0]), float(ssim(restored, target, window=ssim_window)[0])


def evaluate(model: nn.Module | Callable[[torch.Tensor], torch.Tensor], sets: Sequence[EvalSet], *,
             device: torch.device | str = "cpu", multiple: int = 8, tile: int | None = None, overlap: int = 32,
             tile_batch: int = 1, pad_mode: str = "replicate", ssim_window: str = "skimage",
             save_dir: Path | None = None, guidance: Callable[[torch.Tensor], dict[str, Any]] | None = None,
             ) -> list[ImageScore]:
    """Score every pair of ``sets``; optionally write the restored images to ``save_dir/<set>/``.

    ``guidance``: for tiled runs of a guided network (see ``restore_image``)."""
    if ssim_window not in SSIM_WINDOWS:
        raise ValueError(f"ssim_window must be one of {SSIM_WINDOWS}, got {ssim_window!r}")
    scores = []
    for eval_set in sets:
        for stem, degraded_path, target_path in tqdm(eval_set.pairs, desc=eval_set.label, leave=False):
            degraded, target = read_image(degraded_path)[None], read_image(target_path)[None]
            if degraded.shape != target.shape:
                raise ValueError(f"{degraded_path} is {tuple(degraded.shape[-2:])} but its target {target_path} is"
                                 f" {tuple(target.shape[-2:])}; pairs must have the same size")
            restored = restore_image(model, degraded, multiple=multiple, device=device, tile=tile, overlap=overlap,
                                     tile_batch=tile_batch, pad_mode=pad_mode, guidance=guidance)
            scores.append(ImageScore(eval_set.label, stem, *score_pair(restored, target, ssim_window)))
            if save_dir is not None:
                write_image(Path(save_dir) / eval_set.name / f"{stem}.png", restored[0])
    return scores


def summarise(scores: Sequence[ImageScore], labels: Sequence[str]) -> dict[str, tuple[float, float, int]]:
    """``{set label: (mean PSNR, mean SSIM, images)}`` plus ``'average'`` (mean of the set means)."""
    summary = {}
    for label in labels:
        rows = [score for score in scores if score.set_label == label]
        if rows:
            summary[label] = (sum(r.psnr for r in rows) / len(rows), sum(r.ssim for r in rows) / len(rows), len(rows))
    means = list(summary.values())
    summary["average"] = (sum(m[0] for m in means) / len(means), sum(m[1] for m in means) / len(means),
                          sum(m[2] for m in means))
    return summary


def format_cell(psnr_value: float, ssim_value: float) -> str:
    """``34.13/.934`` (docs/method.md §5 style)."""
    ssim_text = f"{ssim_value:.3f}"
    return f"{psnr_value:.2f}/{ssim_text[1:] if ssim_text.startswith('0.') else ssim_text}"


def format_table(summary: dict[str, tuple[float, float, int]], row_label: str) -> str:
    """A Markdown table in the layout of docs/method.md §5: one column per set, then the average."""
    columns = list(summary)
    header = "| setting | " + " | ".join(columns) + " |"
    rule = "|---" * (len(columns) + 1) + "|"
    row = f"| {row_label} | " + " | ".join(format_cell(*summary[c][:2]) for c in columns) + " |"
    return "\n".join([header, rule, row])


def write_reports(out_dir: Path, scores: Sequence[ImageScore], summary: dict[str, tuple[float, float, int]],
                  row_label: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "per_image.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["set", "image", "psnr", "ssim"])
        writer.writerows([s.set_label, s.image, f"{s.psnr:.6f}", f"{s.ssim:.6f}"] for s in scores)
    with open(out_dir / "summary.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["setting", "set", "images", "psnr", "ssim"])
        writer.writerows([row_label, label, n, f"{p:.6f}", f"{s:.6f}"] for label, (p, s, n) in summary.items())
    (out_dir / "table.md").write_text(format_table(summary, row_label) + "\n", encoding="utf-8")


def _parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--override takes KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    network = parser.add_mutually_exclusive_group(required=True)
    network.add_argument("--backbone", help="registry name, e.g. restormer, nafnet, promptir")
    network.add_argument("--run", help="a run folder (net.json, model.safetensors) of train_restormer_perceive.py")
    parser.add_argument("--checkpoint", help="--backbone: official (BasicSR / Lightning / authors') or our weights; "
                        "omit for random weights. --run: a training checkpoint (step_*.pt or checkpoints/latest) "
                        "instead of the run's final weights")
    parser.add_argument("--weights", choices=("auto", "model", "ema"), default="auto",
                        help="--run: the EMA weights if the run kept them (auto), or the plain/EMA ones")
    parser.add_argument("--param-key", help="entry holding the weights, e.g. params_ema (default: detected)")
    parser.add_argument("--sgm-position-embedding", choices=("auto", "timm", "hf"), default="auto",
                        help="DINOv2 position grid of a network with an SGM: auto = 'hf' (as the authors' Hugging "
                        "Face DINOv2) for a checkpoint in the authors' layout, else as built")
    parser.add_argument("--override", action="append", type=_parse_override, default=[], metavar="KEY=VALUE",
                        help="change one config entry of the backbone, e.g. width=64 (repeatable)")
    parser.add_argument("--data-root", required=True, help="folder holding one sub-folder per test set")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--protocol", choices=sorted(PROTOCOLS), help="the standard sets in docs/method.md §5 order")
    group.add_argument("--sets", nargs="+", metavar="NAME[=LABEL]", help="set folders (default: all sub-folders)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tile", type=int, help="tile size (a multiple of 8); default: whole images")
    parser.add_argument("--overlap", type=int, default=32, help="tile overlap in pixels, blended linearly")
    parser.add_argument("--tile-batch", type=int, default=1, help="tiles per forward pass")
    parser.add_argument("--pad-mode", choices=["replicate", "reflect"], default="replicate")
    parser.add_argument("--ssim-window", choices=SSIM_WINDOWS, default="skimage",
                        help="skimage: 7x7 uniform, the authors' and PromptIR's evaluation; gaussian: 11x11, sigma 1.5 "
                        "(BasicSR)")
    parser.add_argument("--label", help="row label of the table (default: backbone name)")
    parser.add_argument("--out", help="folder for table.md, summary.csv, per_image.csv")
    parser.add_argument("--save-images", action="store_true", help="also write the restored images to <out>/images")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, tuple[float, float, int]]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from examples.backbones import create_backbone, load_checkpoint

    if args.save_images and not args.out:
        raise SystemExit("--save-images needs --out")
    specs = PROTOCOLS[args.protocol] if args.protocol else parse_set_specs(args.sets) if args.sets else None
    sets = discover_sets(args.data_root, specs)
    guidance = None
    if args.run:
        from examples.train_restormer_perceive import build_run_net
        from perceive_components import PerceiveAdapter

        if args.override or args.param_key:
            raise ValueError("--override and --param-key apply to --backbone; a --run is rebuilt from its net.json")
        model = build_run_net(args.run, args.weights, args.checkpoint)
        size_factor = (model.backbone if isinstance(model, PerceiveAdapter) else model).size_factor
        guidance = partial(whole_image_guidance, model)
    else:
        model = create_backbone(args.backbone, **dict(args.override))
        if args.checkpoint:
            load_checkpoint(model, args.checkpoint, param_key=args.param_key,
                            sgm_position_embedding=args.sgm_position_embedding)
        else:
            log.warning("no --checkpoint: evaluating %s with random weights", args.backbone)
        size_factor = model.size_factor
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (docs/method.md §4)
    torch.backends.cudnn.allow_tf32 = False
    model = model.to(args.device).float().eval()
    out_dir = Path(args.out) if args.out else None
    scores = evaluate(model, sets, device=args.device, multiple=math.lcm(8, size_factor), tile=args.tile,
                      overlap=args.overlap, tile_batch=args.tile_batch, pad_mode=args.pad_mode,
                      ssim_window=args.ssim_window, save_dir=out_dir / "images" if args.save_images else None,
                      guidance=guidance)
    row_label = args.label or args.backbone or Path(args.run).name
    summary = summarise(scores, [eval_set.label for eval_set in sets])
    print(format_table(summary, row_label))
    if out_dir is not None:
        write_reports(out_dir, scores, summary, row_label)
        log.info("wrote %s", out_dir / "table.md")
    return summary


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:  # bad layout, checkpoint or option: the message says what
        raise SystemExit(f"evaluate.py: error: {error}") from None
