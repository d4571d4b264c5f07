"""Resolving ``MODULE:CALLABLE`` or ``path/to/file.py:CALLABLE`` specs given on command lines."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable


def load_callable(spec: str, flag: str = "--model") -> Callable:
    """The callable named by ``spec``; ``ValueError`` naming ``flag`` if it cannot be found or imported.

    A module path is imported with the working directory on ``sys.path`` (as ``python -m`` would). A file inside
    a package (its folder has an ``__init__.py``) is imported as that package's module, so its relative imports
    work: ``examples/backbones/restormer.py:Restormer`` imports ``backbones.restormer`` with ``examples/`` on
    ``sys.path``.
    """
    module_name, _, attribute = spec.rpartition(":")
    if not module_name or not attribute:
        raise ValueError(f"{flag} must look like MODULE:CALLABLE or file.py:CALLABLE, got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ValueError(f"{flag} file {module_name!r} does not exist")
            module = _import_file(path)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
        target = getattr(module, attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{flag} {spec!r} cannot be imported: {error}") from error
    if not callable(target):
        raise ValueError(f"{flag} {spec!r} is not callable")
    return target


def _import_file(path: Path):
    """Import a ``.py`` file: as ``package.module`` when its folder is a package (walking up to the outermost
    folder with an ``__init__.py``, whose parent goes on ``sys.path``), else as a stand-alone module."""
    path = path.resolve()
    root, parts = path.parent, [path.stem]
    while (root / "__init__.py").is_file():
        parts.insert(0, root.name)
        root = root.parent
    if len(parts) > 1:
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        return importlib.import_module(".".join(parts))
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module
