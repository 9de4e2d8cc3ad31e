"""Scans a folder of images into records: validates each file (memoised by content hash), applies the size
limits, pairs masks and captions and assigns buckets, reporting every file it skips."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import images, masks
from .buckets import Bucket, effective_step, make_buckets, nearest_bucket
from .captions import fallback_caption
from .images import ImageProblem
from .report import BAD_MASK, NO_CAPTION, DataReport, known_from
from .settings import DataSettings
from .sources import Candidate, list_source

VALIDATION_VERSION = 1  # bump when check_image's verdicts change meaning


@dataclass
class ImageRecord:
    """One usable image file (validated up front)."""

    path: str
    rel: str
    caption: str
    sha256: str
    width: int
    height: int
    bucket: int
    repeats: int = 1
    mask: str = ""  # the loss mask: a mask file, masks.ALPHA (its own transparency) or "" (none)
    mask_id: str = ""  # the mask's content identity (its file's sha256; the image's for alpha)


@dataclass
class _Verdict:
    sha256: str
    entry: dict[str, Any] = field(default_factory=dict)  # the "validated" table entry


def _validate_one(c: Candidate, s: DataSettings, validated: dict, files: dict) -> _Verdict | ImageProblem:
    try:
        st = os.stat(c.path)
    except OSError as e:
        return ImageProblem(images.UNREADABLE, str(e))
    memo = files.get(c.rel)
    if isinstance(memo, list) and len(memo) == 3 and memo[:2] == [st.st_size, st.st_mtime_ns]:
        sha = memo[2]
    else:
        try:
            sha = images.file_sha256(c.path) if st.st_size else "empty"
        except OSError as e:
            return ImageProblem(images.UNREADABLE, str(e))
    entry = validated.get(sha)
    fresh = (isinstance(entry, dict) and entry.get("v") == VALIDATION_VERSION
             and not (entry.get("reason") == images.TOO_LARGE and s.max_pixels > entry.get("max_pixels", 0)))
    if not fresh:
        try:
            info = images.check_image(c.path, max_pixels=s.max_pixels, min_size=0, full=True)
            entry = {"v": VALIDATION_VERSION, "ok": True, "w": info.width, "h": info.height,
                     "format": info.format, "notes": info.notes}
        except ImageProblem as e:
            entry = {"v": VALIDATION_VERSION, "ok": False, "reason": e.reason, "detail": e.detail,
                     "max_pixels": s.max_pixels}
    return _Verdict(sha, entry)


def _apply_limits(entry: dict[str, Any], s: DataSettings) -> ImageProblem | None:
    """Size limits are re-applied on every run, so changing them never needs a re-decode."""
    if not entry.get("ok"):
        return ImageProblem(entry.get("reason", images.CORRUPT), entry.get("detail", ""))
    w, h = entry["w"], entry["h"]
    if w * h > s.max_pixels:
        return ImageProblem(images.TOO_LARGE, f"{w}x{h} = {w * h} pixels, over data.max_pixels = {s.max_pixels}")
    if min(w, h) < s.min_size:
        return ImageProblem(images.TOO_SMALL, f"{w}x{h}, shorter side below data.min_size = {s.min_size}")
    return None


def scan_folder(settings: DataSettings, *, known: str | Path | None = None, threads: int | None = None,
                progress: bool = True, default_caption: str = "") -> tuple[list[ImageRecord], list[Bucket], DataReport]:
    """List, validate (header + full decode, memoised by content hash) and bucket every image of a folder.

    ``default_caption`` (e.g. data.class_prompt for class images) captions images without one, before
    the data.missing_caption rule."""
    s = settings
    root = Path(s.source).expanduser()
    report = DataReport(source=str(root), settings=asdict(s))
    fmt, candidates = list_source(root, s.format, report, caption_ext=s.caption_ext, celeba_split=s.celeba_split)
    report.format = fmt
    candidates, mask_files = _with_masks(candidates, s, root)
    validated, files = known_from(known, str(root))
    threads = threads or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:  # Pillow releases the GIL while decoding
        mask_results = pool.map(lambda c: _validate_one(c, s, validated, files), mask_files.values())
        results = pool.map(lambda c: _validate_one(c, s, validated, files), candidates)
        if progress and len(candidates) >= 500:
            from tqdm import tqdm

            results = tqdm(results, total=len(candidates), desc="checking images", unit="img")
        verdicts = list(results)
        mask_verdicts = dict(zip(mask_files, mask_results, strict=True))

    if s.buckets:
        buckets = make_buckets(s.resolution, effective_step(s.resolution, s.bucket_step), s.bucket_max_ratio)
    else:
        buckets = [(s.resolution, s.resolution)]
    records: list[ImageRecord] = []
    for c, v in zip(candidates, verdicts, strict=True):
        if isinstance(v, ImageProblem):
            report.skip(c.rel, v.reason, v.detail)
            continue
        report.validated[v.sha256] = v.entry
        st = os.stat(c.path)
        report.files[c.rel] = [st.st_size, st.st_mtime_ns, v.sha256]
        problem = _apply_limits(v.entry, s)
        if problem is not None:
            report.skip(c.rel, problem.reason, problem.detail)
            continue
        for kind, detail in v.entry.get("notes", []):
            report.warn(c.rel, kind, detail)
        caption = _caption_for(c, s, report, default_caption)
        if caption is None:
            continue
        w, h = v.entry["w"], v.entry["h"]
        mask = _mask_of(c, v, mask_files.get(c.rel), mask_verdicts.get(c.rel), s, report)
        if mask is None:
            continue
        bucket = nearest_bucket(w, h, buckets) if s.buckets else 0
        records.append(ImageRecord(str(c.path), c.rel, caption, v.sha256, w, h, bucket, c.repeats, *mask))
    report.used = len(records)
    report.samples = sum(r.repeats for r in records)
    report.masks = sum(1 for r in records if r.mask)
    for b in sorted({r.bucket for r in records}):
        report.buckets[f"{buckets[b][0]}x{buckets[b][1]}"] = sum(1 for r in records if r.bucket == b)
    return records, buckets, report


def _with_masks(candidates: list[Candidate], s: DataSettings, root: Path) -> tuple[list[Candidate], dict[str, Candidate]]:
    """The images (without those inside ``data.mask_dir``) and, per image ``rel``, its mask file to validate."""
    mask_root = Path(s.mask_dir).expanduser().resolve() if s.mask_dir else None
    if mask_root is not None:  # a mask folder inside the data folder holds masks, not training images
        candidates = [c for c in candidates if not c.path.resolve().is_relative_to(mask_root)]
    found: dict[str, Candidate] = {}
    if s.masked_loss != "off":
        in_mask_dir = masks.mask_dir_index(s.mask_dir)
        for c in candidates:
            path = masks.mask_file(c.path, c.rel, in_mask_dir)
            if path is not None:
                rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
                found[c.rel] = Candidate(path, rel, None)
    return candidates, found


def _mask_of(c: Candidate, v: _Verdict, mask: Candidate | None, verdict: _Verdict | ImageProblem | None,
             s: DataSettings, report: DataReport) -> tuple[str, str] | None:
    """(mask source, mask identity) of a usable image, ("", "") without a mask; None: skip the image."""
    if mask is None:
        if s.masked_loss == "alpha" and masks.has_alpha(c.path):
            return masks.ALPHA, f"{masks.ALPHA}:{v.sha256}"
        return "", ""
    assert verdict is not None  # every mask file found is validated with the images
    problem = verdict if isinstance(verdict, ImageProblem) else _apply_limits(verdict.entry, s)
    if problem is not None and problem.reason != images.TOO_SMALL:  # a small mask is stretched, not refused
        report.skip(c.rel, BAD_MASK, f"{mask.rel}: {problem.reason} ({problem.detail})")
        return None
    assert isinstance(verdict, _Verdict)
    report.validated[verdict.sha256] = verdict.entry
    st = os.stat(mask.path)
    report.files[mask.rel] = [st.st_size, st.st_mtime_ns, verdict.sha256]
    mw, mh, w, h = verdict.entry["w"], verdict.entry["h"], v.entry["w"], v.entry["h"]
    if (mw, mh) != (w, h):
        report.warn(mask.rel, "mask_size_mismatch", f"mask {mw}x{mh}, image {w}x{h}: the mask is stretched to the image")
    return str(mask.path), verdict.sha256


def _caption_for(c: Candidate, s: DataSettings, report: DataReport, default: str = "") -> str | None:
    if c.caption_warning:
        report.warn(c.rel, *c.caption_warning)
    if c.caption is not None:
        return c.caption
    if default:
        return default
    caption = fallback_caption(s.missing_caption, folder_caption=c.folder_caption, path=c.path)
    if caption is None:
        report.skip(c.rel, NO_CAPTION, "no caption and data.missing_caption = skip")
        return None
    if not c.caption_warning:
        report.warn(c.rel, "missing_caption", f"no caption; using {caption!r} (data.missing_caption = {s.missing_caption})")
    return caption
