"""The examples are what users copy: every file under examples/ uses the library's public API only.

Public means importable from one of ``PUBLIC_MODULES`` (the list docs/training.md gives), under a name without a
leading underscore that the module exports (its ``__all__`` when it has one). Importing any other module of the
library (``perceive_components.ops.frozen``, ``perceive_components.data.layouts`` …), a private name, or reading a
private attribute of something imported from the library fails this test.
"""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = "perceive_components"
PUBLIC_MODULES = frozenset({
    "perceive_components", "perceive_components.data", "perceive_components.negatives",
    "perceive_components.losses", "perceive_components.modules", "perceive_components.stage1",
    "perceive_components.tiny", "perceive_components.guidance", "perceive_components.weights",
    "perceive_components.cli", "perceive_components.ops.tiling", "perceive_components.ops.io",
    "perceive_components.ops.metrics", "perceive_components.ops.checkpoint", "perceive_components.ops.validation",
})


def is_public_name(module: str, name: str) -> bool:
    if name.startswith("_"):
        return False
    if f"{module}.{name}" in PUBLIC_MODULES:
        return True
    imported = importlib.import_module(module)
    exported = getattr(imported, "__all__", None)
    return name in exported if exported is not None else hasattr(imported, name)


def violations(source: str) -> list[str]:
    """Every use of a non-public part of the library in ``source`` (imports anywhere, private attributes)."""
    problems, library_names = [], set()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == LIBRARY or alias.name.startswith(LIBRARY + "."):
                    if alias.name not in PUBLIC_MODULES:
                        problems.append(f"line {node.lineno}: import {alias.name} (not a public module)")
                    library_names.add(alias.asname or alias.name.partition(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                (node.module == LIBRARY or node.module.startswith(LIBRARY + ".")):
            if node.module not in PUBLIC_MODULES:
                problems.append(f"line {node.lineno}: from {node.module} import … (not a public module)")
                continue
            for alias in node.names:
                if not is_public_name(node.module, alias.name):
                    problems.append(f"line {node.lineno}: {node.module}.{alias.name} is not public")
                library_names.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in library_names \
                and node.attr.startswith("_") and not re.fullmatch(r"__\w+__", node.attr):
            problems.append(f"line {node.lineno}: {node.value.id}.{node.attr} is private")
    return problems


EXAMPLE_FILES = sorted((ROOT / "examples").rglob("*.py"))


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=[str(p.relative_to(ROOT)) for p in EXAMPLE_FILES])
def test_example_files_use_the_public_api_only(path):
    assert violations(path.read_text(encoding="utf-8")) == []


def test_the_check_catches_each_kind_of_private_use():
    assert violations("from perceive_components.data import CropFlip, scan_images\n"
                      "import perceive_components.ops.io as io\nio.read_image\n") == []
    assert violations("from perceive_components.ops.frozen import FrozenHolder") == [
        "line 1: from perceive_components.ops.frozen import … (not a public module)"]
    assert violations("def f():\n    import perceive_components.level_discovery") == [
        "line 2: import perceive_components.level_discovery (not a public module)"]
    assert violations("from perceive_components.data import _noise_key, TASK_LABELS") == [
        "line 1: perceive_components.data._noise_key is not public",
        "line 1: perceive_components.data.TASK_LABELS is not public"]
    assert violations("from perceive_components import QualityPerceiver\nQualityPerceiver._load_clip") == [
        "line 2: QualityPerceiver._load_clip is private"]


def test_the_public_modules_are_the_ones_docs_training_lists():
    text = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    section = text.split("## Public API only", 1)[1].split("\n## ", 1)[0]
    assert set(re.findall(r"`(perceive_components[\w.]*)`", section)) == PUBLIC_MODULES
