"""Data sources users already have: detect the layout of a folder and list its images with their captions.

Formats: ``folder`` (images, nested, with same-name caption sidecars), ``kohya`` (``<repeats>_<name>``
subfolders), ``metadata`` (``metadata.jsonl`` or ``metadata.csv`` with ``file_name`` and ``text``),
``celeba`` (``list_attr_celeba.txt`` + ``img_align_celeba/``). This module only lists candidates;
images.py decides whether each file is usable.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from . import celeba
from .captions import CaptionText, normalize_caption, read_caption_file
from .images import IMAGE_EXTENSIONS, is_image_name
from .masks import is_mask_name
from .report import BAD_METADATA_ROW, MISSING_FILE, NOT_IN_REPEATS_FOLDER, DataReport

FORMATS = ("auto", "folder", "kohya", "metadata", "celeba", "builtin")
KOHYA_DIR = re.compile(r"^(\d+)_(.+)$")
MAX_REPEATS = 10_000  # kohya's own examples use 1-100; a huge count would expand the epoch past any memory
METADATA_MAX_BYTES = 1 << 30
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
CAPTION_KEYS = ("text", "caption")


@dataclass
class Candidate:
    """One image a source names, before validation."""

    path: Path
    rel: str  # path relative to the source root, with '/' separators (stable across machines)
    caption: str | None  # None: no caption found (the missing-caption rule applies later)
    folder_caption: str | None = None  # kohya folder name without the repeats prefix
    repeats: int = 1
    caption_warning: tuple[str, str] | None = None


def _walk_images(root: Path) -> list[Path]:
    """Image files under ``root`` in a stable order; hidden files and folders (caches, .DS_Store) and loss
    masks (``x-masklabel.png``, data/masks.py) skipped."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
        for name in sorted(filenames):
            if not name.startswith(".") and is_image_name(name) and not is_mask_name(name):
                out.append(Path(dirpath) / name)
    return out


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def detect_format(root: Path) -> str:
    """The layout of ``root``: celeba, metadata, kohya or folder (first match, in that order)."""
    if celeba.find_celeba(root):
        return "celeba"
    if any((root / name).is_file() for name in METADATA_FILES):
        return "metadata"
    try:
        subdirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError as e:
        raise DataError(f"cannot list the data folder '{root}': {e}", "check the path and its permissions") from None
    if any(KOHYA_DIR.match(p.name) for p in subdirs):
        return "kohya"
    return "folder"


def _sidecar(image: Path, caption_ext: str) -> CaptionText:
    """Read ``image``'s caption sidecar: the configured extension first, then the other usual one."""
    exts = [caption_ext] + [e for e in (".txt", ".caption") if e != caption_ext]
    for ext in exts:
        side = image.with_suffix(ext)
        if side.exists():
            return read_caption_file(side)
    return CaptionText(None, None)


def list_folder(root: Path, caption_ext: str = ".txt") -> list[Candidate]:
    """Every image under ``root`` (nested) with its same-name caption sidecar."""
    out = []
    for path in _walk_images(root):
        cap = _sidecar(path, caption_ext)
        out.append(Candidate(path, _rel(path, root), cap.text, caption_warning=cap.warning))
    return out


def list_kohya(root: Path, report: DataReport, caption_ext: str = ".txt") -> list[Candidate]:
    """Images inside ``<repeats>_<name>`` folders, each repeated ``repeats`` times per epoch."""
    out = []
    for path in _walk_images(root):
        rel = _rel(path, root)
        top = rel.split("/", 1)[0] if "/" in rel else None
        m = KOHYA_DIR.match(top) if top else None
        if not m:
            report.skip(rel, NOT_IN_REPEATS_FOLDER, "kohya layout: images must sit in <repeats>_<name> folders")
            continue
        repeats = int(m.group(1)) if len(m.group(1)) <= 9 else MAX_REPEATS + 1
        if repeats > MAX_REPEATS:
            raise DataError(f"kohya folder '{root / top}' asks for {m.group(1)} repeats, more than {MAX_REPEATS}",
                            "rename it to <repeats>_<name> with a repeat count such as 10")
        if repeats < 1:
            report.warn(rel, "zero_repeats", f"folder '{top}' says 0 repeats; using 1")
            repeats = 1
        cap = _sidecar(path, caption_ext)
        out.append(Candidate(path, rel, cap.text, folder_caption=normalize_caption(m.group(2)), repeats=repeats,
                             caption_warning=cap.warning))
    return out


def _safe_join(root: Path, name: str) -> Path | None:
    """``root / name`` if it stays inside ``root`` (metadata must not point elsewhere), else None."""
    candidate = (root / name).resolve()
    try:
        candidate.relative_to(root.resolve())
    except ValueError:
        return None
    return candidate


def _metadata_rows(path: Path, report: DataReport) -> list[tuple[int, dict]]:
    from ..validate import read_regular_file

    rows: list[tuple[int, dict]] = []
    raw = read_regular_file(path, "metadata file", METADATA_MAX_BYTES, DataError)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        report.warn(path.name, "caption_not_utf8", "metadata file is not UTF-8; decoded with replacement characters")
    if path.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                report.skip(f"{path.name}:{n}", BAD_METADATA_ROW, f"not valid JSON: {e.msg}")
                continue
            if not isinstance(row, dict):
                report.skip(f"{path.name}:{n}", BAD_METADATA_ROW, "a line must be a JSON object")
                continue
            rows.append((n, row))
    else:
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or "file_name" not in reader.fieldnames:
            raise DataError(f"'{path}' has no 'file_name' column (columns: {reader.fieldnames})",
                            "the first line must be a header such as: file_name,text")
        for n, row in enumerate(reader, 2):
            rows.append((n, row))
    return rows


def list_metadata(root: Path, report: DataReport) -> list[Candidate]:
    """Images named by ``metadata.jsonl`` (preferred) or ``metadata.csv``: columns ``file_name``, ``text``."""
    meta = next(root / n for n in METADATA_FILES if (root / n).is_file())
    out = []
    listed: set[Path] = set()
    for n, row in _metadata_rows(meta, report):
        where = f"{meta.name}:{n}"
        name = row.get("file_name")
        if not isinstance(name, str) or not name.strip():
            report.skip(where, BAD_METADATA_ROW, "no file_name")
            continue
        path = _safe_join(root, name.strip())
        if path is None:
            report.skip(where, BAD_METADATA_ROW, f"file_name '{name}' points outside the data folder")
            continue
        rel = _rel(path, root.resolve())
        if not path.is_file():
            report.skip(rel, MISSING_FILE, f"named in {where}")
            continue
        value = next((row[k] for k in CAPTION_KEYS if k in row), None)
        caption = normalize_caption(value) if isinstance(value, str) else None
        warning = None
        if value is not None and not isinstance(value, str):
            warning = ("caption_not_text", f"{where}: caption is {type(value).__name__}, not text")
        elif caption == "":
            caption, warning = None, ("empty_caption", f"{where}: empty text")
        listed.add(path)
        out.append(Candidate(path, rel, caption, caption_warning=warning))
    unlisted = [p for p in _walk_images(root) if p.resolve() not in listed]
    if unlisted:
        report.warn(root.as_posix(), "unlisted_images",
                    f"{len(unlisted)} image files are not in {meta.name} and were not used "
                    f"(first: {_rel(unlisted[0], root)})")
    return out


def list_celeba(root: Path, report: DataReport, split: str = "train") -> list[Candidate]:
    """CelebA images of ``split`` (train / val / test / all) with their attribute-template captions."""
    found = celeba.find_celeba(root)
    if found is None:
        raise DataError(f"'{root}' is not a CelebA folder", f"it needs {celeba.ATTR_FILE} and {celeba.IMAGE_DIR}/")
    attr_file, image_dir, part_file = found
    if split not in (*celeba.SPLITS, "all"):
        raise DataError(f"unknown CelebA split '{split}'", "use train, val, test or all (data.celeba_split)")
    table = celeba.read_attributes(attr_file)
    partition = celeba.read_partition(part_file) if part_file else None
    if partition is None and split != "all":
        report.warn(root.as_posix(), "no_partition_file",
                    f"{celeba.PARTITION_FILE} not found: every image is used for split '{split}'")
    out = []
    for name in sorted(table):
        if partition is not None and split != "all" and partition.get(name) != celeba.SPLITS[split]:
            continue
        path = image_dir / name
        rel = _rel(path, root)
        if not path.is_file():
            report.skip(rel, MISSING_FILE, f"listed in {attr_file.name}")
            continue
        out.append(Candidate(path, rel, celeba.caption_from_attributes(table[name])))
    return out


def list_source(root: Path, fmt: str, report: DataReport, *, caption_ext: str = ".txt",
                celeba_split: str = "train") -> tuple[str, list[Candidate]]:
    """Detect (for ``auto``) and list a folder source; returns (format, candidates)."""
    if not root.exists():
        raise DataError(f"data folder '{root}' does not exist", "pass an existing folder with --data or data.source")
    if not root.is_dir():
        raise DataError(f"data source '{root}' is not a folder", "point data.source at the folder holding the images")
    if fmt not in FORMATS or fmt == "builtin":
        raise DataError(f"unknown data format '{fmt}' for a folder", "use auto, folder, kohya, metadata or celeba")
    if fmt == "auto":
        fmt = detect_format(root)
    if fmt == "metadata" and not any((root / n).is_file() for n in METADATA_FILES):
        raise DataError(f"'{root}' has no metadata.jsonl or metadata.csv", "add one, or use data.format=folder")
    listers = {
        "folder": lambda: list_folder(root, caption_ext),
        "kohya": lambda: list_kohya(root, report, caption_ext),
        "metadata": lambda: list_metadata(root, report),
        "celeba": lambda: list_celeba(root, report, celeba_split),
    }
    candidates = listers[fmt]()
    if not candidates and not report.skipped:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"no image files found in '{root}' (format {fmt})", f"add images with one of: {exts}")
    return fmt, candidates
