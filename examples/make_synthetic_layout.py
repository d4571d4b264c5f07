"""Write a small synthetic all-in-one data root (docs/data.md layout) from a folder of clean images.

    python examples/make_synthetic_layout.py --images examples/data/demo_images --out /tmp/allinone --size 320

For machines without the real data sets (CPU smoke runs, GPU timing): each clean image is resized to
``--size``² (bicubic) and written as ``train|test/noise/clean/<name>.png`` (noise is synthesised by the
training set), ``haze/{hazy,clean}/<name>.png`` and ``rain/{rainy,clean}/<name>.png`` with the synthetic
haze and rain of ``perceive_components.data.degrade`` (``--layout 5task`` adds Gaussian blur and
darkening as ``blur/{blurry,sharp}`` and ``lowlight/{low,high}``). The last ``--test`` images go to
``test/``, the others to ``train/``. Severities are drawn per image from ``--seed``. Numbers trained on it
say nothing about the paper's benchmarks.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from perceive_components.data import LAYOUTS, TASK_FOLDERS, degrade  # noqa: E402
from perceive_components.ops.io import list_images, read_image, write_image  # noqa: E402

SEVERITY = (0.4, 0.8)  # uniform range of degrade()'s severity per image


def make_layout(images: str | Path, out: str | Path, *, layout: str = "3task", size: int = 256, test: int = 2,
                seed: int = 0) -> dict[str, int]:
    """Write the layout; returns the number of train and test images per split."""
    sources = list_images(images)
    if len(sources) <= test:
        raise ValueError(f"--images holds {len(sources)} image(s); need more than --test {test}")
    generator = torch.Generator().manual_seed(seed)
    counts = {"train": 0, "test": 0}
    for index, source in enumerate(sources):
        split = "test" if index >= len(sources) - test else "train"
        clean = F.interpolate(read_image(source)[None], size=(size, size), mode="bicubic", align_corners=False,
                              antialias=True).clamp(0, 1)
        name = f"{source.stem}.png"
        for task in LAYOUTS[layout]:
            folders = TASK_FOLDERS[task]
            write_image(Path(out) / split / folders.clean / name, clean[0])
            if folders.degraded is not None:
                severity = SEVERITY[0] + (SEVERITY[1] - SEVERITY[0]) * float(torch.rand((), generator=generator))
                write_image(Path(out) / split / folders.degraded / name, degrade(clean, task, severity, generator)[0])
        counts[split] += 1
    return counts


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="folder of clean images (e.g. examples/data/demo_images)")
    parser.add_argument("--out", required=True, help="data root to write (train/ and test/)")
    parser.add_argument("--layout", default="3task", choices=sorted(LAYOUTS))
    parser.add_argument("--size", type=int, default=256, help="square size of every image")
    parser.add_argument("--test", type=int, default=2, help="images per task in test/")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = make_layout(args.images, args.out, layout=args.layout, size=args.size, test=args.test, seed=args.seed)
    print(f"wrote {args.out}: {counts['train']} train and {counts['test']} test image(s) per task")
    return counts


if __name__ == "__main__":
    main()
