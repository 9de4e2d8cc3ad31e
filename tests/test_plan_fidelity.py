"""`lowvram plan`'s memory verdict holds for the run `lowvram train` then makes, for every job kind.

Each case plans a tiny run through the front door and trains it on the CPU in this process; the CPU
allocator's own events (torch.profiler) give the peak of tensor bytes inside the run's steps, previews,
validation, caching and autoencoder stage. Tolerance: 5 % of the measured peak.
"""

from __future__ import annotations

import numpy as np
import pytest
from flux_fixtures import save_tiny_flux
from PIL import Image
from sd_fixtures import save_tiny

from lowvram.memory.fidelity import RUN_CASES, case_argv, predict_and_measure

TOLERANCE = 0.05


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny SD 1.x, SDXL and FLUX.1-dev checkpoints, 4 captioned instance images and 4 class images (32 px)."""
    tmp = tmp_path_factory.mktemp("fidelity")
    models = {fam: save_tiny(tmp, fam)["folder"] for fam in ("sd1", "sdxl")}
    models["flux"] = save_tiny_flux(tmp)[1]["folder"]
    rng = np.random.default_rng(0)
    for name, caption in (("data", "a photo of sks dog, photo"), ("cls", "a photo of a dog")):
        (tmp / name).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp / name / f"{i}.png")
            (tmp / name / f"{i}.txt").write_text(f"{caption} {i}")
    return {"tmp": tmp, "models": models, "data": tmp / "data", "cls": tmp / "cls", "cache": tmp / "cache"}


@pytest.mark.parametrize("name", list(RUN_CASES))
def test_plan_predicts_the_peak_of_the_real_run(world, name):
    out = world["tmp"] / name.split(" (")[0].replace(" ", "-").replace(",", "")
    argv = case_argv(RUN_CASES[name], out, world["models"], world["data"], world["cls"], world["cache"])
    predicted, measured, record = predict_and_measure(argv)
    print(f"\n{name}: predicted {predicted / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB "
          f"({(predicted - measured) / measured:+.1%}), peak in {record['peak_stage']}")
    assert measured > 0
    assert abs(predicted - measured) <= TOLERANCE * measured, (predicted, measured, record["stages"])
