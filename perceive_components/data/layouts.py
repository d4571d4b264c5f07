"""The standard all-in-one training and test sets: 3-task (N+H+R) and 5-task (+ blur, low light), SPEC.md §4.

Folder layout (docs/data.md)::

    <root>/train/noise/clean/            BSD400 + WED          (noise is synthesised, σ ∈ {15, 25, 50})
    <root>/train/haze/hazy/, haze/clean/   RESIDE OTS
    <root>/train/rain/rainy/, rain/clean/  Rain100L
    <root>/train/blur/blurry/, blur/sharp/ GoPro                (5-task)
    <root>/train/lowlight/low/, lowlight/high/ LOL-v1           (5-task)
    <root>/test/...                      same folders: CBSD68, SOTS-outdoor, Rain100L, GoPro, LOL-v1

Task resampling (authors' repeat factors): every image of a task appears ``repeats[task]`` times per
epoch — 3-task noise 12 / haze 1 / rain 360; 5-task adds blur 30, low light 140.

Synthetic noise: y = clamp(x + σ/255 · n), n ~ N(0, 1), σ drawn uniformly from ``sigmas`` per draw.
All randomness of a draw (σ, noise, crops, flips) comes from one ``torch.Generator``, so a draw is a pure
function of (index, seed): ``sample(index, generator)`` is what a resumable sampler calls.
"""
from __future__ import annotations

import bisect
import os
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from ..ops.io import read_image
from ..ops.validation import check_positive_int
from .crops import crop_flip, random_box, random_flip
from .degradations import TASKS, add_gaussian_noise
from .pairing import ImagePair, find_pairs

TASK_LABELS: dict[str, int] = {task: label for label, task in enumerate(TASKS)}
LAYOUTS: dict[str, tuple[str, ...]] = {
    "3task": ("noise", "haze", "rain"),
    "5task": ("noise", "haze", "rain", "blur", "lowlight"),
}
DEFAULT_REPEATS: dict[str, int] = {"noise": 12, "haze": 1, "rain": 360, "blur": 30, "lowlight": 140}
NOISE_SIGMAS: tuple[int, ...] = (15, 25, 50)
TEST_SET_NAMES = {"haze": "SOTS", "rain": "Rain100L", "blur": "GoPro", "lowlight": "LOL"}


def resolve_layout(layout: str | Sequence[str]) -> tuple[str, ...]:
    """``'3task'``/``'5task'`` or an explicit sequence of task names → the task tuple."""
    if isinstance(layout, str):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {list(LAYOUTS)} or a sequence of tasks, got {layout!r}")
        return LAYOUTS[layout]
    tasks = tuple(layout)
    bad = [t for t in tasks if t not in TASK_LABELS]
    if not tasks or bad or len(set(tasks)) != len(tasks):
        raise ValueError(f"layout must list distinct tasks among {list(TASKS)}, got {list(tasks)}")
    return tasks


def noise_seed_for(key: str, sigma: int, noise_seed: int) -> int:
    """Stable seed of a fixed noise realisation for the image ``key`` at ``sigma`` (same in every process)."""
    return zlib.crc32(f"{noise_seed}:{key}:{sigma}".encode())


def fixed_noisy(clean: torch.Tensor, key: str, sigma: int, noise_seed: int) -> torch.Tensor:
    """The one noisy version of ``clean (3, H, W)`` used for ``key`` at ``sigma`` (test sets, render caches)."""
    generator = torch.Generator().manual_seed(noise_seed_for(key, sigma, noise_seed))
    return add_gaussian_noise(clean[None], float(sigma), generator)[0]


def _noise_key(pair: ImagePair, sigma: int) -> str:
    """``noise/clean/BSD400/1.jpg`` at σ 25 → ``noise/sigma25/BSD400/1.jpg``."""
    return f"noise/sigma{sigma}/" + pair.key.removeprefix("noise/clean/")


def _read_pair(pair: ImagePair) -> tuple[torch.Tensor, torch.Tensor]:
    clean, degraded = read_image(pair.clean), read_image(pair.degraded)
    if clean.shape != degraded.shape:
        raise ValueError(f"degraded image {str(pair.degraded)!r} has size {tuple(degraded.shape[1:])} but its clean "
                         f"partner {str(pair.clean)!r} has size {tuple(clean.shape[1:])}")
    return degraded, clean


class AllInOneTrainSet(Dataset):
    """Random crops of the standard multi-task training data, with task labels and crop records.

    Each item is a dict: ``degraded``, ``target`` ``(3, crop, crop)`` in [0, 1]; ``task`` (int label of
    ``TASKS``, all noise levels are one task); ``sigma`` (noise level, 0 for other tasks); ``path`` (the
    degraded image relative to ``<root>/train``: the render-cache key; noise: ``noise/sigma25/<name>``);
    ``box`` (int64 ``(y, x, h, w)``) and ``flip`` (bool ``(horizontal, vertical)``) to re-cut a cached
    proxy output with ``crop_flip``; with ``positive=True`` also ``positive`` — another crop of the *same*
    degraded image (same noise realisation) with its own flips, for the CFE loss (SPEC §2.3) — and its
    ``positive_box``/``positive_flip``.

    ``noise_seed=None`` draws fresh noise every draw (as the authors do); an int fixes one realisation
    per (image, σ), so that proxies can be rendered once to a cache (``cache_keys``/``degraded_image``).
    """

    def __init__(self, root: str | os.PathLike, layout: str | Sequence[str] = "3task", *, crop_size: int = 256,
                 repeats: Mapping[str, int] | None = None, sigmas: Sequence[int] = NOISE_SIGMAS, flips: bool = True,
                 positive: bool = True, noise_seed: int | None = None) -> None:
        self.tasks = resolve_layout(layout)
        self.crop_size = check_positive_int(crop_size, "crop_size")
        self.repeats = self._resolve_repeats(repeats)
        self.sigmas = tuple(int(check_positive_int(s, "sigmas")) for s in sigmas)
        if not self.sigmas:
            raise ValueError("sigmas must hold at least one noise level, got an empty sequence")
        self.flips, self.positive, self.noise_seed = flips, positive, noise_seed
        self.root = Path(root) / "train"
        self.pairs = find_pairs(self.root, self.tasks, "train")
        self._ends = []
        total = 0
        for task in self.tasks:
            total += self.repeats[task] * len(self.pairs[task])
            self._ends.append(total)

    def _resolve_repeats(self, repeats: Mapping[str, int] | None) -> dict[str, int]:
        merged = {task: DEFAULT_REPEATS[task] for task in self.tasks}
        for task, factor in (repeats or {}).items():
            if task not in self.tasks:
                raise ValueError(f"repeats has task {task!r}, which is not in this layout {list(self.tasks)}")
            merged[task] = check_positive_int(factor, f"repeats[{task!r}]")
        return merged

    def __len__(self) -> int:
        return self._ends[-1]

    def counts(self) -> dict[str, tuple[int, int]]:
        """Per task: (distinct images, items per epoch after resampling)."""
        return {task: (len(self.pairs[task]), len(self.pairs[task]) * self.repeats[task]) for task in self.tasks}

    def locate(self, index: int) -> ImagePair:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a data set of {len(self)} items")
        slot = bisect.bisect_right(self._ends, index)
        start = self._ends[slot - 1] if slot else 0
        pairs = self.pairs[self.tasks[slot]]
        return pairs[(index - start) % len(pairs)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One draw with a seed taken from torch's global generator (plain DataLoader use)."""
        seed = int(torch.randint(2**62, (1,)).item())
        return self.sample(index, torch.Generator().manual_seed(seed))

    def sample(self, index: int, generator: torch.Generator) -> dict[str, Any]:
        """The draw of item ``index`` whose randomness comes only from ``generator`` (exactly repeatable)."""
        pair = self.locate(index)
        if pair.degraded is None:
            sigma = self.sigmas[int(torch.randint(len(self.sigmas), (1,), generator=generator).item())]
            clean = read_image(pair.clean)
            key = _noise_key(pair, sigma)
            if self.noise_seed is None:
                degraded = add_gaussian_noise(clean[None], float(sigma), generator)[0]
            else:
                degraded = fixed_noisy(clean, key, sigma, self.noise_seed)
        else:
            sigma, key = 0, pair.key
            degraded, clean = _read_pair(pair)
        height, width = degraded.shape[-2:]
        box = random_box(height, width, self.crop_size, generator)
        flip = random_flip(generator, self.flips)
        item = {
            "degraded": crop_flip(degraded, box, flip), "target": crop_flip(clean, box, flip),
            "task": TASK_LABELS[pair.task], "sigma": sigma, "path": key,
            "box": torch.tensor(box, dtype=torch.int64), "flip": torch.tensor(flip, dtype=torch.bool),
        }
        if self.positive:
            positive_box = random_box(height, width, self.crop_size, generator)
            positive_flip = random_flip(generator, self.flips)
            item["positive"] = crop_flip(degraded, positive_box, positive_flip)
            item["positive_box"] = torch.tensor(positive_box, dtype=torch.int64)
            item["positive_flip"] = torch.tensor(positive_flip, dtype=torch.bool)
        return item

    def cache_keys(self) -> list[str]:
        """Every distinct degraded image a draw can use (noise: one per image and σ; needs ``noise_seed``)."""
        keys = []
        for task in self.tasks:
            for pair in self.pairs[task]:
                if pair.degraded is not None:
                    keys.append(pair.key)
                elif self.noise_seed is not None:
                    keys.extend(_noise_key(pair, sigma) for sigma in self.sigmas)
        return keys

    def degraded_image(self, key: str) -> torch.Tensor:
        """The full degraded image ``(3, H, W)`` behind a ``path`` key (what a render cache renders)."""
        if key.startswith("noise/sigma"):
            if self.noise_seed is None:
                raise ValueError("noise draws are fresh every time (noise_seed=None), so noisy images have no fixed "
                                 "version to cache; build the data set with noise_seed=<int>")
            sigma_part, _, name = key.removeprefix("noise/").partition("/")
            clean = read_image(self.root / "noise" / "clean" / name)
            return fixed_noisy(clean, key, int(sigma_part.removeprefix("sigma")), self.noise_seed)
        path = self.root / key
        if not path.is_file():
            raise ValueError(f"key {key!r} names no image under {str(self.root)!r}")
        return read_image(path)


class PairedTestSet(Dataset):
    """Whole test images of one task: items ``degraded``, ``target`` ``(3, H, W)``, ``task``, ``path``.

    Noise test sets synthesise one fixed realisation per image at ``sigma`` (seeded by ``noise_seed``).
    """

    def __init__(self, pairs: Sequence[ImagePair], sigma: int | None = None, noise_seed: int = 0) -> None:
        if not pairs:
            raise ValueError("pairs must hold at least one image pair, got none")
        if pairs[0].degraded is None and sigma is None:
            raise ValueError("sigma is required for a noise test set (clean images only), got None")
        self.pairs, self.sigma, self.noise_seed = list(pairs), sigma, noise_seed

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pair = self.pairs[index]
        if pair.degraded is None:
            clean = read_image(pair.clean)
            key = _noise_key(pair, self.sigma)
            degraded = fixed_noisy(clean, key, self.sigma, self.noise_seed)
        else:
            key = pair.key
            degraded, clean = _read_pair(pair)
        return {"degraded": degraded, "target": clean, "task": TASK_LABELS[pair.task], "path": key}


def standard_test_sets(root: str | os.PathLike, layout: str | Sequence[str] = "3task", *,
                       sigmas: Sequence[int] | None = None, noise_seed: int = 0) -> dict[str, PairedTestSet]:
    """The SPEC §5 test sets under ``<root>/test``, by name (e.g. ``CBSD68_s25``, ``SOTS``, ``Rain100L``).

    Noise levels default to 15/25/50 for the 3-task layout and 25 for the 5-task one (SPEC §4).
    """
    tasks = resolve_layout(layout)
    if sigmas is None:
        sigmas = (25,) if layout == "5task" else NOISE_SIGMAS
    pairs = find_pairs(Path(root) / "test", tasks, "test")
    sets = {}
    for task in tasks:
        if task == "noise":
            for sigma in sigmas:
                sets[f"CBSD68_s{sigma}"] = PairedTestSet(pairs[task], sigma=sigma, noise_seed=noise_seed)
        else:
            sets[TEST_SET_NAMES[task]] = PairedTestSet(pairs[task])
    return sets
