"""The data report: which files were used, which were skipped and why, and warnings; written as data_report.json.

It also remembers each validated file's content hash and verdict, so a second run over the same
files skips the full decode (``known_from``), and collects files that fail mid-run (from any worker
process) through an append-only JSON-lines side file.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..fsutil import write_text_atomic

REPORT_NAME = "data_report.json"
MIDRUN_NAME = "data_report.midrun.jsonl"

# Reasons that are not image-decoding problems (those live in images.py).
MISSING_FILE = "missing_file"
NOT_IN_REPEATS_FOLDER = "not_in_repeats_folder"
BAD_METADATA_ROW = "bad_metadata_row"
NO_CAPTION = "no_caption"
BAD_MASK = "bad_mask"
FAILED_MIDRUN = "failed_midrun"

REASON_HELP = {
    "empty_file": "the file is 0 bytes",
    "unreadable": "the file cannot be opened (permissions, vanished)",
    "not_an_image": "the content is not an image Pillow can read",
    "truncated": "the image data ends early (incomplete download or copy)",
    "corrupt": "the image data is damaged",
    "too_large": "more pixels than data.max_pixels (decompression-bomb guard)",
    "too_small": "shorter side below data.min_size",
    MISSING_FILE: "named by the metadata or attribute file but not on disk",
    NOT_IN_REPEATS_FOLDER: "kohya layout: not inside a <repeats>_<name> folder",
    BAD_METADATA_ROW: "a metadata row that cannot be parsed",
    NO_CAPTION: "no caption and data.missing_caption = skip",
    BAD_MASK: "its loss mask file (data.masked_loss) cannot be used",
    FAILED_MIDRUN: "passed validation but failed to load during training",
}


@dataclass
class DataReport:
    """Everything the user should know about the data source; JSON-serialisable."""

    source: str = ""
    format: str = ""
    used: int = 0  # usable images (unique files)
    samples: int = 0  # dataset items per epoch (repeats applied)
    skipped: list[dict[str, str]] = field(default_factory=list)
    warnings: list[dict[str, str]] = field(default_factory=list)
    buckets: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    # content sha256 -> {"ok": bool, "reason", "detail", "w", "h", "format", "notes"}
    validated: dict[str, dict[str, Any]] = field(default_factory=dict)
    # relative path -> [size, mtime_ns, sha256]: skip re-hashing unchanged files on the next run
    files: dict[str, list[Any]] = field(default_factory=dict)
    midrun_log: str | None = None
    masks: int = 0  # usable images with a loss mask (masked loss)
    class_data: DataReport | None = None  # the class images of prior preservation, reported alike

    def skip(self, path: str, reason: str, detail: str = "") -> None:
        self.skipped.append({"path": str(path), "reason": reason, "detail": detail})

    def warn(self, path: str, kind: str, detail: str = "") -> None:
        self.warnings.append({"path": str(path), "kind": kind, "detail": detail})

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(s["reason"] for s in self.all_skipped()).items()))

    def warnings_by_kind(self) -> dict[str, int]:
        return dict(sorted(Counter(w["kind"] for w in self.warnings).items()))

    def all_skipped(self) -> list[dict[str, str]]:
        """Skips found up front plus those recorded mid-run by any worker process."""
        return self.skipped + self.midrun_failures()

    def midrun_failures(self) -> list[dict[str, str]]:
        if not self.midrun_log or not os.path.exists(self.midrun_log):
            return []
        out = []
        with open(self.midrun_log, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a crash: the rest is still good
        return out

    def record_midrun_failure(self, path: str, reason: str, detail: str) -> None:
        """Append one failure; O_APPEND keeps lines whole across processes."""
        if not self.midrun_log:
            self.skipped.append({"path": path, "reason": FAILED_MIDRUN, "detail": f"{reason}: {detail}"})
            return
        line = json.dumps({"path": path, "reason": FAILED_MIDRUN, "detail": f"{reason}: {detail}"}) + "\n"
        fd = os.open(self.midrun_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)

    def summary(self, max_lines: int = 10) -> str:
        """A few lines for the terminal: used, skipped by reason (with the first paths), warnings."""
        skipped = self.all_skipped()
        lines = [f"data: {self.used} images used ({self.samples} samples per epoch) from {self.source} [{self.format}]"]
        if self.buckets:
            lines.append("  buckets: " + ", ".join(f"{k}: {v}" for k, v in self.buckets.items()))
        if self.masks:
            lines.append(f"  loss masks: {self.masks} of {self.used} images (masked loss; the others train unmasked)")
        if skipped:
            by = ", ".join(f"{r} {n}" for r, n in self.skipped_by_reason().items())
            lines.append(f"  skipped {len(skipped)}: {by}")
            for s in skipped[:max_lines]:
                lines.append(f"    {s['path']}: {s['reason']}" + (f" ({s['detail']})" if s.get("detail") else ""))
            if len(skipped) > max_lines:
                lines.append(f"    … {len(skipped) - max_lines} more in {REPORT_NAME}")
        if self.warnings:
            by = ", ".join(f"{k} {n}" for k, n in self.warnings_by_kind().items())
            lines.append(f"  warnings {len(self.warnings)}: {by}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        skipped = self.all_skipped()
        return {
            "source": self.source,
            "format": self.format,
            "used": self.used,
            "samples": self.samples,
            "skipped_count": len(skipped),
            "skipped_by_reason": self.skipped_by_reason(),
            "warnings_by_kind": self.warnings_by_kind(),
            "buckets": self.buckets,
            "masks": self.masks,
            "settings": self.settings,
            "skipped": skipped,
            "warnings": self.warnings,
            "reasons": {r: REASON_HELP.get(r, "") for r in self.skipped_by_reason()},
            "validated": self.validated,
            "files": self.files,
            "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
        } | ({"class_data": self.class_data.to_dict()} if self.class_data is not None else {})

    def write(self, run_dir: str | Path) -> Path:
        """Write ``data_report.json`` into ``run_dir`` atomically; returns its path."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / REPORT_NAME
        write_json_atomic(path, self.to_dict())
        return path


def write_report(report: DataReport, run_dir: str | Path) -> Path:
    """Module-level alias of ``DataReport.write`` (``data_report.json`` in the run folder)."""
    return report.write(run_dir)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temp file in the same folder, flushed, then renamed: readers never see half a file."""
    write_text_atomic(path, json.dumps(data, indent=1), fsync=True)


def known_from(path: str | Path | None, source: str | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, list[Any]]]:
    """The ``validated`` and ``files`` tables of an earlier data_report.json (empty if none or unreadable).

    Verdicts are keyed by content hash and always reusable; the path -> hash memo only when the earlier
    report is of the same ``source`` folder.
    """
    if path is None:
        return {}, {}
    p = Path(path)
    if p.is_dir():
        p = p / REPORT_NAME
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        nested = data.get("class_data")
        if source is not None and data.get("source") != source and isinstance(nested, dict) \
                and nested.get("source") == source:  # the class images' own tables (prior preservation)
            data = nested
        validated, files = data.get("validated", {}), data.get("files", {})
        if source is not None and data.get("source") != source:
            files = {}
        if isinstance(validated, dict) and isinstance(files, dict):
            return validated, files
    except (OSError, ValueError, AttributeError):
        pass
    return {}, {}
