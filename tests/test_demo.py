"""The README's main job runs both stages end to end (here with very few steps) and writes a sane report: offline
by default the Perceive-IR parts that learn without pretrained networks, the full recipe one flag away."""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SET_LABELS = ["σ15", "σ25", "σ50", "haze", "rain", "average"]
ROWS = ["degraded input", "bare (L1)", "Perceive-IR"]


@pytest.fixture(scope="module")
def demo_module():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import demo
        yield demo
    finally:
        sys.path.remove(str(EXAMPLES))


FEW_STEPS = ["--restorer-steps", "4", "--prompt-steps", "4", "--stage2-steps", "3", "--stage2-batch", "4",
             "--stage2-crop", "32", "--device", "cpu"]


def _run_demo(demo_module, out: Path, *flags: str) -> tuple[Path, str, dict]:
    printed = io.StringIO()
    with pytest.warns(UserWarning, match="the perceiver uses a tiny RANDOM CLIP"), contextlib.redirect_stdout(printed):
        assert demo_module.main(["--out", str(out), *FEW_STEPS, *flags]) == 0
    return out, printed.getvalue(), json.loads((out / "report.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_module):
    """The default demo, offline (no cached weights, HF_HUB_OFFLINE=1), with a few steps per stage:
    (output folder, printed text, report.json)."""
    return _run_demo(demo_module, tmp_path_factory.mktemp("demo") / "demo")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, demo_module):
    """The full recipe on tiny random networks (SGM, L_clip, L_dpl with proxies), a few steps per stage."""
    return _run_demo(demo_module, tmp_path_factory.mktemp("demo-full") / "demo", "--recipe", "full")


def _log(run_folder: Path) -> list[dict]:
    with open(run_folder / "train_log.csv", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_stage1_runs_through_run_stage1_and_its_perceiver_scores_after_a_move(demo_run, tmp_path, capsys):
    out, printed, report = demo_run
    assert "## Medium-image gates" in printed and "Authors' gate" in printed
    assert report["real_clip"] is False
    assert set(report["gates"]["per_task"]) == {"noise", "haze", "rain"}
    assert report["audit"]["n_triplets"] + report["train_audit"]["n_triplets"] == report["gates"]["overall"]["n"] == 36
    assert (out / "perceiver_demo.png").stat().st_size > 10_000
    recorded = json.loads((out / "stage1" / "recipe.json").read_text())  # run_stage1's settings record
    assert recorded["restorer"] == "examples/demo.py:SmallRestorer" and recorded["prompts"]["holdout_fold"] == 1
    assert "## Perceiver audit: holdout_fold1" in (out / "stage1" / "report.md").read_text()
    config = json.loads((out / "perceiver" / "config.json").read_text())
    assert config["clip_model"] == "perceive-tiny-clip" and config["training"]["steps"] == 4  # a name, not a path

    from perceive_components.cli import main

    moved = tmp_path / "elsewhere" / "perceiver"  # outputs moved: the perceiver still loads and scores
    shutil.copytree(out / "perceiver", moved)
    image = str(EXAMPLES / "data" / "demo_images" / "coffee_0.png")
    assert main(["score", image, "--perceiver", str(moved), "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["image"] == image


def test_the_offline_default_runs_the_parts_that_learn_without_pretrained_networks(demo_run):
    out, printed, report = demo_run
    assert (report["recipe"], report["weights"]) == ("offline", "tiny")
    assert set(report["pretrained"].values()) == {"missing"}
    ran = {part["name"]: part["ran"] for part in report["stage2"]["parts"]}
    assert [name for name, on in ran.items() if on] == ["L1(R, G)", "CFE + λ1·L_cl (contrastive)",
                                                        "PGM (FiLM on every decoder level)"]
    runs = out / "stage2" / "runs"
    logged = set(_log(runs / "perceive-ir")[0])  # the terms that really ran: L1 and L_cl only
    assert {"l1", "contrastive"} <= logged and not {"clip", "perceptual"} & logged
    from examples.train_restormer_perceive import build_network

    spec = json.loads((runs / "perceive-ir" / "net.json").read_text())
    assert not spec["sgm"] and build_network(spec).sgm is None  # the adapter has no SGM (evaluate --run rebuilds it)
    assert not (out / "stage2" / "proxy-cache").exists()  # L_dpl off: no proxies rendered
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "**Recipe `offline`** (no pretrained CLIP, DINOv2 and VGG weights were found" in text
    for name, on in ran.items():  # the report names every part, whether it ran, and why
        assert re.search(rf"\| {re.escape(name)} \| {'yes' if on else '[*][*]no[*][*]'} \| \w", text), name
    assert "Perceive-IR (offline recipe: L1(R, G); CFE + λ1·L_cl (contrastive); PGM" in printed


def test_proxy_negatives_come_from_the_fold_model_that_never_saw_the_image(full_run):
    out, _, report = full_run
    stage1_folds = {(row["task"], Path(row["clean"]).name): row["fold"]
                    for row in map(json.loads, (out / "stage1" / "pairs.jsonl").read_text().splitlines())}
    cache = out / "stage2" / "proxy-cache"
    rows = [json.loads(line) for line in (cache / "inputs" / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == report["stage2"]["cache"]["inputs"] == 9 * 5  # 9 training images: noise ×3 σ, haze, rain
    for row in rows:  # fold model k trained on every pair but fold k's, and renders exactly fold k
        assert row["fold"] == stage1_folds[(row["task"], Path(row["input"]).name)]
        assert (cache / "stage1" / f"{row['input']}.png").is_file()
    assert {row["fold"] for row in rows} == {0, 1}
    held_out = set(report["stage2"]["held_out"])
    assert not held_out & {Path(row["input"]).name for row in rows}  # no held-out image is trained on


def test_the_full_recipe_trains_every_part_the_same_steps_as_bare(full_run):
    out, printed, report = full_run
    assert (report["recipe"], report["weights"]) == ("full", "tiny")
    assert "training restormer-tiny for 3 steps twice" in printed
    assert all(part["ran"] for part in report["stage2"]["parts"])
    runs = out / "stage2" / "runs"
    logs = {name: _log(runs / name) for name in ("bare", "perceive-ir")}
    assert [row["step"] for row in logs["bare"]] == [row["step"] for row in logs["perceive-ir"]] == ["1", "2", "3"]
    assert {"l1", "contrastive", "clip", "perceptual"} <= set(logs["perceive-ir"][0])
    assert "clip" not in logs["bare"][0]
    for row in [*logs["bare"], *logs["perceive-ir"]]:
        assert math.isfinite(float(row["loss"])) and row["skipped"] == "0"
    spec = json.loads((runs / "perceive-ir" / "net.json").read_text())
    assert spec["backbone"] == "restormer-tiny" and spec["adapter"] and spec["frozen"] == "tiny" and spec["sgm"]
    assert "**Recipe `full` on tiny random networks**" in (out / "report.md").read_text(encoding="utf-8")
    parameters = report["stage2"]["parameters"]
    assert 0 < parameters["bare"] < parameters["perceive-ir"]


def test_the_metrics_table_holds_every_set_and_matches_a_direct_computation(demo_run):
    out, _, report = demo_run
    summaries = report["stage2"]["summaries"]
    assert list(summaries) == ROWS
    for label, summary in summaries.items():
        assert list(summary) == SET_LABELS, label
        for column, (psnr_value, ssim_value, images) in summary.items():
            assert 5.0 < psnr_value < 60.0 and 0.0 < ssim_value <= 1.0, (label, column)
            assert images == (15 if column == "average" else 3)
        means = [summary[c][0] for c in SET_LABELS[:-1]]
        assert summary["average"][0] == pytest.approx(sum(means) / len(means))

    from perceive_components.ops.io import read_image
    from perceive_components.ops.metrics import psnr, quantize_8bit

    eval_root = Path(report["stage2"]["eval_root"])  # the degraded-input row, recomputed from the files
    values = [float(psnr(quantize_8bit(read_image(path)[None]),
                         quantize_8bit(read_image(eval_root / "haze" / "target" / path.name)[None]))[0])
              for path in sorted((eval_root / "haze" / "degraded").iterdir())]
    assert summaries["degraded input"]["haze"][0] == pytest.approx(sum(values) / len(values), abs=1e-4)
    for name, label in (("bare", "bare (L1)"), ("perceive-ir", "Perceive-IR")):  # evaluate.py's own files agree
        with open(out / "stage2" / "runs" / name / "eval" / "summary.csv", encoding="utf-8") as handle:
            rows = {row["set"]: float(row["psnr"]) for row in csv.DictReader(handle)}
        assert rows == pytest.approx({c: summaries[label][c][0] for c in SET_LABELS}, abs=1e-5)


def test_report_md_has_the_tables_the_warning_and_working_image_links(demo_run):
    out, printed, report = demo_run
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "show that the pipeline works end to end; they do **not** show what the method achieves" in text
    assert "Stage 1 learned its prompts on the library's tiny **random** CLIP" in text
    for header in ("| task | pairs | PSNR improved", "| task | triplets | accuracy", "| Perceive-IR part | ran | why |",
                   "| PSNR / SSIM | σ15 | σ25 | σ50 | haze | rain | average |", "## Notes on the numbers below"):
        assert header in text
    for label in ROWS:
        psnr_value, ssim_value, _ = report["stage2"]["summaries"][label]["average"]
        assert re.search(rf"\| {re.escape(label)} \|.*\| {psnr_value:.2f}/", text), label
    assert "| Δ PSNR (Perceive-IR − bare) |" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    expected = {"perceiver_demo.png", "stage2_curves.png", *(f"grid_{folder}.png" for folder, _ in
                                                             report["stage2"]["sets"])}
    assert set(links) == expected and len(expected) == 7
    for link in links:
        with Image.open(out / link) as image:
            image.verify()
        with Image.open(out / link) as image:
            assert image.format == "PNG" and min(image.size) >= 200, link
            assert len(image.convert("L").resize((64, 64)).getcolors(4096)) > 20, link  # not a blank canvas
    assert f"wrote {out / 'report.md'}" in printed


def test_the_recipe_takes_a_built_perceiver_in_process(tiny_perceiver):
    from examples.train_restormer_perceive import build_criterion, build_parser

    args = build_parser().parse_args(["--data", "unused", "--frozen", "tiny"])
    criterion = build_criterion(args, tiny_perceiver)
    assert criterion.clip_loss.perceiver is tiny_perceiver
    assert not any(p.requires_grad for p in tiny_perceiver.parameters())  # frozen by the loss
    with pytest.raises(ValueError, match="either as --perceiver or as an instance"):
        build_criterion(argparse.Namespace(**{**vars(args), "perceiver": "some/folder"}), tiny_perceiver)
    with pytest.raises(TypeError, match="perceiver must be a QualityPerceiver, got Linear"):
        build_criterion(args, torch.nn.Linear(2, 2))


@pytest.mark.parametrize("backbone, message", [("nope", "unknown backbone 'nope'"),
                                               ("perceive-ir-net-tiny", "no bare version to compare with")])
def test_a_backbone_the_demo_cannot_compare_is_refused_before_stage1(demo_module, tmp_path, capsys, backbone, message):
    with pytest.raises(SystemExit) as stopped:
        demo_module.main(["--out", str(tmp_path / "never"), "--backbone", backbone])
    assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_the_reading_note_says_what_ran_with_which_weights(demo_module):
    from demo_report import reading_note

    settings = {"backbone": "restormer-tiny", "steps": 150}
    offline = reading_note("offline", "tiny", settings)
    assert "**Recipe `offline`** (no pretrained" in offline and "`--recipe full` runs them too" in offline
    assert "tiny **random** CLIP" in offline and "the offline stage-2 run does not use it" in offline
    random_full = reading_note("full", "tiny", settings)
    assert "**Recipe `full` on tiny random networks**" in random_full and "periodic texture" in random_full
    real = reading_note("full", "pretrained", settings)
    assert "OpenAI CLIP ViT-B/32 (the stage-1 perceiver), DINOv2-B (SGM) and VGG-16" in real
    assert "random" not in real and "150 training steps" in real
    for note in (offline, random_full, real):
        assert "they do **not** show what the method achieves" in note


def _summaries(bare: tuple[float, ...], ours: tuple[float, ...]) -> dict:
    """PSNR/SSIM on σ15 then haze of each run, against inputs at 24.6/.33 and 8.5/.60."""
    def rows(values):
        return {"σ15": (*values[:2], 3), "haze": (*values[2:], 3),
                "average": ((values[0] + values[2]) / 2, (values[1] + values[3]) / 2, 6)}

    return {"degraded input": rows((24.6, 0.33, 8.5, 0.60)), "bare (L1)": rows(bare), "Perceive-IR": rows(ours)}


def _gates(noise_improved: float) -> dict:
    row = {"n": 12, "psnr_improved_rate": noise_improved, "r_in_band_rate": 0.8, "r_median": 0.4,
           "passed": noise_improved >= 0.9}
    return {"per_task": {"noise": row, "haze": {**row, "psnr_improved_rate": 1.0, "passed": True}}}


def _audit(passed: bool) -> dict:
    return {"accuracy": 0.4, "monotonic": 0.1, "n_triplets": 15, "gate": {"passed": passed}}


def test_every_questionable_row_gets_a_note(demo_module):
    from demo_report import explanations

    settings = {"steps": 150, "recipe": "offline"}
    summaries = _summaries(bare=(24.3, 0.32, 15.6, 0.59), ours=(24.0, 0.34, 15.7, 0.61))
    notes = explanations(summaries, _gates(0.75), _audit(False), _audit(False), settings, "tiny")
    joined = "\n".join(notes)
    assert "**bare (L1) on σ15: 24.30/.320, below its own input (24.60/.330) in PSNR and SSIM.**" in joined
    assert "its input is already fairly clean (24.6 dB)" in joined
    assert ("**bare (L1) on haze: 15.60/.590, below its own input (8.50/.600) in SSIM.** PSNR rises (8.50 → 15.60 dB)"
            in joined)
    assert "Perceive-IR on haze" not in joined and "Perceive-IR on σ15: 24.00/.340, below its own input" in joined
    assert ("**Perceive-IR − bare, average: -0.10 dB PSNR, +0.020 SSIM** (per set from -0.30 to +0.10 dB, widest on "
            "σ15)") in joined
    assert "**Stage-1 gate not passed for noise:** too few beat the degraded input (PSNR improved 0.75" in joined
    assert "gate not passed for haze" not in joined
    assert "**The perceiver's held-out audit does not pass the authors' gate** (accuracy 0.40" in joined
    assert "on a tiny random CLIP" in joined

    above = _summaries(bare=(25.0, 0.40, 15.6, 0.61), ours=(25.1, 0.41, 15.7, 0.62))
    fine = explanations(above, _gates(0.95), _audit(True), _audit(True), settings, "pretrained")
    assert len(fine) == 1 and fine[0].startswith("**Perceive-IR − bare")  # nothing below input, the gates pass


def test_the_recipe_follows_the_pretrained_weights_found(demo_module):
    cached = dict.fromkeys(("CLIP", "DINOv2", "VGG"), "cached")
    assert demo_module.choose("auto", "auto", cached) == ("full", "pretrained")
    assert demo_module.choose("auto", "auto", {**cached, "VGG": "downloadable"}) == ("full", "pretrained")
    assert demo_module.choose("auto", "auto", {**cached, "VGG": "missing"}) == ("offline", "tiny")
    assert demo_module.choose("full", "auto", {**cached, "VGG": "missing"}) == ("full", "tiny")  # one flag away
    assert demo_module.choose("offline", "auto", cached) == ("offline", "pretrained")
    assert demo_module.choose("auto", "tiny", cached) == ("offline", "tiny")
    with pytest.raises(ValueError, match=r"--weights pretrained: no cached weights and no Hub for \['VGG'\]"):
        demo_module.choose("auto", "pretrained", {**cached, "VGG": "missing"})


def test_pretrained_weights_are_found_in_the_cache_without_a_download(demo_module, tmp_path):
    repos = demo_module.pretrained_repos()
    assert repos == {"CLIP ViT-B/32 (OpenAI)": "timm/vit_base_patch32_clip_224.openai",
                     "DINOv2-B/14": "timm/vit_base_patch14_dinov2.lvd142m", "VGG-16": "timm/vgg16.tv_in1k"}
    folder = tmp_path / f"models--{repos['VGG-16'].replace('/', '--')}"  # the Hugging Face cache layout
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    (folder / "snapshots" / "0123abcd").mkdir(parents=True)
    (folder / "snapshots" / "0123abcd" / "model.safetensors").write_bytes(b"weights")
    assert demo_module.pretrained_status(tmp_path, reachable=False) == {
        "CLIP ViT-B/32 (OpenAI)": "missing", "DINOv2-B/14": "missing", "VGG-16": "cached"}
    assert demo_module.pretrained_status(tmp_path, reachable=True)["DINOv2-B/14"] == "downloadable"
    assert demo_module.hub_reachable() is False  # HF_HUB_OFFLINE=1 in the tests: the Hub is never asked


def test_the_training_script_takes_the_demo_perceiver_with_its_tiny_networks(demo_run):
    from examples.train_restormer_perceive import build_criterion, build_parser

    out, _, _ = demo_run
    args = build_parser().parse_args(["--data", "unused", "--tiny", "--perceiver", str(out / "perceiver")])
    args.frozen = "tiny"  # what main() makes of --tiny
    perceiver = build_criterion(args).clip_loss.perceiver  # the same tiny CLIP as the recipe's --tiny (width 64)
    assert perceiver.clip_model == "perceive-tiny-clip" and perceiver.prompt_learner.ctx.shape[-1] == 64


def test_no_sgm_is_refused_for_the_paper_network(tmp_path):
    from examples.train_restormer_perceive import main

    with pytest.raises(ValueError, match="--no-sgm applies to adapter-wrapped backbones; perceive-ir-net-tiny has"):
        main(["--data", str(tmp_path), "--backbone", "perceive-ir-net-tiny", "--no-sgm", "--frozen", "tiny",
              "--no-proxies", "--device", "cpu", "--out-dir", str(tmp_path / "run")])
