"""Each source format is detected and parsed right; caption reading and caption rules behave as documented."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lowvram.config import RunConfig
from lowvram.data import celeba
from lowvram.data.captions import CaptionRules, shuffle_tags
from lowvram.data.dataset import build_dataset
from lowvram.data.sources import detect_format
from lowvram.errors import DataError


def _img(path: Path, w: int = 32, h: int = 32, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _cfg(source: Path, **data) -> RunConfig:
    cfg = RunConfig()
    cfg.data.source = str(source)
    cfg.data.resolution = 32
    cfg.data.caption_dropout = 0.0
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def _captions(ds) -> dict[str, str]:
    return {r.rel: r.caption for r in ds.records}


def test_folder_nested_with_sidecars_and_caption_rules(tmp_path):
    _img(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red car\n\non a road  \n", encoding="utf-8")
    _img(tmp_path / "sub" / "deeper" / "b.jpg")
    (tmp_path / "sub" / "deeper" / "b.caption").write_text("\ufeffa blue boat")
    _img(tmp_path / "c.png")
    (tmp_path / "c.txt").write_bytes(b"caf\xe9 latte")  # latin-1, not UTF-8
    _img(tmp_path / "d.png")
    (tmp_path / "d.txt").write_text("   \n")
    _img(tmp_path / "e.png")  # no sidecar at all
    _img(tmp_path / ".hidden" / "x.png")  # hidden folders (caches) are not data
    assert detect_format(tmp_path) == "folder"
    ds = build_dataset(_cfg(tmp_path), echo=None)
    caps = _captions(ds)
    assert caps == {"a.png": "a red car on a road", "sub/deeper/b.jpg": "a blue boat", "c.png": "caf\ufffd latte",
                    "d.png": "", "e.png": ""}
    kinds = {(w["path"], w["kind"]) for w in ds.report.warnings}
    assert kinds == {("c.png", "caption_not_utf8"), ("d.png", "empty_caption"), ("e.png", "missing_caption")}


def test_caption_ext_setting_prefers_the_configured_extension(tmp_path):
    _img(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("from txt")
    (tmp_path / "a.caption").write_text("from caption")
    assert _captions(build_dataset(_cfg(tmp_path), echo=None))["a.png"] == "from txt"
    assert _captions(build_dataset(_cfg(tmp_path, caption_ext=".caption"), echo=None))["a.png"] == "from caption"


@pytest.mark.parametrize("rule,expected", [("empty", ""), ("filename", "my photo 1"), ("folder", "people")])
def test_missing_caption_rules(tmp_path, rule, expected):
    _img(tmp_path / "people" / "my_photo-1.png")
    ds = build_dataset(_cfg(tmp_path, missing_caption=rule), echo=None)
    assert _captions(ds)["people/my_photo-1.png"] == expected


def test_missing_caption_skip_rule_reports_the_file(tmp_path):
    _img(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("kept")
    _img(tmp_path / "b.png")
    ds = build_dataset(_cfg(tmp_path, missing_caption="skip"), echo=None)
    assert list(_captions(ds)) == ["a.png"]
    assert [(s["path"], s["reason"]) for s in ds.report.skipped] == [("b.png", "no_caption")]


def test_kohya_repeats_and_folder_captions(tmp_path):
    _img(tmp_path / "10_sks dog" / "1.png", seed=1)
    _img(tmp_path / "10_sks dog" / "2.png", seed=2)
    (tmp_path / "10_sks dog" / "2.txt").write_text("sks dog on grass")
    _img(tmp_path / "3_style" / "nested" / "3.png", seed=3)
    _img(tmp_path / "loose.png", seed=4)
    _img(tmp_path / "notes" / "5.png", seed=5)
    assert detect_format(tmp_path) == "kohya"
    ds = build_dataset(_cfg(tmp_path), echo=None)
    assert _captions(ds) == {"10_sks dog/1.png": "sks dog", "10_sks dog/2.png": "sks dog on grass",
                             "3_style/nested/3.png": "style"}
    assert len(ds) == 10 + 10 + 3  # repeats applied per epoch
    per_source = Counter(ds.entries)
    assert sorted(per_source.values()) == [3, 10, 10]
    skipped = {s["path"]: s["reason"] for s in ds.report.skipped}
    assert skipped == {"loose.png": "not_in_repeats_folder", "notes/5.png": "not_in_repeats_folder"}
    assert ds.report.samples == 23 and ds.report.used == 3


def test_metadata_jsonl(tmp_path):
    _img(tmp_path / "imgs" / "a.png", seed=1)
    _img(tmp_path / "imgs" / "b.png", seed=2)
    _img(tmp_path / "unlisted.png", seed=3)
    rows = [
        {"file_name": "imgs/a.png", "text": "first"},
        {"file_name": "imgs/b.png", "text": ""},
        {"file_name": "imgs/missing.png", "text": "gone"},
        {"file_name": "../outside.png", "text": "escape"},
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json"]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    assert detect_format(tmp_path) == "metadata"
    ds = build_dataset(_cfg(tmp_path), echo=None)
    assert _captions(ds) == {"imgs/a.png": "first", "imgs/b.png": ""}
    skipped = {s["path"]: s["reason"] for s in ds.report.skipped}
    assert skipped == {"imgs/missing.png": "missing_file", "metadata.jsonl:4": "bad_metadata_row",
                       "metadata.jsonl:5": "bad_metadata_row"}
    assert any(w["kind"] == "unlisted_images" for w in ds.report.warnings)


def test_metadata_csv(tmp_path):
    _img(tmp_path / "a.png", seed=1)
    _img(tmp_path / "b.png", seed=2)
    (tmp_path / "metadata.csv").write_text('file_name,text\na.png,"a cat, sitting"\nb.png,a dog\n')
    ds = build_dataset(_cfg(tmp_path), echo=None)
    assert _captions(ds) == {"a.png": "a cat, sitting", "b.png": "a dog"}


def test_metadata_csv_without_file_name_column_is_a_data_error(tmp_path):
    _img(tmp_path / "a.png")
    (tmp_path / "metadata.csv").write_text("path,text\na.png,x\n")
    with pytest.raises(DataError, match="file_name"):
        build_dataset(_cfg(tmp_path), echo=None)


NAMES = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
         "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
         "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
         "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
         "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()


def _row(name: str, positive: set[str]) -> str:
    return name + " " + " ".join(" 1" if n in positive else "-1" for n in NAMES)


def _fake_celeba(root: Path, with_partition: bool = True) -> Path:
    for i in range(1, 4):
        _img(root / "img_align_celeba" / f"00000{i}.jpg", 32, 40, seed=i)
    rows = [
        _row("000001.jpg", {"Black_Hair", "Eyeglasses", "Smiling", "No_Beard"}),
        _row("000002.jpg", {"Male", "Young", "Blond_Hair", "Bangs", "Mustache"}),  # No_Beard -1: a beard
        _row("000003.jpg", {"No_Beard"}),
    ]
    (root / "list_attr_celeba.txt").write_text(f"3\n{' '.join(NAMES)}\n" + "\n".join(rows) + "\n")
    if with_partition:
        (root / "list_eval_partition.txt").write_text("000001.jpg 0\n000002.jpg 0\n000003.jpg 1\n")
    return root


def test_celeba_attribute_template(tmp_path):
    root = _fake_celeba(tmp_path)
    assert detect_format(root) == "celeba"
    ds = build_dataset(_cfg(root, celeba_split="all"), echo=None)
    assert _captions(ds) == {
        "img_align_celeba/000001.jpg": "a person with black hair and eyeglasses, smiling",
        "img_align_celeba/000002.jpg": "a young man with blond hair, bangs, a mustache and a beard",
        "img_align_celeba/000003.jpg": "a person",
    }
    assert list(celeba.ATTRIBUTES) == sorted(NAMES)  # the template covers all 40 attributes


def test_celeba_splits(tmp_path):
    root = _fake_celeba(tmp_path)
    train = build_dataset(_cfg(root), echo=None)  # default split: train
    assert sorted(_captions(train)) == ["img_align_celeba/000001.jpg", "img_align_celeba/000002.jpg"]
    val = build_dataset(_cfg(root), split="val", echo=None)
    assert list(_captions(val)) == ["img_align_celeba/000003.jpg"]
    (root / "list_eval_partition.txt").unlink()
    every = build_dataset(_cfg(root), echo=None)
    assert len(every) == 3 and any(w["kind"] == "no_partition_file" for w in every.report.warnings)


def test_celeba_missing_image_is_reported(tmp_path):
    root = _fake_celeba(tmp_path, with_partition=False)
    (root / "img_align_celeba" / "000002.jpg").unlink()
    ds = build_dataset(_cfg(root, celeba_split="all"), echo=None)
    assert [(s["path"], s["reason"]) for s in ds.report.skipped] == [("img_align_celeba/000002.jpg", "missing_file")]


def test_caption_rules_dropout_shuffle_keep_prefix_suffix():
    rng = random.Random(0)
    rules = CaptionRules(dropout=0.25, prefix="photo of ", suffix=", hd")
    out = [rules.apply("a cat", rng) for _ in range(4000)]
    share = out.count("") / len(out)
    assert 0.22 < share < 0.28
    assert set(out) == {"", "photo of a cat, hd"}
    tags = "sks, person, red shirt, smiling, outdoors, night"
    orders = {shuffle_tags(tags, random.Random(i), keep=2) for i in range(50)}
    assert len(orders) > 10
    for o in orders:
        parts = o.split(", ")
        assert parts[:2] == ["sks", "person"] and sorted(parts) == sorted(tags.split(", "))


def test_caption_choices_are_deterministic_per_seed_epoch_index(tmp_path):
    for i in range(6):
        _img(tmp_path / f"{i}.png", seed=i)
        (tmp_path / f"{i}.txt").write_text(f"tag{i}, a, b, c")
    cfg = _cfg(tmp_path, caption_dropout=0.3, shuffle_tags=True, keep_tokens=1, flip=True)
    a, b = build_dataset(cfg, echo=None), build_dataset(cfg, echo=None)
    n = len(a)
    stream = list(range(3 * n))
    assert [a[i]["caption"] for i in stream] == [b[i]["caption"] for i in stream]
    assert [a[i]["key"] for i in stream] == [b[i]["key"] for i in stream]
    # another epoch draws differently (flips and shuffles are not frozen per image)
    assert [a[i]["caption"] for i in range(n)] != [a[n + i]["caption"] for i in range(n)]
