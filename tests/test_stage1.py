"""Stage 1: folds, manifests, fold restorers + rendering, gates, prompt training and the audit."""
from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from torch import nn

from perceive_components import QualityPerceiver
from perceive_components.stage1 import (
    TensorTriplets, TripletImages, assign_folds, audit_perceiver, build_triplets, fold_of, medium_gates,
    read_jsonl, relative_key, render_medium, scan_pairs, train_prompts,
)
from perceive_components.stage1.train import balanced_indices
from perceive_components.ops.tiling import tiled_apply
from perceive_components.ops.io import read_image
from perceive_components.ops.checkpoint import load_state
from stage1_helpers import synthetic_triplets, write_pair_folder


# ----------------------------------------------------------------------------- folds
def test_folds_depend_on_relative_path_only(tmp_path):
    for root in (tmp_path / "a", tmp_path / "moved" / "elsewhere"):
        (root / "noise" / "clean").mkdir(parents=True)
        (root / "noise" / "clean" / "x.png").write_bytes(b"")
    first = fold_of(tmp_path / "a" / "noise" / "clean" / "x.png", 5, root=tmp_path / "a")
    second = fold_of(tmp_path / "moved" / "elsewhere" / "noise" / "clean" / "x.png", 5,
                     root=tmp_path / "moved" / "elsewhere")
    assert first == second == fold_of("noise/clean/x.png", 5)
    assert relative_key("noise\\clean/x.png".replace("\\", "/")) == "noise/clean/x.png"
    with pytest.raises(ValueError, match="not under the data root"):
        fold_of(tmp_path / "a" / "noise" / "clean" / "x.png", 2, root=tmp_path / "b")
    with pytest.raises(ValueError, match="relative"):
        fold_of("/abs/path.png", 2)


def test_folds_are_balanced_and_group_degraded_versions_of_one_image():
    names = [f"clean/{i:04d}.png" for i in range(2000)]
    counts = Counter(fold_of(name, 2) for name in names)
    assert abs(counts[0] - counts[1]) < 150  # ~N(0, 45) for a fair hash
    rows = [{"degraded": f"noise/deg/{i}_s{s}.png", "clean": f"noise/clean/{i}.png", "task": "noise"}
            for i in range(40) for s in (15, 25, 50)]
    folds = assign_folds(rows, 2)
    by_clean = {}
    for row in folds:
        by_clean.setdefault(row["clean"], set()).add(row["fold"])
    assert all(len(f) == 1 for f in by_clean.values())
    with pytest.raises(ValueError, match="empty"):
        assign_folds(rows[:1], 2)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        assign_folds(rows, 0)


# ----------------------------------------------------------------------------- manifests
def test_scan_pairs_layout_and_errors(tmp_path):
    write_pair_folder(tmp_path / "data", n_per_task=2)
    pairs = scan_pairs(tmp_path / "data")
    assert len(pairs) == 4 and {p["task"] for p in pairs} == {"noise", "haze"}
    assert all(not p["degraded"].startswith("/") for p in pairs)
    (tmp_path / "data" / "rain" / "degraded").mkdir(parents=True)
    (tmp_path / "data" / "noise" / "degraded" / "orphan.png").write_bytes(
        (tmp_path / "data" / "noise" / "degraded" / "img0.png").read_bytes())
    with pytest.raises(ValueError) as info:
        scan_pairs(tmp_path / "data")
    assert "rain/ needs both degraded/ and clean/" in str(info.value)
    assert "orphan.png has no clean twin" in str(info.value)
    with pytest.raises(FileNotFoundError):
        scan_pairs(tmp_path / "missing")


def test_read_jsonl_names_bad_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"degraded": "a", "clean": "b"}\n{"degraded": "a"}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: missing field\(s\) \['clean'\]"):
        read_jsonl(path, required=("degraded", "clean"))
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="m.jsonl:1: not valid JSON"):
        read_jsonl(path)


# ----------------------------------------------------------------------------- render
class Halfway(nn.Module):
    """A restorer that is exactly halfway between its input and a fixed target image, for checks."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


def test_build_triplets_trains_each_fold_on_the_others_and_resumes(tmp_path):
    data = tmp_path / "data"
    write_pair_folder(data, n_per_task=4)
    pairs = scan_pairs(data)
    out = tmp_path / "stage1"
    manifest = build_triplets(Halfway, pairs, data, out, k=2,
                              train_kwargs=dict(steps=3, crop_size=16, batch_size=2), progress=False)
    rows = read_jsonl(manifest, required=("degraded", "clean", "medium", "task", "fold"))
    assert len(rows) == len(pairs) and {r["fold"] for r in rows} == {0, 1}
    for fold in (0, 1):  # the fold-k model renders exactly what tiled_apply gives for fold k
        from safetensors.torch import load_file

        model = Halfway()
        model.load_state_dict(load_file(str(out / "folds" / f"fold{fold}.safetensors")))
        row = next(r for r in rows if r["fold"] == fold)
        expected = tiled_apply(model, read_image(data / row["degraded"])[None], tile=512, pad_mode="reflect")
        written = read_image(out / row["medium"])
        assert (written - expected[0].clamp(0, 1)).abs().max() <= 0.5 / 255 + 1e-6

    stamps = {p: p.stat().st_mtime_ns for p in (out / "medium").rglob("*.png")}
    weights = {p: p.stat().st_mtime_ns for p in (out / "folds").iterdir()}
    build_triplets(Halfway, pairs, data, out, k=2, train_kwargs=dict(steps=3, crop_size=16, batch_size=2),
                   progress=False)
    assert {p: p.stat().st_mtime_ns for p in (out / "medium").rglob("*.png")} == stamps  # nothing re-rendered
    assert {p: p.stat().st_mtime_ns for p in (out / "folds").iterdir()} == weights  # nothing re-trained

    dataset = TripletImages(manifest, data)
    item = dataset[0]
    assert item["low"].shape == item["medium"].shape == item["high"].shape
    assert len(TripletImages(manifest, data, folds=[0])) + len(TripletImages(manifest, data, folds=[1])) == len(rows)
    with pytest.raises(ValueError, match="at least 2"):
        build_triplets(Halfway, pairs, data, out, k=1)
    with pytest.raises(ValueError, match="other settings.*train.steps: 3 -> 4"):
        build_triplets(Halfway, pairs, data, out, k=2, train_kwargs=dict(steps=4, crop_size=16, batch_size=2))
    with pytest.raises(ValueError, match="pairs changed"):
        build_triplets(Halfway, pairs[:-2], data, out, k=2, train_kwargs=dict(steps=3, crop_size=16, batch_size=2))


def test_render_medium_tiles_large_images(tmp_path):
    from perceive_components.ops.io import write_image

    image = torch.rand(3, 70, 90)
    write_image(tmp_path / "data" / "t" / "degraded" / "big.png", image)
    model = Halfway().eval()
    rows = render_medium(model, [{"degraded": "t/degraded/big.png", "clean": "t/clean/big.png", "task": "t"}],
                         tmp_path / "data", tmp_path / "out", tile=32, overlap=8, progress=False)
    written = read_image(tmp_path / "out" / rows[0]["medium"])
    whole = tiled_apply(model, read_image(tmp_path / "data" / "t/degraded/big.png")[None], tile=None)[0].clamp(0, 1)
    assert written.shape == image.shape
    assert (written - whole).abs().mean() < 0.01  # seams blended away


# ----------------------------------------------------------------------------- gates
def test_gates_measure_progress_exactly():
    generator = torch.Generator().manual_seed(0)
    high = torch.rand(6, 3, 16, 16, generator=generator, dtype=torch.float64)
    low = (high + 0.2 * torch.randn(6, 3, 16, 16, generator=generator, dtype=torch.float64)).clamp(0, 1)
    medium = high + 0.5 * (low - high)  # MSE ratio 1/4 → r = 0.75, gain 10·log10(4) dB
    report = medium_gates(TensorTriplets(low, medium, high, ["a", "a", "a", "b", "b", "b"]))
    assert report["overall"]["r_median"] == pytest.approx(0.75, abs=1e-9)
    assert report["overall"]["psnr_improved_rate"] == 1.0
    assert report["overall"]["mean_psnr_gain_db"] == pytest.approx(10 * math.log10(4.0), abs=1e-9)
    assert report["per_task"]["a"]["passed"] and report["per_task"]["b"]["n"] == 3
    swapped = medium_gates(TensorTriplets(medium, low, high, ["a"] * 6))  # "medium" worse than degraded
    assert swapped["overall"]["psnr_improved_rate"] == 0.0 and not swapped["overall"]["passed"]


# ----------------------------------------------------------------------------- prompt training
def test_balanced_batches_share_tasks_equally():
    tasks = ["noise"] * 90 + ["haze"] * 9 + ["rain"] * 1
    picked = balanced_indices(tasks, 30, torch.Generator().manual_seed(0))
    counts = Counter(tasks[i] for i in picked)
    assert counts == {"noise": 10, "haze": 10, "rain": 10}
    picked = balanced_indices(tasks, 31, torch.Generator().manual_seed(0))
    assert sorted(Counter(tasks[i] for i in picked).values()) == [10, 10, 11]


@pytest.fixture(scope="module")
def trained(tiny_clip):
    torch.manual_seed(0)
    perceiver = QualityPerceiver(clip_model="tiny", pretrained=None, n_ctx=4, clip=tiny_clip)
    held_out = synthetic_triplets(48, seed=1)
    before = audit_perceiver(perceiver, held_out, views="center", record=False)
    history = train_prompts(perceiver, synthetic_triplets(96, seed=0), steps=150, batch_size=12, lr=1e-3,
                            crop_size=32, progress=False)
    after = audit_perceiver(perceiver, held_out, views="center")
    return perceiver, before, after, history


def test_prompt_training_lifts_held_out_accuracy_from_chance(trained):
    perceiver, before, after, history = trained
    assert before["accuracy"] < 0.40  # chance is 1/3
    assert after["accuracy"] >= 0.55, after
    assert after["monotonic"] > before["monotonic"]
    assert sum(history["loss"][-20:]) / 20 < sum(history["loss"][:20]) / 20
    assert perceiver.training_info["triplets_per_task"] == {"haze": 48, "lowlight": 48}
    assert perceiver.audit_metrics["accuracy"] == after["accuracy"]
    assert set(after["per_task"]) == {"haze", "lowlight"}
    assert after["gate"]["task_macro_accuracy"]["threshold"] == 0.85


def test_prompt_training_resumes_exactly(tmp_path, tiny_clip):
    triplets = synthetic_triplets(12, seed=2)
    settings = dict(steps=6, batch_size=4, lr=1e-3, crop_size=32, progress=False)

    def fresh():
        torch.manual_seed(0)
        return QualityPerceiver(clip_model="tiny", pretrained=None, n_ctx=4, clip=tiny_clip)

    straight = fresh()
    full = train_prompts(straight, triplets, **settings)
    checkpoint = tmp_path / "prompts.ckpt"
    _interrupt_after(fresh(), triplets, checkpoint, stop_after=3)
    assert load_state(checkpoint)["step"] == 3
    resumed = fresh()
    history = train_prompts(resumed, triplets, checkpoint=checkpoint, checkpoint_every=3, **settings)
    assert history["loss"] == full["loss"]
    assert torch.equal(resumed.prompt_learner.ctx, straight.prompt_learner.ctx)
    with pytest.raises(ValueError, match="different run"):
        train_prompts(fresh(), triplets, checkpoint=checkpoint, **{**settings, "steps": 7})


def test_prompt_training_uses_the_authors_weight_decay_by_default(tmp_path, tiny_perceiver):
    checkpoint = tmp_path / "prompts.ckpt"  # the authors' AdamW(lr, betas) keeps PyTorch's default decay, 0.01
    train_prompts(tiny_perceiver, synthetic_triplets(2, seed=0), steps=1, batch_size=2, crop_size=32, progress=False,
                  checkpoint=checkpoint)
    assert load_state(checkpoint)["optimizer"]["param_groups"][0]["weight_decay"] == 0.01
    assert tiny_perceiver.training_info["weight_decay"] == 0.01


def _interrupt_after(perceiver, triplets, checkpoint, stop_after):
    """Run train_prompts but raise KeyboardInterrupt inside the loop right after step ``stop_after``."""
    import perceive_components.stage1.train as train_module

    original = train_module.save_state
    calls = []

    def save_then_maybe_stop(state, path):
        original(state, path)
        calls.append(state["step"])
        if state["step"] >= stop_after:
            raise KeyboardInterrupt

    train_module.save_state = save_then_maybe_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            train_prompts(perceiver, triplets, steps=6, batch_size=4, lr=1e-3, crop_size=32, progress=False,
                          checkpoint=checkpoint, checkpoint_every=3)
    finally:
        train_module.save_state = original
    assert calls == [stop_after]


@pytest.mark.parametrize("mutate, error, message", [
    (lambda t: {**t, "medium": t["medium"][:, :8]}, ValueError, "same size"),
    (lambda t: {**t, "low": t["low"][None]}, ValueError, r"triplets\[0\]\['low'\] must have shape \(3, H, W\)"),
    (lambda t: {**t, "high": t["high"][:1]}, ValueError, r"\['high'\] must have shape"),
    (lambda t: {**t, "low": (t["low"] * 255).byte()}, TypeError, "floating-point"),
    (lambda t: {**t, "medium": t["medium"] * float("nan")}, ValueError, "NaN"),
    (lambda t: {**t, "high": t["high"] * 3}, ValueError, r"\[0, 1\]"),
    (lambda t: {k: v for k, v in t.items() if k != "medium"}, ValueError, "missing"),
    (lambda t: {**t, "task": 3}, TypeError, "task"),
])
def test_bad_triplets_are_named(tiny_perceiver, mutate, error, message):
    base = synthetic_triplets(1, seed=0)[0]

    class One(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            return mutate(dict(base))

    with pytest.raises(error, match=message):
        train_prompts(tiny_perceiver, One(), steps=1, batch_size=1, crop_size=32, progress=False)
    with pytest.raises(error, match=message):
        audit_perceiver(tiny_perceiver, One())


def test_bad_training_arguments(tiny_perceiver):
    triplets = synthetic_triplets(2, seed=0)
    for kwargs, name in (({"steps": 0}, "steps"), ({"steps": 1, "batch_size": -1}, "batch_size"),
                         ({"steps": 1, "crop_size": 2.5}, "crop_size")):
        with pytest.raises(ValueError, match=name):
            train_prompts(tiny_perceiver, triplets, progress=False, **kwargs)
    with pytest.raises(ValueError, match="empty"):
        train_prompts(tiny_perceiver, TensorTriplets(*(torch.zeros(0, 3, 8, 8),) * 3), steps=1, progress=False)
    with pytest.raises(ValueError, match="views"):
        audit_perceiver(tiny_perceiver, triplets, views="six")
    with pytest.raises(ValueError, match="same shape|one shape"):
        TensorTriplets(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 9), torch.zeros(2, 3, 8, 8))


# ----------------------------------------------------------------------------- audit
class BrightnessPerceiver(nn.Module):
    """A stand-in perceiver whose tier is set by brightness: lets the audit arithmetic be checked by hand."""

    image_size = (8, 8)
    tier_words = ("terrible", "mediocre", "excellent")

    def __init__(self):
        super().__init__()
        self.prompt_learner = nn.Module()
        self.prompt_learner.ctx = nn.Parameter(torch.zeros(1))
        self.register_buffer("tier_values", torch.arange(3.0))

    def forward(self, images):
        mean = images.mean(dim=(1, 2, 3))
        return -50.0 * (mean[:, None] - torch.tensor([0.2, 0.5, 0.8])).abs()


def test_audit_metrics_match_a_hand_count():
    def image(value):
        return torch.full((3, 8, 8), value)

    # triplet 0: all right; 1: medium predicted excellent (not strict, still monotonic); 2: reversed
    triplets = TensorTriplets(torch.stack([image(0.2), image(0.2), image(0.8)]),
                              torch.stack([image(0.5), image(0.75), image(0.5)]),
                              torch.stack([image(0.8), image(0.8), image(0.2)]), ["x", "x", "y"])
    report = audit_perceiver(BrightnessPerceiver(), triplets, views="five", record=False)
    assert report["accuracy"] == pytest.approx(6 / 9)
    assert report["accuracy_per_tier"] == pytest.approx([2 / 3, 2 / 3, 2 / 3])
    assert report["strict"] == pytest.approx(1 / 3)
    assert report["monotonic"] == pytest.approx(2 / 3)
    assert report["per_task"]["y"]["strict"] == 0 and report["per_task"]["x"]["accuracy"] == pytest.approx(5 / 6)
    assert report["gate"]["passed"] is False
    assert report["gate"]["task_min_accuracy"]["value"] == pytest.approx(1 / 3)
    json.dumps(report)  # serialisable for the model card and --json


# ----------------------------------------------------------------------------- fold restorers
def test_fold_restorer_resumes_exactly_and_weights_tasks(tmp_path, monkeypatch):
    import perceive_components.stage1.render as render_module
    from perceive_components.stage1 import PairImages, train_fold_restorer
    from perceive_components.stage1.render import sample_weights

    data = tmp_path / "data"
    write_pair_folder(data, n_per_task=3)
    pairs = PairImages(scan_pairs(data), data)
    settings = dict(steps=6, crop_size=16, batch_size=2, progress=False, task_repeats={"haze": 3.0})

    def fresh():
        torch.manual_seed(0)
        return Halfway()

    straight = train_fold_restorer(fresh, pairs, **settings)
    original, calls = render_module.save_state, []

    def save_then_crash(state, path):
        original(state, path)
        calls.append(state["step"])
        if state["step"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(render_module, "save_state", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_fold_restorer(fresh, pairs, checkpoint=tmp_path / "f.ckpt", checkpoint_every=3, **settings)
    monkeypatch.setattr(render_module, "save_state", original)
    resumed = train_fold_restorer(fresh, pairs, checkpoint=tmp_path / "f.ckpt", checkpoint_every=3, **settings)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="another fold-restorer run"):
        train_fold_restorer(fresh, pairs, checkpoint=tmp_path / "f.ckpt", **{**settings, "steps": 7})

    weights = sample_weights(["noise", "haze", "haze", "rain"], {"rain": 120})
    assert weights.tolist() == [1.0, 1.0, 1.0, 120.0]
    with pytest.raises(ValueError, match="not in the data"):
        sample_weights(["noise"], {"rain": 2})
    with pytest.raises(ValueError, match="positive"):
        sample_weights(["noise"], {"noise": 0})
