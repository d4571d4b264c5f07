"""Mutation check: does each single-line change of the method make the tests that pin it fail?

    python tests/mutations/run_mutations.py                 # every mutation of mutations.toml
    python tests/mutations/run_mutations.py -k "PGCA" -v    # those whose name contains "PGCA", with pytest output

The repository (tracked and untracked, not ignored files) is copied once into a temporary folder; the working
tree is never edited. The unchanged copy must pass every listed test first (the baseline). Then, per mutation,
the copy's file gets the one change, its tests run with ``pytest -x -q``, and the file is restored. The result
is printed as a markdown table:

    caught    the tests failed (the failing test is named)
    survived  the tests passed, or a ``-k`` selection matched no test: nothing pins that line
    stale     the original text is no longer in the file (update mutations.toml)
    error     the original text is ambiguous, pytest could not collect the tests, or it timed out

Heavy imports (torch, timm, open_clip) are done once; each run is a fork of this process (``--spawn``: a fresh
interpreter per run instead, slower). Exit status: 0 when every mutation is caught, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PRELOAD = ("torch", "torchvision", "timm", "open_clip", "huggingface_hub", "safetensors", "numpy", "PIL", "pytest",
           "hypothesis")
PYTEST_ARGS = ("-x", "-q", "-p", "no:cacheprovider")
FAILED_LINE = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.M)

Runner = Callable[[Path, list[str], Path, float], "int | None"]  # (copy, pytest args, log, timeout) -> exit code


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    original: str
    replacement: str
    breaks: str
    tests: tuple[str, ...]


@dataclass(frozen=True)
class Outcome:
    result: str  # caught / survived / stale / error
    detail: str  # the failing test, or why there is no result
    seconds: float


def load_mutations(path: Path) -> list[Mutation]:
    """Read mutations.toml; every entry needs exactly the fields of ``Mutation``."""
    with open(path, "rb") as handle:
        entries = tomllib.load(handle)["mutation"]
    fields = set(Mutation.__dataclass_fields__)
    mutations = []
    for index, entry in enumerate(entries):
        if set(entry) != fields:
            raise ValueError(f"{path} mutation #{index + 1}: needs exactly the keys {sorted(fields)}, "
                             f"got {sorted(entry)}")
        mutations.append(Mutation(**{**entry, "tests": tuple(entry["tests"])}))
    return mutations


def copy_repository(destination: Path) -> None:
    """Copy the files git would commit (tracked, plus untracked ones that are not ignored)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for relative in filter(None, listed):
        source = ROOT / relative
        if source.is_file():
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def environment(copy: Path, hf_home: Path) -> dict[str, str]:
    """Imports come from the copy, no bytecode is cached (a restored file must never run as its mutant), offline."""
    return {"PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home),
            "OMP_NUM_THREADS": "1"}


def run_pytest_forked(copy: Path, args: list[str], log: Path, timeout: float) -> int | None:
    """pytest.main in a fork of this process (heavy modules already imported); None on timeout. Exit 99 when the
    library was imported from somewhere else than the copy."""
    pid = os.fork()
    if pid == 0:  # child
        code = 98
        try:
            with open(log, "w") as out:
                os.dup2(out.fileno(), 1)
                os.dup2(out.fileno(), 2)
            os.chdir(copy)
            sys.path.insert(0, str(copy))
            import pytest

            code = int(pytest.main([*PYTEST_ARGS, *args]))
            library = sys.modules.get("perceive_components")
            if library is not None and not str(Path(library.__file__).resolve()).startswith(str(copy.resolve())):
                print(f"perceive_components came from {library.__file__}, not the copy {copy}")
                code = 99
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.05)


def run_pytest_spawned(copy: Path, args: list[str], log: Path, timeout: float) -> int | None:
    with open(log, "w") as out:
        try:
            return subprocess.run([sys.executable, "-m", "pytest", *PYTEST_ARGS, *args], cwd=copy, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return None


def judge(code: int | None, log_text: str) -> tuple[str, str]:
    """(result, detail) from pytest's exit code and output."""
    if code is None:
        return "error", "timed out"
    if code == 0:
        return "survived", "—"
    if code == 5:
        return "survived", "no test matched the selection"
    if code == 1:
        failed = FAILED_LINE.findall(log_text)
        return "caught", ", ".join(f"`{name.split('::')[-1]}`" for name in failed) or "(pytest failed)"
    reasons = {2: "pytest interrupted (collection error?)", 4: "bad pytest arguments",
               99: "imported the library from outside the copy"}
    return "error", reasons.get(code, f"pytest exit code {code}")


def check(mutation: Mutation, copy: Path, run: Runner, timeout: float, logs: Path, verbose: bool) -> Outcome:
    """Apply one mutation to the copy, run its tests, restore the file."""
    start = time.monotonic()
    target = copy / mutation.file
    text = target.read_text(encoding="utf-8") if target.is_file() else ""
    count = text.count(mutation.original)
    if count == 0:
        return Outcome("stale", "original text not found", 0.0)
    if count > 1:
        return Outcome("error", f"original text found {count} times: add context", 0.0)
    target.write_text(text.replace(mutation.original, mutation.replacement), encoding="utf-8")
    log = logs / f"{len(list(logs.iterdir())):02d}.log"
    try:
        code = run(copy, list(mutation.tests), log, timeout)
    finally:
        target.write_text(text, encoding="utf-8")
    log_text = log.read_text(encoding="utf-8", errors="replace")
    if verbose:
        print(log_text)
    result, detail = judge(code, log_text)
    return Outcome(result, detail, time.monotonic() - start)


def baseline_arguments(mutations: list[Mutation]) -> tuple[list[str], list[tuple[str, ...]]]:
    """The union of every mutation's tests (node ids and files; ``-k`` selections keep their file and filter)."""
    plain, filtered = [], []
    for mutation in mutations:
        if "-k" in mutation.tests:
            filtered.append(mutation.tests)
        else:
            plain.extend(t for t in mutation.tests if t not in plain)
    return plain, filtered


def table(mutations: list[Mutation], outcomes: list[Outcome]) -> str:
    """The markdown table of results and a one-line count."""
    rows = ["| mutation | what it breaks | caught by | result |", "|---|---|---|---|"]
    for mutation, outcome in zip(mutations, outcomes):
        name = f"{mutation.name} (`{mutation.file}`)"
        rows.append(f"| {name} | {mutation.breaks} | {outcome.detail} | {outcome.result} |")
    counts = {r: sum(o.result == r for o in outcomes) for r in ("caught", "survived", "stale", "error")}
    rows.append("")
    rows.append(", ".join(f"{n} {r}" for r, n in counts.items()) + f" of {len(outcomes)} mutations")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutations", type=Path, default=HERE / "mutations.toml")
    parser.add_argument("-k", "--select", default="", help="only mutations whose name contains this text")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per pytest run")
    parser.add_argument("--spawn", action="store_true", help="a fresh interpreter per run instead of a fork")
    parser.add_argument("--skip-baseline", action="store_true", help="do not first run the tests unchanged")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each run's pytest output")
    args = parser.parse_args(argv)

    mutations = [m for m in load_mutations(args.mutations) if args.select.lower() in m.name.lower()]
    if not mutations:
        parser.error(f"no mutation name contains {args.select!r}")
    work = Path(tempfile.mkdtemp(prefix="mutations-"))
    copy, logs = work / "repo", work / "logs"
    logs.mkdir()
    copy_repository(copy)
    os.environ.update(environment(copy, work / "hf-home"))
    sys.dont_write_bytecode = True
    run: Runner
    if args.spawn or not hasattr(os, "fork"):
        run = run_pytest_spawned
    else:
        for name in PRELOAD:  # after the environment (HF_HUB_OFFLINE must precede huggingface_hub)
            __import__(name)
        run = run_pytest_forked
    try:
        if not args.skip_baseline:
            plain, filtered = baseline_arguments(mutations)
            for selection in ([plain] if plain else []) + filtered:
                log = logs / "baseline.log"
                code = run(copy, list(selection), log, args.timeout * 4)
                if code not in (0, 5):  # 5: a -k selection with no test yet is not a failing baseline
                    print(log.read_text(encoding="utf-8", errors="replace")[-4000:])
                    print(f"baseline failed for {' '.join(selection)}: the unchanged repository must pass first")
                    return 2
        outcomes = []
        for mutation in mutations:
            outcome = check(mutation, copy, run, args.timeout, logs, args.verbose)
            print(f"[{outcome.seconds:5.1f} s] {outcome.result:8} {mutation.name}", file=sys.stderr, flush=True)
            outcomes.append(outcome)
        print(table(mutations, outcomes))
        return 0 if all(o.result == "caught" for o in outcomes) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
