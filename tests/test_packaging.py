"""What a wheel ships: every package folder is listed in pyproject.toml, the top-level webui/ and presets/ install
inside lowvram (no generic top-level `webui` or `presets` in site-packages), and an installed copy finds both."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import lowvram
from lowvram.presets import PRESET_PACKAGE, list_presets, preset_dir
from lowvram.source_layout import TOP_LEVEL_FOLDERS, CheckoutFinder, install_checkout_finder

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("lowvram", "webui", "presets")  # the folders a wheel is built from
INSTALLED_AT = {"lowvram": "lowvram", "webui": "lowvram/webui", "presets": "lowvram/preset_files"}
tomllib = pytest.importorskip("tomllib")  # Python 3.11+
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def package_folders(repo: Path, package_dir: dict[str, str]) -> dict[str, Path]:
    """Installed package name -> source folder, for every folder under the SOURCES that holds .py files;
    ``package_dir`` (pyproject's) maps an installed package to a folder that is not its dotted path."""
    folder_to_name = {folder: name for name, folder in package_dir.items()}
    found = {}
    for top in SOURCES:
        for path in sorted((repo / top).rglob("*.py")):
            folder = path.parent.relative_to(repo)
            for depth in range(len(folder.parts), 0, -1):  # the deepest mapped folder names the package
                head = Path(*folder.parts[:depth]).as_posix()
                if head in folder_to_name:
                    name = ".".join([folder_to_name[head], *folder.parts[depth:]])
                    break
            else:
                name = ".".join(folder.parts)
            found[name] = repo / folder
    return found


def test_every_package_folder_is_listed_in_pyproject():
    folders = package_folders(REPO, SETUPTOOLS["package-dir"])
    assert {"lowvram", "lowvram.memory", "lowvram.webui", "lowvram.preset_files"} <= folders.keys()  # the walk ran
    listed = set(SETUPTOOLS["packages"])
    # a folder missing from [tool.setuptools] packages is silently left out of the wheel
    assert sorted(folders.keys() - listed) == [], "add these to pyproject.toml's [tool.setuptools] packages"
    assert sorted(listed - folders.keys()) == [], "listed in pyproject.toml but no such folder with .py files"


def test_the_walk_finds_a_new_subpackage_and_maps_the_top_level_folders(tmp_path):
    for rel in ("lowvram/__init__.py", "lowvram/newroom/thing.py", "webui/__init__.py", "webui/parts/x.py",
                "presets/__init__.py", "lowvram/models/clip/vocab.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    found = package_folders(tmp_path, {"lowvram.webui": "webui", "lowvram.preset_files": "presets"})
    assert sorted(found) == ["lowvram", "lowvram.newroom", "lowvram.preset_files", "lowvram.webui",
                             "lowvram.webui.parts"]
    assert found["lowvram.webui.parts"] == tmp_path / "webui" / "parts"


def test_a_checkout_imports_the_top_level_folders_as_the_install_does():
    """lowvram/source_layout.py and pyproject's package-dir say the same, so a checkout and a wheel agree."""
    assert SETUPTOOLS["package-dir"] == {f"lowvram.{name}": folder for name, folder in TOP_LEVEL_FOLDERS.items()}
    assert PRESET_PACKAGE in SETUPTOOLS["packages"]
    assert SETUPTOOLS["package-data"][PRESET_PACKAGE] == ["*.yaml"]
    if Path(lowvram.__file__).resolve().parents[1] == REPO:  # the tests run on this checkout (PYTHONPATH, -e)
        assert Path(importlib.util.find_spec("lowvram.webui").origin) == REPO / "webui" / "__init__.py"
        # so `lowvram profile --update-presets` rewrites the repository's presets/*.yaml
        assert preset_dir() == REPO / "presets"


def test_the_checkout_finder_serves_only_its_two_folders(tmp_path):
    (tmp_path / "webui").mkdir()
    (tmp_path / "webui" / "__init__.py").write_text('"""A panel."""\n')
    finder = CheckoutFinder("pkg", tmp_path)
    spec = finder.find_spec("pkg.webui")
    assert spec is not None and Path(spec.origin) == tmp_path / "webui" / "__init__.py"
    assert spec.submodule_search_locations == [str(tmp_path / "webui")]
    assert finder.find_spec("pkg.preset_files") is None  # no presets/__init__.py in this checkout
    assert finder.find_spec("pkg.other") is None
    assert finder.find_spec("other.webui") is None
    assert finder.find_spec("webui") is None  # never a generic top-level module
    # an installed package has no pyproject.toml beside it: no finder at all
    (tmp_path / "site" / "pkg").mkdir(parents=True)
    assert install_checkout_finder(str(tmp_path / "site" / "pkg" / "__init__.py"), "pkg") is None


def installed_name(path: Path) -> str:
    """Where a source file of this checkout lands in the wheel: webui/app.py -> lowvram/webui/app.py."""
    top, *rest = path.relative_to(REPO).parts
    return "/".join([INSTALLED_AT[top], *rest])


def _build_wheel(out: Path) -> Path:
    """A wheel of this checkout, built offline from a copy of its sources (so no build/ lands in the repo)."""
    setuptools = pytest.importorskip("setuptools")
    major_minor = tuple(int(x) for x in setuptools.__version__.split(".")[:2])
    if major_minor < (70, 1) and importlib.util.find_spec("wheel") is None:
        pytest.skip(f"setuptools {setuptools.__version__} builds wheels only with the `wheel` package installed")
    src = out / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in SOURCES:
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = {**os.environ, "PIP_NO_INDEX": "1"}  # nothing comes from a package index
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                           "--no-index", "-w", str(out / "dist")],
                          capture_output=True, text=True, env=env, cwd=out, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (wheel,) = (out / "dist").glob("lowvram-*.whl")
    return wheel


def test_the_wheel_ships_the_panel_and_the_presets_inside_lowvram(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    version = PYPROJECT["project"]["version"]
    assert {n.split("/")[0] for n in names} == {"lowvram", f"lowvram-{version}.dist-info"}  # no top-level webui/
    assert "lowvram/webui/app.py" in names
    shipped_yaml = sorted(p.name for p in (REPO / "presets").glob("*.yaml"))
    assert len(shipped_yaml) >= 7
    assert sorted(n.split("/")[-1] for n in names if n.endswith(".yaml")) == shipped_yaml
    assert {f"lowvram/preset_files/{n}" for n in shipped_yaml} <= names
    # every Python file of the three source folders, at its installed place
    sources = {installed_name(p) for top in SOURCES for p in (REPO / top).rglob("*.py")}
    assert sources == {n for n in names if n.endswith(".py")}

    # Installed (unpacked, no pyproject.toml beside it): the panel and the presets are found inside the package.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import importlib.util, json\nfrom lowvram.presets import list_presets, preset_dir\n"
             "print(json.dumps([importlib.util.find_spec('lowvram.webui.app').origin, str(preset_dir()), "
             "list_presets()]))")
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    app, folder, presets = json.loads(proc.stdout.splitlines()[-1])
    assert Path(app) == site / "lowvram" / "webui" / "app.py"
    assert Path(folder) == site / "lowvram" / "preset_files"
    assert presets == list_presets()
