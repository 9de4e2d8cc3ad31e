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
import os
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import ImageColor
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError
from . import images, masks
from .buckets import Bucket, BucketBatchSampler, effective_step, make_buckets, nearest_bucket
from .captions import MISSING_CAPTION_RULES, CaptionRules, fallback_caption
from .images import ImageProblem
from .report import BAD_MASK, MIDRUN_NAME, NO_CAPTION, DataReport, known_from
from .sources import Candidate, list_source

log = logging.getLogger("lowvram.data")
VALIDATION_VERSION = 1  # bump when check_image's verdicts change meaning


@dataclass(frozen=True)
class DataSettings:
    """Every data knob, read from ``cfg.data`` with defaults for fields config.py does not have yet."""

    source: str = "builtin"
    format: str = "auto"
    resolution: int = 32
    num_images: int = 4096
    caption_dropout: float = 0.0
    flip: bool = False
    workers: int = 0
    caption_ext: str = ".txt"
    crop: str = "center"
    buckets: bool = True
    bucket_step: int = 64
    bucket_max_ratio: float = 4.0
    keep_tokens: int = 0
    shuffle_tags: bool = False
    caption_prefix: str = ""
    caption_suffix: str = ""
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    min_size: int = images.DEFAULT_MIN_SIZE
    background: str = "white"
    celeba_split: str = "train"
    missing_caption: str = "auto"
    cache_dir: str = ""
    masked_loss: str = "auto"
    mask_dir: str = ""
    builtin_exclude: tuple[str, ...] = ()
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: Any, *, resolution: int | None = None) -> DataSettings:
        """From a RunConfig (uses ``cfg.data`` and ``cfg.run.seed``) or a DataSection alone.

        ``data.resolution = None`` means "the model's": pass it as ``resolution`` (else 32 is used).
        """
        data = getattr(cfg, "data", cfg)
        run = getattr(cfg, "run", None)
        values = {f: getattr(data, f) for f in cls.__dataclass_fields__ if hasattr(data, f)}
        values = {k: v for k, v in values.items() if v is not None}  # None: "use the default"
        if "builtin_exclude" in values:
            values["builtin_exclude"] = tuple(values["builtin_exclude"])
        if resolution is not None:
            values["resolution"] = resolution
        if run is not None and hasattr(run, "seed"):
            values["seed"] = run.seed
        out = cls(**values)
        out.check()
        return out

    def check(self) -> None:
        problems = []
        if self.crop not in ("center", "random"):
            problems.append(f"data.crop = {self.crop!r}: expected center or random")
        if self.masked_loss not in masks.MASKED_LOSS:
            problems.append(f"data.masked_loss = {self.masked_loss!r}: expected one of " + ", ".join(masks.MASKED_LOSS))
        if self.mask_dir and not Path(self.mask_dir).expanduser().is_dir():
            problems.append(f"data.mask_dir = {self.mask_dir!r}: not a folder")
        if self.missing_caption not in MISSING_CAPTION_RULES:
            problems.append(f"data.missing_caption = {self.missing_caption!r}: expected one of "
                            + ", ".join(MISSING_CAPTION_RULES))
        if self.bucket_step < 8 or self.bucket_step % 8:
            problems.append(f"data.bucket_step = {self.bucket_step}: expected a multiple of 8")
        if self.keep_tokens < 0:
            problems.append(f"data.keep_tokens = {self.keep_tokens}: expected 0 or more")
        if self.max_pixels <= 0 or self.min_size < 0:
            problems.append("data.max_pixels must be above 0 and data.min_size 0 or more")
        try:
            self.background_rgb()
        except ValueError:
            problems.append(f"data.background = {self.background!r}: expected a colour name, #rrggbb or r,g,b")
        if problems:
            raise DataError("invalid data settings: " + "; ".join(problems), "fix these data.* values")

    def background_rgb(self) -> tuple[int, int, int]:
        text = self.background.strip()
        if "," in text:
            parts = tuple(int(p) for p in text.split(","))
            if len(parts) != 3 or not all(0 <= p <= 255 for p in parts):
                raise ValueError(text)
            return parts  # type: ignore[return-value]
        return ImageColor.getrgb(text)[:3]

    def caption_rules(self) -> CaptionRules:
        return CaptionRules(self.caption_dropout, self.shuffle_tags, self.keep_tokens,
                            self.caption_prefix, self.caption_suffix)


@dataclass
class ImageRecord:
    """One usable image file (validated up front)."""

    path: str
    rel: str
    caption: str
    sha256: str
    width: int
    height: int
    bucket: int
    repeats: int = 1
    mask: str = ""  # the loss mask: a mask file, masks.ALPHA (its own transparency) or "" (none)
    mask_id: str = ""  # the mask's content identity (its file's sha256; the image's for alpha)


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


# --- scanning and validation --------------------------------------------------------------------------


@dataclass
class _Verdict:
    sha256: str
    entry: dict[str, Any] = field(default_factory=dict)  # the "validated" table entry


def _validate_one(c: Candidate, s: DataSettings, validated: dict, files: dict) -> _Verdict | ImageProblem:
    try:
        st = os.stat(c.path)
    except OSError as e:
        return ImageProblem(images.UNREADABLE, str(e))
    memo = files.get(c.rel)
    if isinstance(memo, list) and len(memo) == 3 and memo[:2] == [st.st_size, st.st_mtime_ns]:
        sha = memo[2]
    else:
        try:
            sha = images.file_sha256(c.path) if st.st_size else "empty"
        except OSError as e:
            return ImageProblem(images.UNREADABLE, str(e))
    entry = validated.get(sha)
    fresh = (isinstance(entry, dict) and entry.get("v") == VALIDATION_VERSION
             and not (entry.get("reason") == images.TOO_LARGE and s.max_pixels > entry.get("max_pixels", 0)))
    if not fresh:
        try:
            info = images.check_image(c.path, max_pixels=s.max_pixels, min_size=0, full=True)
            entry = {"v": VALIDATION_VERSION, "ok": True, "w": info.width, "h": info.height,
                     "format": info.format, "notes": info.notes}
        except ImageProblem as e:
            entry = {"v": VALIDATION_VERSION, "ok": False, "reason": e.reason, "detail": e.detail,
                     "max_pixels": s.max_pixels}
    return _Verdict(sha, entry)


def _apply_limits(entry: dict[str, Any], s: DataSettings) -> ImageProblem | None:
    """Size limits are re-applied on every run, so changing them never needs a re-decode."""
    if not entry.get("ok"):
        return ImageProblem(entry.get("reason", images.CORRUPT), entry.get("detail", ""))
    w, h = entry["w"], entry["h"]
    if w * h > s.max_pixels:
        return ImageProblem(images.TOO_LARGE, f"{w}x{h} = {w * h} pixels, over data.max_pixels = {s.max_pixels}")
    if min(w, h) < s.min_size:
        return ImageProblem(images.TOO_SMALL, f"{w}x{h}, shorter side below data.min_size = {s.min_size}")
    return None


def scan_folder(settings: DataSettings, *, known: str | Path | None = None, threads: int | None = None,
                progress: bool = True, default_caption: str = "") -> tuple[list[ImageRecord], list[Bucket], DataReport]:
    """List, validate (header + full decode, memoised by content hash) and bucket every image of a folder.

    ``default_caption`` (e.g. data.class_prompt for class images) captions images without one, before
    the data.missing_caption rule."""
    s = settings
    root = Path(s.source).expanduser()
    report = DataReport(source=str(root), settings=asdict(s))
    fmt, candidates = list_source(root, s.format, report, caption_ext=s.caption_ext, celeba_split=s.celeba_split)
    report.format = fmt
    candidates, mask_files = _with_masks(candidates, s, root)
    validated, files = known_from(known, str(root))
    threads = threads or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=threads) as pool:  # Pillow releases the GIL while decoding
        mask_results = pool.map(lambda c: _validate_one(c, s, validated, files), mask_files.values())
        results = pool.map(lambda c: _validate_one(c, s, validated, files), candidates)
        if progress and len(candidates) >= 500:
            from tqdm import tqdm

            results = tqdm(results, total=len(candidates), desc="checking images", unit="img")
        verdicts = list(results)
        mask_verdicts = dict(zip(mask_files, mask_results, strict=True))

    if s.buckets:
        buckets = make_buckets(s.resolution, effective_step(s.resolution, s.bucket_step), s.bucket_max_ratio)
    else:
        buckets = [(s.resolution, s.resolution)]
    records: list[ImageRecord] = []
    for c, v in zip(candidates, verdicts, strict=True):
        if isinstance(v, ImageProblem):
            report.skip(c.rel, v.reason, v.detail)
            continue
        report.validated[v.sha256] = v.entry
        st = os.stat(c.path)
        report.files[c.rel] = [st.st_size, st.st_mtime_ns, v.sha256]
        problem = _apply_limits(v.entry, s)
        if problem is not None:
            report.skip(c.rel, problem.reason, problem.detail)
            continue
        for kind, detail in v.entry.get("notes", []):
            report.warn(c.rel, kind, detail)
        caption = _caption_for(c, s, report, default_caption)
        if caption is None:
            continue
        w, h = v.entry["w"], v.entry["h"]
        mask = _mask_of(c, v, mask_files.get(c.rel), mask_verdicts.get(c.rel), s, report)
        if mask is None:
            continue
        bucket = nearest_bucket(w, h, buckets) if s.buckets else 0
        records.append(ImageRecord(str(c.path), c.rel, caption, v.sha256, w, h, bucket, c.repeats, *mask))
    report.used = len(records)
    report.samples = sum(r.repeats for r in records)
    report.masks = sum(1 for r in records if r.mask)
    for b in sorted({r.bucket for r in records}):
        report.buckets[f"{buckets[b][0]}x{buckets[b][1]}"] = sum(1 for r in records if r.bucket == b)
    return records, buckets, report


def _with_masks(candidates: list[Candidate], s: DataSettings, root: Path) -> tuple[list[Candidate], dict[str, Candidate]]:
    """The images (without those inside ``data.mask_dir``) and, per image ``rel``, its mask file to validate."""
    mask_root = Path(s.mask_dir).expanduser().resolve() if s.mask_dir else None
    if mask_root is not None:  # a mask folder inside the data folder holds masks, not training images
        candidates = [c for c in candidates if not c.path.resolve().is_relative_to(mask_root)]
    found: dict[str, Candidate] = {}
    if s.masked_loss != "off":
        in_mask_dir = masks.mask_dir_index(s.mask_dir)
        for c in candidates:
            path = masks.mask_file(c.path, c.rel, in_mask_dir)
            if path is not None:
                rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
                found[c.rel] = Candidate(path, rel, None)
    return candidates, found


def _mask_of(c: Candidate, v: _Verdict, mask: Candidate | None, verdict: _Verdict | ImageProblem | None,
             s: DataSettings, report: DataReport) -> tuple[str, str] | None:
    """(mask source, mask identity) of a usable image, ("", "") without a mask; None: skip the image."""
    if mask is None:
        if s.masked_loss == "alpha" and masks.has_alpha(c.path):
            return masks.ALPHA, f"{masks.ALPHA}:{v.sha256}"
        return "", ""
    assert verdict is not None  # every mask file found is validated with the images
    problem = verdict if isinstance(verdict, ImageProblem) else _apply_limits(verdict.entry, s)
    if problem is not None and problem.reason != images.TOO_SMALL:  # a small mask is stretched, not refused
        report.skip(c.rel, BAD_MASK, f"{mask.rel}: {problem.reason} ({problem.detail})")
        return None
    assert isinstance(verdict, _Verdict)
    report.validated[verdict.sha256] = verdict.entry
    st = os.stat(mask.path)
    report.files[mask.rel] = [st.st_size, st.st_mtime_ns, verdict.sha256]
    mw, mh, w, h = verdict.entry["w"], verdict.entry["h"], v.entry["w"], v.entry["h"]
    if (mw, mh) != (w, h):
        report.warn(mask.rel, "mask_size_mismatch", f"mask {mw}x{mh}, image {w}x{h}: the mask is stretched to the image")
    return str(mask.path), verdict.sha256


def _caption_for(c: Candidate, s: DataSettings, report: DataReport, default: str = "") -> str | None:
    if c.caption_warning:
        report.warn(c.rel, *c.caption_warning)
    if c.caption is not None:
        return c.caption
    if default:
        return default
    caption = fallback_caption(s.missing_caption, folder_caption=c.folder_caption, path=c.path)
    if caption is None:
        report.skip(c.rel, NO_CAPTION, "no caption and data.missing_caption = skip")
        return None
    if not c.caption_warning:
        report.warn(c.rel, "missing_caption", f"no caption; using {caption!r} (data.missing_caption = {s.missing_caption})")
    return caption


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
