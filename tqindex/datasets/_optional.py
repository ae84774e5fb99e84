"""Lazy imports of optional dependencies, with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise ImportError telling to ``pip install tqindex[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{module} is needed here but is not installed: pip install 'tqindex[{extra}]'") from err
