"""Tiny all-in-one data folders for the data and trainer tests (random images, written in a temp dir)."""
from __future__ import annotations

from pathlib import Path

import torch

from perceive_components.ops.io import write_image

# relative paths of (degraded, clean) per task, in the naming of each standard data set
PAIRS = {
    "haze": [("haze/hazy/0001_0.8_0.2.png", "haze/clean/0001.png"),  # OTS: hazy in part folders, clean flat
             ("haze/hazy/part2/0002_0.9_0.1.png", "haze/clean/0002.png")],
    "rain": [("rain/rainy/rain-1.png", "rain/clean/norain-1.png"), ("rain/rainy/rain-2.png", "rain/clean/norain-2.png")],
    "blur": [("blur/blurry/GOPR0001/000001.png", "blur/sharp/GOPR0001/000001.png")],
    "lowlight": [("lowlight/low/1.png", "lowlight/high/1.png")],
}


def make_layout(root: Path, tasks=("noise", "haze", "rain"), splits=("train", "test"), size=(24, 28),
                noise_images: int = 3, seed: int = 0) -> Path:
    """Write a complete layout for ``tasks`` under ``root/<split>``; returns ``root``."""
    generator = torch.Generator().manual_seed(seed)
    height, width = size

    def image(path: Path) -> None:
        write_image(path, torch.rand(3, height, width, generator=generator))

    for split in splits:
        for task in tasks:
            if task == "noise":
                for index in range(noise_images):
                    image(root / split / "noise" / "clean" / f"img{index}.png")
            else:
                for degraded, clean in PAIRS[task]:
                    image(root / split / degraded)
                    image(root / split / clean)
    return root
