"""Build the stage-1 layout ``OUT/<task>/{degraded,clean}/`` from the standard all-in-one data sets (docs/method.md §4).

Stage 1 (``perceive-ir stage1 run``, ``perceive_components.stage1.scan_pairs``) reads one folder per task
with a ``degraded/`` and a ``clean/`` folder whose file names pair up. This script makes that layout from the
data sets as they are downloaded, with symlinks (default) or copies, and synthesises the noise task:

=========  ======================================  =================================  ===========================
task       train split (``--split train``)          test split (``--split test``)      flags (default under RAW)
=========  ======================================  =================================  ===========================
noise      BSD400 + WED clean images, σ 15/25/50   CBSD68 clean images, σ 15/25/50    ``--noise-clean`` BSD400 WED
haze       RESIDE OTS (hazy + clear)               RESIDE SOTS-outdoor                ``--haze-degraded/-clean``
rain       Rain100L train (rain-X / norain-X)      Rain100L test                      ``--rain-degraded/-clean``
blur       GoPro train (5task)                     GoPro test                         ``--blur-degraded/-clean``
lowlight   LOL-v1 our485 (5task)                   LOL-v1 eval15                      ``--lowlight-degraded/-clean``
=========  ======================================  =================================  ===========================

Default input folders, relative to ``--raw-root`` (any flag takes another path; absolute paths are used as given)::

    train: BSD400/  WED/  OTS/hazy/  OTS/clear/  Rain100L/train/rainy/  Rain100L/train/norain/
           GoPro/train/ (<sequence>/blur/*.png + <sequence>/sharp/*.png)  LOL/our485/low/  LOL/our485/high/
    test:  CBSD68/  SOTS/outdoor/hazy/  SOTS/outdoor/clear/  Rain100L/test/rainy/  Rain100L/test/norain/
           GoPro/test/  LOL/eval15/low/  LOL/eval15/high/

Pairing (a degraded image finds its clean image by its path relative to its folder, suffix ignored): the
same path; RESIDE ``0001_0.8_0.2.jpg`` → ``0001``; Rain100L ``rain-12`` → ``norain-12``; GoPro
``<seq>/blur/000001`` → ``<seq>/sharp/000001``. A degraded and a clean flag may name the same folder
(Rain100L ships ``rain-*``/``norain-*`` side by side; GoPro's sequences hold both ``blur/`` and ``sharp/``).

Output names: a clean image becomes ``<task>/clean/<id><suffix>`` with ``id`` its relative path with ``/``
replaced by ``-`` (noise: prefixed by its source folder name, e.g. ``BSD400-test_001``); its degraded image
``<task>/degraded/<id><suffix>``, or ``<id>_<variant>`` when one clean image has several (OTS, noise levels
``<id>_s15``; ``--sigma-mode cycle`` gives each clean image one level, cycling over the images, as the
authors' stage 1 does). Noise is synthesised once, ``y = clamp(x + σ/255 · n)`` rounded to 8-bit PNG, with a
generator seeded by a hash of the output path (``--noise-seed`` salts it): re-running gives the same files,
and existing outputs are kept. The result is checked with ``scan_pairs``.

Examples::

    python examples/prepare_stage1_data.py --raw-root /data/raw --out /data/stage1/train --protocol 5task
    python examples/prepare_stage1_data.py --raw-root /data/raw --out /data/stage1/test --protocol 5task --split test
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from perceive_components.data import add_gaussian_noise  # noqa: E402
from perceive_components.ops.io import list_images, read_image, write_image  # noqa: E402
from perceive_components.stage1 import scan_pairs  # noqa: E402

log = logging.getLogger("prepare_stage1_data")

PROTOCOLS: dict[str, tuple[str, ...]] = {
    "3task": ("noise", "haze", "rain"),
    "5task": ("noise", "haze", "rain", "blur", "lowlight"),
}
NOISE_SIGMAS = (15, 25, 50)
MODES = ("symlink", "copy")


@dataclass(frozen=True)
class PairedTask:
    """A task whose degraded images come with the data set: where they are and how names pair up."""

    task: str
    dataset: dict[str, str]  # split -> what the folders must hold (for error messages)
    defaults: dict[str, tuple[str, str]]  # split -> (degraded folder, clean folder) under --raw-root
    candidates: Callable[[PurePosixPath], list[PurePosixPath]]  # degraded relative stem -> clean stems to try
    is_clean: Callable[[PurePosixPath], bool]  # which files are clean when both flags name one folder
    folder_words: tuple[str, ...] = ()  # path parts left out of output names (GoPro's "sharp")


def _same(stem: PurePosixPath) -> list[PurePosixPath]:
    return [stem]


def _reside(stem: PurePosixPath) -> list[PurePosixPath]:
    scene = stem.name.split("_")[0]
    return [stem, stem.with_name(scene), PurePosixPath(scene)]  # the last one: hazy images in shard sub-folders


def _rain(stem: PurePosixPath) -> list[PurePosixPath]:
    return [stem, stem.with_name("no" + stem.name)]


def _gopro(stem: PurePosixPath) -> list[PurePosixPath]:
    parts = ["sharp" if part == "blur" else part for part in stem.parts]
    return [stem, PurePosixPath(*parts)]


PAIRED_TASKS: dict[str, PairedTask] = {
    "haze": PairedTask(
        "haze", {"train": "RESIDE OTS", "test": "RESIDE SOTS-outdoor"},
        {"train": ("OTS/hazy", "OTS/clear"), "test": ("SOTS/outdoor/hazy", "SOTS/outdoor/clear")},
        _reside, lambda stem: "_" not in stem.name),
    "rain": PairedTask(
        "rain", {"train": "Rain100L training split", "test": "Rain100L test split"},
        {"train": ("Rain100L/train/rainy", "Rain100L/train/norain"),
         "test": ("Rain100L/test/rainy", "Rain100L/test/norain")},
        _rain, lambda stem: stem.name.startswith("no")),
    "blur": PairedTask(
        "blur", {"train": "GoPro training split", "test": "GoPro test split"},
        {"train": ("GoPro/train", "GoPro/train"), "test": ("GoPro/test", "GoPro/test")},
        _gopro, lambda stem: "sharp" in stem.parts, ("sharp",)),
    "lowlight": PairedTask(
        "lowlight", {"train": "LOL-v1 our485", "test": "LOL-v1 eval15"},
        {"train": ("LOL/our485/low", "LOL/our485/high"), "test": ("LOL/eval15/low", "LOL/eval15/high")},
        _same, lambda stem: False),
}
NOISE_DEFAULTS = {"train": ("BSD400", "WED"), "test": ("CBSD68",)}
NOISE_DATASET = {"train": "BSD400 + WED clean images", "test": "CBSD68 clean images"}


@dataclass(frozen=True)
class Planned:
    """One output file: a link/copy of ``source``, or (``sigma`` set) a noisy version of ``source``."""

    target: str  # path relative to the output root, POSIX
    source: Path
    sigma: int | None = None
    clean: str | None = None  # for a degraded image: the target of its clean image


# ----------------------------------------------------------------------------- planning
def _flat_id(stem: PurePosixPath, leave_out: tuple[str, ...] = ()) -> str:
    return "-".join(part for part in stem.parts if part not in leave_out)


def _variant(stem: PurePosixPath, clean_stem: PurePosixPath) -> str:
    """What tells one of several degraded versions apart: ``0001_0.8_0.2`` of ``0001`` → ``0.8-0.2``."""
    name, prefix = _flat_id(stem), _flat_id(clean_stem)
    if name.startswith(prefix) and len(name) > len(prefix):
        name = name[len(prefix):].lstrip("_-")
    return name.replace("_", "-")


def _resolve(raw_root: Path | None, folder: str) -> Path:
    path = Path(folder)
    return path if path.is_absolute() or raw_root is None else raw_root / path


def _relative_stem(path: Path, folder: Path) -> PurePosixPath:
    return PurePosixPath(path.relative_to(folder).with_suffix("").as_posix())


def _limited(items: list, limit: int) -> list:
    return items[:limit] if limit > 0 else items


def plan_noise(folders: Sequence[Path], sigmas: Sequence[int], limit: int, problems: list[str],
               sigma_mode: str = "all") -> list[Planned]:
    """Clean links under ``noise/clean`` and noisy PNGs under ``noise/degraded``: one per clean image and σ
    (``sigma_mode='all'``), or one per clean image with σ cycling over the images (``'cycle'``, the authors')."""
    names = [folder.name for folder in folders]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        problems.append(f"noise: clean folders must have distinct names (they prefix the file names), got {names}")
    planned, index = [], 0
    for folder in folders:
        images = _limited(list_images(folder), limit)
        if not images:
            problems.append(f"noise: {folder} holds no images")
        for path in images:
            clean_id = f"{folder.name}-{_flat_id(_relative_stem(path, folder))}"
            clean_target = f"noise/clean/{clean_id}{path.suffix.lower()}"
            planned.append(Planned(clean_target, path))
            levels = sigmas if sigma_mode == "all" else [sigmas[index % len(sigmas)]]
            planned += [Planned(f"noise/degraded/{clean_id}_s{sigma}.png", path, sigma, clean_target)
                        for sigma in levels]
            index += 1
    return planned


def plan_paired(spec: PairedTask, degraded_dir: Path, clean_dir: Path, limit: int,
                problems: list[str]) -> list[Planned]:
    """Links of the degraded and clean images of one task, renamed so that ``scan_pairs`` pairs them."""
    same_folder = degraded_dir.resolve() == clean_dir.resolve()
    clean_files, degraded_files = list_images(clean_dir), list_images(degraded_dir)
    if same_folder:
        clean_files = [p for p in clean_files if spec.is_clean(_relative_stem(p, clean_dir))]
        degraded_files = [p for p in degraded_files if not spec.is_clean(_relative_stem(p, degraded_dir))]
    clean_by_stem: dict[PurePosixPath, Path] = {}
    for path in clean_files:
        stem = _relative_stem(path, clean_dir)
        if stem in clean_by_stem:
            problems.append(f"{spec.task}: two clean images share the name {stem} in {clean_dir}")
        clean_by_stem[stem] = path
    groups: dict[PurePosixPath, list[tuple[PurePosixPath, Path]]] = defaultdict(list)
    orphans = []
    for path in degraded_files:
        stem = _relative_stem(path, degraded_dir)
        match = next((c for c in spec.candidates(stem) if c in clean_by_stem), None)
        if match is None:
            orphans.append(path.relative_to(degraded_dir).as_posix())
        else:
            groups[match].append((stem, path))
    if orphans:
        shown = ", ".join(orphans[:5]) + (", …" if len(orphans) > 5 else "")
        problems.append(f"{spec.task}: {len(orphans)} of {len(degraded_files)} degraded images in {degraded_dir} "
                        f"have no clean partner in {clean_dir}: {shown}")
    if not degraded_files or not clean_files:
        problems.append(f"{spec.task}: no {'degraded' if not degraded_files else 'clean'} images found "
                        f"(degraded folder {degraded_dir}, clean folder {clean_dir})")
    planned = []
    for clean_stem in _limited(sorted(groups), limit):
        clean_path, clean_id = clean_by_stem[clean_stem], _flat_id(clean_stem, spec.folder_words)
        clean_target = f"{spec.task}/clean/{clean_id}{clean_path.suffix.lower()}"
        planned.append(Planned(clean_target, clean_path))
        members = sorted(groups[clean_stem])
        for stem, path in members:
            name = clean_id if len(members) == 1 else f"{clean_id}_{_variant(stem, clean_stem)}"
            planned.append(Planned(f"{spec.task}/degraded/{name}{path.suffix.lower()}", path, clean=clean_target))
    return planned


def plan(args: argparse.Namespace) -> list[Planned]:
    """Every output file for the chosen tasks; raises ``ValueError`` listing every missing or broken input."""
    raw_root = Path(args.raw_root) if args.raw_root else None
    tasks = _tasks(args)
    missing, problems = [], []
    folders: dict[str, list[Path]] = {}
    for task in tasks:
        if task == "noise":
            wanted = [("--noise-clean", _resolve(raw_root, f), NOISE_DATASET[args.split])
                      for f in (args.noise_clean or NOISE_DEFAULTS[args.split])]
        else:
            spec = PAIRED_TASKS[task]
            default_degraded, default_clean = spec.defaults[args.split]
            dataset = spec.dataset[args.split]
            wanted = [(f"--{task}-degraded", _resolve(raw_root, getattr(args, f"{task}_degraded") or default_degraded),
                       f"{dataset}, degraded images"),
                      (f"--{task}-clean", _resolve(raw_root, getattr(args, f"{task}_clean") or default_clean),
                       f"{dataset}, clean images")]
        absent: dict[Path, tuple[list[str], list[str]]] = {}  # one line per folder, even if two flags name it
        for flag, path, what in wanted:
            if not path.is_dir():
                flags, whats = absent.setdefault(path, ([], []))
                flags.append(flag)
                whats.append(what)
        missing += [f"{task}: {path} does not exist ({' + '.join(whats)}; set {' / '.join(flags)})"
                    for path, (flags, whats) in absent.items()]
        folders[task] = [path for _, path, _ in wanted]
    if missing:
        where = f"--raw-root {raw_root}" if raw_root else "no --raw-root"
        raise ValueError(f"{len(missing)} input folder(s) missing for the {args.split} split of {list(tasks)} "
                         f"({where}):\n  - " + "\n  - ".join(missing)
                         + "\nSee docs/reproduce.md for where to download each data set.")
    planned = []
    for task in tasks:
        if task == "noise":
            planned += plan_noise(folders[task], args.sigmas, args.limit, problems, args.sigma_mode)
        else:
            planned += plan_paired(PAIRED_TASKS[task], *folders[task], args.limit, problems)
    if problems:
        raise ValueError("the input data cannot be paired:\n  - " + "\n  - ".join(problems))
    return planned


def _tasks(args: argparse.Namespace) -> tuple[str, ...]:
    if not args.tasks:
        return PROTOCOLS[args.protocol]
    unknown = [t for t in args.tasks if t not in PROTOCOLS["5task"]]
    if unknown:
        raise ValueError(f"--tasks must be among {list(PROTOCOLS['5task'])}, got {unknown}")
    return tuple(args.tasks)


# ----------------------------------------------------------------------------- writing
def noise_seed(relative_target: str, salt: int) -> int:
    """Seed of the noise of one output file: ``int(sha256(salt | path)[:15], 16)``, stable across runs."""
    return int(hashlib.sha256(f"{salt}|{relative_target}".encode("utf-8")).hexdigest()[:15], 16)


def write_noisy(item: Planned, out: Path, salt: int) -> None:
    clean = read_image(item.source)[None]
    generator = torch.Generator().manual_seed(noise_seed(item.target, salt))
    write_image(out / item.target, add_gaussian_noise(clean, float(item.sigma), generator)[0])


def place(source: Path, target: Path, mode: str) -> bool:
    """Link or copy ``source`` to ``target`` (atomically); returns False when ``target`` is already right."""
    source = source.resolve()
    if mode == "symlink":
        if target.is_symlink() and Path(os.readlink(target)) == source:
            return False
    elif target.is_file() and not target.is_symlink() and target.stat().st_size == source.stat().st_size:
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp{os.getpid()}")
    if temporary.is_symlink() or temporary.exists():
        temporary.unlink()
    if mode == "symlink":
        os.symlink(source, temporary)
    else:
        shutil.copy2(source, temporary)
    os.replace(temporary, target)
    return True


def prepare(args: argparse.Namespace) -> dict[str, int]:
    """Plan, write and check the layout; returns the number of pairs per task."""
    if any(s <= 0 for s in args.sigmas):
        raise ValueError(f"--sigmas must be positive noise levels on the 0-255 scale, got {args.sigmas}")
    planned = plan(args)
    out = Path(args.out)
    written = 0
    for item in tqdm(planned, desc="prepare", disable=not args.progress, dynamic_ncols=True):
        if item.sigma is None:
            written += place(item.source, out / item.target, args.mode)
        elif not (out / item.target).is_file():
            write_noisy(item, out, args.noise_seed)
            written += 1
    log.info("%d files written, %d already in place", written, len(planned) - written)
    return check_layout(out, planned)


def check_layout(out: Path, planned: Sequence[Planned]) -> dict[str, int]:
    """``scan_pairs(out)`` must find exactly the planned pairs (stale files from other runs are reported)."""
    pairs = scan_pairs(out)
    expected = {p.target: p.clean for p in planned if p.clean is not None}
    found = {pair["degraded"]: pair["clean"] for pair in pairs}
    extra = sorted(set(found) - set(expected))
    if extra:
        raise ValueError(f"{out} holds {len(extra)} degraded image(s) this run did not plan (e.g. {extra[:3]}): "
                         "use an empty --out folder for each preparation")
    wrong = sorted(k for k in expected if found.get(k) != expected[k])
    if wrong:  # only possible with unusual names (a clean id that looks like '<other id>_<variant>')
        raise ValueError(f"scan_pairs pairs {len(wrong)} prepared image(s) differently than planned, e.g. "
                         f"{wrong[0]} -> {found.get(wrong[0])} instead of {expected[wrong[0]]}: rename the sources")
    counts: dict[str, int] = defaultdict(int)
    for pair in pairs:
        counts[pair["task"]] += 1
    return dict(sorted(counts.items()))


# ----------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", required=True, help="output root: <task>/degraded and <task>/clean are made here")
    parser.add_argument("--raw-root", help="folder the default (and relative) input folders are looked up in")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="3task", help="3task: noise, haze, rain; "
                        "5task: + blur, lowlight")
    parser.add_argument("--tasks", nargs="+", metavar="TASK", help="explicit task list instead of --protocol")
    parser.add_argument("--split", choices=("train", "test"), default="train",
                        help="which default folders to read (train: BSD400/WED, OTS, …; test: CBSD68, SOTS, …)")
    parser.add_argument("--mode", choices=MODES, default="symlink", help="symlink (absolute) or copy the images")
    parser.add_argument("--noise-clean", nargs="+", metavar="DIR", help="clean image folders for the noise task")
    for task, spec in PAIRED_TASKS.items():
        degraded, clean = spec.defaults["train"]
        parser.add_argument(f"--{task}-degraded", metavar="DIR",
                            help=f"{spec.dataset['train']} degraded images (default: {degraded}; test split: "
                                 f"{spec.defaults['test'][0]})")
        parser.add_argument(f"--{task}-clean", metavar="DIR",
                            help=f"{spec.dataset['train']} clean images (default: {clean}; test split: "
                                 f"{spec.defaults['test'][1]})")
    parser.add_argument("--sigmas", nargs="+", type=int, default=list(NOISE_SIGMAS),
                        help="noise levels on the 0-255 scale, one noisy image per clean image and level")
    parser.add_argument("--sigma-mode", choices=("all", "cycle"), default="all",
                        help="all: one noisy image per clean image and level; cycle: one per clean image, the level "
                             "cycling over the sorted images (the authors' stage 1)")
    parser.add_argument("--noise-seed", type=int, default=0, help="salt of the per-file noise seeds")
    parser.add_argument("--limit", type=int, default=0,
                        help="use only the first N clean images per source folder / task (0 = all), for trial runs")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    counts = prepare(args)
    print(f"{args.out}: " + ", ".join(f"{task} {n} pairs" for task, n in counts.items()))
    return counts


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"prepare_stage1_data.py: error: {error}") from None
