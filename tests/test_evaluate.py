"""examples/evaluate.py: the protocol's numbers, tiling, table layout and data-layout errors."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from examples import evaluate as ev
from examples.backbones import create_backbone, save_official_checkpoint
from perceive_components.data.degradations import add_gaussian_noise
from perceive_components.ops.io import read_image, write_image
from perceive_components.ops.metrics import psnr, ssim
from perceive_components.ops.tiling import pad_to_multiple

REPO = Path(__file__).resolve().parent.parent
SIZES = {"setA": [(21, 30), (40, 33)], "setB": [(24, 24), (17, 45), (32, 40)]}  # mostly off the 8-grid



@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval-data")
    generator = torch.Generator().manual_seed(0)
    for set_name, sizes in SIZES.items():
        for index, (height, width) in enumerate(sizes):
            clean = torch.rand(1, 3, height, width, generator=generator)
            write_image(root / set_name / "target" / f"im{index}.png", clean[0])
            suffix = ".png" if index else ".bmp"  # names pair by stem, suffixes may differ
            write_image(root / set_name / "degraded" / f"im{index}{suffix}", add_gaussian_noise(clean, 25, generator)[0])
    return root


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    model = create_backbone("restormer-tiny").eval()
    return model, save_official_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "restormer-tiny.pth")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("ssim_window", [None, "gaussian"])
def test_cli_metrics_match_a_direct_computation(ssim_window, data_root, tiny_checkpoint, tmp_path):
    from skimage.metrics import structural_similarity

    model, checkpoint = tiny_checkpoint
    out = tmp_path / "out"
    window = ["--ssim-window", ssim_window] if ssim_window else []  # default: scikit-image's SSIM
    summary = ev.main(["--backbone", "restormer-tiny", "--checkpoint", str(checkpoint), "--data-root", str(data_root),
                       "--sets", "setA=A", "setB", "--device", "cpu", *window, "--label", "tiny", "--out", str(out)])
    rows = read_csv(out / "per_image.csv")
    assert [(r["set"], r["image"]) for r in rows] == [("A", "im0"), ("A", "im1"), ("setB", "im0"), ("setB", "im1"),
                                                      ("setB", "im2")]
    for row in rows:
        folder = data_root / ("setA" if row["set"] == "A" else "setB")
        degraded = read_image(next((folder / "degraded").glob(row["image"] + ".*")))[None]
        target = read_image(folder / "target" / f"{row['image']}.png")[None]
        padded, (height, width) = pad_to_multiple(degraded, 8, mode="replicate")
        with torch.no_grad():
            restored = model(padded)[..., :height, :width].clamp(0, 1)  # float values, no 8-bit rounding
        expected_psnr = psnr(restored, target).item()
        if ssim_window == "gaussian":
            expected_ssim = ssim(restored, target, window="gaussian").item()
        else:
            arrays = [image[0].permute(1, 2, 0).double().numpy() for image in (target, restored)]
            expected_ssim = structural_similarity(*arrays, data_range=1.0, channel_axis=-1)
        assert float(row["psnr"]) == pytest.approx(expected_psnr, abs=1e-4)
        assert float(row["ssim"]) == pytest.approx(expected_ssim, abs=1e-5)

    set_means = {label: [float(r["psnr"]) for r in rows if r["set"] == label] for label in ("A", "setB")}
    set_means = {label: sum(v) / len(v) for label, v in set_means.items()}
    assert summary["A"][0] == pytest.approx(set_means["A"], abs=1e-4) and summary["A"][2] == 2
    assert summary["average"][0] == pytest.approx((set_means["A"] + set_means["setB"]) / 2, abs=1e-4)  # mean of sets
    table = (out / "table.md").read_text().splitlines()
    assert table[0] == "| setting | A | setB | average |" and table[1] == "|---|---|---|---|"
    assert table[2].startswith("| tiny | ") and table[2].count("/") == 3
    assert [r["set"] for r in read_csv(out / "summary.csv")] == ["A", "setB", "average"]


class LocalNet(nn.Module):
    """A small conv net with a receptive-field radius of ``kernel // 2`` per layer; records its input sizes."""

    def __init__(self, kernel: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, kernel, padding=kernel // 2), nn.ReLU(),
                                  nn.Conv2d(8, 3, kernel, padding=kernel // 2), nn.Sigmoid())
        self.seen: list[tuple[int, int, int]] = []  # (batch, H, W) of every call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((x.shape[0], x.shape[2], x.shape[3]))
        return self.body(x)


@pytest.mark.parametrize(("kernel", "tolerance"), [(1, 1e-6), (3, 1 / 255)])
def test_tiled_matches_whole_image_for_a_local_model_at_bounded_input_size(kernel, tolerance):
    torch.manual_seed(0)
    net = LocalNet(kernel).eval()
    image = torch.rand(1, 3, 70, 85)
    whole = ev.restore_image(net, image)
    assert net.seen == [(1, 72, 88)]  # replicate-padded to the 8-grid, run once
    net.seen.clear()
    tiled = ev.restore_image(net, image, tile=32, overlap=16, tile_batch=2)
    assert tiled.shape == whole.shape == image.shape
    # 72x88 padded, tile 32, stride 16: 4 x 5 tiles, two per pass, each pass (2, 3, 32, 32)
    assert net.seen == [(2, 32, 32)] * 10
    # radius-2 model: pixels next to a tile edge are wrong in that tile but carry a small blending weight,
    # so the difference stays under one 8-bit level; a pointwise model is exact.
    assert (tiled - whole).abs().max().item() < tolerance
    score_whole, score_tiled = ev.score_pair(whole, image), ev.score_pair(tiled, image)
    assert score_tiled[0] == pytest.approx(score_whole[0], abs=0.05)


def test_layout_problems_are_all_listed_at_once(data_root, tmp_path):
    with pytest.raises(ValueError, match="data root .* does not exist; expected <root>/<set>/degraded"):
        ev.discover_sets(tmp_path / "nowhere")
    root = tmp_path / "root"
    write_image(root / "noise" / "degraded" / "a.png", torch.rand(3, 8, 8))
    write_image(root / "noise" / "degraded" / "b.png", torch.rand(3, 8, 8))
    write_image(root / "noise" / "target" / "a.png", torch.rand(3, 8, 8))
    write_image(root / "noise" / "target" / "c.png", torch.rand(3, 8, 8))
    (root / "haze" / "degraded").mkdir(parents=True)
    (root / "empty" / "degraded").mkdir(parents=True)
    (root / "empty" / "target").mkdir(parents=True)
    with pytest.raises(ValueError) as info:
        ev.discover_sets(root, [("noise", "σ25"), ("haze", "SOTS"), ("rain", "Rain100L"), ("empty", "E")])
    message = str(info.value)
    assert "set 'noise': 1 degraded image(s) without a target, e.g. b" in message
    assert "set 'noise': 1 target image(s) without a degraded image, e.g. c" in message
    assert f"set 'haze': missing folder(s) {root / 'haze' / 'target'}" in message
    assert f"set 'rain': missing folder(s) {root / 'rain' / 'degraded'}, {root / 'rain' / 'target'}" in message
    assert "set 'empty': no images" in message
    assert [s.name for s in ev.discover_sets(data_root)] == ["setA", "setB"]  # default: every sub-folder


def test_pairs_of_different_sizes_are_refused(tmp_path):
    write_image(tmp_path / "s" / "degraded" / "a.png", torch.rand(3, 8, 8))
    write_image(tmp_path / "s" / "target" / "a.png", torch.rand(3, 8, 16))
    with pytest.raises(ValueError, match=r"a.png is \(8, 8\) but its target .*a.png is \(8, 16\)"):
        ev.evaluate(nn.Identity(), ev.discover_sets(tmp_path))


def test_cells_and_average_follow_the_reference_table():
    assert ev.format_cell(34.1349, 0.93449) == "34.13/.934"
    assert ev.format_cell(40.0, 1.0) == "40.00/1.000"
    scores = [ev.ImageScore("σ15", "a", 30.0, 0.9), ev.ImageScore("σ15", "b", 32.0, 0.8),
              ev.ImageScore("SOTS", "c", 20.0, 0.5)]
    summary = ev.summarise(scores, ["σ15", "SOTS"])
    assert summary == {"σ15": (31.0, pytest.approx(0.85), 2), "SOTS": (20.0, 0.5, 1),
                       "average": (25.5, pytest.approx(0.675), 3)}
    assert ev.format_table(summary, "ours").splitlines()[0] == "| setting | σ15 | SOTS | average |"
    assert [label for _, label in ev.PROTOCOLS["3task"]] == ["σ15", "σ25", "σ50", "SOTS", "Rain100L"]
    assert [label for _, label in ev.PROTOCOLS["5task"]] == ["σ25", "SOTS", "Rain100L", "GoPro", "LOL"]


def test_script_runs_from_a_shell_and_reports_bad_layouts_cleanly(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "examples" / "evaluate.py"), "--backbone", "nafnet-tiny",
                             "--data-root", str(tmp_path / "missing")], capture_output=True, text=True, cwd=tmp_path,
                            timeout=120)
    assert result.returncode != 0
    assert "evaluate.py: error: evaluation data root" in result.stderr and "Traceback" not in result.stderr
