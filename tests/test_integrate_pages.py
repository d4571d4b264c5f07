"""The "add Perceive-IR to your trainer" page for PromptIR's Lightning code shows its added lines as diffs; every one of
them must occur, as written, in examples/lightning_promptir_perceive.py, which tests/test_lightning_example.py runs.
So the page cannot drift from code that runs."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def added_lines(page: Path) -> list[str]:
    """The ``+`` lines of the page's ```diff blocks, without the ``+``."""
    blocks = re.findall(r"```diff\n(.*?)```", page.read_text(encoding="utf-8"), re.S)
    return [line[1:] for block in blocks for line in block.splitlines() if line.startswith("+")]


def test_every_line_the_promptir_page_adds_is_in_the_tested_example():
    lines = added_lines(ROOT / "docs" / "integrate-promptir.md")
    assert len(lines) >= 20
    example = (ROOT / "examples" / "lightning_promptir_perceive.py").read_text(encoding="utf-8")
    source_lines = {line.strip().split("  # noqa")[0] for line in example.splitlines()}
    missing = [line for line in lines if line.strip().split("  # noqa")[0] not in source_lines
               and line.strip() not in example]
    assert not missing, f"lines on the page that the tested example does not have: {missing}"
