"""Every ```python and ```bash block of README.md and docs/ runs as written, offline, in page order (a reader pastes
them one after another into one shell / one Python session), in a fresh copy of the repository.

A block that cannot run here says so on its first line — ``# not run in tests: <why>`` (a download, real data
sets, a GPU) — and the reason must be given. Each bash block runs in its own shell (so it defines the variables
it uses); files persist from block to block. A ``# prints: <text>`` line in a block is a promise: that text must
appear in what the block prints (numbers a page states come from seeded commands). Pages whose blocks another test runs against stand-ins or checks for
values are listed in ``RUN_ELSEWHERE`` with that test. So the docs cannot drift from the code: a changed name, flag or
signature fails here.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *ROOT.glob("docs/**/*.md")])
RUN_ELSEWHERE = {  # page -> the test that runs its blocks (with stand-ins, or checking the values they compute)
    "docs/integrate-basicsr.md": "tests/test_integrate_basicsr.py (BasicSR stand-ins)",
    "docs/adapter.md": "tests/test_docs_values.py",
    "docs/losses.md": "tests/test_losses.py (the training loop with tiny stand-ins for its names)",
    "docs/modules/cfe.md": "tests/test_docs_values.py",
    "docs/modules/sgm.md": "tests/test_docs_values.py",
    "docs/modules/pgm.md": "tests/test_docs_values.py",
    "docs/modules/pgca.md": "tests/test_docs_values.py",
}
SKIP = re.compile(r"#\s*not run in tests:\s*(\S.*)")
PROMISE = re.compile(r"#\s*prints:\s*(\S.*?)\s*$", re.M)
FENCE = re.compile(r"^```(python|bash)\n(.*?)^```", re.S | re.M)
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "outputs", "runs", "__pycache__", ".pytest_cache", "*.egg-info",
                                     ".hypothesis")


def blocks(page: Path) -> list[tuple[str, str]]:
    """``(language, code)`` of the page's runnable blocks, in order."""
    found = []
    for language, code in FENCE.findall(page.read_text(encoding="utf-8")):
        first = code.splitlines()[0] if code.strip() else ""
        skipped = SKIP.match(first.strip())
        if skipped is None:
            installs = re.search(r"^\s*(pip|python -m pip|make)\b", code, re.M)
            assert installs is None, f"{page}: a block that installs or runs make must be skipped: {code[:80]!r}"
            found.append((language, code))
        elif not skipped.group(1).strip():
            raise AssertionError(f"{page}: a skipped block must say why: {first!r}")
    return found


def _page_id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


@pytest.mark.parametrize("page", [p for p in PAGES if _page_id(p) not in RUN_ELSEWHERE], ids=_page_id)
def test_page_blocks_run_as_written(page, tmp_path, monkeypatch):
    runnable = blocks(page)
    if not runnable:
        pytest.skip("no runnable code blocks")
    sandbox = tmp_path / "repo"
    shutil.copytree(ROOT, sandbox, ignore=COPY_IGNORE)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(sandbox),
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                   "MPLBACKEND": "Agg"}
    monkeypatch.chdir(sandbox)
    monkeypatch.syspath_prepend(str(sandbox))
    namespace: dict = {"__name__": "__docs__"}
    for index, (language, code) in enumerate(runnable):
        where = f"{_page_id(page)}, {language} block {index + 1}:\n{code}"
        if language == "python":
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                try:
                    exec(compile(code, str(page), "exec"), namespace)
                except Exception as error:
                    raise AssertionError(f"{where}\nraised {type(error).__name__}: {error}") from error
            output = printed.getvalue()
        else:
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=sandbox, env=environment,
                                    capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, f"{where}\nexit {result.returncode}\n{result.stdout[-3000:]}\n" \
                                           f"{result.stderr[-3000:]}"
            output = result.stdout + result.stderr
        for promise in PROMISE.findall(code):
            assert promise in output, f"{where}\npromised {promise!r}, printed:\n{output[-3000:]}"


def test_pages_run_elsewhere_are_run_there():
    for page, test in RUN_ELSEWHERE.items():
        assert (ROOT / page).is_file(), page
        assert (ROOT / test.split()[0]).is_file(), test
        assert page.split("/")[-1] in (ROOT / test.split()[0]).read_text(encoding="utf-8"), (page, test)
