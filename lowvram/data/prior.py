"""Class (regularisation) images for DreamBooth-style prior preservation, paired with instance batches.

Every instance image of a micro-batch gets one class image of the same bucket, so the two stack into one
batch. Which class image is a pure function of (seed, epoch, instance item), like the rest of the data
pipeline, so a resumed run draws the same ones; per bucket the class images cycle through a shuffled
order, so each is used once before any repeats.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError
from .dataset import DataSettings, ImageDataset, scan_folder
from .report import MIDRUN_NAME, REPORT_NAME, DataReport

CLASS_MIDRUN_NAME = MIDRUN_NAME.replace(".midrun", ".class_data.midrun")
CLASS_FIX = ("put photos of the class there (e.g. 100-200 images of 'a dog'), captioned by .txt files or by "
             "data.class_prompt, or unset data.class_data to train without prior preservation")


class ClassImages:
    """The class image dataset and the pairing of instance stream indices with class stream indices."""

    def __init__(self, dataset: ImageDataset, instance_bucket_ids: list[int], seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.instance_bucket_ids = list(instance_bucket_ids)
        self.pools: dict[int, list[int]] = {}  # bucket -> class items in it
        for item, bucket in enumerate(dataset.bucket_ids):
            self.pools.setdefault(bucket, []).append(item)
        missing = sorted(set(self.instance_bucket_ids) - set(self.pools))
        if missing:  # open_class_images fills every instance bucket; a dataset made elsewhere may not
            w, h = dataset.buckets[missing[0]]
            raise DataError(f"no class image in bucket {w}x{h}, which instance images use", CLASS_FIX)
        self.ranks: list[int] = []  # instance item -> its rank among the instance items of its bucket
        self.counts: dict[int, int] = {}  # bucket -> instance items in it
        for bucket in self.instance_bucket_ids:
            self.ranks.append(self.counts.get(bucket, 0))
            self.counts[bucket] = self.counts.get(bucket, 0) + 1
        self._orders: dict[tuple[int, int], list[int]] = {}

    def _order(self, bucket: int, cycle: int) -> list[int]:
        """The bucket's class items in the shuffled order of one pass over them."""
        key = (bucket, cycle)
        if key not in self._orders:
            if len(self._orders) > 256:  # a small memo: batches walk forward through cycles
                self._orders.clear()
            order = list(self.pools[bucket])
            random.Random(f"class-{self.seed}-{bucket}-{cycle}").shuffle(order)
            self._orders[key] = order
        return self._orders[key]

    def pair(self, index: int) -> int:
        """The class stream index drawn beside instance stream index ``index`` (``epoch * n + item``)."""
        epoch, item = divmod(index, len(self.instance_bucket_ids))
        bucket = self.instance_bucket_ids[item]
        pool = self.pools[bucket]
        # the k-th draw from this bucket since the start of training: epoch e has counts[bucket] draws
        cycle, pos = divmod(epoch * self.counts[bucket] + self.ranks[item], len(pool))
        # the class dataset's own per-draw choices (flip, tag shuffle) follow the cycle as their epoch
        return cycle * len(self.dataset) + self._order(bucket, cycle)[pos]

    def pairs(self, indices: list[int]) -> list[int]:
        return [self.pair(i) for i in indices]


def _fill_buckets(records: list[Any], instance: Any, report: Any) -> list[Any]:
    """Each class image goes to the instance bucket nearest its aspect ratio; an instance bucket no class
    image falls into gets every class image cropped to it (so each instance batch finds partners)."""
    from .buckets import nearest_bucket

    used = sorted(set(instance.bucket_ids))
    shapes = [instance.buckets[b] for b in used]
    for rec in records:
        rec.bucket = used[nearest_bucket(rec.width, rec.height, shapes)]
    have = {rec.bucket for rec in records}
    out = list(records)
    for b in used:
        if b not in have:
            w, h = instance.buckets[b]
            report.warn(report.source, "class_bucket_filled",
                        f"no class image has the aspect ratio of bucket {w}x{h}; every class image is also cropped to it")
            out += [dataclasses.replace(rec, bucket=b) for rec in records]
    return out


@dataclass
class ClassScan:
    """The validated class folder, before it is bucketed on the instance images."""

    records: list[Any]
    report: DataReport
    settings: DataSettings


def scan_class_images(cfg: Any, run_dir: str | Path | None, echo: Callable[[str], None] | None = print) -> ClassScan:
    """Validate ``data.class_data`` (before any model loads). Call it before the instance dataset rewrites
    data_report.json, so a resumed run reuses the class images' verdicts from there."""
    root = Path(cfg.data.class_data).expanduser()
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise DataError(f"class image folder '{root}' (data.class_data) {what}", CLASS_FIX)
    # the instance images' settings, without a trigger word (it belongs to the instance images only) nor
    # the instance images' mask folder (class images take masks from -masklabel files beside them)
    settings = dataclasses.replace(DataSettings.from_config(cfg, resolution=cfg.data.resolution), source=str(root),
                                   format="auto", caption_prefix="", caption_suffix="", caption_dropout=0.0,
                                   mask_dir="")
    known = run_dir if run_dir is not None and (Path(run_dir) / REPORT_NAME).is_file() else None
    try:
        records, _, report = scan_folder(settings, known=known, progress=echo is not None,
                                         default_caption=getattr(cfg.data, "class_prompt", ""))
    except DataError as e:
        raise DataError(f"class images (data.class_data): {e.problem}", CLASS_FIX) from None
    if not records:
        reasons = ", ".join(f"{r} {n}" for r, n in report.skipped_by_reason().items()) or "none listed"
        raise DataError(f"no usable class image in '{root}' (data.class_data); skipped by reason: {reasons}",
                        CLASS_FIX)
    return ClassScan(records, report, settings)


def open_class_images(cfg: Any, instance: Any, run_dir: str | Path | None,
                      echo: Callable[[str], None] | None = print, scan: ClassScan | None = None) -> ClassImages:
    """The class images of ``data.class_data`` bucketed on ``instance``'s buckets and paired with it.

    Class images get the instance images' settings (resolution, buckets, flips, tag shuffling) but neither
    caption prefix nor suffix; images without a caption file are captioned ``data.class_prompt``. Their
    report goes into data_report.json under ``class_data``. ``scan``: from ``scan_class_images``.
    """
    scan = scan or scan_class_images(cfg, run_dir, echo)
    report = scan.report
    records = _fill_buckets(scan.records, instance, report)
    report.samples = sum(r.repeats for r in records)
    report.buckets = {}
    for b in sorted({r.bucket for r in records}):
        w, h = instance.buckets[b]
        report.buckets[f"{w}x{h}"] = sum(1 for r in records if r.bucket == b)
    dataset = ImageDataset(records, instance.buckets, scan.settings, report)
    instance.report.class_data = report
    if run_dir is not None:
        report.midrun_log = str(Path(run_dir) / CLASS_MIDRUN_NAME)
        instance.report.write(run_dir)
    if echo is not None:
        echo("class " + report.summary())
    return ClassImages(dataset, instance.bucket_ids, scan.settings.seed)
