"""Stage-1 outputs are reused by content, not by name: other images, a foreign fold model or a medium image
of unknown origin are refused with an error naming them, and rebuilt when asked."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from perceive_components.cli import main
from perceive_components.ops.io import read_png_text, write_image
from perceive_components.stage1 import (
    PairImages, TripletImages, build_triplets, read_jsonl, render_medium, scan_pairs, train_fold_restorer,
    train_prompts,
)
from perceive_components.ops.checkpoint import state_sha256
from perceive_components.stage1.fingerprints import file_sha256
from perceive_components.stage1.render import MEDIUM_KEY
from stage1_helpers import write_pair_folder

TRAIN = dict(steps=2, crop_size=16, batch_size=2)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return x + 0.1 * self.conv(x)


def build(data, out, **kwargs):
    return build_triplets(Net, scan_pairs(data), data, out, k=2, train_kwargs=TRAIN, progress=False, **kwargs)


@pytest.fixture()
def stage1(tmp_path):
    """Data A rendered into ``out``; data B has the same file names and other pixels."""
    write_pair_folder(tmp_path / "a", n_per_task=3, size=16, seed=0)
    write_pair_folder(tmp_path / "b", n_per_task=3, size=16, seed=1)
    build(tmp_path / "a", tmp_path / "out")
    return tmp_path / "a", tmp_path / "b", tmp_path / "out"


def medium_records(out):
    return {path.relative_to(out).as_posix(): json.loads(read_png_text(path)[MEDIUM_KEY])
            for path in (out / "medium").rglob("*.png")}


def test_outputs_carry_the_fingerprints_of_their_inputs(stage1):
    data, _, out = stage1
    rows = read_jsonl(out / "triplets.jsonl")
    records = medium_records(out)
    assert len(records) == len(rows) == 6
    for row in rows:
        assert row["degraded_sha256"] == file_sha256(data / row["degraded"])
        assert row["clean_sha256"] == file_sha256(data / row["clean"])
        record = records[row["medium"]]
        assert record["degraded_sha256"] == row["degraded_sha256"]
        assert record["restorer_sha256"] == row["restorer_sha256"]
    from safetensors.torch import load_file

    for fold in (0, 1):  # each medium image names the weights of its own fold's model
        model = Net()
        model.load_state_dict(load_file(str(out / "folds" / f"fold{fold}.safetensors")))
        assert {r["restorer_sha256"] for r in rows if r["fold"] == fold} == {state_sha256(model)}


def test_the_same_names_with_other_pixels_are_refused_then_rebuilt(stage1):
    _, other, out = stage1
    before = {path: path.read_bytes() for path in (out / "folds").glob("*.safetensors")}
    with pytest.raises(ValueError, match=r"other settings \(data: 12 image file\(s\) changed content, e\.g\. "
                                         r"haze/clean/img0\.png.*rebuild=True"):
        build(other, out)
    assert {path: path.read_bytes() for path in before} == before  # nothing touched
    build(other, out, rebuild=True)
    assert all(path.read_bytes() != content for path, content in before.items())  # retrained
    for name, record in medium_records(out).items():  # re-rendered from the new degraded files
        assert record["degraded_sha256"] == file_sha256(other / name.removeprefix("medium/"))
    build(other, out)  # and now reused as it is


def test_a_foreign_fold_model_or_a_missing_one_is_refused(stage1, tmp_path):
    data, other, out = stage1
    build(other, tmp_path / "elsewhere")
    shutil.copy(tmp_path / "elsewhere" / "folds" / "fold0.safetensors", out / "folds" / "fold0.safetensors")
    with pytest.raises(ValueError, match=r"folds/fold0\.safetensors was trained on other pairs or settings"):
        build(data, out)
    (out / "folds" / "fold0.safetensors").unlink()  # the medium images of fold 0 now have no model to vouch
    with pytest.raises(ValueError, match="medium images of fold 0 exist but its model does not"):
        build(data, out)


def test_medium_images_of_unknown_origin_are_refused(stage1):
    data, _, out = stage1
    rows = read_jsonl(out / "pairs.jsonl")
    fold0 = [row for row in rows if row["fold"] == 0]
    stranger = out / (("medium/" + fold0[0]["degraded"]).rsplit(".", 1)[0] + ".png")
    write_image(stranger, torch.rand(3, 16, 16))  # same name, no record
    with pytest.raises(ValueError, match=r"1 medium image\(s\) rendered from other inputs.*"
                                         + fold0[0]["degraded"].rsplit(".", 1)[0]):
        build(data, out)
    other_model = Net()
    with pytest.raises(ValueError, match=rf"{len(fold0)} medium image\(s\) rendered from other inputs"):
        render_medium(other_model, fold0, data, out, progress=False)  # another model over fold 0's images
    render_medium(other_model, fold0, data, out, overwrite=True, progress=False)
    assert {medium_records(out)[f"medium/{row['degraded']}"]["restorer_sha256"] for row in fold0} \
        == {state_sha256(other_model)}


def test_a_fold_checkpoint_of_other_images_is_not_resumed(tmp_path):
    write_pair_folder(tmp_path / "a", n_per_task=2, size=16, seed=0)
    write_pair_folder(tmp_path / "b", n_per_task=2, size=16, seed=1)
    checkpoint = tmp_path / "fold.ckpt"
    train_fold_restorer(Net, PairImages(scan_pairs(tmp_path / "a"), tmp_path / "a"), checkpoint=checkpoint,
                        progress=False, **TRAIN)
    with pytest.raises(ValueError, match=r"another fold-restorer run \(differs in data"):
        train_fold_restorer(Net, PairImages(scan_pairs(tmp_path / "b"), tmp_path / "b"), checkpoint=checkpoint,
                            progress=False, **TRAIN)


def test_prompt_checkpoints_follow_the_triplets(stage1, tiny_perceiver, tmp_path):
    data, other, out = stage1
    checkpoint = tmp_path / "prompts.ckpt"
    settings = dict(steps=1, batch_size=2, crop_size=16, checkpoint=checkpoint, progress=False)
    train_prompts(tiny_perceiver, TripletImages(out / "triplets.jsonl", data), **settings)
    assert tiny_perceiver.training_info["triplets_sha256"] == TripletImages(out / "triplets.jsonl", data).fingerprint()
    build(other, out, rebuild=True)
    with pytest.raises(ValueError, match="different run"):
        train_prompts(tiny_perceiver, TripletImages(out / "triplets.jsonl", other), **settings)


def test_cli_render_refuses_and_rebuilds(stage1, capsys):
    _, other, out = stage1
    (out.parent / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in scan_pairs(other)))
    argv = ["stage1", "render", "--pairs", str(out.parent / "pairs.jsonl"), "--root", str(other), "--out", str(out),
            "--restorer", f"{__file__}:Net", "--steps", "2", "--crop-size", "16", "--batch-size", "2"]
    assert main(argv) == 1
    assert "changed content" in capsys.readouterr().err
    assert main([*argv, "--rebuild"]) == 0
