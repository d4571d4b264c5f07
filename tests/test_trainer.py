"""The loop machinery of the example scripts (examples/train_support.py): data order, checkpoints, exact resume
after SIGKILL, DDP, non-finite steps, the learning rate of an extended run, validation. Tiny models; CPU only."""
from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import signal
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from data_factory import make_layout
from ddp_helpers import free_port
from examples import train_plain
from examples.train_support import (
    CheckpointManager, CosineSchedule, DistEnv, ModelEMA, NonFiniteLossError, ResumableBatchSampler, SeededDataset,
    TrainConfig, TrainingRun, add_train_args, config_from_args, distributed_job, move_to, training_loader,
)
from perceive_components.ops.checkpoint import load_state

ROOT = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).with_name("train_child.py")


# ------------------------------------------------------------------------------------------ helpers
class RandomPairs(torch.utils.data.Dataset):
    """Items {'degraded', 'target'} (3×8×8) drawn from the generator the sampler gives (``sample``)."""

    def __len__(self) -> int:
        return 32

    def sample(self, index: int, generator: torch.Generator) -> dict:
        target = torch.rand(3, 8, 8, generator=generator)
        return {"degraded": (target + 0.1 * torch.randn(3, 8, 8, generator=generator)).clamp(0, 1), "target": target}


def tiny_model(width: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, 3, 3, padding=1))


def config(tmp_path: Path, **overrides) -> TrainConfig:
    settings = dict(out_dir=str(tmp_path / "run"), steps=6, batch_size=4, workers=0, log_every=1, val_every=0,
                    ckpt_every=100, tensorboard=False, plots=False, device="cpu")
    settings.update(overrides)
    return TrainConfig(**settings)


def l1(model, batch):
    return nn.functional.l1_loss(model(batch["degraded"]), batch["target"])


def fit(model, dataset, step_fn, cfg: TrainConfig, *, val_sets=None, generators=None) -> dict:
    """The loop every example script writes (examples/train_plain.py) around ``step_fn(model, batch) -> loss``."""
    with distributed_job(cfg) as env:
        sampler = ResumableBatchSampler(len(dataset), cfg.batch_size, seed=cfg.seed)
        loader = training_loader(dataset, sampler, cfg, env)
        with TrainingRun(model, cfg, env, steps_per_epoch=sampler.steps_per_epoch, generators=generators) as run:
            batches = run.batches(loader)
            while run.step < cfg.steps:
                batch = move_to(next(batches), env.device)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                    loss = step_fn(model, batch)
                loss.backward()
                run.update(loss, {}, torch.nn.utils.clip_grad_norm_(run.parameters, cfg.grad_clip or math.inf))
                if run.due(cfg.ckpt_every):
                    run.save()
                if run.due(cfg.val_every):
                    run.validate(val_sets or {})
            run.export_weights()
    return run.metrics


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


def run_until_frozen(args: list[str], freeze: dict[str, str], ready: Path, log: Path) -> None:
    """Start the child, wait until it reports being frozen at the chosen point, then SIGKILL it."""
    env = child_env() | freeze | {"READY_FILE": str(ready)}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, str(CHILD), *args], env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not ready.exists():
        if process.poll() is not None:
            pytest.fail(f"child exited with {process.returncode} before freezing:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("child did not reach its freeze point in 120 s")
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


def run_child(args: list[str], log: Path) -> None:
    with open(log, "w") as out:
        result = subprocess.run([sys.executable, str(CHILD), *args], env=child_env(), stdout=out,
                                stderr=subprocess.STDOUT, timeout=300)
    assert result.returncode == 0, log.read_text()[-3000:]


# ----------------------------------------------------------------------------------- data order
def test_sampler_shards_are_world_size_independent_and_resume_exactly():
    single = ResumableBatchSampler(40, 8, seed=3)
    shards = [ResumableBatchSampler(40, 8, rank=r, world_size=2, seed=3) for r in range(2)]
    assert single.steps_per_epoch == 5
    two_epochs = list(islice(single, 10))
    for batch, (left, right) in zip(two_epochs, zip(*(islice(shard, 10) for shard in shards))):
        assert batch == left + right  # the two processes together see exactly the global batch
    assert sorted(index for batch in two_epochs[:5] for index, _ in batch) == list(range(40))  # a permutation
    assert two_epochs[5:] != two_epochs[:5]  # another epoch, another order
    single.set_step(7)
    assert list(islice(single, 3)) == two_epochs[7:]  # resuming at step 7 replays the remaining order
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        ResumableBatchSampler(40, 7, world_size=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableBatchSampler(5, 8)


def test_seeded_dataset_draws_are_pure_functions_of_the_seed():
    with_sample = SeededDataset(RandomPairs())
    assert torch.equal(with_sample[(1, 99)]["target"], with_sample[(1, 99)]["target"])
    assert not torch.equal(with_sample[(1, 99)]["target"], with_sample[(1, 98)]["target"])

    class GlobalRandom(torch.utils.data.Dataset):  # a plain data set that uses the global RNG
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return torch.rand(2)

    plain = SeededDataset(GlobalRandom())
    before = torch.get_rng_state()
    assert torch.equal(plain[(0, 5)], plain[(0, 5)])
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is left untouched


# ---------------------------------------------------------------------------------- checkpoints
def test_checkpoints_keep_last_and_a_failed_write_never_becomes_latest(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        manager.save({"step": step, "w": torch.full((4,), float(step))}, step)
    assert [p.name for p in manager.checkpoints()] == ["step_00000002.pt", "step_00000003.pt"]
    assert manager.latest().name == "step_00000003.pt"

    real_save = torch.save

    def crash_mid_write(obj, f, *args, **kwargs):  # half the bytes, then the "crash"
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as handle:
            handle.truncate(os.path.getsize(f) // 2)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="disk full"):
        manager.save({"step": 4, "w": torch.zeros(4)}, 4)
    monkeypatch.setattr(torch, "save", real_save)
    assert manager.latest().name == "step_00000003.pt"
    assert load_state(manager.latest())["step"] == 3
    assert not (tmp_path / "step_00000004.pt").exists()
    assert not list(tmp_path.glob(".*.tmp"))


# ------------------------------------------------------------------------- exact resume after SIGKILL
@pytest.mark.slow
def test_sigkill_then_resume_reproduces_the_uninterrupted_losses_step_for_step(tmp_path):
    data = make_layout(tmp_path / "data", size=(20, 24))
    common = ["--data", str(data), "--crop-size", "16", "--steps", "12", "--batch-size", "4", "--log-every", "1",
              "--ckpt-every", "3", "--val-every", "6", "--num-grids", "1", "--ema-decay", "0.9", "--device", "cpu"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    args = [*common, "--out-dir", str(resumed), "--workers", "1"]
    # killed in the middle of the run, while half of the step-9 checkpoint is on disk
    run_until_frozen([*args, "--no-tensorboard", "--no-plots"], {"FREEZE_IN_SAVE_AT": "9"}, tmp_path / "ready",
                     tmp_path / "run1.log")
    checkpoints = CheckpointManager(resumed / "checkpoints")
    partial = list((resumed / "checkpoints").glob(".step_00000009.pt.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0
    with pytest.raises((ValueError, OSError)):
        load_state(partial[0])  # truly truncated ...
    assert checkpoints.latest().name == "step_00000006.pt"  # ... and never the latest
    assert load_state(checkpoints.latest())["step"] == 6
    assert len(read_csv(resumed / "train_log.csv")) == 9  # steps 7-9 were logged, then lost with the process
    # resumed to the end (with TensorBoard this time)
    run_child(args, tmp_path / "run2.log")
    assert not list((resumed / "checkpoints").glob("*.tmp"))

    # the same run without interruption, here (one thread, like the child), with no DataLoader worker
    train_plain.main([*common, "--out-dir", str(reference), "--workers", "0", "--no-tensorboard", "--no-plots"])

    ref_rows, new_rows = read_csv(reference / "train_log.csv"), read_csv(resumed / "train_log.csv")
    assert [int(r["step"]) for r in new_rows] == list(range(1, 13))
    for ref, new in zip(ref_rows, new_rows):
        for column in ("loss", "grad_norm", "lr"):
            assert ref[column] == new[column], (ref["step"], column)  # exact: the same digits
    assert read_csv(reference / "val_log.csv") == read_csv(resumed / "val_log.csv")
    ref_state = load_state(reference / "checkpoints" / "step_00000012.pt")
    new_state = load_state(resumed / "checkpoints" / "step_00000012.pt")
    for name, value in ref_state["ema"].items():
        assert torch.equal(value, new_state["ema"][name]), name
    for artefact in ("curves.png", "model.safetensors", "model_ema.safetensors", "grids/step_00000012/SOTS_0.png",
                     "train.log"):
        assert (resumed / artefact).is_file(), artefact
    assert list((resumed / "tensorboard").glob("events.out.tfevents.*"))


# ---------------------------------------------------------------------------------------- DDP
@pytest.mark.distributed
def test_two_process_gloo_torchrun_matches_one_process(tmp_path):
    data = make_layout(tmp_path / "data", size=(20, 24))
    common = ["--data", str(data), "--crop-size", "16", "--steps", "4", "--batch-size", "4", "--log-every", "1",
              "--ckpt-every", "2", "--workers", "0", "--no-tensorboard", "--no-plots", "--no-val", "--device", "cpu"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "examples" / "train_plain.py"), *common, "--out-dir", str(tmp_path / "ddp")]
    result = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    train_plain.main([*common, "--out-dir", str(tmp_path / "single")])
    ddp_rows = read_csv(tmp_path / "ddp" / "train_log.csv")
    single_rows = read_csv(tmp_path / "single" / "train_log.csv")
    assert len(ddp_rows) == len(single_rows) == 4
    for ddp, single in zip(ddp_rows, single_rows):  # same global batches; only the summation order differs
        assert float(ddp["loss"]) == pytest.approx(float(single["loss"]), rel=1e-5, abs=1e-6)
    state = load_state(tmp_path / "ddp" / "checkpoints" / "step_00000004.pt")
    assert state["world_size"] == 2 and len(state["per_rank"]) == 2
    assert not torch.equal(state["per_rank"][0]["rng"]["torch"], state["per_rank"][1]["rng"]["torch"])


def collective_decisions(rank: int, port: int, out: dict) -> None:
    """Process ``rank`` of 2: a joint flag where only rank 1 is False, and a set-up step that fails on rank 0."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    env = DistEnv(rank, 2, rank, torch.device("cpu"))
    try:
        out[f"all_true_{rank}"] = env.all_true(torch.tensor(rank == 0))
        out[f"result_{rank}"] = env.on_main(lambda: "from rank 0")

        def broken_scan():
            raise ValueError("2 of 9 image file(s) cannot be used for training")

        try:
            env.on_main(broken_scan)
        except Exception as error:  # noqa: BLE001 - the test records what each rank raised
            out[f"error_{rank}"] = f"{type(error).__name__}: {error}"
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_joint_decisions_and_main_only_failures_reach_every_process():
    """``all_true`` is False everywhere when one process says False; a failure of ``on_main`` on rank 0 raises on
    rank 1 too (instead of rank 1 waiting forever in its next collective)."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(collective_decisions, args=(free_port(), out), nprocs=2, join=True)
        out = dict(out)
    assert out["all_true_0"] is False and out["all_true_1"] is False
    assert out["result_0"] == out["result_1"] == "from rank 0"
    assert out["error_0"] == "ValueError: 2 of 9 image file(s) cannot be used for training"
    assert out["error_1"] == "RuntimeError: rank 0 failed during set-up: ValueError: 2 of 9 image file(s) cannot be " \
                             "used for training"


def test_single_process_collectives_are_the_local_values():
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    assert env.all_true(torch.tensor(True)) and not env.all_true(False)
    assert env.on_main(lambda: 7) == 7

    def broken():
        raise ValueError("bad file")

    with pytest.raises(ValueError, match="bad file"):
        env.on_main(broken)


# --------------------------------------------------------------------------------- non-finite
def test_nonfinite_step_is_skipped_with_a_warning_and_training_goes_on(tmp_path, caplog):
    model = tiny_model()
    snapshots = []

    def step_fn(net, batch):
        snapshots.append([p.detach().clone() for p in model.parameters()])
        loss = l1(net, batch)
        if len(snapshots) == 3:
            return loss * math.nan  # NaN loss
        if len(snapshots) == 5:  # finite loss, infinite gradient
            return loss + (model[0].weight.sum() - model[0].weight.sum().detach()).abs().sqrt()
        return loss

    with caplog.at_level(logging.WARNING):
        fit(model, RandomPairs(), step_fn, config(tmp_path, steps=7))
    changed = [not all(torch.equal(a, b) for a, b in zip(snapshots[i], snapshots[i + 1])) for i in range(6)]
    assert changed == [True, True, False, True, False, True]  # steps 3 and 5 did not touch the weights
    rows = read_csv(tmp_path / "run" / "train_log.csv")
    assert [int(r["skipped"]) for r in rows] == [0, 0, 1, 0, 1, 0, 0]
    assert math.isnan(float(rows[2]["loss"])) and not math.isfinite(float(rows[4]["grad_norm"]))
    assert "step 3 skipped" in caplog.text and "step 5 skipped" in caplog.text
    assert "step 3 skipped" in (tmp_path / "run" / "train.log").read_text()


def test_nonfinite_streak_stops_with_a_clear_error(tmp_path):
    def step_fn(net, batch):
        return l1(net, batch) * math.inf

    with pytest.raises(NonFiniteLossError, match=r"stopped at step 3: 3 consecutive steps had a non-finite loss"):
        fit(tiny_model(), RandomPairs(), step_fn, config(tmp_path, steps=20, max_nonfinite=3))


# --------------------------------------------------------------------------- the learning rate
def cosine(step: int, first: float, start: int, end: int, min_lr: float = 1e-6) -> float:
    return min_lr + (first - min_lr) * 0.5 * (1 + math.cos(math.pi * (step - start) / (end - start)))


def test_raising_steps_at_a_resume_continues_the_cosine_to_the_new_end(tmp_path):
    """A run planned for 8 steps, stopped after its step-4 checkpoint and resumed with 16 steps: the learning rate
    of step 5 is the one the 8-step schedule had there (continuous), then a cosine reaches min_lr at step 16."""
    calls = []

    def stop_at_step_6(net, batch):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt("stopped by the test")
        return l1(net, batch)

    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(), RandomPairs(), stop_at_step_6, config(tmp_path, steps=8, ckpt_every=4))
    fit(tiny_model(), RandomPairs(), l1, config(tmp_path, steps=16, ckpt_every=4))
    lrs = [float(row["lr"]) for row in read_csv(tmp_path / "run" / "train_log.csv")]  # row s: the lr of step s
    assert len(lrs) == 16
    assert lrs[:4] == pytest.approx([cosine(s, 2e-4, 0, 8) for s in range(4)], rel=1e-12)
    resumed_at = cosine(4, 2e-4, 0, 8)
    assert lrs[4] == pytest.approx(resumed_at, rel=1e-12)  # continuous at the resume step
    assert lrs[4:] == pytest.approx([cosine(s, resumed_at, 4, 16) for s in range(4, 16)], rel=1e-12)
    assert all(later < earlier for earlier, later in zip(lrs, lrs[1:]))  # no warm restart
    state = load_state(tmp_path / "run" / "checkpoints" / "step_00000016.pt")
    assert state["schedule"]["segments"] == [[0, 2e-4, 8], [4, pytest.approx(resumed_at, rel=1e-12), 16]]


def test_extending_a_finished_run_keeps_its_last_learning_rate(tmp_path):
    fit(tiny_model(), RandomPairs(), l1, config(tmp_path, steps=4, ckpt_every=4))
    fit(tiny_model(), RandomPairs(), l1, config(tmp_path, steps=7, ckpt_every=4))
    lrs = [float(row["lr"]) for row in read_csv(tmp_path / "run" / "train_log.csv")]
    assert len(lrs) == 7 and max(lrs[4:]) <= lrs[3] and lrs[4:] == pytest.approx([1e-6] * 3)


def test_cosine_schedule_state_round_trip():
    schedule = CosineSchedule(2e-4, 1e-6, 10)
    schedule.extend_to(20, at_step=6)
    restored = CosineSchedule(1.0, 0.0, 1)
    restored.load_state_dict(schedule.state_dict())
    assert [restored.lr_at(s) for s in range(21)] == [schedule.lr_at(s) for s in range(21)]
    assert schedule.lr_at(3) == cosine(3, 2e-4, 0, 10) and schedule.lr_at(20) == pytest.approx(1e-6)


# ---------------------------------------------------------------------------- resume guards
def test_a_checkpoint_of_another_model_gives_a_clear_error(tmp_path):
    fit(tiny_model(4), RandomPairs(), l1, config(tmp_path, steps=2))
    with pytest.raises(ValueError, match="does not fit this model"):
        fit(tiny_model(6), RandomPairs(), l1, config(tmp_path, steps=4))
    with pytest.raises(ValueError, match="was written for a 'Sequential' model"):
        fit(nn.Conv2d(3, 3, 3, padding=1), RandomPairs(), l1, config(tmp_path, steps=4))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        fit(tiny_model(4), RandomPairs(), l1, config(tmp_path, steps=4, resume="never"))


def test_in_process_resume_continues_the_same_run_in_bf16_with_clipping(tmp_path):
    """The loss is weighted by draws from the global RNG and from a generator of the script's own: both
    streams must continue where they were, or the rows after the resume would differ."""
    settings = dict(steps=6, ema_decay=0.5, bf16=True, grad_clip=0.01)

    def run(out, **extra):
        generator = torch.Generator().manual_seed(1)

        def step_fn(net, batch):
            return l1(net, batch) * (1 + torch.rand((), generator=generator) + torch.rand(()))

        fit(tiny_model(), RandomPairs(), step_fn, config(out, **settings, **extra), generators={"weights": generator})

    full, split = tmp_path / "full", tmp_path / "split"
    run(full)
    run(split, ckpt_every=3)
    (split / "run" / "checkpoints" / "latest").write_text("step_00000003.pt\n")  # rewind to step 3 and finish again
    run(split, ckpt_every=3)

    def without_timing(path):
        return [{k: v for k, v in row.items() if k != "sec_per_step"} for row in read_csv(path)]

    assert without_timing(split / "run" / "train_log.csv") == without_timing(full / "run" / "train_log.csv")
    assert len(without_timing(full / "run" / "train_log.csv")) == 6


# ------------------------------------------------------------------------------ small parts
def test_ema_update_and_swap_restore_the_training_weights_exactly():
    model = tiny_model()
    ema = ModelEMA(model, decay=0.75)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(ema.shadow[name], 0.75 * start[name] + 0.25 * value)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped_in(model):
        assert torch.equal(model.state_dict()["0.weight"], ema.shadow["0.weight"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(model, decay=1.0)


def test_validation_metrics_grids_and_flags(tmp_path):
    from perceive_components.data import standard_test_sets
    from perceive_components.ops.metrics import psnr

    data = make_layout(tmp_path / "data", tasks=("haze",), splits=("test",))
    sets = standard_test_sets(data, ("haze",))

    class Identity(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, x):
            return x * self.scale

    def zero_step(net, batch):
        return (net(batch["degraded"]) * 0).sum()  # zero gradient: the identity stays the identity

    metrics = fit(Identity(), RandomPairs(), zero_step, config(tmp_path, steps=1, num_grids=1), val_sets=sets)
    expected = sum(psnr(item["degraded"][None], item["target"][None]).item() for item in sets["SOTS"]) / 2
    assert metrics["SOTS/psnr"] == pytest.approx(expected, rel=1e-5)
    assert (tmp_path / "run" / "grids" / "step_00000001" / "SOTS_0.png").is_file()

    args = add_train_args(argparse.ArgumentParser(), steps=9).parse_args(["--bf16", "--betas", "0.8", "0.99"])
    parsed = config_from_args(args)
    assert (parsed.steps, parsed.bf16, parsed.betas, parsed.lr) == (9, True, (0.8, 0.99), 2e-4)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.5)
