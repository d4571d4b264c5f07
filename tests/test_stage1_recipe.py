"""examples/prepare_stage1_data.py and examples/stage1_recipe.py: layout building, the recipe end to end at tiny
scale on CPU, resuming without redoing work, and clear errors."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from examples import prepare_stage1_data as prep
from examples import stage1_recipe as recipe
from perceive_components import QualityPerceiver
from perceive_components.data.degradations import add_gaussian_noise, degrade
from perceive_components.ops.io import read_image, write_image
from perceive_components.stage1 import TripletImages, audit_perceiver, fold_of, read_jsonl
from stage1_helpers import smooth_images

SIZE = 32



def _write_set(raw: Path, generator: torch.Generator, task: str | None,
               pairs: list[tuple[str, tuple[str, ...]]]) -> None:
    """Write clean images and, for ``task``, degraded versions of each at the given paths under ``raw``."""
    clean = smooth_images(len(pairs), SIZE, generator)
    for index, (clean_path, degraded_paths) in enumerate(pairs):
        write_image(raw / clean_path, clean[index])
        for degraded_path in degraded_paths:
            write_image(raw / degraded_path, degrade(clean[index : index + 1], task, 0.6, generator)[0])


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory) -> Path:
    """The standard data sets in miniature, under the default folder names of prepare_stage1_data.py."""
    raw = tmp_path_factory.mktemp("raw")
    g = torch.Generator().manual_seed(0)
    _write_set(raw, g, None, [(f"BSD400/test_{i:03d}.png", ()) for i in range(3)])
    _write_set(raw, g, None, [(f"WED/pristine_images/{i:05d}.bmp", ()) for i in range(3)])
    _write_set(raw, g, None, [(f"CBSD68/{i}.png", ()) for i in range(2)])
    # OTS: several hazy versions of one clear image; SOTS: hazy images in shard sub-folders, clear ones flat
    _write_set(raw, g, "haze", [(f"OTS/clear/{i:04d}.png", (f"OTS/hazy/{i:04d}_0.8_0.2.png",
                                                             f"OTS/hazy/{i:04d}_0.9_0.1.png")) for i in range(3)])
    _write_set(raw, g, "haze", [(f"SOTS/outdoor/clear/{i:04d}.png",
                                 (f"SOTS/outdoor/hazy/part{i}/{i:04d}_0.8_0.2.png",)) for i in range(2)])
    for split, count in (("train", 4), ("test", 2)):
        _write_set(raw, g, "rain", [(f"Rain100L/{split}/norain/norain-{i}.png",
                                     (f"Rain100L/{split}/rainy/rain-{i}.png",)) for i in range(count)])
    _write_set(raw, g, "blur", [(f"GoPro/train/GOPR03{s}/sharp/{i:06d}.png",
                                 (f"GoPro/train/GOPR03{s}/blur/{i:06d}.png",)) for s in (72, 74) for i in range(2)])
    _write_set(raw, g, "lowlight", [(f"LOL/our485/high/{i}.png", (f"LOL/our485/low/{i}.png",)) for i in range(3)])
    return raw


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- preparation
def test_prepare_builds_the_stage1_layout_with_deterministic_noise(raw_root, tmp_path):
    out = tmp_path / "stage1"
    counts = prep.main(["--raw-root", str(raw_root), "--out", str(out), "--protocol", "5task", "--no-progress"])
    assert counts == {"blur": 4, "haze": 6, "lowlight": 3, "noise": 18, "rain": 4}
    # names pair up for scan_pairs; OTS variants and noise levels get a suffix after the clean id
    assert sorted(p.name for p in (out / "haze" / "degraded").iterdir())[:2] == ["0000_0.8-0.2.png", "0000_0.9-0.1.png"]
    assert (out / "noise" / "clean" / "WED-pristine_images-00000.bmp").is_symlink()
    assert (out / "blur" / "clean" / "GOPR0372-000001.png").resolve() == \
        (raw_root / "GoPro/train/GOPR0372/sharp/000001.png").resolve()
    assert (out / "rain" / "degraded" / "norain-3.png").resolve() == \
        (raw_root / "Rain100L/train/rainy/rain-3.png").resolve()

    # the noise is add_gaussian_noise with a generator seeded by the output path, rounded to 8 bits
    target = "noise/degraded/BSD400-test_001_s25.png"
    clean = read_image(raw_root / "BSD400" / "test_001.png")[None]
    expected = add_gaussian_noise(clean, 25.0, torch.Generator().manual_seed(prep.noise_seed(target, 0)))[0]
    noisy = read_image(out / target)
    assert torch.equal(noisy, (expected * 255).round() / 255)
    residual = noisy - clean[0]
    assert 15 / 255 < float(residual.std()) < 35 / 255  # σ 25 (a little clamping at the range ends)

    # re-running keeps every file; a deleted noisy image comes back bit-identical; another salt changes the noise
    before = _mtimes(out)
    data = (out / target).read_bytes()
    (out / target).unlink()
    prep.main(["--raw-root", str(raw_root), "--out", str(out), "--protocol", "5task", "--no-progress"])
    after = _mtimes(out)
    assert (out / target).read_bytes() == data
    assert {k: v for k, v in after.items() if k != target} == {k: v for k, v in before.items() if k != target}
    other = tmp_path / "other-salt"
    prep.main(["--raw-root", str(raw_root), "--out", str(other), "--tasks", "noise", "--noise-seed", "1",
               "--no-progress"])
    assert (other / target).read_bytes() != data
    cycled = tmp_path / "cycled"  # the authors' variant: one level per clean image, cycling over the sorted images
    assert prep.main(["--raw-root", str(raw_root), "--out", str(cycled), "--tasks", "noise", "--sigma-mode", "cycle",
                      "--no-progress"]) == {"noise": 6}
    assert sorted(p.name for p in (cycled / "noise" / "degraded").iterdir())[:4] == [
        "BSD400-test_000_s15.png", "BSD400-test_001_s25.png", "BSD400-test_002_s50.png",
        "WED-pristine_images-00000_s15.png"]
    assert (cycled / target).read_bytes() == data  # same file name, same noise


def test_prepare_copy_mode_one_folder_pairs_and_test_split(raw_root, tmp_path):
    # Rain100L shipped with rain-* and norain-* side by side: both flags name one folder
    mixed = tmp_path / "RainTrainL"
    mixed.mkdir()
    for path in [*(raw_root / "Rain100L/train/rainy").iterdir(), *(raw_root / "Rain100L/train/norain").iterdir()]:
        (mixed / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "copied"
    counts = prep.main(["--out", str(out), "--tasks", "rain", "--rain-degraded", str(mixed), "--rain-clean", str(mixed),
                        "--mode", "copy", "--no-progress"])
    assert counts == {"rain": 4}
    copied = out / "rain" / "degraded" / "norain-0.png"
    assert not copied.is_symlink() and copied.read_bytes() == (mixed / "rain-0.png").read_bytes()
    assert (out / "rain" / "clean" / "norain-0.png").read_bytes() == (mixed / "norain-0.png").read_bytes()

    test = prep.main(["--raw-root", str(raw_root), "--out", str(tmp_path / "test"), "--split", "test", "--no-progress"])
    assert test == {"haze": 2, "noise": 6, "rain": 2}


def test_prepare_errors_list_everything_missing(raw_root, tmp_path):
    with pytest.raises(ValueError) as info:
        prep.main(["--raw-root", str(tmp_path / "nothing"), "--out", str(tmp_path / "o"), "--protocol", "5task",
                   "--split", "test", "--no-progress"])
    message = str(info.value)
    assert "8 input folder(s) missing" in message
    for expected in ("CBSD68 clean images; set --noise-clean", "SOTS/outdoor/hazy", "--lowlight-clean",
                     "GoPro test split, degraded images + GoPro test split, clean images; "
                     "set --blur-degraded / --blur-clean"):
        assert expected in message

    broken = tmp_path / "broken"
    for name in ("rain-0.png", "rain-1.png"):
        (broken / "rainy").mkdir(parents=True, exist_ok=True)
        (broken / "rainy" / name).write_bytes((raw_root / "Rain100L/train/rainy" / name).read_bytes())
    (broken / "norain").mkdir()
    (broken / "norain" / "norain-0.png").write_bytes((raw_root / "Rain100L/train/norain/norain-0.png").read_bytes())
    with pytest.raises(ValueError, match=r"rain: 1 of 2 degraded images in .*rainy have no clean partner .*rain-1.png"):
        prep.main(["--out", str(tmp_path / "o"), "--tasks", "rain", "--rain-degraded", str(broken / "rainy"),
                   "--rain-clean", str(broken / "norain"), "--no-progress"])

    out = tmp_path / "stale"
    prep.main(["--raw-root", str(raw_root), "--out", str(out), "--tasks", "lowlight", "--no-progress"])
    with pytest.raises(ValueError, match="this run did not plan"):  # a second, smaller preparation into one folder
        prep.main(["--raw-root", str(raw_root), "--out", str(out), "--tasks", "lowlight", "--limit", "1",
                   "--no-progress"])
    with pytest.raises(ValueError, match="--tasks must be among"):
        prep.main(["--out", str(out), "--tasks", "snow", "--no-progress"])


# ----------------------------------------------------------------------------- the recipe
TINY = ["--backbone", "restormer-tiny", "--restorer-steps", "3", "--restorer-crop", "32", "--restorer-batch", "2",
        "--prompt-steps", "3", "--prompt-batch", "6", "--checkpoint-every", "2", "--clip", "tiny", "--device", "cpu",
        "--no-progress"]


@pytest.fixture(scope="module")
def recipe_run(raw_root, tmp_path_factory):
    """Prepare 3-task train and test data, then run the whole recipe once at tiny scale."""
    base = tmp_path_factory.mktemp("recipe")
    prep.main(["--raw-root", str(raw_root), "--out", str(base / "train"), "--no-progress"])
    prep.main(["--raw-root", str(raw_root), "--out", str(base / "test"), "--split", "test", "--no-progress"])
    argv = ["--data-root", str(base / "train"), "--out", str(base / "run"), "--holdout-fold", "1",
            "--audit-root", str(base / "test"), *TINY]
    return base, argv, recipe.main(argv)


def test_recipe_runs_end_to_end(recipe_run):
    base, _, report = recipe_run
    run = base / "run"
    triplets = read_jsonl(run / "triplets.jsonl")
    assert len(triplets) == 18 + 6 + 4  # noise 6 clean × 3 σ, haze 3 × 2 OTS variants, rain 4
    for row in triplets:  # every pair rendered once, into the fold its clean image hashes to
        assert row["fold"] == fold_of(row["clean"], 2) and (run / row["medium"]).is_file()
    # build_triplets kept the fold models and its settings; the mid-training checkpoints are gone
    assert sorted(p.name for p in (run / "folds").iterdir()) == ["fold0.safetensors", "fold1.safetensors",
                                                                 "settings.json"]
    # the repeat factors reach the fold models through build_triplets' train_kwargs (the tiny data holds every
    # haze image in fold 1 and every rain image in fold 0, so only noise keeps one: see the test below)
    stored = json.loads((run / "folds" / "settings.json").read_text())["train"]
    assert stored["task_repeats"] == "{'haze': 1, 'noise': 1, 'rain': 120}" and stored["steps"] == "3" and stored["amp_dtype"] == "None"
    assert set(report["gates"]["per_task"]) == {"noise", "haze", "rain"}
    assert set(report["audit"]) == {"test", "holdout_fold1"}
    held_out = [row for row in triplets if row["fold"] == 1]
    assert report["audit"]["holdout_fold1"]["n_triplets"] == len(held_out)
    assert report["audit"]["test"]["n_triplets"] == len(read_jsonl(run / "audit" / "triplets.jsonl")) == 6 + 2 + 2
    assert len((run / "prompt_history.csv").read_text().splitlines()) == 1 + 3
    for name in ("Medium-image gates", "Perceiver audit: test", "Perceiver audit: holdout_fold1"):
        assert name in (run / "report.md").read_text()

    # the saved perceiver records names only; with the same tiny CLIP rebuilt it reproduces the recorded audit
    config = json.loads((run / "perceiver" / "config.json").read_text())
    assert config["clip_model"] == "tiny-random-clip" and config["pretrained"] is None and config["n_ctx"] == 16
    assert config["audit"]["audit_set"] == "test" and config["training"]["steps"] == 3
    assert config["training"]["triplets"] == len(triplets) - len(held_out)  # the held-out fold was not trained on
    perceiver = QualityPerceiver.from_pretrained(run / "perceiver", clip=recipe.build_tiny_clip(0))
    again = audit_perceiver(perceiver, TripletImages(run / "audit" / "triplets.jsonl", base / "test"), record=False)
    assert again["accuracy"] == pytest.approx(report["audit"]["test"]["accuracy"])
    assert again["mean_q"] == pytest.approx(report["audit"]["test"]["mean_q"], abs=1e-5)


def test_recipe_task_repeats_follow_the_data(recipe_run, caplog):
    base, _, _ = recipe_run
    args = recipe.build_parser().parse_args(["--data-root", "unused", "--out", "unused"])
    spread = [{"task": task, "clean": f"{task}/clean/{i}.png"} for task in ("noise", "rain", "mine") for i in range(8)]
    assert recipe.fold_repeats(args, spread) == {"noise": 1, "rain": 120}  # authors' factors, for the tasks present
    args.restorer_repeat = ["noise=3", "mine=2"]
    assert recipe.fold_repeats(args, spread) == {"mine": 2, "noise": 3, "rain": 120}
    args.restorer_repeat = ["blur=2"]
    with pytest.raises(ValueError, match=r"--restorer-repeat names task\(s\) \['blur'\] that --data-root does not"):
        recipe.fold_repeats(args, spread)

    # a task whose images all hash to one fold: that fold's model cannot train on it (a warning); the other
    # fold's model still gets its factor (build_triplets passes each fold the factors of its own tasks)
    args.restorer_repeat = []
    pairs = recipe.scan_pairs(base / "train")
    with caplog.at_level("WARNING", logger="stage1_recipe"):
        assert recipe.fold_repeats(args, pairs) == {"haze": 1, "noise": 1, "rain": 120}
    assert "never trains on a task whose images all hash to its own fold: haze (fold 1), rain (fold 0)" in caplog.text


def test_recipe_rerun_continues_without_redoing_work(recipe_run):
    base, argv, report = recipe_run
    run = base / "run"
    stored = [*sorted((run / "folds").iterdir()), *sorted((run / "medium").rglob("*.png")),
              *sorted((run / "audit" / "medium").rglob("*.png")), run / "prompts.ckpt"]
    before = {p: p.stat().st_mtime_ns for p in stored}
    rendered = sorted((run / "medium").rglob("*.png"))[4]
    data = rendered.read_bytes()
    rendered.unlink()  # as if the first run had stopped before rendering it
    del before[rendered]

    again = recipe.main(argv)
    assert {p: p.stat().st_mtime_ns for p in before} == before  # no fold model retrained, no image re-rendered
    assert rendered.read_bytes() == data  # the missing image is rendered again by the stored fold model
    assert again["audit"]["test"]["accuracy"] == report["audit"]["test"]["accuracy"]
    assert again["gates"] == report["gates"]


def test_recipe_refuses_other_settings_in_the_same_folder(recipe_run):
    base, argv, _ = recipe_run
    changed = [*argv, "--restorer-steps", "4"]
    with pytest.raises(ValueError, match=r"medium results made with other settings \(restorer_steps: 3 -> 4\)"):
        recipe.main(changed)
    with pytest.raises(ValueError, match=r"medium results made with other settings \(bf16: False -> True\)"):
        recipe.main([*argv, "--bf16"])  # the fold models' precision is part of them
    with pytest.raises(ValueError, match=r"prompts results made with other settings \(prompt_lr: 4e-05 -> 0.001\)"):
        recipe.main([*argv, "--prompt-lr", "1e-3"])
    # same flags, other data: build_triplets' own record (folds/settings.json) refuses and names the pairs
    pairs = (base / "run" / "pairs.jsonl").read_bytes()
    other_data = [*argv, "--data-root", str(base / "test")]
    with pytest.raises(ValueError, match=r"fold models trained with other settings \(pairs.* changed\)"):
        recipe.main(other_data)
    assert (base / "run" / "pairs.jsonl").read_bytes() == pairs


def test_recipe_errors_for_bad_layouts_and_options(recipe_run, tmp_path):
    base, _, _ = recipe_run
    bad = tmp_path / "bad"
    (bad / "noise" / "degraded").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"noise/ needs both degraded/ and clean/"):
        recipe.main(["--data-root", str(bad), "--out", str(tmp_path / "run"), *TINY])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        recipe.main(["--data-root", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), *TINY])
    with pytest.raises(ValueError, match=r"--data-root has no pairs for task\(s\) \['blur'\]"):
        recipe.main(["--data-root", str(base / "train"), "--out", str(tmp_path / "run"), "--tasks", "blur", *TINY])
    with pytest.raises(ValueError, match=r"--holdout-fold must be in \[0, 2\)"):
        recipe.main(["--data-root", str(base / "train"), "--out", str(tmp_path / "run"), "--holdout-fold", "2", *TINY])
    with pytest.raises(ValueError, match="--restorer-repeat takes TASK=N"):
        recipe.main(["--data-root", str(base / "train"), "--out", str(tmp_path / "run"), "--restorer-repeat", "rain",
                     *TINY])
    with pytest.raises(ValueError, match="unknown backbone 'restormer-huge'"):
        recipe.main(["--data-root", str(base / "train"), "--out", str(tmp_path / "run"), *TINY,
                     "--backbone", "restormer-huge"])
    assert not os.path.exists(tmp_path / "run" / "folds")
