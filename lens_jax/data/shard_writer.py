"""Build ArrayRecord shards of image-caption records (``lens_jax.data.records``) from raw inputs.

This is the data-preparation step in front of every real-data run (LENS_SPEC §5). It reads one of

* a folder of images plus a JSONL captions file (lines ``{"file": ..., "caption": ..., "brief": ...}``,
  optional ``"meta"``; ``file`` is relative to the folder),
* WebDataset-style tar shards (members grouped by key: an image ``KEY.jpg|png|webp|...`` plus a caption
  ``KEY.txt`` and/or ``KEY.json`` with ``caption``/``dense``/``text`` and optional ``brief``),
* Parquet files (image bytes column, or a Hugging Face ``{bytes, path}`` struct, plus caption columns;
  read by row groups in small batches), or
* the synthetic shapes world (``lens_jax.data.synthetic``; images PNG-encoded, meta = the scene JSON),

and writes ``shard-KKKKK-of-NNNNN.array_record`` files holding the **original encoded image bytes** (never
re-encoded), the dense and brief captions, the decoded width and height and a stable id.

Filters (spec §5.2 steps 1-2, which belong at this stage): every image is decoded with PIL (``verify`` then
``load``); unreadable images and images whose area is under ``min_area`` (384² for full-scale data) are
skipped and counted, as are items with an empty caption, a missing image file or a malformed captions entry.
Skip reasons are checked in this order: ``malformed_entry``, ``empty_caption``, ``missing_file``,
``unreadable``, ``too_small``. Nothing an input item contains can crash the build.

Work split: the inputs, in their natural order, are cut into fixed shards of ``records_per_shard`` input
items, so shard k always sees the same inputs. A planning pass (cheap: caption lines, tar headers, Parquet
metadata) records where each shard starts; that plan is kept in ``build.json`` and reused on a rerun.
Each shard is written to a temporary name and renamed when complete, followed by its stats file
``shard-...stats.json``; a shard with both files is never rebuilt, so an interrupted build resumes where it
stopped. ``num_workers`` spawned processes each build whole shards, holding one input item at a time.
When every shard is done, ``manifest.json`` is written; it contains no timings or output paths, so a
resumed build and an uninterrupted one (with any number of workers) give identical manifests and shards.

Plain ArrayRecord + Grain only: TFDS is deliberately not used (it would pull in TensorFlow).

Readers: ``read_manifest(dir)`` and ``list_shards(dir)`` (paths for ``grain.sources.ArrayRecordDataSource``).
"""
from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
import time
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from lens_jax.data.records import VERSION as RECORD_VERSION
from lens_jax.data.records import encode_record

FORMAT = "lens_jax.shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BUILD_STATE = "build.json"
DEFAULT_MIN_AREA = 384 * 384
DEFAULT_RECORDS_PER_SHARD = 1000
DEFAULT_WRITER_OPTIONS = "group_size:1"  # one record per chunk: cheap random access for Grain
SKIP_REASONS = ("malformed_entry", "empty_caption", "missing_file", "unreadable", "too_small")
MAX_SKIP_EXAMPLES = 5  # skipped ids kept per reason per shard (and 4x that in the manifest)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


class ShardBuildError(ValueError):
    """A problem with the build's inputs or output directory (bad path, no inputs, changed settings)."""


class ShardManifestError(FileNotFoundError):
    """A shard directory without a manifest, or with a listed shard missing."""


# --------------------------------------------------------------------------------------------
# Input items and adapters
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Item:
    """One input item. ``reason`` is set by an adapter that already knows the item is unusable."""

    id: str
    image: Optional[bytes]
    caption: Optional[str]
    brief: str = ""
    meta: str = ""
    reason: Optional[str] = None


def _file_fingerprint(path: str) -> List[Any]:
    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns]


def _expand(patterns: Sequence[str], what: str) -> List[str]:
    files = set()
    for pat in patterns:
        for p in pat.split(","):
            p = p.strip()
            if not p:
                continue
            hits = glob.glob(os.path.expanduser(p))
            if not hits:
                raise ShardBuildError(f"{what}: nothing matches {p!r}")
            files.update(os.path.abspath(h) for h in hits if os.path.isfile(h))
    if not files:
        raise ShardBuildError(f"{what}: no input files in {list(patterns)!r}")
    return sorted(files)


def _relnames(files: Sequence[str]) -> List[str]:
    """Names of ``files`` relative to their common directory (stable, unique prefixes for ids)."""
    root = os.path.commonpath([os.path.dirname(f) for f in files])
    return [os.path.relpath(f, root).replace(os.sep, "/") for f in files]


def _meta_str(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _text(value: Any) -> Optional[str]:
    """A caption field as text; None when absent. Non-text values raise TypeError."""
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if not isinstance(value, str):
        raise TypeError(f"caption is a {type(value).__name__}")
    return value


class InputSource:
    """Base class of the input adapters: plan once, then iterate any shard's items lazily."""

    kind = "?"

    def describe(self) -> Dict[str, Any]:
        """A JSON description written into the manifest (deterministic, no timings)."""
        raise NotImplementedError

    def fingerprint(self) -> List[Any]:
        """Sizes and mtimes of the inputs, to refuse resuming a build whose inputs changed."""
        return []

    def plan(self, records_per_shard: int) -> Tuple[int, List[Any]]:
        """(number of input items, one JSON cursor per shard where that shard's items start)."""
        raise NotImplementedError

    def iter_items(self, cursor: Any, count: int) -> Iterator[Item]:
        """The ``count`` items starting at ``cursor``, in input order."""
        raise NotImplementedError


class FolderInput(InputSource):
    """A folder of images plus a JSONL captions file (``file`` relative to the folder)."""

    kind = "folder_jsonl"

    def __init__(self, images_dir: str, captions: Optional[str] = None):
        self.images_dir = os.path.abspath(os.path.expanduser(images_dir))
        if not os.path.isdir(self.images_dir):
            raise ShardBuildError(f"image folder {images_dir!r} does not exist or is not a directory")
        if captions is None:
            captions = os.path.join(self.images_dir, "captions.jsonl")
            if not os.path.isfile(captions):
                raise ShardBuildError(
                    f"no captions file: {captions!r} does not exist (pass --captions=FILE.jsonl)")
        self.captions = os.path.abspath(os.path.expanduser(captions))
        if not os.path.isfile(self.captions):
            raise ShardBuildError(f"captions file {captions!r} does not exist")

    def describe(self):
        return {"kind": self.kind, "images": self.images_dir, "captions": self.captions}

    def fingerprint(self):
        return [_file_fingerprint(self.captions)]

    def plan(self, records_per_shard):
        n, cursors, offset = 0, [], 0
        with open(self.captions, "rb") as f:
            for line in f:
                if line.strip():
                    if n % records_per_shard == 0:
                        cursors.append(offset)
                    n += 1
                offset += len(line)
        return n, cursors

    def iter_items(self, cursor, count):
        done = 0
        with open(self.captions, "rb") as f:
            f.seek(int(cursor))
            for line in f:
                if done == count:
                    return
                if not line.strip():
                    continue
                done += 1
                yield self._item(line, int(cursor))
        if done != count:
            raise ShardBuildError(f"{self.captions} ended early (changed during the build?)")

    def _item(self, line: bytes, cursor: int) -> Item:
        try:
            entry = json.loads(line)
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or not entry["file"]:
                raise ValueError("no 'file' string")
            rel = entry["file"]
            caption = _text(entry.get("caption"))
            brief = _text(entry.get("brief")) or ""
            meta = _meta_str(entry.get("meta"))
        except Exception:  # malformed JSON, wrong types, bad UTF-8
            head = line[:60].decode("utf-8", "replace").strip()
            return Item(id=f"<line {head!r}>", image=None, caption=None, reason="malformed_entry")
        item = Item(id=rel.replace(os.sep, "/"), image=None, caption=caption, brief=brief, meta=meta)
        if caption is None or not caption.strip():
            item.reason = "empty_caption"
            return item
        path = os.path.join(self.images_dir, rel)
        try:
            with open(path, "rb") as f:
                item.image = f.read()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            item.reason = "missing_file"
        except OSError:
            item.reason = "unreadable"
        return item


def _tar_key(name: str) -> Tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the basename; ext = the rest."""
    d, base = os.path.split(name)
    if "." in base:
        stem, ext = base.split(".", 1)
    else:
        stem, ext = base, ""
    return (f"{d}/{stem}" if d else stem), ext.lower()


class TarInput(InputSource):
    """WebDataset-style tar shards: consecutive members sharing a key form one item."""

    kind = "webdataset_tar"
    _WANTED = set(IMAGE_EXTS) | {"txt", "caption.txt", "dense.txt", "brief.txt", "json"}

    def __init__(self, patterns: Sequence[str]):
        self.files = _expand(patterns, "--tar")
        self.names = _relnames(self.files)

    def describe(self):
        return {"kind": self.kind, "files": list(self.files)}

    def fingerprint(self):
        return [_file_fingerprint(f) for f in self.files]

    @staticmethod
    def _open_seekable(path):
        import tarfile
        try:
            return tarfile.open(path, mode="r:")  # uncompressed: headers can be read with seeks
        except tarfile.ReadError:
            return None

    @staticmethod
    def _members(tf) -> Iterator[Any]:
        """Regular-file members, without letting ``tf.members`` grow (bounded memory)."""
        while True:
            ti = tf.next()
            if ti is None:
                return
            tf.members.clear()
            if ti.isfile():
                yield ti

    def plan(self, records_per_shard):
        import tarfile
        n, cursors = 0, []
        for i, path in enumerate(self.files):
            tf = self._open_seekable(path)
            seekable = tf is not None
            try:
                if tf is None:
                    tf = tarfile.open(path, mode="r|*")
                key, k = None, 0
                for ti in self._members(tf):
                    kk = _tar_key(ti.name)[0]
                    if kk == key:
                        continue
                    key = kk
                    if n % records_per_shard == 0:
                        cursors.append([i, ti.offset if seekable else None, k])
                    n += 1
                    k += 1
            except (tarfile.TarError, OSError, EOFError) as e:
                raise ShardBuildError(f"cannot read tar {path}: {e}") from None
            finally:
                if tf is not None:
                    tf.close()
        return n, cursors

    def _samples(self, i: int, offset: Optional[int], skip: int) -> Iterator[Item]:
        import tarfile
        path = self.files[i]
        with open(path, "rb") as f:
            if offset is not None:
                f.seek(offset)
                tf = tarfile.open(fileobj=f, mode="r|")
            else:
                tf = tarfile.open(fileobj=f, mode="r|*")
            key, parts, k = None, {}, 0
            for ti in self._members(tf):
                kk, ext = _tar_key(ti.name)
                if kk != key:
                    if key is not None and k > skip:
                        yield self._item(i, key, parts)
                    key, parts = kk, {}
                    k += 1
                if k > skip and ext in self._WANTED and ext not in parts:
                    parts[ext] = tf.extractfile(ti).read()
            if key is not None and k > skip:
                yield self._item(i, key, parts)
            tf.close()

    def iter_items(self, cursor, count):
        i, offset, skip = cursor
        done = 0
        while done < count and i < len(self.files):
            for item in self._samples(i, offset, 0 if offset is not None else skip):
                yield item
                done += 1
                if done == count:
                    return
            i, offset, skip = i + 1, None, 0
        if done != count:
            raise ShardBuildError("tar inputs ended early (changed during the build?)")

    def _item(self, i: int, key: str, parts: Dict[str, bytes]) -> Item:
        item = Item(id=f"{self.names[i]}/{key}", image=None, caption=None)
        try:
            caption = None
            if "json" in parts:
                item.meta = parts["json"].decode("utf-8")
                d = json.loads(item.meta)
                if isinstance(d, dict):
                    for k in ("caption", "dense", "text"):
                        if d.get(k) is not None:
                            caption = _text(d[k])
                            break
                    item.brief = _text(d.get("brief")) or ""
            for ext in ("txt", "caption.txt", "dense.txt"):
                if ext in parts:
                    caption = parts[ext].decode("utf-8")
                    break
            if "brief.txt" in parts:
                item.brief = parts["brief.txt"].decode("utf-8")
            item.caption = caption
        except Exception:
            item.reason = "malformed_entry"
            return item
        if caption is None or not caption.strip():
            item.reason = "empty_caption"
            return item
        for ext in IMAGE_EXTS:
            if ext in parts:
                item.image = parts[ext]
                break
        else:
            item.reason = "missing_file"
        return item


class ParquetInput(InputSource):
    """Parquet files: an image column (bytes, or a ``{bytes, path}`` struct) plus caption columns."""

    kind = "parquet"

    def __init__(self, patterns: Sequence[str], image_column: str = "image", caption_column: str = "caption",
                 brief_column: Optional[str] = "brief", id_column: Optional[str] = None,
                 meta_column: Optional[str] = None, batch_size: int = 64):
        self.files = _expand(patterns, "--parquet")
        self.names = _relnames(self.files)
        self.image_column, self.caption_column = image_column, caption_column
        self.brief_column, self.id_column, self.meta_column = brief_column or None, id_column or None, \
            meta_column or None
        self.batch_size = int(batch_size)
        self._brief_present: Optional[List[bool]] = None

    def describe(self):
        return {"kind": self.kind, "files": list(self.files), "image_column": self.image_column,
                "caption_column": self.caption_column, "brief_column": self.brief_column,
                "id_column": self.id_column, "meta_column": self.meta_column}

    def fingerprint(self):
        return [_file_fingerprint(f) for f in self.files]

    def _columns(self, pf, path) -> List[str]:
        names = set(pf.schema_arrow.names)
        required = [self.image_column, self.caption_column] + [c for c in (self.id_column, self.meta_column) if c]
        missing = [c for c in required if c not in names]
        if missing:
            raise ShardBuildError(f"{path}: no column(s) {missing}; columns are {sorted(names)} "
                                  "(choose with --image_column/--caption_column/--id_column/--meta_column)")
        cols = required + ([self.brief_column] if self.brief_column in names else [])
        return list(dict.fromkeys(cols))

    def plan(self, records_per_shard):
        pq = _pyarrow_parquet()
        n, cursors = 0, []
        for i, path in enumerate(self.files):
            try:
                pf = pq.ParquetFile(path)
            except Exception as e:
                raise ShardBuildError(f"cannot read parquet {path}: {e}") from None
            self._columns(pf, path)
            rows = pf.metadata.num_rows
            first = (-n) % records_per_shard  # first row in this file that starts a shard
            for r in range(first, rows, records_per_shard):
                cursors.append([i, r])
            n += rows
        return n, cursors

    def iter_items(self, cursor, count):
        pq = _pyarrow_parquet()
        i, row = cursor
        done = 0
        while done < count and i < len(self.files):
            pf = pq.ParquetFile(self.files[i])
            cols = self._columns(pf, self.files[i])
            md = pf.metadata
            start, g = 0, 0
            while g < md.num_row_groups and start + md.row_group(g).num_rows <= row:
                start += md.row_group(g).num_rows
                g += 1
            r = start
            for batch in pf.iter_batches(batch_size=self.batch_size, row_groups=list(range(g, md.num_row_groups)),
                                         columns=cols):
                data = {c: batch.column(c).to_pylist() for c in cols}
                for j in range(batch.num_rows):
                    if r >= row:
                        yield self._item(i, r, {c: data[c][j] for c in cols})
                        done += 1
                        if done == count:
                            return
                    r += 1
            i, row = i + 1, 0
        if done != count:
            raise ShardBuildError("parquet inputs ended early (changed during the build?)")

    def _item(self, i: int, r: int, row: Dict[str, Any]) -> Item:
        rid = f"{self.names[i]}:{r}" if self.id_column is None else str(row[self.id_column])
        item = Item(id=rid, image=None, caption=None)
        try:
            item.caption = _text(row[self.caption_column])
            if self.brief_column in row:
                item.brief = _text(row[self.brief_column]) or ""
            if self.meta_column:
                item.meta = _meta_str(row[self.meta_column])
            img = row[self.image_column]
            if isinstance(img, dict):
                img = img.get("bytes")
            if img is not None and not isinstance(img, (bytes, bytearray)):
                raise TypeError(f"image is a {type(img).__name__}")
        except Exception:
            item.reason = "malformed_entry"
            return item
        if item.caption is None or not item.caption.strip():
            item.reason = "empty_caption"
        elif not img:
            item.reason = "missing_file"
        else:
            item.image = bytes(img)
        return item


def _pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ShardBuildError("Parquet input needs pyarrow: pip install pyarrow") from None
    return pq


class ShapesWorldInput(InputSource):
    """``num`` examples of the synthetic shapes world, PNG-encoded; meta = the scene JSON."""

    kind = "shapes_world"

    def __init__(self, num: int, image_size: int = 64, seed: int = 0, world: dict | None = None):
        """``world``: layout and geometry options (``lens_jax.data.synthetic.WORLD_FIELDS``; None = defaults)."""
        from lens_jax.data.synthetic import world_config
        if int(num) <= 0:
            raise ShardBuildError(f"--shapes_world needs a positive count, got {num}")
        self.num = int(num)
        try:
            self.cfg = world_config(world, image_size=int(image_size), seed=int(seed))
        except (TypeError, ValueError) as e:
            raise ShardBuildError(f"bad shapes-world options {world!r}: {e}") from e

    def describe(self):
        return {"kind": self.kind, "num": self.num, "config": dataclasses.asdict(self.cfg)}

    def plan(self, records_per_shard):
        return self.num, list(range(0, self.num, records_per_shard))

    def iter_items(self, cursor, count):
        from PIL import Image

        from lens_jax.data.synthetic import example
        for index in range(int(cursor), int(cursor) + count):
            ex = example(index, self.cfg)
            buf = io.BytesIO()
            Image.fromarray(ex["image"]).save(buf, format="PNG")
            yield Item(id=f"shapes/seed{self.cfg.seed}/{index:08d}", image=buf.getvalue(), caption=ex["dense"],
                       brief=ex["brief"], meta=ex["metadata"])


# --------------------------------------------------------------------------------------------
# Validation and one shard
# --------------------------------------------------------------------------------------------

def image_size(data: bytes) -> Tuple[int, int]:
    """(width, height) of an encoded image after a full decode; raises on anything unreadable."""
    from PIL import Image
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return int(im.size[0]), int(im.size[1])


def check_item(item: Item, min_area: int) -> Tuple[Optional[str], int, int]:
    """(skip reason or None, width, height). Never raises."""
    if item.reason is not None:
        return item.reason, 0, 0
    if item.caption is None or not item.caption.strip():
        return "empty_caption", 0, 0
    if not item.image:
        return "missing_file", 0, 0
    try:
        w, h = image_size(item.image)
    except Exception:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...) on bad data
        return "unreadable", 0, 0
    if w <= 0 or h <= 0:
        return "unreadable", 0, 0
    if w * h < min_area:
        return "too_small", w, h
    return None, w, h


def shard_name(k: int, num_shards: int) -> str:
    width = max(5, len(str(num_shards)))
    return f"shard-{k:0{width}d}-of-{num_shards:0{width}d}.array_record"


def stats_name(k: int, num_shards: int) -> str:
    return shard_name(k, num_shards)[: -len(".array_record")] + ".stats.json"


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclasses.dataclass
class _ShardTask:
    source: InputSource
    out_dir: str
    k: int
    num_shards: int
    cursor: Any
    count: int
    first_input: int
    min_area: int
    writer_options: str


def build_one_shard(task: _ShardTask) -> Dict[str, Any]:
    """Write shard ``task.k`` (temp name, then rename) and its stats file; returns the stats."""
    from array_record.python.array_record_module import ArrayRecordWriter

    name = shard_name(task.k, task.num_shards)
    final = os.path.join(task.out_dir, name)
    tmp = f"{final}.tmp-{os.getpid()}"
    skipped = {r: 0 for r in SKIP_REASONS}
    examples: Dict[str, List[str]] = {r: [] for r in SKIP_REASONS}
    records = inputs = 0
    writer = ArrayRecordWriter(tmp, task.writer_options)
    try:
        for item in task.source.iter_items(task.cursor, task.count):
            inputs += 1
            reason, w, h = check_item(item, task.min_area)
            if reason is not None:
                skipped[reason] += 1
                if len(examples[reason]) < MAX_SKIP_EXAMPLES:
                    examples[reason].append(item.id)
                continue
            writer.write(encode_record(id=item.id, image=item.image, width=w, height=h,
                                       caption=item.caption.strip(), brief=(item.brief or "").strip(),
                                       meta=item.meta or ""))
            records += 1
    except BaseException:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    writer.close()
    if inputs != task.count:
        os.remove(tmp)
        raise ShardBuildError(f"shard {task.k}: expected {task.count} inputs, read {inputs}")
    os.replace(tmp, final)
    stats = {"shard": task.k, "file": name, "first_input": task.first_input, "inputs": inputs,
             "records": records, "skipped": skipped,
             "skipped_examples": {r: v for r, v in examples.items() if v},
             "bytes": os.path.getsize(final)}
    _write_json_atomic(os.path.join(task.out_dir, stats_name(task.k, task.num_shards)), stats)
    return stats


# --------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------

def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _shard_done(out_dir: str, k: int, num_shards: int) -> Optional[Dict[str, Any]]:
    sp = os.path.join(out_dir, stats_name(k, num_shards))
    if not (os.path.isfile(os.path.join(out_dir, shard_name(k, num_shards))) and os.path.isfile(sp)):
        return None
    try:
        return _read_json(sp)
    except (OSError, ValueError):
        return None


def _our_files(out_dir: str) -> List[str]:
    return sorted(f for f in os.listdir(out_dir)
                  if f.startswith("shard-") or f in (MANIFEST, BUILD_STATE)
                  or f.startswith(MANIFEST + ".tmp") or f.startswith(BUILD_STATE + ".tmp"))


def build_shards(source: InputSource, out_dir: str, *, records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
                 min_area: int = DEFAULT_MIN_AREA, num_workers: int = 1, max_shards: Optional[int] = None,
                 overwrite: bool = False, writer_options: str = DEFAULT_WRITER_OPTIONS,
                 log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Build (or resume building) the shards of ``source`` in ``out_dir``.

    Returns a summary dict: ``complete`` (bool), ``manifest`` (the manifest when complete, else None),
    ``built`` / ``reused`` (shards written in this call / found finished), ``num_shards``.
    ``max_shards`` builds at most that many missing shards in this call (an incremental or test build).
    """
    log = log or (lambda s: print(s, flush=True))
    if records_per_shard <= 0:
        raise ShardBuildError(f"records_per_shard must be positive, got {records_per_shard}")
    if min_area < 0:
        raise ShardBuildError(f"min_area must be >= 0, got {min_area}")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ShardBuildError(f"--out {out_dir!r} exists and is not a directory")
    os.makedirs(out_dir, exist_ok=True)
    if overwrite:
        for f in _our_files(out_dir):
            os.remove(os.path.join(out_dir, f))
    for f in os.listdir(out_dir):  # leftovers of an interrupted run
        if ".tmp-" in f and (f.startswith("shard-") or f.startswith(MANIFEST) or f.startswith(BUILD_STATE)):
            os.remove(os.path.join(out_dir, f))

    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "record_version": RECORD_VERSION,
              "source": source.describe(), "records_per_shard": int(records_per_shard),
              "min_area": int(min_area), "writer_options": writer_options}
    config = json.loads(json.dumps(config))  # tuples -> lists, as it reads back from build.json
    fingerprint = json.loads(json.dumps(source.fingerprint()))
    state_path = os.path.join(out_dir, BUILD_STATE)
    state = None
    if os.path.isfile(state_path):
        state = _read_json(state_path)
        if state.get("config") != config:
            raise ShardBuildError(
                f"{out_dir} holds a build with different settings ({BUILD_STATE}); "
                "use the same settings, a new --out, or --overwrite")
        if state.get("fingerprint") != fingerprint:
            raise ShardBuildError(f"the inputs changed since {out_dir} was started; use a new --out or --overwrite")
    elif any(f.startswith("shard-") or f == MANIFEST for f in os.listdir(out_dir)):
        raise ShardBuildError(f"{out_dir} holds shards without {BUILD_STATE}; use a new --out or --overwrite")
    if state is None:
        t0 = time.time()
        num_inputs, cursors = source.plan(records_per_shard)
        if num_inputs == 0:
            raise ShardBuildError(f"no input items in {json.dumps(config['source'])}")
        state = {"config": config, "fingerprint": fingerprint, "num_inputs": num_inputs,
                 "num_shards": len(cursors), "cursors": cursors}
        _write_json_atomic(state_path, state)
        log(f"planned {num_inputs} inputs -> {len(cursors)} shards of <= {records_per_shard} "
            f"({time.time() - t0:.1f}s)")
    num_inputs, num_shards, cursors = state["num_inputs"], state["num_shards"], state["cursors"]

    done = {k: s for k in range(num_shards) if (s := _shard_done(out_dir, k, num_shards)) is not None}
    pending = [k for k in range(num_shards) if k not in done]
    reused = len(done)
    if max_shards is not None:
        pending = pending[:max(0, int(max_shards))]
    tasks = [_ShardTask(source, out_dir, k, num_shards, cursors[k],
                        min(records_per_shard, num_inputs - k * records_per_shard), k * records_per_shard,
                        int(min_area), writer_options) for k in pending]
    if reused:
        log(f"{reused}/{num_shards} shards already finished; building {len(tasks)}")
    t0, written = time.time(), 0

    def progress(stats):
        nonlocal written
        done[stats["shard"]] = stats
        written += stats["records"]
        rate = written / max(time.time() - t0, 1e-9)
        log(f"shards {len(done)}/{num_shards}  records {written} this run  {rate:.1f} records/s")

    if tasks:
        nw = max(1, min(int(num_workers), len(tasks)))
        if nw == 1:
            for t in tasks:
                progress(build_one_shard(t))
        else:
            import multiprocessing as mp
            with mp.get_context("spawn").Pool(nw) as pool:
                for stats in pool.imap_unordered(build_one_shard, tasks):
                    progress(stats)

    summary = {"complete": len(done) == num_shards, "manifest": None, "built": len(tasks),
               "reused": reused, "num_shards": num_shards, "out_dir": out_dir}
    if not summary["complete"]:
        log(f"partial build: {len(done)}/{num_shards} shards finished; rerun the same command to finish")
        return summary
    manifest = _manifest(config, num_inputs, [done[k] for k in range(num_shards)])
    _write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)
    summary["manifest"] = manifest
    sk = ", ".join(f"{r} {n}" for r, n in manifest["skipped"].items())
    log(f"done: {manifest['records']} records from {num_inputs} inputs in {num_shards} shards; "
        f"skipped {manifest['num_skipped']} ({sk}); manifest {os.path.join(out_dir, MANIFEST)}")
    return summary


def _manifest(config: Dict[str, Any], num_inputs: int, shards: List[Dict[str, Any]]) -> Dict[str, Any]:
    skipped = {r: sum(s["skipped"].get(r, 0) for s in shards) for r in SKIP_REASONS}
    examples = {}
    for r in SKIP_REASONS:
        ids = [i for s in shards for i in s.get("skipped_examples", {}).get(r, [])][:4 * MAX_SKIP_EXAMPLES]
        if ids:
            examples[r] = ids
    return {
        **config,
        "num_inputs": num_inputs,
        "records": sum(s["records"] for s in shards),
        "num_skipped": sum(skipped.values()),
        "skipped": skipped,
        "skipped_examples": examples,
        "num_shards": len(shards),
        "shards": [{"file": s["file"], "inputs": s["inputs"], "records": s["records"], "skipped": s["skipped"],
                    "bytes": s["bytes"]} for s in shards],
        "files": [s["file"] for s in shards],
    }


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------

def read_manifest(shard_dir: str) -> Dict[str, Any]:
    """The manifest of a finished shard directory (``ShardManifestError`` if there is none)."""
    path = os.path.join(shard_dir, MANIFEST)
    if not os.path.isfile(path):
        partial = os.path.isfile(os.path.join(shard_dir, BUILD_STATE))
        raise ShardManifestError(
            f"no {MANIFEST} in {shard_dir!r}: " + ("the shard build is incomplete; rerun tools/build_shards.py"
                                                  if partial else "not a shard directory (build it with "
                                                  "tools/build_shards.py)"))
    try:
        manifest = _read_json(path)
    except ValueError as e:
        raise ShardManifestError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ShardManifestError(f"{path}: format {manifest.get('format')!r} v{manifest.get('format_version')!r}; "
                                 f"this reader knows {FORMAT!r} v{FORMAT_VERSION}")
    return manifest


def list_shards(shard_dir: str, include_empty: bool = False) -> List[str]:
    """Paths of the shard files listed in the manifest (shards with no records left out by default).

    Raises ``ShardManifestError`` if the manifest is missing or a listed shard file is not there.
    """
    manifest = read_manifest(shard_dir)
    paths = [os.path.join(shard_dir, s["file"]) for s in manifest["shards"] if include_empty or s["records"] > 0]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ShardManifestError(f"{len(missing)} shard file(s) listed in {os.path.join(shard_dir, MANIFEST)} "
                                 f"are missing, e.g. {missing[0]}")
    return paths

