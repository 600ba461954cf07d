"""Bucketed, mixed-resolution Grain pipeline over ArrayRecord image-caption shards (LENS_SPEC §5.5, §6.1).

Records are `lens_jax.data.records` msgpack maps (original encoded image + captions). One optimisation step
is a list of **micro-batches**, each of one base area (e.g. 512², 768², 1024²) and a fixed size
(`per_device_batch[area] * data_parallel_size` globally); the trainer accumulates gradients over them
(LENS_SPEC §5.5 "lens_jax design note (SPMD)").

Pipeline, per process and per base area (one Grain stream each):

  ArrayRecord shards --(process slice: records p, p+P, p+2P, ...)--> .seed(seed).shuffle().repeat()
    --> parse + area assignment (pure function of (seed, id) and the image size; mixture-weighted,
        falling back to a smaller area when the image is too small for the sampled one)
    --> for the records of this stream's area: validate, pick the bucket (nearest aspect ratio in log
        space), decode + cover-resize + centre-crop to the bucket, pick the caption
    --> to_iter_dataset(ReadOptions(num_threads, prefetch)) [--> mp_prefetch(num_workers) if > 0]
  The batcher (`ShardBatchIterator`, main thread) pulls elements until the micro-batch is full, counting
  skipped records by reason, so a fault never changes the batch shape.

Skipped and counted (never a crash): `unreadable` (an ArrayRecord read error), `bad_record` (not a valid
record), `corrupt` (image does not decode), `empty_caption`, `too_small` (image area < `min_area`).
A shard that cannot be opened (e.g. truncated) is left out with a warning and counted in `bad_shards`.

Micro-batch dict (local to this process; B = local micro-batch size, N = the area's max tokens):

  area          int             base side in pixels (e.g. 512)
  area_index    int             index into the bucket table's areas
  step          int             global optimisation step this micro-batch belongs to
  micro_batch   int             position within the step's list
  pixels        list of B np arrays [H_i, W_i, 3]: each image at its own bucket size; float32 in [-1, 1]
                (pixel_dtype='float32') or uint8 0..255 (pixel_dtype='uint8')
  bucket        int32 [B]       bucket index within the area (0..len(area buckets)-1)
  size          int32 [B, 2]    bucket (H, W) in pixels
  grid          int32 [B, 2]    token grid (h, w) = (H/16, W/16)
  num_tokens    int32 [B]       h * w valid image tokens
  img_pos       int32 [B, N, 3] token positions (mmdit.image_positions(h, w) then zeros), row-major
  img_mask      bool  [B, N]    True for the first h*w slots
  aspect        float32 [B]     bucket W / H
  orig_size     int32 [B, 2]    decoded image (H, W) before resize
  caption       list of B str   per `caption`: dense; brief (dense when a record has none); mixed (50/50
                                brief/dense, redrawn every epoch). Tokenisation is the text encoder's job.
  id            list of B str   record ids
  stats         dict            this micro-batch's counters (see `ShardBatchIterator`)

Iterator API: `it = iter(ShardPipeline(opts))` or `iter(build_pipeline(config.data, data_parallel=...,
seed=...))`; `next(it)` -> list of micro-batch dicts for the next step (`StepPlan` order: by area);
`it.get_state()` / `it.set_state(s)` (JSON-able; also `save_state(path)` / `restore_state(path)` and Orbax
via `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)`); `it.metrics()` cumulative counters;
`step_metrics(micro_batches)` one step's; `it.close()`.

The trainer VAE-encodes `pixels` (e.g. `encode_micro_batch(batch, encode_fn)`, grouping by bucket) into
tokens [B, N, C] padded with zeros where `img_mask` is False (`tokens_from_latents`), encodes `caption`
with the text encoder, and turns the arrays into global `jax.Array`s with `to_global_arrays`.
"""
from __future__ import annotations

import bisect
import collections
import glob
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from lens_jax.data import buckets as buckets_lib
from lens_jax.data.records import RecordError, decode_record

log = logging.getLogger(__name__)

#: Reasons a record is skipped (counted, never raised).
SKIP_REASONS = ("unreadable", "bad_record", "corrupt", "empty_caption", "too_small")
CAPTION_MODES = ("dense", "brief", "mixed")
PIXEL_DTYPES = ("float32", "uint8")
STATE_VERSION = 1

_VALID, _SKIP, _OTHER = 0, 1, 2


# ============================================================================= shards and sources

def list_shard_files(path: Union[str, Sequence[str]]) -> List[str]:
    """The shard files of a directory (the shard writer's manifest when there is one, else *.array_record,
    sorted) or an explicit list of files."""
    if not isinstance(path, str):
        files = [str(p) for p in path]
        if not files:
            raise FileNotFoundError("no shard files given")
        return files
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"shard path {path!r} is neither a directory nor a file")
    files = None
    if os.path.exists(os.path.join(path, "manifest.json")):
        try:
            from lens_jax.data import shard_writer
        except ImportError:
            shard_writer = None
        if shard_writer is not None:
            try:
                files = [str(f) for f in shard_writer.list_shards(path)]
            except FileNotFoundError as e:
                # Listed shards are missing: keep every listed file, so the missing ones are counted as bad
                # shards when opened instead of silently shrinking the dataset.
                log.warning("%s", e)
                try:
                    m = shard_writer.read_manifest(path)
                    files = [os.path.join(path, s["file"]) for s in m["shards"] if s.get("records", 1) > 0]
                except Exception:  # noqa: BLE001 - unreadable manifest: fall back to the glob
                    files = None
            except Exception as e:  # noqa: BLE001 - an unreadable manifest falls back to the glob
                log.warning("cannot use %s/manifest.json (%s); globbing *.array_record", path, e)
                files = None
    if files is None:
        files = sorted(glob.glob(os.path.join(path, "*.array_record")))
    if not files:
        raise FileNotFoundError(f"no *.array_record shards in {path!r}")
    return files


class RecordSource:
    """Random access over the records of several shards, robust to bad shards and bad reads.

    Shards that fail to open (truncated, not ArrayRecord) are left out (`bad_shards`). `source[i]` returns
    `(i, record bytes)` or `(i, None)` when the read fails (counted downstream as `unreadable`).
    """

    def __init__(self, files: Sequence[str]):
        from grain.sources import ArrayRecordDataSource
        self.files: List[str] = []
        self.bad_shards: List[Tuple[str, str]] = []
        self._sources = []
        self._starts = [0]
        for f in files:
            try:
                src = ArrayRecordDataSource([f])
                n = len(src)
            except Exception as e:  # noqa: BLE001 - riegeli raises RuntimeError / OSError
                msg = f"{type(e).__name__}: {str(e)[:200]}"
                log.warning("skipping shard %s: %s", f, msg)
                self.bad_shards.append((f, msg))
                continue
            self.files.append(f)
            self._sources.append(src)
            self._starts.append(self._starts[-1] + n)

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int):
        index = int(index) % len(self)
        k = bisect.bisect_right(self._starts, index) - 1
        try:
            data = self._sources[k][index - self._starts[k]]
        except Exception as e:  # noqa: BLE001 - a corrupt chunk raises RuntimeError
            log.debug("unreadable record %d of %s: %s", index - self._starts[k], self.files[k], e)
            data = None
        return index, data


def process_indices(num_records: int, process_index: int, process_count: int) -> range:
    """Record indices read by one process: a stride-P slice (disjoint and complete over processes)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, {process_count})")
    return range(process_index, num_records, process_count)


# ============================================================================= determinism helpers

def _unit_hash(*parts) -> float:
    """A uniform number in [0, 1) from the parts; identical on every host and Python run."""
    h = hashlib.blake2b(":".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0 ** 64


def _fractions(weights: Sequence[float]) -> List[Fraction]:
    fr = [Fraction(w).limit_denominator(10 ** 6) for w in weights]
    if any(f < 0 for f in fr) or sum(fr) <= 0:
        raise ValueError(f"area weights {tuple(weights)} must be >= 0 with a positive sum")
    return fr


class StepPlan:
    """Which micro-batches make up global step s: a pure function of (seed, step).

    K = `micro_batches_per_step` slots (default: the number of areas with a positive weight) are shared
    among the areas by weight: area a gets floor(K w_a / W) slots plus, for the fractional remainders, a
    seeded systematic draw (so its expected count is exactly K w_a / W). Equal weights with the default K
    give exactly one micro-batch per area every step; (1, 0, 0) gives one 512² micro-batch per step.
    The list is ordered by area; each entry is (area index, global micro-batch size).
    """

    def __init__(self, seed: int, weights: Sequence[float], global_sizes: Sequence[int],
                 micro_batches_per_step: int = 0):
        if len(weights) != len(global_sizes):
            raise ValueError(f"{len(weights)} area weights for {len(global_sizes)} areas")
        self.seed = int(seed)
        self.weights = _fractions(weights)
        self.global_sizes = tuple(int(s) for s in global_sizes)
        self.k = int(micro_batches_per_step) or sum(1 for w in self.weights if w > 0)
        if self.k <= 0:
            raise ValueError("micro_batches_per_step must be positive")
        total = sum(self.weights)
        self.quotas = [self.k * w / total for w in self.weights]          # expected micro-batches per step
        self._base = [int(math.floor(q)) for q in self.quotas]
        self._frac = [q - b for q, b in zip(self.quotas, self._base)]
        self._extra = self.k - sum(self._base)                             # == sum(frac), an integer

    def counts(self, step: int) -> List[int]:
        counts = list(self._base)
        if self._extra:
            u = _unit_hash(self.seed, "plan", int(step))
            points = [u + j for j in range(self._extra)]
            lo = Fraction(0)
            for a, f in enumerate(self._frac):
                hi = lo + f
                counts[a] += sum(1 for p in points if lo <= p < hi)
                lo = hi
        return counts

    def __call__(self, step: int) -> List[Tuple[int, int]]:
        return [(a, self.global_sizes[a]) for a, c in enumerate(self.counts(step)) for _ in range(c)]

    def images_per_step(self) -> List[float]:
        """Expected images per step per area (global)."""
        return [float(q) * s for q, s in zip(self.quotas, self.global_sizes)]


def area_probabilities(plan: StepPlan) -> List[float]:
    """Share of the records assigned to each area: proportional to the images each area consumes per
    step, so all area streams go through their records at the same rate."""
    ips = plan.images_per_step()
    t = sum(ips)
    return [x / t for x in ips]


def assign_area(seed: int, example_id: str, width: int, height: int, probs: Sequence[float],
                sides: Sequence[int], max_upscale: float = 1.0) -> int:
    """The base area an example is used at: sampled from `probs` by a hash of (seed, id), then moved to
    the largest smaller area the image fits (w*h*max_upscale² >= side²); the smallest area takes the rest."""
    u = _unit_hash(seed, "area", example_id)
    a, acc = len(probs) - 1, 0.0
    for i, p in enumerate(probs):
        acc += p
        if u < acc and p > 0:
            a = i
            break
    while a > 0 and (width * height * max_upscale ** 2 < sides[a] ** 2 or probs[a] <= 0):
        a -= 1
    return a


# ============================================================================= per-example transform

@dataclass(frozen=True)
class _StreamSpec:
    area: int
    seed: int
    sides: Tuple[int, ...]
    buckets: Tuple[Tuple[int, int], ...]     # this area's buckets
    probs: Tuple[float, ...]
    min_area: int
    max_upscale: float
    caption: str
    jpeg_draft: bool
    pixel_dtype: str


def _owner(spec: _StreamSpec, key: str) -> int:
    """Area that counts a record with no usable id/size (so every fault is counted exactly once)."""
    return assign_area(spec.seed, key, 1 << 30, 1 << 30, spec.probs, spec.sides, 1.0)


class PrepareExample:
    """Grain RandomMap: (index, bytes | None) -> a valid example, a counted skip, or 'other area'."""

    def __init__(self, spec: _StreamSpec):
        self.spec = spec

    def _skip(self, reason: str, key: str):
        return {"kind": _SKIP, "reason": reason, "id": key}

    def __call__(self, item, rng: Optional[np.random.Generator] = None):
        s = self.spec
        index, data = item
        key = f"#{index}"
        if data is None:
            return self._skip("unreadable", key) if _owner(s, key) == s.area else {"kind": _OTHER}
        try:
            rec = decode_record(data)
        except RecordError:
            return self._skip("bad_record", key) if _owner(s, key) == s.area else {"kind": _OTHER}
        rid = rec["id"]
        if assign_area(s.seed, rid, rec["width"], rec["height"], s.probs, s.sides, s.max_upscale) != s.area:
            return {"kind": _OTHER}
        if rec["width"] * rec["height"] < s.min_area:
            return self._skip("too_small", rid)
        dense, brief = rec["caption"].strip(), rec["brief"].strip()
        if s.caption == "brief":
            caption = brief or dense
        elif s.caption == "mixed":
            use_brief = (rng.random() < 0.5) if rng is not None else (_unit_hash(s.seed, "cap", rid) < 0.5)
            caption = (brief or dense) if use_brief else dense
        else:
            caption = dense
        if not caption:
            return self._skip("empty_caption", rid)
        try:
            opened = buckets_lib.open_image(rec["image"])
            w, h = opened[1]
            if w * h < s.min_area:
                return self._skip("too_small", rid)
            b = buckets_lib.assign_bucket(w, h, s.buckets)
            bw, bh = s.buckets[b]
            px = buckets_lib.decode_resize(rec["image"], bw, bh, draft=s.jpeg_draft, opened=opened)
        except Exception:  # noqa: BLE001 - PIL raises many types on corrupt / truncated data
            return self._skip("corrupt", rid)
        if s.pixel_dtype == "float32":
            px = px.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)
        return {"kind": _VALID, "id": rid, "pixels": px, "bucket": b, "orig_size": (h, w), "caption": caption}


# ============================================================================= batches

def collate(examples: Sequence[dict], table: buckets_lib.BucketTable, area: int) -> Dict[str, Any]:
    """Valid examples of one area -> the micro-batch dict (module docstring), without `stats`."""
    n_max = table.max_tokens(area)
    bs = table.buckets[area]
    b = len(examples)
    pos = np.zeros((b, n_max, 3), np.int32)
    mask = np.zeros((b, n_max), bool)
    size = np.zeros((b, 2), np.int32)
    grid = np.zeros((b, 2), np.int32)
    for i, ex in enumerate(examples):
        w, h = bs[ex["bucket"]]
        pos[i], mask[i] = buckets_lib.bucket_positions(w, h, n_max)
        size[i] = (h, w)
        grid[i] = buckets_lib.token_grid(w, h)
    return {
        "area": int(table.sides[area]),
        "area_index": int(area),
        "pixels": [ex["pixels"] for ex in examples],
        "bucket": np.array([ex["bucket"] for ex in examples], np.int32),
        "size": size,
        "grid": grid,
        "num_tokens": (grid[:, 0] * grid[:, 1]).astype(np.int32),
        "img_pos": pos,
        "img_mask": mask,
        "aspect": (size[:, 1] / size[:, 0]).astype(np.float32),
        "orig_size": np.array([ex["orig_size"] for ex in examples], np.int32).reshape(b, 2),
        "caption": [ex["caption"] for ex in examples],
        "id": [ex["id"] for ex in examples],
    }


def tokens_from_latents(latent_tokens: Sequence[np.ndarray], n_max: int, dtype=np.float32) -> np.ndarray:
    """Per-example token arrays [n_i, C] (row-major h x w grids) -> [B, n_max, C], zeros in padded slots."""
    if not latent_tokens:
        raise ValueError("no examples")
    c = latent_tokens[0].shape[-1]
    out = np.zeros((len(latent_tokens), n_max, c), dtype)
    for i, t in enumerate(latent_tokens):
        t = np.asarray(t).reshape(-1, c)
        if t.shape[0] > n_max:
            raise ValueError(f"example {i} has {t.shape[0]} tokens > n_max {n_max}")
        out[i, :t.shape[0]] = t
    return out


def group_by_bucket(batch: Dict[str, Any]) -> List[Tuple[int, np.ndarray, np.ndarray]]:
    """[(bucket, example indices, stacked pixels [n, H, W, 3])] in bucket order: one VAE shape per group."""
    out = []
    for b in sorted(set(int(x) for x in batch["bucket"])):
        idx = np.nonzero(batch["bucket"] == b)[0]
        out.append((b, idx, np.stack([batch["pixels"][i] for i in idx])))
    return out


def encode_micro_batch(batch: Dict[str, Any], encode_fn: Callable[[np.ndarray], Any],
                       per_example: bool = False) -> np.ndarray:
    """VAE-encode a micro-batch's images into padded tokens [B, N, C] (zeros where img_mask is False).

    `encode_fn(pixels [n, H, W, 3]) -> tokens [n, (H/16)(W/16), C]` (e.g. `vae.encode_to_tokens` bound to
    the model). Groups share a bucket (one shape each); `per_example=True` encodes one image per call
    instead, so at most one executable per bucket is ever compiled (group sizes vary between batches).
    """
    n_max = batch["img_mask"].shape[1]
    toks: List[Optional[np.ndarray]] = [None] * len(batch["pixels"])
    if per_example:
        for i, px in enumerate(batch["pixels"]):
            toks[i] = np.asarray(encode_fn(px[None]))[0]
    else:
        for _, idx, px in group_by_bucket(batch):
            enc = np.asarray(encode_fn(px))
            for j, i in enumerate(idx):
                toks[i] = enc[j]
    for i, t in enumerate(toks):
        if t.shape[0] != int(batch["num_tokens"][i]):
            raise ValueError(f"example {i}: encoder gave {t.shape[0]} tokens, grid has {batch['num_tokens'][i]}")
    return tokens_from_latents(toks, n_max, toks[0].dtype)


def to_global_arrays(local_batch: Dict[str, Any], mesh) -> Dict[str, Any]:
    """The array entries of a process-local batch as global jax.Arrays, batch axis over the data axes.

    Only numpy / jax arrays with a leading batch axis are converted (lists of pixels, captions, ids and
    stats stay on the host and are left out). Every process must call this with its own local batch.
    """
    import jax
    from lens_jax.train.sharding import batch_sharding
    out = {}
    for k, v in local_batch.items():
        if isinstance(v, (np.ndarray, jax.Array)) and getattr(v, "ndim", 0) >= 1:
            out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), np.asarray(v))
    return out


# ============================================================================= options

@dataclass(frozen=True)
class PipelineOptions:
    """Everything the pipeline needs; `PipelineOptions.from_config(config.data, ...)` reads the config."""
    paths: Union[str, Tuple[str, ...]]
    table: buckets_lib.BucketTable
    per_device_batch: Tuple[int, ...]
    data_parallel: int = 1
    process_index: int = 0
    process_count: int = 1
    seed: int = 0
    area_mixture: Tuple[float, ...] = ()         # () = equal weights
    micro_batches_per_step: int = 0              # 0 = number of areas with a positive weight
    caption: str = "dense"
    min_area: int = 384 ** 2
    max_upscale: float = 1.0
    num_threads: int = 0                         # 0 = min(16, cpu count)
    prefetch: int = 64                           # elements buffered per area stream
    num_workers: int = 0                         # > 0: grain mp_prefetch worker processes per stream
    jpeg_draft: bool = True
    pixel_dtype: str = "float32"

    @classmethod
    def from_config(cls, data, *, data_parallel: int = 1, process_index: Optional[int] = None,
                    process_count: Optional[int] = None, seed: int = 0,
                    paths: Union[None, str, Sequence[str]] = None) -> "PipelineOptions":
        if process_index is None or process_count is None:
            import jax
            process_index, process_count = jax.process_index(), jax.process_count()
        table = buckets_lib.bucket_table(data.buckets, data.resolution)
        get = data.get if hasattr(data, "get") else (lambda k, d=None: getattr(data, k, d))
        return cls(
            paths=paths if paths is not None else data.path,
            table=table,
            per_device_batch=tuple(int(b) for b in data.per_device_batch),
            data_parallel=int(data_parallel), process_index=int(process_index), process_count=int(process_count),
            seed=int(seed),
            area_mixture=tuple(float(w) for w in (get("area_mixture", ()) or ())),
            micro_batches_per_step=int(get("micro_batches_per_step", 0) or 0),
            caption=str(data.caption),
            min_area=int(get("min_area", 384 ** 2)),
            max_upscale=float(get("max_upscale", 1.0)),
            num_threads=int(get("num_threads", 0) or 0),
            prefetch=int(get("prefetch", 64)),
            num_workers=int(get("num_workers", 0) or 0),
            jpeg_draft=bool(get("jpeg_draft", True)),
            pixel_dtype=str(get("pixel_dtype", "float32")),
        )

    def validate(self) -> None:
        a = self.table.num_areas
        if len(self.per_device_batch) != a:
            raise ValueError(f"per_device_batch {self.per_device_batch} has {len(self.per_device_batch)} entries; "
                             f"the bucket table has {a} base areas {self.table.sides}")
        if self.area_mixture and len(self.area_mixture) != a:
            raise ValueError(f"area_mixture {self.area_mixture} needs {a} weights (areas {self.table.sides})")
        for b in self.per_device_batch:
            if b <= 0 or (b * self.data_parallel) % self.process_count:
                raise ValueError(f"global micro-batch {b} x {self.data_parallel} is not divisible by "
                                 f"{self.process_count} processes")
        if self.caption not in CAPTION_MODES:
            raise ValueError(f"caption {self.caption!r}; choose one of {CAPTION_MODES}")
        if self.pixel_dtype not in PIXEL_DTYPES:
            raise ValueError(f"pixel_dtype {self.pixel_dtype!r}; choose one of {PIXEL_DTYPES}")
        if self.max_upscale <= 0 or self.min_area < 0 or self.prefetch <= 0:
            raise ValueError("max_upscale and prefetch must be positive, min_area >= 0")

    def weights(self) -> Tuple[float, ...]:
        return self.area_mixture or (1.0,) * self.table.num_areas

    def global_sizes(self) -> Tuple[int, ...]:
        return tuple(b * self.data_parallel for b in self.per_device_batch)

    def local_sizes(self) -> Tuple[int, ...]:
        return tuple(g // self.process_count for g in self.global_sizes())


# ============================================================================= the iterator

def _zero_totals(table: buckets_lib.BucketTable) -> Dict[str, Any]:
    return {
        "records": [0] * table.num_areas,          # elements of each area's stream consumed (valid + skipped)
        "examples": [0] * table.num_areas,         # examples delivered
        "skipped": {r: 0 for r in SKIP_REASONS},
        "buckets": {lab: 0 for lab in table.labels()},
        "token_slots": [0] * table.num_areas,
        "valid_tokens": [0] * table.num_areas,
    }


class ShardBatchIterator:
    """Yields, per global step, the list of this process's micro-batches (`StepPlan` order).

    State (`get_state()`, JSON-able; `set_state(state)`): the step, each area stream's Grain iterator
    state and the cumulative counters. A restored iterator continues exactly where the saved one stopped.
    Also a `grain.DatasetIterator` (see `make_iterator`), so `grain.checkpoint.CheckpointSave(it)` /
    `CheckpointRestore(it)` store it as an Orbax item.

    Per micro-batch `stats`: step, area, records (elements of the area stream consumed), skipped
    {reason: n}, buckets {label: n}, tokens (valid), token_slots (B*N), padding_fraction.
    `metrics()` flattens the cumulative counters (plus `bad_shards`) for metrics.jsonl.
    """

    def __init__(self, pipeline: "ShardPipeline", num_steps: Optional[int] = None):
        self.p = pipeline
        self.num_steps = num_steps
        self.step = 0
        self.totals = _zero_totals(pipeline.opts.table)
        self._iters = {a: iter(ds) for a, ds in pipeline.streams.items()}

    # ---------------------------------------------------------------- iteration
    def __iter__(self):
        return self

    def __next__(self) -> List[Dict[str, Any]]:
        if self.num_steps is not None and self.step >= self.num_steps:
            raise StopIteration
        plan = self.p.plan(self.step)
        out = []
        for j, (area, gsize) in enumerate(plan):
            mb = self._micro_batch(area, gsize // self.p.opts.process_count)
            mb["step"], mb["micro_batch"] = self.step, j
            mb["stats"]["step"] = self.step
            out.append(mb)
        self.step += 1
        return out

    def _micro_batch(self, area: int, size: int) -> Dict[str, Any]:
        it = self._iters[area]
        table = self.p.opts.table
        examples, skipped = [], collections.Counter()
        records = misses = 0
        limit = 2 * len(self.p.source) + 1      # an area's records can sit at the start of one epoch, end of next
        while len(examples) < size:
            el = next(it)
            kind = el["kind"]
            if kind == _VALID:
                examples.append(el)
                records += 1
                misses = 0
                continue
            if kind == _SKIP:
                skipped[el["reason"]] += 1
                records += 1
            misses += 1
            if misses > limit:
                raise RuntimeError(
                    f"base area {table.sides[area]}: no usable example in two passes over the {len(self.p.source)} "
                    f"records of process {self.p.opts.process_index} (skipped so far: {dict(skipped)}); "
                    "check data.min_area / max_upscale / area_mixture against the data")
        mb = collate(examples, table, area)
        n_max = table.max_tokens(area)
        tokens = int(mb["num_tokens"].sum())
        slots = size * n_max
        hist = collections.Counter(table.label(area, int(b)) for b in mb["bucket"])
        mb["stats"] = {
            "area": int(table.sides[area]),
            "records": records,
            "skipped": {r: int(skipped.get(r, 0)) for r in SKIP_REASONS},
            "buckets": dict(sorted(hist.items())),
            "tokens": tokens,
            "token_slots": slots,
            "padding_fraction": 1.0 - tokens / slots,
        }
        t = self.totals
        t["records"][area] += records
        t["examples"][area] += size
        for r in SKIP_REASONS:
            t["skipped"][r] += int(skipped.get(r, 0))
        for lab, n in hist.items():
            t["buckets"][lab] += n
        t["token_slots"][area] += slots
        t["valid_tokens"][area] += tokens
        return mb

    # ---------------------------------------------------------------- state
    def get_state(self) -> Dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "step": int(self.step),
            "fingerprint": self.p.fingerprint(),
            "streams": {str(a): it.get_state() for a, it in self._iters.items()},
            "totals": json.loads(json.dumps(self.totals)),
        }

    def set_state(self, state: Dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')!r}; expected {STATE_VERSION}")
        fp = self.p.fingerprint()
        if state.get("fingerprint") != fp:
            raise ValueError(f"data iterator state was saved for a different pipeline: {state.get('fingerprint')} "
                             f"vs now {fp} (shards, seed, buckets, batch sizes or process layout changed)")
        for a, it in self._iters.items():
            it.set_state(state["streams"][str(a)])
        self.step = int(state["step"])
        self.totals = json.loads(json.dumps(state["totals"]))

    def save_state(self, path: str) -> None:
        """Writes `get_state()` as JSON (atomically)."""
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.get_state(), f)
        os.replace(tmp, path)

    def restore_state(self, path: str) -> None:
        with open(path) as f:
            self.set_state(json.load(f))

    def start_prefetch(self) -> None:
        for it in self._iters.values():
            if hasattr(it, "start_prefetch"):
                it.start_prefetch()

    def close(self) -> None:
        for it in self._iters.values():
            if hasattr(it, "close"):
                it.close()

    # ---------------------------------------------------------------- metrics
    def metrics(self, prefix: str = "data/") -> Dict[str, float]:
        """Cumulative counters, flat: padding fraction (all and per area), skipped per reason, bucket
        histogram, examples per area, bad shards."""
        t, table = self.totals, self.p.opts.table
        m = {f"{prefix}bad_shards": len(self.p.source.bad_shards)}
        slots, valid = sum(t["token_slots"]), sum(t["valid_tokens"])
        m[f"{prefix}padding_fraction"] = 1.0 - valid / slots if slots else 0.0
        for a, side in enumerate(table.sides):
            if t["token_slots"][a]:
                m[f"{prefix}padding_fraction/{side}"] = 1.0 - t["valid_tokens"][a] / t["token_slots"][a]
            m[f"{prefix}examples/{side}"] = t["examples"][a]
        for r in SKIP_REASONS:
            m[f"{prefix}skipped/{r}"] = t["skipped"][r]
        m[f"{prefix}skipped/total"] = sum(t["skipped"].values())
        for lab, n in t["buckets"].items():
            m[f"{prefix}bucket/{lab}"] = n
        return m


def step_metrics(micro_batches: Sequence[Dict[str, Any]], prefix: str = "data/step_") -> Dict[str, float]:
    """One step's counters, flat (for metrics.jsonl): padding fraction, skipped, examples per area."""
    slots = sum(mb["stats"]["token_slots"] for mb in micro_batches)
    tokens = sum(mb["stats"]["tokens"] for mb in micro_batches)
    m = {f"{prefix}padding_fraction": 1.0 - tokens / slots if slots else 0.0,
         f"{prefix}image_tokens": tokens,
         f"{prefix}skipped": sum(sum(mb["stats"]["skipped"].values()) for mb in micro_batches)}
    for mb in micro_batches:
        k = f"{prefix}examples/{mb['area']}"
        m[k] = m.get(k, 0) + len(mb["id"])
    return m


# ============================================================================= the pipeline

class ShardPipeline:
    """Builds the per-area Grain streams of one process; iterate with `iter(pipeline)`.

    `ShardPipeline(opts, num_steps=None)`; `iter()` returns a fresh `ShardBatchIterator` at step 0 (so the
    object can be handed to `grain.experimental.assert_equal_output_after_checkpoint`).
    """

    def __init__(self, opts: PipelineOptions, num_steps: Optional[int] = None):
        import grain
        opts.validate()
        self.opts = opts
        self.num_steps = num_steps
        self.files = list_shard_files(opts.paths)
        self.source = RecordSource(self.files)
        if len(self.source) == 0:
            raise FileNotFoundError(f"no readable records in {len(self.files)} shard(s) "
                                    f"({len(self.source.bad_shards)} could not be opened)")
        self.plan = StepPlan(opts.seed, opts.weights(), opts.global_sizes(), opts.micro_batches_per_step)
        self.probs = tuple(area_probabilities(self.plan))
        table = opts.table
        threads = opts.num_threads or min(16, os.cpu_count() or 1)
        self.streams = {}
        for a in range(table.num_areas):
            if self.plan.quotas[a] == 0:
                continue                                      # never scheduled: no stream
            spec = _StreamSpec(area=a, seed=opts.seed, sides=table.sides, buckets=table.buckets[a],
                               probs=self.probs, min_area=opts.min_area, max_upscale=opts.max_upscale,
                               caption=opts.caption, jpeg_draft=opts.jpeg_draft, pixel_dtype=opts.pixel_dtype)
            ds = grain.MapDataset.source(self.source)
            ds = ds.slice(slice(opts.process_index, None, opts.process_count))
            ds = ds.seed(opts.seed).shuffle().repeat().random_map(_GrainPrepare(spec))
            ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=opts.prefetch))
            if opts.num_workers > 0:
                _ensure_absl_flags_parsed()          # grain's workers read absl flags
                ids = ids.mp_prefetch(grain.MultiprocessingOptions(
                    num_workers=opts.num_workers, per_worker_buffer_size=max(1, opts.prefetch // opts.num_workers)))
            self.streams[a] = ids

    def fingerprint(self) -> Dict[str, Any]:
        o = self.opts
        fp = {"records": len(self.source), "shards": [os.path.basename(f) for f in self.source.files],
              "seed": o.seed, "buckets": o.table.labels(), "global_sizes": list(o.global_sizes()),
              "weights": [str(w) for w in self.plan.weights], "micro_batches_per_step": self.plan.k,
              "process": [o.process_index, o.process_count], "caption": o.caption, "min_area": o.min_area,
              "max_upscale": o.max_upscale}
        return json.loads(json.dumps(fp))          # the JSON form, so a restored state compares equal

    def __iter__(self) -> ShardBatchIterator:
        return make_iterator(self, self.num_steps)


def _ensure_absl_flags_parsed() -> None:
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _grain_prepare_base():
    import grain
    return grain.transforms.RandomMap


class _GrainPrepare(_grain_prepare_base()):
    """PrepareExample as a grain RandomMap (picklable for mp_prefetch workers)."""

    def __init__(self, spec: _StreamSpec):
        self.prepare = PrepareExample(spec)

    def random_map(self, element, rng: np.random.Generator):
        return self.prepare(element, rng)


def make_iterator(pipeline: ShardPipeline, num_steps: Optional[int] = None) -> ShardBatchIterator:
    """A `ShardBatchIterator` that is also a `grain.DatasetIterator` (Orbax `grain.checkpoint` support)."""
    return _GrainShardBatchIterator(pipeline, num_steps)


def _dataset_iterator_base():
    import grain
    return grain.DatasetIterator


class _GrainShardBatchIterator(ShardBatchIterator, _dataset_iterator_base()):
    def __init__(self, pipeline, num_steps=None):
        _dataset_iterator_base().__init__(self)
        ShardBatchIterator.__init__(self, pipeline, num_steps)

    def __next__(self):
        return ShardBatchIterator.__next__(self)

    def get_state(self):
        return ShardBatchIterator.get_state(self)

    def set_state(self, state):
        return ShardBatchIterator.set_state(self, state)

    def start_prefetch(self):
        return ShardBatchIterator.start_prefetch(self)

    def close(self):
        return ShardBatchIterator.close(self)


def build_pipeline(data_config, *, data_parallel: int = 1, seed: int = 0, process_index: Optional[int] = None,
                   process_count: Optional[int] = None, num_steps: Optional[int] = None,
                   paths=None) -> ShardPipeline:
    """The pipeline of `config.data` for this process (defaults: jax.process_index()/process_count())."""
    opts = PipelineOptions.from_config(data_config, data_parallel=data_parallel, process_index=process_index,
                                       process_count=process_count, seed=seed, paths=paths)
    return ShardPipeline(opts, num_steps=num_steps)
