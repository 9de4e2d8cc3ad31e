"""Runs diffusers' ``train_text_to_image_lora.py`` unchanged and records when its training steps happen.

    python bench/diffusers_example_launcher.py STEP_TIMES.json EXAMPLE.py [example flags...]

The example's own progress bar (``tqdm(desc="Steps")``) is created right before its training loop and
updated after every optimizer step; a subclass records those moments (perf_counter seconds) and writes
them to STEP_TIMES.json at exit: ``times[-1] - times[0]`` is the time its steps took.

Only where the installed torchvision cannot load its C++ ops (a CUDA torchvision wheel next to a CPU
torch, as on the machine this was written on) are the schemas of the two detection ops that
torchvision's import registers (``nms``, ``qnms``) defined first; the example only uses
``torchvision.transforms``, which is pure Python.
"""

from __future__ import annotations

import json
import runpy
import sys
import time


def _importable_torchvision() -> None:
    import torch

    try:
        import torchvision  # noqa: F401
    except RuntimeError:  # "operator torchvision::nms does not exist": the extension did not load
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        import torchvision  # noqa: F401
        _importable_torchvision.lib = lib  # keep the fragment alive


def main() -> None:
    out, example, *flags = sys.argv[1:]
    _importable_torchvision()
    import tqdm.auto

    marks: list[float] = []

    class TimedBar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._steps = kwargs.get("desc") == "Steps"
            if self._steps:
                marks.append(time.perf_counter())

        def update(self, n: float = 1) -> bool | None:
            shown = super().update(n)
            if self._steps:
                marks.append(time.perf_counter())
            return shown

    tqdm.auto.tqdm = TimedBar
    sys.argv = [example, *flags]
    try:
        runpy.run_path(example, run_name="__main__")
    finally:
        with open(out, "w") as f:
            json.dump(marks, f)


if __name__ == "__main__":
    main()
