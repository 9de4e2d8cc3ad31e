"""Follow a JSON-lines file another process is appending to: read only what is new since last time.

The panel polls the training child's events and the run's ``metrics.jsonl`` every second; re-reading
a long run's whole file each time would grow with the run, so the offset is remembered.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class JsonlTail:
    """New complete JSON lines of ``path`` on each ``read()``; a half-written last line waits."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.offset = 0
        self._partial = b""
        self.restarted = False  # set by read() when the file was replaced: earlier rows are void

    def read(self) -> list[dict[str, Any]]:
        """The rows appended since the previous call (none if the file does not exist yet)."""
        try:
            with self.path.open("rb") as f:
                size = f.seek(0, 2)
                self.restarted = size < self.offset
                if self.restarted:  # replaced or truncated: start over
                    self.offset, self._partial = 0, b""
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()  # b"" when the chunk ended on a newline
        rows = []
        for line in lines:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a damaged line must not stop the panel from following the rest
            if isinstance(row, dict):
                rows.append(row)
        return rows
