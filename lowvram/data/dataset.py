"""The training dataset: validated images → buckets → transformed tensors, plus ``build_dataset(cfg)``.

Items are ``{"pixel_values": float32 [3, H, W] in [-1, 1], "caption": str, "key": str}``. Every
per-sample random choice (flip, random crop, caption dropout / shuffle) is derived from
(seed, epoch, index), so the data order and content are reproducible and resumable, also in
DataLoader worker processes. Files that fail after validation are reported and replaced by another
image of the same bucket; they never stop a run.
"""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from . import images, masks
from .buckets import Bucket, BucketBatchSampler
from .images import ImageProblem
from .report import MIDRUN_NAME, DataReport
from .scan import VALIDATION_VERSION, ImageRecord, scan_folder  # noqa: F401 (re-exported)
from .settings import DataSettings

log = logging.getLogger("lowvram.data")


@dataclass(frozen=True)
class SamplePlan:
    """What stream index ``i`` of an epoch means: which source image, flipped or not, which caption."""

    source: int
    flip: bool
    caption: str
    key: str
    crop_seed: str


def _rngs(seed: int, epoch: int, index: int) -> tuple[random.Random, random.Random]:
    # Separate streams: caption choices must not depend on whether flip/crop are on.
    return (random.Random(f"pixels-{seed}-{epoch}-{index}"), random.Random(f"caption-{seed}-{epoch}-{index}"))


class _PlannedDataset(Dataset):
    """Shared logic of every source: stream indices, sample plans, bad-source replacement."""

    buckets: list[Bucket]
    bucket_ids: list[int]  # per item (repeats expanded): what BucketBatchSampler groups by
    entries: list[int]  # item -> source index
    report: DataReport

    def __init__(self, settings: DataSettings) -> None:
        self.settings = settings
        self.rules = settings.caption_rules()
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.entries)

    # --- per-source hooks, implemented by the concrete datasets -------------------------------------
    def num_sources(self) -> int:
        raise NotImplementedError

    def source_bucket(self, source: int) -> int:
        raise NotImplementedError

    def source_caption(self, source: int) -> str:
        raise NotImplementedError

    def source_key(self, source: int) -> str:
        raise NotImplementedError

    def source_id(self, source: int) -> str:
        """Content identity of the source (for the latent cache)."""
        raise NotImplementedError

    def load_source(self, source: int, crop_rng: random.Random | None = None) -> torch.Tensor:
        """The source at its bucket size, unflipped, [3, H, W] in [-1, 1]; raises on failure."""
        raise NotImplementedError

    # --- loss masks (data/masks.py); sources without any have none ------------------------------------
    has_masks = False

    def source_mask_id(self, source: int) -> str | None:
        """Content identity of the source's loss mask (for the latent cache), None without one."""
        return None

    def load_mask(self, source: int, crop_rng: random.Random | None = None) -> torch.Tensor:
        """The source's loss mask at its bucket size, unflipped, [1, H, W] in [0, 1] (ones without a mask)."""
        w, h = self.buckets[self.source_bucket(source)]
        return torch.ones(1, h, w)

    def mask(self, index: int) -> torch.Tensor:
        """The loss mask of stream index ``index``: cropped and flipped as its image is."""
        plan = self.plan(index)
        m = self.load_mask(plan.source, random.Random(plan.crop_seed))
        return torch.flip(m, dims=[-1]) if plan.flip else m

    # --- shared --------------------------------------------------------------------------------------
    def split_index(self, index: int) -> tuple[int, int]:
        """Stream index -> (epoch, item index); plain indices are epoch 0."""
        if index < 0:
            raise IndexError(index)
        return divmod(index, len(self.entries))

    def plan(self, index: int) -> SamplePlan:
        """The deterministic choices for stream index ``index`` (see BucketBatchSampler)."""
        epoch, item = self.split_index(index)
        source = self.replacement(self.entries[item])
        pix_rng, cap_rng = _rngs(self.settings.seed, epoch, item)
        flip = self.settings.flip and pix_rng.random() < 0.5
        caption = self.rules.apply(self.source_caption(source), cap_rng)
        key = self.source_key(source) + ("#flip" if flip else "")
        return SamplePlan(source, flip, caption, key, f"crop-{self.settings.seed}-{epoch}-{item}")

    def replacement(self, source: int) -> int:
        """``source``, or the next good source of its bucket when it failed to load earlier."""
        if source not in self._bad:
            return source
        bucket = self.source_bucket(source)
        n = self.num_sources()
        for step in range(1, n):
            other = (source + step) % n
            if other not in self._bad and self.source_bucket(other) == bucket:
                return other
        raise DataError(f"every image of bucket {self.buckets[bucket]} failed to load during training",
                        "see data_report.json for the reasons")

    def is_bad(self, source: int) -> bool:
        """True once ``source`` failed to load in this process (it is then replaced)."""
        return source in self._bad

    def mark_bad(self, source: int, reason: str, detail: str) -> None:
        """Report a source that failed after validation and stop using it (in this process)."""
        self._bad.add(source)
        self.report.record_midrun_failure(self.source_key(source), reason, detail)
        log.warning("skipping %s during training: %s (%s)", self.source_key(source), reason, detail)

    def __getitem__(self, index: int) -> dict[str, Any]:
        while True:  # a failing file is marked bad; the new plan then names its replacement and caption
            plan = self.plan(index)
            try:
                pixels = self.load_source(plan.source, random.Random(plan.crop_seed))
                break
            except ImageProblem as e:
                self.mark_bad(plan.source, e.reason, e.detail)
            except Exception as e:  # never let one file stop a run
                self.mark_bad(plan.source, "corrupt", f"{type(e).__name__}: {e}")
        if plan.flip:
            pixels = torch.flip(pixels, dims=[-1])
        item = {"pixel_values": pixels, "caption": plan.caption, "key": plan.key}
        if self.has_masks:
            item["mask"] = self.mask(index)
        return item

    def make_sampler(self, batch_size: int, *, seed: int | None = None, drop_last: bool = False) -> BucketBatchSampler:
        """A bucket batch sampler over this dataset (seed defaults to the run seed)."""
        return BucketBatchSampler(self.bucket_ids, batch_size, seed=self.settings.seed if seed is None else seed,
                                  drop_last=drop_last)

    def write_report(self, run_dir: str | Path) -> Path:
        """Write ``data_report.json`` (including mid-run failures so far) into the run folder."""
        return self.report.write(run_dir)


class ImageDataset(_PlannedDataset):
    """Images from a folder source, validated up front and assigned to aspect-ratio buckets."""

    def __init__(self, records: list[ImageRecord], buckets: list[Bucket], settings: DataSettings,
                 report: DataReport) -> None:
        super().__init__(settings)
        self.records = records
        self.buckets = buckets
        self.report = report
        self.entries = [i for i, r in enumerate(records) for _ in range(r.repeats)]
        self.bucket_ids = [records[i].bucket for i in self.entries]
        self._background = settings.background_rgb()
        self.has_masks = any(r.mask for r in records)

    def num_sources(self) -> int:
        return len(self.records)

    def source_bucket(self, source: int) -> int:
        return self.records[source].bucket

    def source_caption(self, source: int) -> str:
        return self.records[source].caption

    def source_key(self, source: int) -> str:
        return self.records[source].rel

    def source_id(self, source: int) -> str:
        return self.records[source].sha256

    def load_source(self, source: int, crop_rng: random.Random | None = None) -> torch.Tensor:
        rec = self.records[source]
        size = self.buckets[rec.bucket]
        img = images.load_rgb(rec.path, max_pixels=self.settings.max_pixels, background=self._background,
                              draft_size=size)
        crop = self.settings.crop if crop_rng is not None else "center"
        img = images.resize_cover_crop(img, size, crop, crop_rng)
        return images.to_tensor(img)

    def source_mask_id(self, source: int) -> str | None:
        return self.records[source].mask_id or None

    def load_mask(self, source: int, crop_rng: random.Random | None = None) -> torch.Tensor:
        rec = self.records[source]
        if not rec.mask:
            return super().load_mask(source, crop_rng)
        crop = self.settings.crop if crop_rng is not None else "center"
        return masks.load_mask(rec.mask, rec.path, (rec.width, rec.height), self.buckets[rec.bucket], crop, crop_rng,
                               max_pixels=self.settings.max_pixels)


class BuiltinDataset(_PlannedDataset):
    """The generated shapes dataset (lowvram.data.builtin) behind the same plan/flip/caption rules."""

    def __init__(self, settings: DataSettings) -> None:
        super().__init__(settings)
        from .builtin import ShapesDataset  # lazy: only runs on the builtin source pay for it

        self.base = ShapesDataset(settings.num_images, settings.resolution, settings.seed,
                                  exclude=tuple(settings.builtin_exclude))
        n = len(self.base)
        self.buckets = [(settings.resolution, settings.resolution)]
        self.entries = list(range(n))
        self.bucket_ids = [0] * n
        self.report = DataReport(source="builtin", format="builtin", used=n, samples=n,
                                 buckets={f"{settings.resolution}x{settings.resolution}": n},
                                 settings=asdict(settings))
        self._ids: dict[int, str] = {}

    def num_sources(self) -> int:
        return len(self.base)

    def source_bucket(self, source: int) -> int:
        return 0

    def source_caption(self, source: int) -> str:
        from .builtin import caption_of

        return caption_of(self.base.attributes(source))

    def source_key(self, source: int) -> str:
        return f"shapes-{self.settings.seed}-{source:06d}"

    def source_id(self, source: int) -> str:
        # The generator is deterministic, but its code may change: identify by the pixels themselves.
        if source not in self._ids:
            import hashlib

            self._ids[source] = hashlib.sha256(self.load_source(source).numpy().tobytes()).hexdigest()
        return self._ids[source]

    def load_source(self, source: int, crop_rng: random.Random | None = None) -> torch.Tensor:
        return self.base[source]["pixel_values"]


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors (all items of a batch share one bucket), keep strings as lists."""
    out: dict[str, Any] = {}
    for k in items[0]:
        values = [it[k] for it in items]
        out[k] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


def make_loader(dataset: Dataset, batch_size: int, *, seed: int = 0, workers: int = 0,
                drop_last: bool = False) -> tuple[DataLoader, BucketBatchSampler]:
    """A DataLoader with a bucket batch sampler; keep the sampler to save/restore the data position."""
    sampler = BucketBatchSampler(dataset.bucket_ids, batch_size, seed=seed, drop_last=drop_last)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                        persistent_workers=workers > 0)
    return loader, sampler


def build_dataset(cfg: Any, *, resolution: int | None = None, run_dir: str | Path | None = None,
                  known: str | Path | None = None, split: str | None = None,
                  echo: Callable[[str], None] | None = print) -> _PlannedDataset:
    """The dataset of ``cfg.data``: builtin shapes or a validated folder source; prints the summary.

    ``resolution``: overrides data.resolution (the model's default when that is None);
    ``run_dir``: where data_report.json is written (call ``write_report`` again at the end to add mid-run
    failures), mid-run failures are logged, and an earlier report's verdicts are reused (resume);
    ``known``: another data_report.json whose validation verdicts to reuse; ``split``: CelebA split
    override (train / val / test / all). Raises DataError, before any model loads, when nothing is usable.
    """
    settings = DataSettings.from_config(cfg, resolution=resolution)
    if split is not None:
        settings = DataSettings(**{**asdict(settings), "celeba_split": split})
    if settings.source == "builtin" or settings.format == "builtin":
        ds: _PlannedDataset = BuiltinDataset(settings)
    else:
        if known is None and run_dir is not None and (Path(run_dir) / "data_report.json").is_file():
            known = run_dir
        records, buckets, report = scan_folder(settings, known=known, progress=echo is not None)
        if not records:
            reasons = ", ".join(f"{r} {n}" for r, n in report.skipped_by_reason().items()) or "none listed"
            first = "; ".join(f"{x['path']}: {x['reason']}" for x in report.skipped[:3])
            raise DataError(f"no usable image in '{report.source}' (format {report.format}); skipped by reason: "
                            f"{reasons}" + (f" (e.g. {first})" if first else ""),
                            "fix or replace the files listed, or point data.source at another folder")
        ds = ImageDataset(records, buckets, settings, report)
    if run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        ds.report.midrun_log = str(Path(run_dir) / MIDRUN_NAME)
        ds.report.write(run_dir)
    if echo is not None:
        echo(ds.report.summary())
    return ds


def open_for_training(cfg: Any, run_dir: str | Path | None) -> tuple[Any, Callable[[int], list[list[int]]]]:
    """A folder dataset validated before any model loads, and each epoch's bucketed batches.

    Captions are kept whole: guidance dropout belongs to the training job (it must also reach cached
    text embeddings). Batches hold stream indices ``epoch * len + i`` (per-epoch flips and crops).
    """
    no_drop = copy.deepcopy(cfg)
    no_drop.data.caption_dropout = 0.0
    ds = build_dataset(no_drop, resolution=cfg.data.resolution, run_dir=run_dir)
    n = len(ds)
    sampler = ds.make_sampler(cfg.train.batch_size, seed=cfg.run.seed, drop_last=True)

    def epoch_batches(epoch: int) -> list[list[int]]:
        return [[epoch * n + i for i in b] for b in sampler.batches(epoch)]

    return ds, epoch_batches
