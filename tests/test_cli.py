"""The perceive-ir command: score and stage-1 subcommands, end to end on tiny models and files."""
from __future__ import annotations

import json

import pytest
import torch

from perceive_components import QualityPerceiver
from perceive_components.cli import main
from perceive_components.ops.io import read_image, write_image
from perceive_components.tiny import TINY_CLIP_NAME
from stage1_helpers import write_pair_folder

RESTORER = '''
import torch.nn as nn
def small(width=8):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, 3, 3, padding=1))
'''


@pytest.fixture(scope="module")
def perceiver_dir(tmp_path_factory, tiny_clip):
    torch.manual_seed(1)  # the saved config names the tiny CLIP, which the CLI rebuilds by name
    perceiver = QualityPerceiver(clip_model=TINY_CLIP_NAME, pretrained=None, n_ctx=4, clip=tiny_clip)
    folder = tmp_path_factory.mktemp("perceiver")
    perceiver.save_pretrained(folder)
    return folder, perceiver


def test_score_table_and_json_match_the_library(tmp_path, perceiver_dir, capsys):
    folder, perceiver = perceiver_dir
    paths = []
    for index, size in enumerate([(40, 40), (24, 60)]):
        image = torch.rand(3, *size)
        write_image(tmp_path / f"im{index}.png", image)
        paths.append(str(tmp_path / f"im{index}.png"))
    assert main(["score", *paths, "--perceiver", str(folder), "--json", "--device", "cpu"]) == 0
    rows = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        expected = perceiver.score(torch.stack([perceiver.resize(read_image(p)[None])[0] for p in paths]).clamp(0, 1))
    assert [r["image"] for r in rows] == paths
    assert [r["q"] for r in rows] == pytest.approx(expected.tolist(), abs=1e-5)
    assert set(rows[0]["probabilities"]) == {"terrible", "mediocre", "excellent"}
    assert main(["score", *paths, "--perceiver", str(folder), "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "p(terrible)" in table and paths[1] in table


def test_score_errors_have_exit_codes(tmp_path, perceiver_dir, capsys):
    folder, _ = perceiver_dir
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert main(["score", str(tmp_path / "broken.png"), "--perceiver", str(folder), "--device", "cpu"]) == 1
    assert "broken.png" in capsys.readouterr().err
    assert main(["score", str(tmp_path / "missing.png"), "--perceiver", str(folder), "--device", "cpu"]) == 1
    assert "missing.png" in capsys.readouterr().err
    assert main(["score", str(tmp_path / "x.png"), "--perceiver", str(tmp_path / "no" / "such" / "dir")]) == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["score"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["score", "a.png", "--perceiver", str(folder), "--batch-size", "0"])
    assert info.value.code == 2


def test_stage1_commands_end_to_end(tmp_path, perceiver_dir, capsys):
    data, out = tmp_path / "data", tmp_path / "stage1"
    write_pair_folder(data, n_per_task=4, size=32)
    (tmp_path / "restorer.py").write_text(RESTORER)
    assert main(["stage1", "split", str(data), "--out", str(tmp_path / "pairs.jsonl")]) == 0
    assert "8 pairs in 2 folds" in capsys.readouterr().out
    assert main(["stage1", "render", "--pairs", str(tmp_path / "pairs.jsonl"), "--root", str(data), "--out", str(out),
                 "--restorer", f"{tmp_path / 'restorer.py'}:small", "--restorer-kwargs", '{"width": 4}',
                 "--steps", "2", "--crop-size", "16", "--device", "cpu"]) == 0
    triplets = out / "triplets.jsonl"
    assert len(triplets.read_text().splitlines()) == 8
    capsys.readouterr()
    assert main(["stage1", "gates", "--triplets", str(triplets), "--root", str(data), "--json"]) == 0
    gates = json.loads(capsys.readouterr().out)
    assert set(gates["per_task"]) == {"noise", "haze"}
    trained = tmp_path / "trained"
    assert main(["stage1", "train-prompts", "--triplets", str(triplets), "--root", str(data), "--out", str(trained),
                 "--clip-model", TINY_CLIP_NAME, "--pretrained", "", "--n-ctx", "4", "--steps", "3",
                 "--batch-size", "2", "--device", "cpu"]) == 0
    config = json.loads((trained / "config.json").read_text())
    assert config["training"]["steps"] == 3 and config["training"]["triplets"] == 8
    capsys.readouterr()
    assert main(["stage1", "audit", "--perceiver", str(trained), "--triplets", str(triplets), "--root", str(data),
                 "--views", "center", "--record", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    assert "overall" in table and "authors' gate" in table
    assert "accuracy" in json.loads((trained / "config.json").read_text())["audit"]
    assert "| strict |" in (trained / "README.md").read_text()


def test_stage1_bad_arguments(tmp_path, capsys):
    assert main(["stage1", "split", str(tmp_path / "nothing"), "--out", str(tmp_path / "p.jsonl")]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "p.jsonl").write_text('{"degraded": "a.png", "clean": "b.png"}\n')
    assert main(["stage1", "render", "--pairs", str(tmp_path / "p.jsonl"), "--root", str(tmp_path),
                 "--out", str(tmp_path / "o"), "--restorer", "no_such_module_xyz:make"]) == 1
    assert "cannot be imported" in capsys.readouterr().err
    assert main(["stage1", "render", "--pairs", str(tmp_path / "p.jsonl"), "--root", str(tmp_path),
                 "--out", str(tmp_path / "o"), "--restorer", "torch.nn"]) == 1
    assert "MODULE:CALLABLE" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["stage1", "audit", "--triplets", "t.jsonl"])
    assert info.value.code == 2


def test_cache_subcommand_is_wired_with_clean_errors(tmp_path, capsys):
    assert main(["cache", "inspect", "--cache", str(tmp_path / "nowhere")]) == 1
    assert capsys.readouterr().err.startswith("perceive-ir: error:")
    assert main(["cache", "render", "--cache", str(tmp_path / "c"), "--slot", "s", "--model", "nocolon",
                 "--input-root", str(tmp_path)]) == 1
    assert "--model must look like MODULE:CALLABLE" in capsys.readouterr().err


def test_pretrained_without_clip_model_is_an_error(tmp_path, perceiver_dir, capsys):
    folder, _ = perceiver_dir
    write_image(tmp_path / "a.png", torch.rand(3, 32, 32))
    assert main(["score", str(tmp_path / "a.png"), "--perceiver", str(folder), "--pretrained", "openai",
                 "--device", "cpu"]) == 1
    assert "--pretrained 'openai' only applies with --clip-model" in capsys.readouterr().err


def test_a_perceiver_file_is_named_as_a_file(tmp_path, perceiver_dir, capsys):
    folder, _ = perceiver_dir
    write_image(tmp_path / "a.png", torch.rand(3, 32, 32))
    assert main(["score", str(tmp_path / "a.png"), "--perceiver", str(folder / "config.json"), "--device", "cpu"]) == 1
    assert "is a file, not a perceiver" in capsys.readouterr().err


@pytest.mark.parametrize("passed", [False, True])
def test_score_warns_when_the_recorded_audit_failed_its_gate(tmp_path, perceiver_dir, tiny_clip, passed, capsys):
    folder, perceiver = perceiver_dir
    audited = QualityPerceiver.from_pretrained(folder, clip=tiny_clip)
    audited.audit_metrics = {"accuracy": 0.5, "gate": {
        "passed": passed, "task_macro_accuracy": {"value": 0.55 if not passed else 0.9, "threshold": 0.8},
        "monotonic": {"value": 0.95, "threshold": 0.9}}}
    audited.save_pretrained(tmp_path / "audited")
    write_image(tmp_path / "a.png", torch.rand(3, 32, 32))
    assert main(["score", str(tmp_path / "a.png"), "--perceiver", str(tmp_path / "audited"), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    if passed:
        assert "warning" not in err
    else:
        assert err.startswith("perceive-ir: warning: this perceiver's recorded audit did not pass the authors' gate "
                              "(task_macro_accuracy 0.55 < 0.8)")
