"""The standard all-in-one training and test sets: 3-task (N+H+R) and 5-task (+ blur, low light), docs/method.md §4.

Folder layout (docs/data.md)::

    <root>/train/noise/clean/            BSD400 + WED          (noise is synthesised, σ ∈ {15, 25, 50})
    <root>/train/haze/hazy/, haze/clean/   RESIDE OTS
    <root>/train/rain/rainy/, rain/clean/  Rain100L
    <root>/train/blur/blurry/, blur/sharp/ GoPro                (5-task)
    <root>/train/lowlight/low/, lowlight/high/ LOL-v1           (5-task)
    <root>/test/...                      same folders: CBSD68, SOTS-outdoor, Rain100L, GoPro, LOL-v1

Task resampling (authors' repeat factors): every image of a task appears ``repeats[task]`` times per
epoch — 3-task noise 12 / haze 1 / rain 360; 5-task adds blur 30, low light 140.

Synthetic noise: y = clamp(x + σ/255 · n), n ~ N(0, 1), on the whole (resized, if small) clean image. As in
the authors' data set, σ is a property of the epoch entry: with repeat r, every clean image is drawn r times
per epoch, r / len(sigmas) times at each σ. All randomness of a draw (noise, crops, flips) comes from one
``torch.Generator``, so a draw is a pure function of (index, seed): ``sample(index, generator)`` is what a
resumable sampler calls.
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
from ..ops.validation import check_choice, check_positive_int
from .degradations import add_gaussian_noise
from .fitting import SMALL_IMAGE_RULES, fit_image
from .pairing import ImagePair, find_pairs
from .paired import paired_crops
from .tasks import STANDARD_TASKS

TASK_LABELS: dict[str, int] = {task: label for label, task in enumerate(STANDARD_TASKS.names)}
SIGMA_DRAWS = ("per_entry", "per_draw")
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
        raise ValueError(f"layout must list distinct tasks among {list(TASK_LABELS)}, got {list(tasks)}")
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
    """Random crops of the standard multi-task training data, with task labels and crop geometry.

    Each item is a dict: ``degraded``, ``target`` ``(3, crop, crop)`` in [0, 1]; ``task`` (int id in
    ``STANDARD_TASKS``, all noise levels are one task); ``sigma`` (noise level, 0 for other tasks); ``path``
    (the degraded image relative to ``<root>/train``: the render-cache key; noise: ``noise/sigma25/<name>``);
    ``crop`` (int64 ``(12,)``, ``CropFlip.as_tensor()``: decode with ``CropFlip.from_tensor`` and read aligned
    proxy negatives with it); with ``positive=True`` also ``positive`` — another crop of the *same* degraded
    image (same noise realisation) with its own flips, for the CFE loss (docs/method.md §2.3) — and its
    ``positive_crop``.

    Defaults follow the authors' data set (Perceive-IR ``src/perceiveIR/data.py``, ``PaperFiveDataset`` with
    their configs' ``shared_noise_positive: true``):

    - ``small_image="resize"``: an image with a side shorter than the crop is bicubic-upscaled to hold it
      (``fitting.fit_size``; BSD400's 180² images for 256² crops); the clean image is resized *before* the
      noise. A padding mode (``"reflect"``, ``"symmetric"``, ``"edge"``, ``"zeros"``) pads instead.
    - ``sigma_draw="per_entry"``: σ belongs to the epoch entry — with repeat r an image is drawn r / len(sigmas)
      times at each σ per epoch (authors: 12 = 4 × 3); when r is not a multiple of len(sigmas), the σ's rotate
      over images and rounds. ``"per_draw"`` draws σ uniformly at every draw instead.
    - ``noise_seed=None`` draws fresh noise every draw (as the authors do); an int fixes one realisation
      per (image, σ), so that proxies can be rendered once to a cache (``cache_keys``/``degraded_image``).
    """

    def __init__(self, root: str | os.PathLike, layout: str | Sequence[str] = "3task", *, crop_size: int = 256,
                 repeats: Mapping[str, int] | None = None, sigmas: Sequence[int] = NOISE_SIGMAS, flips: bool = True,
                 positive: bool = True, noise_seed: int | None = None, small_image: str = "resize",
                 sigma_draw: str = "per_entry") -> None:
        self.tasks = resolve_layout(layout)
        self.crop_size = check_positive_int(crop_size, "crop_size")
        self.repeats = self._resolve_repeats(repeats)
        self.sigmas = tuple(int(check_positive_int(s, "sigmas")) for s in sigmas)
        if not self.sigmas:
            raise ValueError("sigmas must hold at least one noise level, got an empty sequence")
        self.small_image = check_choice(small_image, "small_image", SMALL_IMAGE_RULES)
        self.sigma_draw = check_choice(sigma_draw, "sigma_draw", SIGMA_DRAWS)
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

    def _entry(self, index: int) -> tuple[ImagePair, int | None]:
        """The image pair of item ``index`` and, for noise with ``sigma_draw="per_entry"``, its σ.

        Within a task block, item j is image i = j mod N in round j // N; its σ is sigmas[(round + i) mod S]."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a data set of {len(self)} items")
        slot = bisect.bisect_right(self._ends, index)
        offset = index - (self._ends[slot - 1] if slot else 0)
        pairs = self.pairs[self.tasks[slot]]
        image, round_ = offset % len(pairs), offset // len(pairs)
        pair = pairs[image]
        if pair.degraded is not None or self.sigma_draw == "per_draw":
            return pair, None
        return pair, self.sigmas[(round_ + image) % len(self.sigmas)]

    def locate(self, index: int) -> ImagePair:
        return self._entry(index)[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One draw with a seed taken from torch's global generator (plain DataLoader use)."""
        seed = int(torch.randint(2**62, (1,)).item())
        return self.sample(index, torch.Generator().manual_seed(seed))

    def _noisy(self, clean: torch.Tensor, key: str, sigma: int, generator: torch.Generator | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean, noisy) whole images: the clean one resized first under the authors' rule (noise is never
        resized), then fresh noise from ``generator`` or the fixed realisation of ``noise_seed``."""
        if self.small_image == "resize":
            clean = fit_image(clean, self.crop_size)
        if self.noise_seed is None:
            return clean, add_gaussian_noise(clean[None], float(sigma), generator)[0]
        return clean, fixed_noisy(clean, key, sigma, self.noise_seed)

    def sample(self, index: int, generator: torch.Generator) -> dict[str, Any]:
        """The draw of item ``index`` whose randomness comes only from ``generator`` (exactly repeatable).

        Order of draws: σ (``per_draw`` only), the noise, the crop (top, left, flips), the positive crop."""
        pair, sigma = self._entry(index)
        if pair.degraded is None:
            if sigma is None:
                sigma = self.sigmas[int(torch.randint(len(self.sigmas), (1,), generator=generator).item())]
            key = _noise_key(pair, sigma)
            clean, degraded = self._noisy(read_image(pair.clean), key, sigma, generator)
        else:
            sigma, key = 0, pair.key
            degraded, clean = _read_pair(pair)
        crops = paired_crops(degraded, clean, self.crop_size, generator=generator, positive=self.positive,
                             flips=self.flips, small_image=self.small_image)
        item = {"degraded": crops.degraded, "target": crops.target, "task": TASK_LABELS[pair.task], "sigma": sigma,
                "path": key, "crop": crops.crop.as_tensor()}
        if self.positive:
            item["positive"], item["positive_crop"] = crops.positive, crops.positive_crop.as_tensor()
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
        """The full degraded image ``(3, H, W)`` behind a ``path`` key (what a render cache renders). For noise:
        the fixed realisation on the clean image, resized first if it is smaller than ``crop_size`` (so it
        depends on the crop size under ``small_image="resize"``)."""
        if key.startswith("noise/sigma"):
            if self.noise_seed is None:
                raise ValueError("noise draws are fresh every time (noise_seed=None), so noisy images have no fixed "
                                 "version to cache; build the data set with noise_seed=<int>")
            sigma_part, _, name = key.removeprefix("noise/").partition("/")
            clean = read_image(self.root / "noise" / "clean" / name)
            return self._noisy(clean, key, int(sigma_part.removeprefix("sigma")), None)[1]
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
    """The docs/method.md §5 test sets under ``<root>/test``, by name (e.g. ``CBSD68_s25``, ``SOTS``, ``Rain100L``).

    Noise levels default to 15/25/50 for the 3-task layout and 25 for the 5-task one (docs/method.md §4).
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
