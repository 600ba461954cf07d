"""The image-caption record stored in lens_jax ArrayRecord shards (one record = one training example).

A record is a msgpack map (version 1):

  v        int    format version (1)
  id       str    stable example id (unique within a dataset; e.g. "<source>/<relative path>")
  image    bytes  the original encoded image file (JPEG, PNG, WebP, ...), never re-encoded
  width    int    image width in pixels (as decoded when the shard was built)
  height   int    image height in pixels
  caption  str    the dense caption (training uses this by default)
  brief    str    an optional brief caption ("" when absent)
  meta     str    optional JSON string (e.g. shapes-world ground truth); "" when absent

`encode_record` validates and packs; `decode_record` unpacks and validates, raising `RecordError` with the
reason on anything malformed, so a reader can count the record as skipped instead of crashing.
"""
from __future__ import annotations

from typing import Any, Dict

import msgpack

VERSION = 1
FIELDS = ("v", "id", "image", "width", "height", "caption", "brief", "meta")


class RecordError(ValueError):
    """A record that cannot be used (malformed bytes, missing or mistyped fields)."""


def encode_record(*, id: str, image: bytes, width: int, height: int, caption: str, brief: str = "",
                  meta: str = "") -> bytes:
    rec = dict(v=VERSION, id=str(id), image=bytes(image), width=int(width), height=int(height),
               caption=str(caption), brief=str(brief or ""), meta=str(meta or ""))
    _check(rec)
    return msgpack.packb(rec, use_bin_type=True)


def decode_record(data: bytes) -> Dict[str, Any]:
    try:
        rec = msgpack.unpackb(data, raw=False)
    except Exception as e:  # msgpack raises several exception types on truncated/garbled input
        raise RecordError(f"not a msgpack record: {type(e).__name__}: {e}") from None
    if not isinstance(rec, dict):
        raise RecordError(f"record is a {type(rec).__name__}, not a map")
    _check(rec)
    return rec


def _check(rec: Dict[str, Any]) -> None:
    missing = [f for f in FIELDS if f not in rec]
    if missing:
        raise RecordError(f"record is missing fields {missing}")
    if rec["v"] != VERSION:
        raise RecordError(f"record version {rec['v']!r}; this reader knows version {VERSION}")
    types = dict(id=str, image=bytes, width=int, height=int, caption=str, brief=str, meta=str)
    bad = [f"{k} is {type(rec[k]).__name__}" for k, t in types.items() if not isinstance(rec[k], t)]
    if bad:
        raise RecordError("record has mistyped fields: " + ", ".join(bad))
    if rec["width"] <= 0 or rec["height"] <= 0:
        raise RecordError(f"record {rec['id']!r} has size {rec['width']}x{rec['height']}")
