"""The names ``app.py`` wires to widgets, gathered from the panel's forms, views and actions in one namespace.

Each is a plain function of its inputs (plus the explicit :class:`PanelState`), returning text, tables and
images, so they are tested without a browser: ``forms.py`` checks fields and builds the config, ``views.py``
renders cards, plans, status, plots and the gallery, ``actions.py`` plans, starts, stops and samples.
"""

from __future__ import annotations

from ..config import MODEL_SIZES
from .actions import (
    check_out_live,
    default_preset,
    plan_report,
    preset_names,
    resume_job,
    sample_now,
    start_job,
    stop_job,
)
from .forms import (
    FROM_SCRATCH,
    TASK_LABELS,
    Check,
    Form,
    build_config,
    check_data,
    check_model,
    check_out,
    check_settings,
    config_yaml,
    default_resolution,
    form_from_config,
    form_settings,
    preset_knobs,
    resolve_form,
    validate_form,
)
from .state import PanelState
from .views import (
    MAX_PLOT_POINTS,
    PREVIEW_MIN_SIDE,
    error_markdown,
    fmt_duration,
    gallery_items,
    grid_legend,
    loss_frame,
    memory_table,
    plan_markdown,
    preset_card,
    read_metrics,
    sample_files,
    scaled,
    status_html,
)

__all__ = [
    "FROM_SCRATCH", "MAX_PLOT_POINTS", "MODEL_SIZES", "PREVIEW_MIN_SIDE", "TASK_LABELS", "Check", "Form",
    "PanelState", "build_config", "check_data", "check_model", "check_out", "check_out_live", "check_settings",
    "config_yaml", "default_preset", "default_resolution", "error_markdown", "fmt_duration", "form_from_config",
    "form_settings", "gallery_items", "grid_legend", "loss_frame", "memory_table", "plan_markdown", "plan_report",
    "preset_card", "preset_knobs", "preset_names", "read_metrics", "resolve_form", "resume_job", "sample_files",
    "sample_now", "scaled", "start_job", "status_html", "stop_job", "validate_form",
]
