"""Stage 2 (examples/train_restormer_perceive.py with each backbone, prepare_proxy_inputs.py, evaluate.py --run):
tiny CPU runs, 2-process gloo runs, resume, proxy negatives from a render cache rendered with the documented CLI,
the checks before step 1 (image scan, cache verification) and the errors for bad caches, layouts and checkpoints."""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from data_factory import make_layout
from examples import evaluate as ev
from examples import prepare_proxy_inputs
from examples import train_restormer_perceive as script
from examples.backbones import create_backbone, save_official_checkpoint
from examples.train_support import DistEnv
from perceive_components.data import AllInOneTrainSet, ImageScanError
from perceive_components.negatives.cli import register as register_cache_cli
from perceive_components.ops.io import read_image, write_image
from perceive_components.ops.tiling import tiled_apply
from perceive_components.stage1 import write_jsonl
from perceive_components.weights import WeightsError

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = ("restormer", "nafnet", "promptir", "perceive-ir-net")
NOISE_SEED = 5
REPEATS = ["--repeat", "noise=1", "haze=2", "rain=2"]  # 4 + 4 + 4 items: 3 steps per epoch at batch 4
ONE_PROCESS = DistEnv(0, 1, 0, torch.device("cpu"))


def render(*args: str) -> None:
    """``perceive-ir cache render …`` through the subcommand's own parser (the CLI registers the same one)."""
    parser = argparse.ArgumentParser()
    register_cache_cli(parser.add_subparsers())
    parsed = parser.parse_args(["cache", "render", *args, "--device", "cpu", "--tile", "0"])
    parsed.func(parsed)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """3-task layout of 40×36 images, plus a 24×28 noise image (smaller than the 32² crop: resized)."""
    root = make_layout(tmp_path_factory.mktemp("aio"), size=(40, 36))
    write_image(root / "train" / "noise" / "clean" / "small.png", torch.rand(3, 24, 28))
    return root


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, data) -> dict:
    """A stage-1 output as `perceive-ir stage1 run` leaves it: its own data layout (other file names, same bytes) with
    pairs.jsonl folds, and two fold models. img0 is not in it (stage 1 never saw it)."""
    root = tmp_path_factory.mktemp("stage1")
    sources = ["noise/clean/img1.png", "noise/clean/img2.png", "noise/clean/small.png", "haze/clean/0001.png",
               "haze/clean/0002.png", "rain/clean/norain-1.png", "rain/clean/norain-2.png"]
    rows, fold_of_source = [], {}
    for index, source in enumerate(sources):
        task = source.partition("/")[0]
        name = f"{task}/clean/s1-{index}.png"
        (root / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data / "train" / source, root / "data" / name)
        rows.append({"degraded": f"{task}/degraded/s1-{index}.png", "clean": name, "task": task, "fold": index % 2})
        fold_of_source[source] = index % 2
    write_jsonl(root / "out" / "pairs.jsonl", rows)
    (root / "out" / "folds").mkdir()
    for fold in (0, 1):
        torch.manual_seed(10 + fold)
        weights = root / "out" / "folds" / f"fold{fold}.safetensors"
        save_file(create_backbone("restormer-tiny").state_dict(), str(weights))
    return {"dir": root / "out", "data": root / "data", "fold_of_source": fold_of_source}


@pytest.fixture(scope="module")
def cache(tmp_path_factory, data, stage1) -> Path:
    """The documented route: prepare_proxy_inputs.py, then one `cache render` per fold model into slot
    'stage1', a haze-only user restorer in slot 'extra', and an identity 'proxy' (checks the alignment)."""
    root = tmp_path_factory.mktemp("cache")
    prepare_proxy_inputs.main(["--data", str(data), "--cache", str(root), "--noise-seed", str(NOISE_SEED),
                               "--crop-size", "32", "--stage1-dir", str(stage1["dir"]),
                               "--stage1-data", str(stage1["data"])])
    inputs = ["--input-root", str(root / "inputs"), "--manifest", str(root / "inputs" / "manifest.jsonl")]
    for fold in (0, 1):
        render("--cache", str(root), "--slot", "stage1", "--model", "examples.backbones:create_backbone",
               "--model-kwargs", '{"name": "restormer-tiny"}',
               "--checkpoint", str(stage1["dir"] / "folds" / f"fold{fold}.safetensors"), "--fold", str(fold), *inputs)
    render("--cache", str(root), "--slot", "extra", "--model", "examples.backbones:create_backbone",
           "--model-kwargs", '{"name": "nafnet-tiny"}', "--tasks", "haze", *inputs)
    render("--cache", str(root), "--slot", "identity", "--model", "torch.nn:Identity", *inputs)
    return root


def args_for(data: Path, cache: Path | None, out: Path, *extra: str, steps: int = 2) -> list[str]:
    proxies = ["--proxy-cache", str(cache)] if cache else ["--no-proxies"]
    return ["--data", str(data), "--tiny", *proxies, "--steps", str(steps), "--batch-size", "4", "--crop-size", "32",
            "--workers", "0", "--device", "cpu", "--no-bf16", "--out-dir", str(out), "--log-every", "1",
            "--no-tensorboard", "--no-plots", "--no-val", *REPEATS, *extra]


def read_log(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return env | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def torchrun(script_path: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script_path), *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


# ---------------------------------------------------------------------------------------------- data
def test_proxy_inputs_take_the_stage1_fold_of_the_same_image(data, stage1, cache):
    manifest = [json.loads(line) for line in (cache / "inputs" / "manifest.jsonl").read_text().splitlines()]
    train_set = AllInOneTrainSet(data, noise_seed=NOISE_SEED)
    for task in train_set.tasks:
        for pair in train_set.pairs[task]:
            stem = pair.key.removeprefix("noise/clean/")
            rows = [r for r in manifest if r["input"] == pair.key or r["input"].endswith("/" + stem)]
            assert len(rows) == (3 if task == "noise" else 1)  # noise: one input per σ
            source = pair.clean.relative_to(data / "train").as_posix()
            if source != "noise/clean/img0.png":  # img0 has no stage-1 twin: it gets the hash fold
                assert {r["fold"] for r in rows} == {stage1["fold_of_source"][source]}, source
    settings = json.loads((cache / "inputs" / "settings.json").read_text())
    assert settings["noise_seed"] == NOISE_SEED and settings["matched_stage1"] == 7 and settings["hash_fold"] == 1
    for fold in (0, 1):  # each input of fold k was rendered by fold model k (the one that never trained on it)
        row = next(r for r in manifest if r["fold"] == fold and r["task"] != "noise")
        torch.manual_seed(10 + fold)
        model = create_backbone("restormer-tiny").eval()
        with torch.no_grad():  # as the cache renders: whole image, reflect-padded to a multiple of 8
            expected = tiled_apply(model, read_image(cache / "inputs" / row["input"])[None], tile=None, multiple=8)
        rendered = read_image(cache / "stage1" / f"{row['input']}.png")
        assert (rendered - expected[0].clamp(0, 1)).abs().max() <= 0.5 / 255 + 1e-6


def test_cached_negatives_are_aligned_with_every_crop_and_resized_like_it(data, cache):
    train_set = AllInOneTrainSet(data, crop_size=32, noise_seed=NOISE_SEED, repeats={"noise": 1, "haze": 2, "rain": 2})
    args = script.build_parser().parse_args(["--data", str(data), "--proxy-cache", str(cache)])
    dataset = script.open_proxy_cache(args, train_set, ONE_PROCESS)
    assert dataset.slots == ["extra", "identity", "stage1"]
    small = [i for i in range(len(train_set)) if train_set.locate(i).clean.name == "small.png"]
    for index in [*range(len(train_set)), *small]:
        item = dataset.sample(index, torch.Generator().manual_seed(index))
        identity = item["negatives"][1]
        # PNG inputs come back exactly; fixed-seed noise was stored in 8 bits: half a grey level at most
        assert (identity - item["degraded"]).abs().max() <= 0.5 / 255 + 1e-6
        haze = item["task"] == 1  # the 'extra' slot covers haze only: elsewhere zeros and False
        assert item["negatives"].shape == (3, 3, 32, 32)
        assert item["negative_mask"].tolist() == [haze, True, True]
        assert haze or not item["negatives"][0].any()


# ---------------------------------------------------------------------------------------------- the script
@pytest.mark.parametrize("backbone", BACKBONES)
def test_each_backbone_trains_every_trainable_part_on_cpu(backbone, data, cache, tmp_path):
    out = tmp_path / "run"
    script.main(args_for(data, cache, out, "--backbone", backbone))
    rows = read_log(out / "train_log.csv")
    assert [r["step"] for r in rows] == ["1", "2"] and all(r["skipped"] == "0" for r in rows)
    for column in ("loss", "l1", "contrastive", "clip", "perceptual", "grad_norm"):
        assert all(math.isfinite(float(r[column])) for r in rows), column
    assert all(float(r["perceptual"]) > 0 and float(r["clip"]) > 0 for r in rows)
    for r in rows:  # the logged total is the method's objective of the logged terms (docs/method.md §2.4)
        terms = {name: float(r[name]) for name in ("l1", "contrastive", "clip", "perceptual")}
        total = terms["l1"] + 0.1 * terms["contrastive"] + 0.05 * terms["clip"] + 0.1 * terms["perceptual"]
        assert float(r["loss"]) == pytest.approx(total, rel=1e-5), r
    spec = json.loads((out / "net.json").read_text())
    assert spec == {"format": script.NET_FORMAT, "backbone": f"{backbone}-tiny",
                    "adapter": backbone != "perceive-ir-net", "pgca": False, "sgm": True, "frozen": "tiny", "seed": 0}
    # every trainable parameter moved (it got a gradient: DDP needs no find_unused_parameters); the PromptIR
    # convolutions its forward never calls were frozen and did not
    initial, trained = script.build_network(spec).state_dict(), load_file(str(out / "model.safetensors"))
    assert trained.keys() == initial.keys()
    unused = ("backbone.chnl_reduce", "backbone.reduce_noise_channel_") if backbone == "promptir" else ()
    for key, value in trained.items():
        if unused and key.startswith(unused):
            assert torch.equal(value, initial[key]), key
        elif value.is_floating_point():
            assert not torch.equal(value, initial[key]), f"{key} was not trained"
    assert not unused or any(key.startswith(unused) for key in trained)


def test_pgca_bf16_and_probe_difficulty_run(data, cache, tmp_path):
    out = tmp_path / "run"
    script.main(args_for(data, cache, out, "--pgca", "--bf16", "--difficulty", "probe", "--probe-crops", "2", steps=1))
    row = read_log(out / "train_log.csv")[0]
    assert math.isfinite(float(row["loss"])) and 0 < float(row["probe_psnr"]) < 100
    assert json.loads((out / "probe_psnr.json").read_text()) == {"0": pytest.approx(float(row["probe_psnr"]))}
    assert any(key.startswith("perceive.pgca.") for key in load_file(str(out / "model.safetensors")))


def test_resume_after_a_stop_repeats_the_uninterrupted_losses(data, cache, tmp_path, monkeypatch):
    """Stop after step 5 (checkpoint at 4, mid-epoch 1), run the same command again: every logged value equals
    the uninterrupted run's, with EMA and the probe difficulty (its epoch-1 value comes back from the record)."""
    extra = ("--ckpt-every", "2", "--ema-decay", "0.9", "--difficulty", "probe", "--probe-crops", "2", "--val")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    script.main(args_for(data, cache, full, *extra, steps=6))

    real_loss, calls = script.perceive_loss, []

    def stop_at_step_6(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt("stopped by the test")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(script, "perceive_loss", stop_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        script.main(args_for(data, cache, resumed, *extra, steps=6))
    monkeypatch.setattr(script, "perceive_loss", real_loss)
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step_00000004.pt"
    script.main(args_for(data, cache, resumed, *extra, steps=6))
    full_rows, resumed_rows = read_log(full / "train_log.csv"), read_log(resumed / "train_log.csv")
    for row in full_rows + resumed_rows:
        del row["sec_per_step"]  # wall time
    assert [r["step"] for r in resumed_rows] == ["1", "2", "3", "4", "5", "6"]
    assert resumed_rows == full_rows  # same digits for loss, every term, grad norm, lr
    assert read_log(resumed / "val_log.csv") == read_log(full / "val_log.csv")
    assert len({r["probe_psnr"] for r in full_rows}) == 2  # epochs 0 and 1 measured separately
    for name in ("model.safetensors", "model_ema.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(resumed / name))
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.distributed
def test_two_gloo_processes_match_one_process(data, cache, tmp_path):
    """torchrun with 2 CPU processes (global batch 4 = 2 + 2) logs the losses of the 1-process run: DDP over the
    adapter-wrapped PromptIR (unused convolutions frozen, no find_unused_parameters), all-rank L_cl negatives."""
    single, double = tmp_path / "one", tmp_path / "two"
    script.main(args_for(data, cache, single, "--backbone", "promptir", steps=3))
    result = torchrun(ROOT / "examples" / "train_restormer_perceive.py",
                      args_for(data, cache, double, "--backbone", "promptir", steps=3), child_env())
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = read_log(single / "train_log.csv"), read_log(double / "train_log.csv")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        for column in ("loss", "l1", "contrastive", "clip", "perceptual", "grad_norm"):
            assert float(b[column]) == pytest.approx(float(a[column]), rel=2e-4, abs=1e-6), column


@pytest.mark.distributed
def test_a_nan_output_on_one_process_is_skipped_by_both_without_a_hang(data, cache, tmp_path):
    """Rank 1's output is NaN at step 2 while rank 0's is finite: both ranks decide together to skip the loss (rank
    0 would otherwise wait in L_cl's all_gather forever), both skip the update, the run finishes in sync."""
    out = tmp_path / "run"
    env = child_env(CHILD_SCRIPT="perceive", NAN_ON_RANK="1", NAN_AT_STEP="2", WEIGHTS_SUM_FILE=str(tmp_path / "sum"))
    result = torchrun(Path(__file__).with_name("train_child.py"), args_for(data, cache, out, steps=3), env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["skipped"] for r in read_log(out / "train_log.csv")] == ["0", "1", "0"]
    assert "rank 0: step 2 skipped" in result.stderr and "rank 1: step 2 skipped" in result.stderr
    assert "step 1 skipped" not in result.stderr and "step 3 skipped" not in result.stderr
    assert (tmp_path / "sum.0").read_text() == (tmp_path / "sum.1").read_text()  # the same weights on both ranks


def test_the_one_task_warning_reaches_the_log_and_mixed_batches_avoid_it(data, tmp_path):
    """Rain holds 400 of 406 items: shuffled batches are mostly rain only, L_cl is 0 there, and the loss's warning is
    in train.log. --mix-tasks draws every batch with at least two tasks: L_cl > 0 at every step, no warning."""
    dominated = [a for a in args_for(data, None, tmp_path / "plain", steps=3) if a not in REPEATS[1:]]
    dominated += ["noise=1", "haze=1", "rain=200"]
    script.main(dominated)
    assert "NoNegativesWarning" in (tmp_path / "plain" / "train.log").read_text()
    mixed = [a if a != str(tmp_path / "plain") else str(tmp_path / "mixed") for a in dominated]
    script.main([*mixed, "--mix-tasks"])
    assert all(float(row["contrastive"]) > 0 for row in read_log(tmp_path / "mixed" / "train_log.csv"))
    assert "NoNegativesWarning" not in (tmp_path / "mixed" / "train.log").read_text()


# ---------------------------------------------------------------------------------------------- evaluation
def test_evaluate_run_gives_the_validation_numbers_whole_and_tiled(data, cache, tmp_path):
    out = tmp_path / "run"
    script.main(args_for(data, cache, out, "--backbone", "nafnet", "--val", "--ema-decay", "0.5"))
    eval_root = tmp_path / "eval"  # the validation's haze pairs in evaluate.py's layout (same file names)
    (eval_root / "SOTS" / "degraded").mkdir(parents=True)
    (eval_root / "SOTS" / "target").mkdir()
    for name in ("0001", "0002"):
        shutil.copy(next((data / "test" / "haze" / "hazy").rglob(f"{name}_*.png")),
                    eval_root / "SOTS" / "degraded" / f"{name}.png")
        shutil.copy(data / "test" / "haze" / "clean" / f"{name}.png", eval_root / "SOTS" / "target" / f"{name}.png")
    validation = read_log(out / "val_log.csv")[-1]
    whole = ev.main(["--run", str(out), "--data-root", str(eval_root), "--device", "cpu"])
    assert whole["SOTS"][0] == pytest.approx(float(validation["SOTS/psnr"]), abs=1e-4)  # EMA weights, like validation
    assert whole["SOTS"][1] == pytest.approx(float(validation["SOTS/ssim"]), abs=1e-5)
    tiled = ev.main(["--run", str(out), "--data-root", str(eval_root), "--device", "cpu", "--tile", "16",
                     "--overlap", "8", "--checkpoint", str(out / "checkpoints" / "latest"), "--weights", "model"])
    assert math.isfinite(tiled["SOTS"][0])


# ---------------------------------------------------------------------------------------------- checks before step 1
def test_a_corrupt_image_stops_the_run_before_step_1_with_every_bad_file(data, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    broken = [bad / "train" / "rain" / "rainy" / "rain-2.png", bad / "test" / "haze" / "clean" / "0001.png"]
    for path in broken:
        path.write_bytes(path.read_bytes()[:60])  # cut short, as an interrupted copy leaves it
    out = tmp_path / "run"
    with pytest.raises(ImageScanError, match=r"2 of \d+ image file\(s\) cannot be used") as error:
        script.main(args_for(bad, None, out, "--val"))
    assert sorted(path for path, _ in error.value.problems) == sorted(str(path) for path in broken)
    assert not (out / "checkpoints").exists() and not (out / "train_log.csv").exists()


def test_a_cache_of_other_images_with_the_same_names_is_refused(data, cache, tmp_path):
    """Rain100H and Rain100L share file names: a cache rendered from one must not serve the other."""
    other = tmp_path / "other"
    shutil.copytree(data, other)
    for name in ("rain-1.png", "rain-2.png"):
        write_image(other / "train" / "rain" / "rainy" / name, torch.rand(3, 40, 36))
    with pytest.raises(ValueError, match=r"does not match these inputs:\n(.*\n)*  - slot 'stage1': 2 stale: "
                                         r"rain/rainy/rain-1.png, rain/rainy/rain-2.png"):
        script.main(args_for(other, cache, tmp_path / "run"))


# ---------------------------------------------------------------------------------------------- errors
def test_missing_or_incomplete_proxy_caches_are_clear_errors(data, cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="no render cache at .*perceive-ir cache render"):
        script.main(args_for(data, tmp_path / "nowhere", tmp_path / "a"))
    with pytest.raises(ValueError, match="--proxy-cache DIR .* or --no-proxies"):
        script.main([a for a in args_for(data, None, tmp_path / "b") if a != "--no-proxies"])
    with pytest.raises(ValueError, match="--dpl-weight 0 .* pass --no-proxies"):
        script.main(args_for(data, cache, tmp_path / "f", "--dpl-weight", "0"))
    broken = tmp_path / "broken"
    shutil.copytree(cache, broken, symlinks=True)
    (broken / "stage1" / "rain" / "rainy" / "rain-2.png.png").unlink()
    with pytest.raises(ValueError, match=r"does not match these inputs:\n  - slot 'stage1': 1 missing: "
                                         r"rain/rainy/rain-2.png"):
        script.main(args_for(data, broken, tmp_path / "c"))
    (broken / "inputs" / "settings.json").unlink()  # no recorded seed, no --noise-seed: noise is fresh every draw
    with pytest.raises(ValueError, match="cover noise, but noise is synthesised afresh .* --noise-seed"):
        script.main(args_for(data, broken, tmp_path / "d"))
    with pytest.raises(ValueError, match="--noise-seed 6 differs .* \\(5,"):
        script.main(args_for(data, cache, tmp_path / "e", "--noise-seed", "6"))


def test_a_bad_data_layout_lists_what_is_missing(data, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    shutil.rmtree(bad / "train" / "rain" / "rainy")
    with pytest.raises(ValueError, match=r"(?s)train data .* is incomplete.*rain: missing folder rain/rainy/"):
        script.main(args_for(bad, None, tmp_path / "run"))


def test_init_backbone_loads_official_weights_under_the_adapter(data, cache, tmp_path):
    torch.manual_seed(123)
    official = create_backbone("promptir-tiny")
    path = save_official_checkpoint(official, tmp_path / "promptir.ckpt")  # Lightning layout, 'net.' prefix
    out = tmp_path / "run"  # one step at a negligible learning rate: the backbone keeps the official weights
    script.main(args_for(data, cache, out, "--backbone", "promptir", "--init-backbone", str(path), "--lr", "1e-12",
                         "--min-lr", "0", "--weight-decay", "0", steps=1))
    trained = load_file(str(out / "model.safetensors"))
    for key, value in official.state_dict().items():
        assert torch.allclose(trained[f"backbone.{key}"], value, atol=1e-9), key


def test_checkpoints_of_another_backbone_are_refused(data, cache, tmp_path):
    torch.manual_seed(0)
    nafnet = save_official_checkpoint(create_backbone("nafnet-tiny"), tmp_path / "nafnet.pth")
    with pytest.raises(WeightsError, match="does not fit Restormer under any key prefix"):
        script.main(args_for(data, cache, tmp_path / "a", "--init-backbone", str(nafnet)))
    restormer_run = tmp_path / "restormer"
    script.main(args_for(data, cache, restormer_run, steps=1))
    with pytest.raises(ValueError, match="holds checkpoints of another network .*nafnet-tiny"):
        script.main(args_for(data, cache, restormer_run, "--backbone", "nafnet", steps=2))
    nafnet_run = tmp_path / "nafnet"
    script.main(args_for(data, cache, nafnet_run, "--backbone", "nafnet", steps=1))
    with pytest.raises(WeightsError, match="does not fit"):
        script.build_run_net(restormer_run, checkpoint=nafnet_run / "checkpoints" / "latest")


def test_a_non_finite_output_becomes_a_skipped_step_not_a_crash():
    class NaNNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))

        def guide(self, images, positive=None):
            from perceive_components import Guidance

            return Guidance(None, torch.zeros(len(images), 4), torch.zeros(len(images), 4))

        def forward(self, images, guidance=None):
            return images * self.scale * float("nan")

    net = NaNNet()
    batch = {"degraded": torch.rand(2, 3, 16, 16), "positive": torch.rand(2, 3, 16, 16)}
    criterion = script.QualityAwareLoss(None, clip_weight=0.0, perceptual_weight=0.0)
    loss, terms = script.perceive_loss(net, net, criterion, batch, ONE_PROCESS, ["l1", "contrastive"])
    assert math.isnan(loss.item()) and list(terms) == ["l1", "contrastive"]
    assert all(math.isnan(value) for value in terms.values())
    loss.backward()
    assert net.scale.grad is not None  # the backward runs (under DDP: the gradient all-reduce of every process)
