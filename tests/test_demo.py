"""The README's main job runs both stages end to end (here with very few steps) and writes a sane report."""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import re
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


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_module):
    """One whole demo run with a few steps per stage: (output folder, printed text, report.json)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    printed = io.StringIO()
    with pytest.warns(UserWarning, match="--tiny-clip was given: this demo uses a tiny RANDOM CLIP"), \
            contextlib.redirect_stdout(printed):
        code = demo_module.main(["--out", str(out), "--restorer-steps", "4", "--prompt-steps", "4", "--tiny-clip",
                                 "--stage2-steps", "3", "--stage2-batch", "4", "--stage2-crop", "32",
                                 "--device", "cpu"])
    assert code == 0
    return out, printed.getvalue(), json.loads((out / "report.json").read_text(encoding="utf-8"))


def test_stage1_writes_gates_audit_and_a_perceiver_that_scores_from_the_cli(demo_run, capsys):
    out, printed, report = demo_run
    assert "medium-image gates" in printed and "authors' gate" in printed
    assert report["real_clip"] is False
    assert set(report["gates"]["per_task"]) == {"noise", "haze", "rain"}
    assert report["audit"]["n_triplets"] + report["train_audit"]["n_triplets"] == report["gates"]["overall"]["n"] == 36
    assert (out / "perceiver_demo.png").stat().st_size > 10_000
    config = json.loads((out / "perceiver" / "config.json").read_text())
    assert config["clip_model"].startswith("local-dir:") and config["training"]["steps"] == 4

    from perceive_components.cli import main

    image = str(EXAMPLES / "data" / "demo_images" / "coffee_0.png")  # the saved perceiver scores from the CLI
    assert main(["score", image, "--perceiver", str(out / "perceiver"), "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["image"] == image


def test_proxy_negatives_come_from_the_fold_model_that_never_saw_the_image(demo_run):
    out, _, report = demo_run
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


def test_both_stage2_runs_trained_the_same_steps_with_their_own_losses(demo_run):
    out, printed, report = demo_run
    assert "training restormer-tiny for 3 steps twice" in printed
    runs = out / "stage2" / "runs"
    logs = {name: list(csv.DictReader(open(runs / name / "train_log.csv", encoding="utf-8")))
            for name in ("bare", "perceive-ir")}
    assert [row["step"] for row in logs["bare"]] == [row["step"] for row in logs["perceive-ir"]] == ["1", "2", "3"]
    assert {"l1", "contrastive", "clip", "perceptual"} <= set(logs["perceive-ir"][0])
    assert "clip" not in logs["bare"][0]
    for row in [*logs["bare"], *logs["perceive-ir"]]:
        assert math.isfinite(float(row["loss"])) and row["skipped"] == "0"
    spec = json.loads((runs / "perceive-ir" / "net.json").read_text())
    assert spec["backbone"] == "restormer-tiny" and spec["adapter"] and spec["frozen"] == "tiny"
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
    assert "tiny **random** CLIP" in text and "tiny **random** DINOv2 and VGG" in text
    for header in ("| task | pairs | PSNR improved", "| task | triplets | accuracy",
                   "| PSNR / SSIM | σ15 | σ25 | σ50 | haze | rain | average |"):
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


def test_the_reading_note_names_random_nets_unless_every_frozen_net_is_pretrained(demo_module):
    from demo_report import reading_note

    tiny = {"frozen": "tiny", "backbone": "restormer-tiny", "steps": 150}
    for real_clip, settings in ((False, tiny), (True, tiny), (False, {**tiny, "frozen": "pretrained"})):
        note = reading_note(real_clip, settings)
        assert "with random frozen networks" in note and "may well score below the bare backbone" in note
        assert "do **not** show what the method achieves" in note
    note = reading_note(True, {**tiny, "frozen": "pretrained"})
    assert "OpenAI CLIP ViT-B/32" in note and "pretrained DINOv2-B and VGG-16" in note and "150 training steps" in note
    assert "random" not in note and "do **not** show what the method achieves" in note
