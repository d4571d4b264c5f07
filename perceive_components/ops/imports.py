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

    A module path is imported with the working directory on ``sys.path`` (as ``python -m`` would).
    """
    module_name, _, attribute = spec.rpartition(":")
    if not module_name or not attribute:
        raise ValueError(f"{flag} must look like MODULE:CALLABLE or file.py:CALLABLE, got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ValueError(f"{flag} file {module_name!r} does not exist")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
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
