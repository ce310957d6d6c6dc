"""Imports of the packages of the ``train`` extra, failing with the install command that adds them.

Example:
    >>> datasets = require("datasets", "reading training data")
"""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, purpose: str) -> ModuleType:
    """Import `module`; if it is missing, raise an ImportError that names it, what needed it
    (`purpose`) and ``pip install 'gist-fast[train]'``."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        package = module.partition(".")[0]
        raise ImportError(f"{purpose} needs the package '{package}': pip install 'gist-fast[train]'") from error
