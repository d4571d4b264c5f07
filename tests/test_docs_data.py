"""Every Python block of docs/data.md and docs/negatives.md runs as written, offline, each on its own."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).parents[1] / "docs"
BLOCKS = [(name, index, code) for name in ("data.md", "negatives.md")
          for index, code in enumerate(re.findall(r"```python\n(.*?)```", (DOCS / name).read_text(encoding="utf-8"),
                                                  re.S))]


@pytest.mark.parametrize("name,index,code", BLOCKS, ids=[f"{name}-{index}" for name, index, _ in BLOCKS])
def test_doc_block_runs(name, index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"docs/{name} block {index}", "exec"), {"__name__": f"docs_{index}"})


def test_every_page_has_blocks_collected():
    assert {name for name, _, _ in BLOCKS} == {"data.md", "negatives.md"}
