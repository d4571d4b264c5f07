"""Run logs: CSV files (exact values), TensorBoard scalars and loss-curve plots (PNG).

``train_log.csv`` has one row per logged step (step, epoch, lr, loss, every loss term, grad_norm,
skipped, sec_per_step); ``val_log.csv`` one row per validation (step, ``<set>/psnr``, ``<set>/ssim``,
averages). Floats are written with ``repr`` so a resumed run can be compared digit for digit. On
resume, rows after the resumed step (logged by the interrupted run after its last checkpoint) are
dropped, and so are TensorBoard events (``purge_step``); a row cut short by a crash is ignored.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Mapping

from perceive_components.ops.checkpoint import atomic_write

NOT_PLOTTED = {"step", "epoch", "skipped", "sec_per_step"}


def read_rows(path: Path) -> list[dict[str, str]]:
    """The complete rows of a log CSV, as written (rows cut short by a crash are skipped)."""
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                [float(value) for value in row.values()]
            except (TypeError, ValueError):
                continue
            rows.append(row)
    return rows


def _format(value: Any) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class CsvLog:
    """Append-only CSV with a fixed header (set by the first row)."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        kept = [row for row in read_rows(path) if int(row["step"]) <= resume_step]
        self.fields: list[str] | None = list(kept[0]) if kept else None
        if path.exists():
            with atomic_write(path) as tmp, open(tmp, "w", newline="") as handle:
                if self.fields:
                    writer = csv.DictWriter(handle, self.fields)
                    writer.writeheader()
                    writer.writerows(kept)
        self.rows = [{k: float(v) for k, v in row.items()} for row in kept]

    def append(self, row: Mapping[str, Any]) -> None:
        if self.fields is None:
            self.fields = list(row)
            with open(self.path, "w", newline="") as handle:
                csv.DictWriter(handle, self.fields).writeheader()
        elif list(row) != self.fields:
            raise ValueError(f"logged terms changed: {self.path.name} has columns {self.fields}, got {list(row)}; "
                             "a step_fn must return the same terms every step")
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, self.fields).writerow({k: _format(v) for k, v in row.items()})
        self.rows.append({k: float(v) for k, v in row.items()})


class RunLog:
    """Training and validation logs of one run (create it on rank 0 only)."""

    def __init__(self, out_dir: Path, resume_step: int, tensorboard: bool = True) -> None:
        self.out_dir = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        self.train = CsvLog(out_dir / "train_log.csv", resume_step)
        self.val = CsvLog(out_dir / "val_log.csv", resume_step)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def log_train(self, row: Mapping[str, Any]) -> None:
        self.train.append(row)
        self._scalars("train", row)

    def log_val(self, row: Mapping[str, Any]) -> None:
        self.val.append(row)
        self._scalars("val", row)

    def _scalars(self, prefix: str, row: Mapping[str, Any]) -> None:
        if self.writer is None:
            return
        for key, value in row.items():
            if key != "step":
                self.writer.add_scalar(f"{prefix}/{key}", float(value), int(row["step"]))
        self.writer.flush()

    def plot(self) -> Path | None:
        """Write ``curves.png``: every logged term and the lr against the step, and validation metrics
        (nothing before the first logged row)."""
        if not (self.train.rows or self.val.rows):
            return None
        return plot_curves(self.train.rows, self.val.rows, self.out_dir / "curves.png")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _smooth(values: list[float], weight: float = 0.9) -> list[float]:
    out, running = [], None
    for value in values:
        if math.isfinite(value):
            running = value if running is None else weight * running + (1 - weight) * value
        out.append(running if running is not None else math.nan)
    return out


def plot_curves(train_rows: list[dict[str, float]], val_rows: list[dict[str, float]], path: Path) -> Path:
    """One panel per training column (raw and smoothed; log scale for positive losses), and one panel
    per validation metric (PSNR, SSIM) with a line per set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_keys = [k for k in (train_rows[0] if train_rows else {}) if k not in NOT_PLOTTED]
    metrics = sorted({k.rpartition("/")[2] for k in (val_rows[0] if val_rows else {}) if k != "step"})
    panels = len(train_keys) + len(metrics)
    if not panels:
        raise ValueError("nothing to plot yet: no training or validation rows were logged")
    columns = min(3, panels)
    figure, axes = plt.subplots(math.ceil(panels / columns), columns, figsize=(4 * columns, 2.8 * math.ceil(panels / columns)),
                                squeeze=False)
    axes = list(axes.flat)
    steps = [row["step"] for row in train_rows]
    for axis, key in zip(axes, train_keys):
        values = [row[key] for row in train_rows]
        axis.plot(steps, values, lw=0.8, alpha=0.4)
        if len(values) > 10 and key != "lr":
            axis.plot(steps, _smooth(values), lw=1.5)
        finite = [v for v in values if math.isfinite(v)]
        if key != "lr" and finite and min(finite) > 0:
            axis.set_yscale("log")
        axis.set_title(f"train: {key}", fontsize=9)
    val_steps = [row["step"] for row in val_rows]
    for axis, metric in zip(axes[len(train_keys):], metrics):
        for key in (k for k in val_rows[0] if k.endswith("/" + metric)):
            average = key.startswith("avg/")
            axis.plot(val_steps, [row[key] for row in val_rows], marker="o", ms=3, lw=2.0 if average else 1.0,
                      color="black" if average else None, label=key.rpartition("/")[0])
        axis.legend(fontsize=7)
        axis.set_title(f"validation: {metric}", fontsize=9)
    for axis in axes[:panels]:
        axis.set_xlabel("step", fontsize=8)
        axis.grid(alpha=0.3)
    for axis in axes[panels:]:
        axis.axis("off")
    figure.tight_layout()
    with atomic_write(path) as tmp:
        figure.savefig(tmp, format="png", dpi=80)
    plt.close(figure)
    return path
