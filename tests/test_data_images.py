"""Bad input never stops a run: a corpus of every bad kind mixed with good images of every awkward mode."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowvram.config import RunConfig
from lowvram.data import images
from lowvram.data.dataset import build_dataset
from lowvram.errors import DataError


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header that claims width x height pixels, with almost no data (nothing is allocated)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + _png_chunk(b"IEND", b""))


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


BAD = {
    "zero.png": images.EMPTY_FILE,
    "truncated.jpg": images.TRUNCATED,
    "truncated.png": images.TRUNCATED,
    "text.png": images.NOT_AN_IMAGE,
    "bomb.png": images.TOO_LARGE,
    "bomb_warn.png": images.TOO_LARGE,
    "tiny.png": images.TOO_SMALL,
}


def make_corpus(root: Path) -> Path:
    """Every bad kind next to good images in every mode the loader must convert."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "zero.png").write_bytes(b"")
    jpg = _bytes(_noise(64, 64, 1), "JPEG", quality=90)
    (root / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    png = _bytes(_noise(64, 64, 2), "PNG")
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "text.png").write_text("this is not a picture\n")
    (root / "bomb.png").write_bytes(bomb_png(50000, 50000))  # over 2x PIL's limit: DecompressionBombError
    (root / "bomb_warn.png").write_bytes(bomb_png(10000, 9000))  # between 1x and 2x: the warning
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "tiny.png")

    _noise(64, 48, 3).save(root / "good.jpg", quality=95)
    Image.new("CMYK", (64, 48), (0, 255, 255, 0)).save(root / "cmyk.jpg")  # pure red in CMYK
    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (16, 0, 32, 32))  # right half index 1 (blue), left half index 0 (red, transparent)
    pal.save(root / "palette.png", transparency=0)
    gradient = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    Image.fromarray(gradient).save(root / "sixteen.png")
    Image.fromarray(np.full((32, 40), 77, np.uint8), "L").save(root / "gray.png")
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:, :16] = (0, 255, 0, 255)  # left opaque green, right fully transparent
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    la = Image.new("LA", (32, 32), (0, 0))
    la.save(root / "la.png")
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :32] = (255, 0, 0)  # stored left half red, right half blue
    stored[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise: red ends on top
    Image.fromarray(stored).save(root / "rotated.jpg", exif=exif, quality=95)
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    _noise(40, 40, 4).save(root / "png_named.jpg", format="PNG")
    return root


GOOD = {"good.jpg", "cmyk.jpg", "palette.png", "sixteen.png", "gray.png", "rgba.png", "la.png", "rotated.jpg",
        "anim.gif", "png_named.jpg"}


def _cfg(source: Path, **data) -> RunConfig:
    cfg = RunConfig()
    cfg.data.source = str(source)
    cfg.data.resolution = 32
    cfg.data.caption_dropout = 0.0
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def test_report_lists_exactly_the_bad_files_with_their_reasons(tmp_path):
    corpus = make_corpus(tmp_path / "data")
    ds = build_dataset(_cfg(corpus), run_dir=tmp_path / "run", echo=None)
    skipped = {s["path"]: s["reason"] for s in ds.report.skipped}
    assert skipped == BAD
    assert {r.rel for r in ds.records} == GOOD
    path = ds.write_report(tmp_path / "run")
    data = json.loads(path.read_text())
    assert data["used"] == len(GOOD)
    assert data["skipped_count"] == len(BAD)
    assert data["skipped_by_reason"]["too_large"] == 2
    kinds = {(w["path"], w["kind"]) for w in data["warnings"]}
    assert ("png_named.jpg", "extension_mismatch") in kinds
    assert ("anim.gif", "animated") in kinds
    summary = ds.report.summary()
    assert "10 images used" in summary and "skipped 7" in summary and "truncated 2" in summary


def test_good_images_load_with_the_right_shape_and_range(tmp_path):
    corpus = make_corpus(tmp_path / "data")
    ds = build_dataset(_cfg(corpus, flip=True), echo=None)
    sampler = ds.make_sampler(2)
    seen = set()
    for batch in sampler:
        items = [ds[i] for i in batch]
        shapes = {tuple(it["pixel_values"].shape) for it in items}
        assert len(shapes) == 1  # one bucket per batch
        for it in items:
            px = it["pixel_values"]
            assert px.dtype == torch.float32 and px.shape[0] == 3
            assert px.shape[1] * px.shape[2] <= 32 * 32 and px.shape[1] % 8 == 0 and px.shape[2] % 8 == 0
            assert -1.0 <= px.min() and px.max() <= 1.0
            seen.add(it["key"].split("#")[0])
    assert seen == GOOD


def _rgb(corpus: Path, name: str, **kw) -> np.ndarray:
    return np.asarray(images.load_rgb(corpus / name, **kw)).astype(int)


def test_modes_are_converted_correctly(tmp_path):
    c = make_corpus(tmp_path)
    cmyk = _rgb(c, "cmyk.jpg")
    assert cmyk.shape == (48, 64, 3) and cmyk[..., 0].mean() > 200 and cmyk[..., 1:].mean() < 60
    pal = _rgb(c, "palette.png")
    assert (pal[:, :16] == 255).all()  # transparent red -> white background
    assert (pal[:, 16:] == (0, 0, 255)).all()
    six = _rgb(c, "sixteen.png")
    assert six[0, 0].tolist() == [0, 0, 0] and six[-1, -1].tolist() == [255, 255, 255]
    stored = int(np.linspace(0, 65535, 32 * 32).astype(np.uint16)[16 * 32])
    assert six[16, 0].tolist() == [round(stored / 257)] * 3
    gray = _rgb(c, "gray.png")
    assert gray.shape == (32, 40, 3) and (gray == 77).all()
    rgba = _rgb(c, "rgba.png", background=(0, 0, 0))
    assert (rgba[:, :16] == (0, 255, 0)).all() and (rgba[:, 16:] == 0).all()
    assert (_rgb(c, "rgba.png")[:, 16:] == 255).all()
    assert (_rgb(c, "la.png", background=(10, 20, 30)) == (10, 20, 30)).all()
    anim = _rgb(c, "anim.gif")
    assert (np.abs(anim - (255, 0, 0)) < 8).all()  # the first frame


def test_exif_orientation_is_applied(tmp_path):
    c = make_corpus(tmp_path)
    img = _rgb(c, "rotated.jpg")
    assert img.shape == (64, 32, 3)  # stored 64 wide x 32 high, displayed rotated
    top, bottom = img[:24].mean(axis=(0, 1)), img[40:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60  # red on top
    assert bottom[2] > 200 and bottom[0] < 60  # blue below
    assert images.check_image(c / "rotated.jpg").width == 32


def test_pixel_limit_is_checked_from_the_header_without_decoding(tmp_path):
    (tmp_path / "big.png").write_bytes(bomb_png(2000, 1000))
    with pytest.raises(images.ImageProblem) as e:
        images.check_image(tmp_path / "big.png", max_pixels=1_000_000)
    assert e.value.reason == images.TOO_LARGE
    before = Image.MAX_IMAGE_PIXELS
    ok = tmp_path / "ok.png"
    _noise(20, 20).save(ok)
    assert images.check_image(ok, max_pixels=before // 2).width == 20
    assert Image.MAX_IMAGE_PIXELS == before  # the process-wide limit is never lowered


def test_no_usable_image_is_a_data_error_naming_folder_and_reasons(tmp_path):
    (tmp_path / "a.png").write_text("nope")
    (tmp_path / "b.jpg").write_bytes(b"")
    with pytest.raises(DataError) as e:
        build_dataset(_cfg(tmp_path), echo=None)
    msg = str(e.value)
    assert str(tmp_path) in msg and "not_an_image 1" in msg and "empty_file 1" in msg


def test_empty_or_missing_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(_cfg(tmp_path / "nowhere"), echo=None)
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(DataError, match="no image files"):
        build_dataset(_cfg(tmp_path), echo=None)


def test_a_file_failing_mid_run_is_replaced_and_reported(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        _noise(32, 32, i).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"caption {i}")
    ds = build_dataset(_cfg(data), run_dir=tmp_path / "run", echo=None)
    (data / "2.png").write_bytes((data / "2.png").read_bytes()[:100])  # damaged after validation
    items = [ds[i] for i in range(len(ds))]
    assert [it["key"] for it in items] == ["0.png", "1.png", "3.png", "3.png"]  # replaced from its bucket
    assert all(it["caption"] == f"caption {it['key'][0]}" for it in items)  # the caption follows the image
    report = json.loads(ds.write_report(tmp_path / "run").read_text())
    failures = [s for s in report["skipped"] if s["reason"] == "failed_midrun"]
    assert [f["path"] for f in failures] == ["2.png"]


def test_validation_is_reused_by_content_hash(tmp_path, monkeypatch):
    corpus = make_corpus(tmp_path / "data")
    run = tmp_path / "run"
    build_dataset(_cfg(corpus), run_dir=run, echo=None)  # writes run/data_report.json
    calls = []
    real = images.check_image
    monkeypatch.setattr(images, "check_image", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    (corpus / "new.png").write_bytes(_bytes(_noise(30, 30, 9), "PNG"))
    second = build_dataset(_cfg(corpus), run_dir=run, echo=None)
    assert [Path(p).name for p in calls] == ["new.png"]  # only the new file is decoded again
    assert {s["path"]: s["reason"] for s in second.report.skipped} == BAD
    # limits are re-applied without decoding: a larger minimum now rejects more, from the stored sizes
    calls.clear()
    third = build_dataset(_cfg(corpus, min_size=40), run_dir=run, echo=None)
    assert calls == []
    assert {s["path"] for s in third.report.skipped if s["reason"] == "too_small"} >= {"gray.png", "rgba.png"}
