"""What the server keeps between the panel's calls: the job manager, the probed card and small caches."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from .forms import Form
from .jobs import JobManager
from .tail import JsonlTail


@dataclass
class PanelState:
    """What the server keeps between calls: the job manager and small caches (never per page)."""

    manager: JobManager
    hardware: Any = None  # HardwareInfo, probed once
    _metrics: dict[str, tuple[JsonlTail, list[dict[str, Any]]]] = field(default_factory=dict)
    _model: tuple[tuple[str, str], Any] | None = None
    _model_lock: threading.Lock = field(default_factory=threading.Lock)
    job_form: Form | None = None  # the form the current job was started from (a reloaded page shows it)

    def probe(self) -> Any:
        if self.hardware is None:
            from ..hardware import probe

            self.hardware = probe()
        return self.hardware
