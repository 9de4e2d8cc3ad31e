"""Serve the repository's top-level ``webui/`` and ``presets/`` as ``lowvram.webui`` and ``lowvram.preset_files``
when lowvram runs from a source checkout (PYTHONPATH, a plain clone); an install maps them with pyproject's
``package-dir`` instead, so the wheel carries them inside the package."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

# lowvram's subpackage -> its folder at the repository's top level. pyproject.toml's
# [tool.setuptools.package-dir] says the same for installs; tests/test_packaging.py holds the two equal.
TOP_LEVEL_FOLDERS = {"webui": "webui", "preset_files": "presets"}


class CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds ``<package>.webui`` / ``<package>.preset_files`` in the checkout that holds the imported package."""

    def __init__(self, package: str, root: Path) -> None:
        self.package = package
        self.root = root

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        parent, _, child = fullname.rpartition(".")
        if parent != self.package or child not in TOP_LEVEL_FOLDERS:
            return None
        folder = self.root / TOP_LEVEL_FOLDERS[child]
        init = folder / "__init__.py"
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(folder)])


def install_checkout_finder(package_file: str, package: str) -> CheckoutFinder | None:
    """In a checkout (``pyproject.toml`` beside the package folder) put a CheckoutFinder first on
    ``sys.meta_path`` and return it; an installed package (site-packages has no pyproject.toml) gets none.

    First, not last: an editable install of another checkout (the shared dev venv) would otherwise map
    ``lowvram.webui`` to that checkout's panel while ``lowvram`` itself comes from this one."""
    root = Path(package_file).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        return None
    for finder in sys.meta_path:
        if isinstance(finder, CheckoutFinder) and finder.package == package and finder.root == root:
            return finder
    finder = CheckoutFinder(package, root)
    sys.meta_path.insert(0, finder)
    return finder
