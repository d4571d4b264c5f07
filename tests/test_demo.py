"""The README's main job runs end to end (here with very few steps) and writes its report and figure."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def demo_module():
    sys.path.insert(0, str(EXAMPLES))
    try:
        import demo
        yield demo
    finally:
        sys.path.remove(str(EXAMPLES))


def test_demo_runs_stage1_end_to_end(tmp_path, demo_module, capsys):
    out = tmp_path / "demo"
    with pytest.warns(UserWarning, match="--tiny-clip was given: this demo uses a tiny RANDOM CLIP"):
        code = demo_module.main(["--out", str(out), "--restorer-steps", "4", "--prompt-steps", "4", "--tiny-clip",
                                 "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "medium-image gates" in printed and "authors' gate" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["real_clip"] is False
    assert set(report["gates"]["per_task"]) == {"noise", "haze", "rain"}
    assert report["audit"]["n_triplets"] + report["gates"]["overall"]["n"] >= 36
    assert (out / "perceiver_demo.png").stat().st_size > 10_000
    config = json.loads((out / "perceiver" / "config.json").read_text())
    assert config["clip_model"].startswith("local-dir:") and config["training"]["steps"] == 4

    from perceive_components.cli import main

    image = str(EXAMPLES / "data" / "demo_images" / "coffee_0.png")  # the saved perceiver scores from the CLI
    assert main(["score", image, "--perceiver", str(out / "perceiver"), "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["image"] == image
