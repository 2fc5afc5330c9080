"""Optional dependencies: imported on first use, with the extra that brings them named."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingDependency", "require"]


class MissingDependency(ImportError):
    """An optional package a feature needs is not installed; the message names the extra."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` or raise ImportError naming ``pip install 'unlock-fast[extra]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.partition(".")[0]
        raise MissingDependency(
            f"{purpose} needs the optional package {top!r}, which is not installed; "
            f"install it with: pip install 'unlock-fast[{extra}]'"
        ) from e
