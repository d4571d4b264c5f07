"""Markdown tables of the stage-1 results: the medium-image gates and the perceiver audit.

Both read the dicts returned by :func:`medium_gates` and :func:`audit_perceiver`; ``run_stage1`` writes them
into ``report.md``, and ``perceive-ir stage1 gates`` / ``audit`` print them.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` under ``header``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def gates_table(gates: Mapping[str, Any]) -> str:
    """Per task and overall: pairs, PSNR-improved rate, share of r in the band, r quantiles, mean gain, passed."""
    low, high = gates["band"]
    rows = [(task, row["n"], f"{row['psnr_improved_rate']:.3f}", f"{row['r_in_band_rate']:.3f}",
             f"{row['r_p10']:.2f} / {row['r_median']:.2f} / {row['r_p90']:.2f}", f"{row['mean_psnr_gain_db']:+.2f}",
             "yes" if row["passed"] else "**no**")
            for task, row in [*gates["per_task"].items(), ("overall", gates["overall"])]]
    return markdown_table(["task", "pairs", "PSNR improved", f"r in [{low}, {high}]", "r p10 / median / p90",
                           "mean gain (dB)", "passed"], rows)


def audit_table(audit: Mapping[str, Any]) -> str:
    """Per task and overall: accuracy (also per tier), strict and monotonic rates, mean q; then the authors' gate."""
    rows = [(task, row["n_triplets"], f"{row['accuracy']:.3f}", " / ".join(f"{v:.3f}" for v in row["accuracy_per_tier"]),
             f"{row['strict']:.3f}", f"{row['monotonic']:.3f}", " / ".join(f"{v:.2f}" for v in row["mean_q"]))
            for task, row in [*audit["per_task"].items(), ("overall", audit)]]
    table = markdown_table(["task", "triplets", "accuracy", "accuracy terrible / mediocre / excellent", "strict",
                            "monotonic", "mean q (degraded / medium / clean)"], rows)
    gate = audit["gate"]
    checks = ", ".join(f"{name} {check['value']:.3f} (needs ≥ {check['threshold']})"
                       for name, check in gate.items() if name != "passed")
    return f"{table}\n\nAuthors' gate {'passed' if gate['passed'] else '**not passed**'}: {checks}."
