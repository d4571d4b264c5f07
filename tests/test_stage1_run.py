"""examples/prepare_stage1_data.py and the one way to run stage 1 (``run_stage1`` / ``perceive-ir stage1 run``):
layout building, all of stage 1 end to end at tiny scale on CPU, resuming without redoing work, refusing mixed
settings, and clear errors."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from examples import prepare_stage1_data as prep
from perceive_components import QualityPerceiver
from perceive_components.cli import main as cli
from perceive_components.data.degradations import add_gaussian_noise, degrade
from perceive_components.ops.io import read_image, write_image
from perceive_components.stage1 import (
    MediumSettings, PromptSettings, TripletImages, audit_perceiver, fold_of, read_jsonl, run_stage1,
)
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


# ----------------------------------------------------------------------------- all of stage 1
REPO = Path(__file__).resolve().parents[1]
TINY_RESTORMER = json.dumps({"dim": 4, "num_blocks": [1, 1, 1, 1], "num_refinement_blocks": 1, "heads": [1, 1, 2, 2]})
TINY = ["--restorer", f"{REPO / 'examples' / 'backbones' / 'restormer.py'}:Restormer",  # the file form (relative imports)
        "--restorer-kwargs", TINY_RESTORMER, "--restorer-steps", "3", "--restorer-crop", "32", "--restorer-batch", "2",
        "--prompt-steps", "3", "--prompt-batch", "6", "--checkpoint-every", "2", "--clip-model", "perceive-tiny-clip",
        "--pretrained", "", "--device", "cpu", "--no-progress"]


def stage1_run(argv: list[str]) -> int:
    return cli(["stage1", "run", *argv])


@pytest.fixture(scope="module")
def stage1_folder(raw_root, tmp_path_factory):
    """Prepare 3-task train and test data, then run all of stage 1 once at tiny scale from the command line."""
    base = tmp_path_factory.mktemp("stage1")
    prep.main(["--raw-root", str(raw_root), "--out", str(base / "train"), "--no-progress"])
    prep.main(["--raw-root", str(raw_root), "--out", str(base / "test"), "--split", "test", "--no-progress"])
    argv = ["--data-root", str(base / "train"), "--out", str(base / "run"), "--holdout-fold", "1",
            "--audit-root", str(base / "test"), *TINY]
    assert stage1_run(argv) == 0
    return base, argv


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_stage1_run_end_to_end(stage1_folder):
    base, _ = stage1_folder
    run = base / "run"
    triplets = read_jsonl(run / "triplets.jsonl")
    assert len(triplets) == 18 + 6 + 4  # noise 6 clean × 3 σ, haze 3 × 2 OTS variants, rain 4
    for row in triplets:  # every pair rendered once, into the fold its clean image hashes to
        assert row["fold"] == fold_of(row["clean"], 2) and (run / row["medium"]).is_file()
    # build_triplets kept the fold models and its settings; the mid-training checkpoints are gone
    assert sorted(p.name for p in (run / "folds").iterdir()) == ["fold0.safetensors", "fold1.safetensors",
                                                                 "settings.json"]
    # the authors' repeat factors, for the tasks present, reach the fold models through build_triplets
    recorded = _json(run / "recipe.json")
    assert recorded["medium"]["task_repeats"] == {"haze": 1, "noise": 1, "rain": 120}
    stored = _json(run / "folds" / "settings.json")["train"]
    assert stored["steps"] == "3" and stored["amp_dtype"] == "None"
    assert recorded["restorer"].endswith(f"restormer.py:Restormer {TINY_RESTORMER}")
    assert set(_json(run / "gates.json")["per_task"]) == {"noise", "haze", "rain"}
    held_out = [row for row in triplets if row["fold"] == 1]
    assert _json(run / "audit_holdout_fold1.json")["n_triplets"] == len(held_out)
    assert _json(run / "audit_test.json")["n_triplets"] == len(read_jsonl(run / "audit" / "triplets.jsonl")) == 10
    assert len((run / "prompt_history.csv").read_text().splitlines()) == 1 + 3
    report = (run / "report.md").read_text()
    for name in ("## Medium-image gates", "## Prompt training", "## Perceiver audit: test",
                 "## Perceiver audit: holdout_fold1", "| task | pairs | PSNR improved", "Authors' gate"):
        assert name in report

    config = _json(run / "perceiver" / "config.json")  # the library's tiny CLIP, recorded by name
    assert config["clip_model"] == "perceive-tiny-clip" and config["pretrained"] is None and config["n_ctx"] == 16
    assert config["audit"]["audit_set"] == "test" and config["training"]["steps"] == 3
    assert config["training"]["weight_decay"] == 0.01  # the authors' AdamW default
    assert config["training"]["triplets"] == len(triplets) - len(held_out)  # the held-out fold was not trained on


def test_the_saved_tiny_perceiver_loads_again_by_name(stage1_folder):
    base, _ = stage1_folder
    perceiver = QualityPerceiver.from_pretrained(base / "run" / "perceiver")  # no clip= needed
    again = audit_perceiver(perceiver, TripletImages(base / "run" / "audit" / "triplets.jsonl", base / "test"),
                            record=False)
    recorded = _json(base / "run" / "audit_test.json")
    assert again["accuracy"] == pytest.approx(recorded["accuracy"])
    assert again["mean_q"] == pytest.approx(recorded["mean_q"], abs=1e-5)


def test_the_saved_tiny_perceiver_scores_from_the_cli(stage1_folder, capsys):
    base, _ = stage1_folder
    image = str(base / "test" / "rain" / "clean" / "norain-0.png")
    assert cli(["score", image, "--perceiver", str(base / "run" / "perceiver"), "--json", "--device", "cpu"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["image"] == image and 0.0 <= rows[0]["q"] <= 2.0


def test_the_saved_tiny_perceiver_audits_from_the_cli(stage1_folder, capsys):
    base, _ = stage1_folder
    assert cli(["stage1", "audit", "--perceiver", str(base / "run" / "perceiver"), "--triplets",
                str(base / "run" / "audit" / "triplets.jsonl"), "--root", str(base / "test"), "--json",
                "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"] == pytest.approx(_json(base / "run" / "audit_test.json")["accuracy"])


def test_stage1_run_continues_without_redoing_work(stage1_folder):
    base, argv = stage1_folder
    run = base / "run"
    stored = [*sorted((run / "folds").iterdir()), *sorted((run / "medium").rglob("*.png")),
              *sorted((run / "audit" / "medium").rglob("*.png")), run / "prompts.ckpt"]
    before = {p: p.stat().st_mtime_ns for p in stored}
    audit = _json(run / "audit_test.json")
    rendered = sorted((run / "medium").rglob("*.png"))[4]
    data = rendered.read_bytes()
    rendered.unlink()  # as if the first run had stopped before rendering it
    del before[rendered]

    assert stage1_run(argv) == 0
    assert {p: p.stat().st_mtime_ns for p in before} == before  # no fold model retrained, no image re-rendered
    assert rendered.read_bytes() == data  # the missing image is rendered again by the stored fold model
    assert _json(run / "audit_test.json") == audit


@pytest.mark.parametrize("change, message", [
    (["--restorer-steps", "4"], r"medium results made with other settings \(steps: 3 -> 4\)"),
    (["--bf16"], r"medium results made with other settings \(bf16: False -> True\)"),  # precision is part of them
    (["--prompt-lr", "1e-3"], r"prompts results made with other settings \(lr: 4e-05 -> 0.001\)"),
    (["--prompt-weight-decay", "0"], r"prompts results made with other settings \(weight_decay: 0.01 -> 0.0\)"),
    (["--restorer-kwargs", TINY_RESTORMER.replace('"dim": 4', '"dim": 8')],
     r"medium results made with other settings \(restorer_architecture: '[0-9a-f]{64}' -> '[0-9a-f]{64}'\)"),
])
def test_stage1_run_refuses_other_settings_in_the_same_folder(stage1_folder, capsys, change, message):
    base, argv = stage1_folder
    recorded = (base / "run" / "recipe.json").read_bytes()
    assert stage1_run([*argv, *change]) == 1
    assert re.search(message, capsys.readouterr().err)
    assert (base / "run" / "recipe.json").read_bytes() == recorded


def test_stage1_run_refuses_other_data_under_the_same_flags(stage1_folder, capsys):
    base, argv = stage1_folder
    pairs = (base / "run" / "pairs.jsonl").read_bytes()
    assert stage1_run([*argv, "--data-root", str(base / "test")]) == 1  # build_triplets' record names the pairs
    assert re.search(r"fold models trained with other settings \(pairs.* changed\)", capsys.readouterr().err)
    assert (base / "run" / "pairs.jsonl").read_bytes() == pairs


def test_task_repeats_override_the_authors_for_the_tasks_present(stage1_folder, tmp_path, monkeypatch):
    import perceive_components.stage1.pipeline as pipeline

    base, _ = stage1_folder

    class Recorded(Exception):
        """Raised instead of training: recipe.json is written by then."""

    def stop(*args, **kwargs):
        raise Recorded

    monkeypatch.setattr(pipeline, "build_triplets", stop)
    with pytest.raises(Recorded):
        run_stage1(base / "train", tmp_path / "run", torch.nn.Identity,
                   medium=MediumSettings(task_repeats={"noise": 3, "rain": 2}), prompts=PromptSettings())
    assert _json(tmp_path / "run" / "recipe.json")["medium"]["task_repeats"] == {"haze": 1, "noise": 3, "rain": 2}
    with pytest.raises(ValueError, match=r"MediumSettings.task_repeats names task\(s\) \['blur'\] that the data does "
                                         r"not hold \(\['haze', 'noise', 'rain'\]\)"):
        run_stage1(base / "train", tmp_path / "other", torch.nn.Identity, medium=MediumSettings(task_repeats={"blur": 2}))
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "blur"], r"data_root has no pairs for task\(s\) \['blur'\]"),
    (["--holdout-fold", "2"], r"PromptSettings.holdout_fold must be in \[0, 2\) for 2 folds, got 2"),
    (["--restorer-repeat", "rain"], r"--restorer-repeat takes TASK=N items \(e.g. rain=120\), got 'rain'"),
    (["--restorer", "no_such_module_xyz:make"], r"--restorer 'no_such_module_xyz:make' cannot be imported"),
    (["--restorer", "builtins:dict"], r"restorer\(\) must return an nn.Module, got dict"),
    (["--restorer", "torch:zeros"], r"restorer: calling the factory with no arguments failed: zeros\(\) missing"),
    (["--folds", "1"], r"MediumSettings.folds must be at least 2"),
])
def test_stage1_run_errors_name_the_argument(stage1_folder, tmp_path, capsys, extra, message):
    base, _ = stage1_folder
    assert stage1_run(["--data-root", str(base / "train"), "--out", str(tmp_path / "run"), *TINY, *extra]) == 1
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_stage1_run_errors_for_bad_layouts(tmp_path, capsys):
    bad = tmp_path / "bad"
    (bad / "noise" / "degraded").mkdir(parents=True)
    assert stage1_run(["--data-root", str(bad), "--out", str(tmp_path / "run"), *TINY]) == 1
    assert "noise/ needs both degraded/ and clean/" in capsys.readouterr().err
    assert stage1_run(["--data-root", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), *TINY]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_restorer_file_inside_a_package_imports_with_its_relative_imports(monkeypatch):
    from perceive_components.ops.imports import load_callable

    monkeypatch.chdir(REPO)
    by_file = load_callable("examples/backbones/restormer.py:Restormer", "--restorer")  # `from .base import …`
    by_module = load_callable("examples.backbones:Restormer", "--restorer")
    assert by_file.__name__ == by_module.__name__ == "Restormer"
    model = by_file(**json.loads(TINY_RESTORMER))
    assert model(torch.rand(1, 3, 16, 16)).shape == (1, 3, 16, 16)
