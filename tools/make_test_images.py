"""Writes ArrayRecord shards of synthetic, natural-looking JPEGs with captions (pipeline tests and benchmarks).

Images have random sizes and aspect ratios (default sides 400-1600 px, W:H from 1:2.2 to 2.2:1): a smooth
colour field, soft shapes, fine grain noise, JPEG quality 90 -- so decode and resize cost about what a
photograph of the same size costs. Captions are generated text (dense ~60-120 words, brief a few words).

  python tools/make_test_images.py --out=/tmp/shards --num=400 --shards=4 [--min_side=400 --max_side=1600]

Shards are `shard-XXXXX-of-YYYYY.array_record` of `lens_jax.data.records` records (no manifest).
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from typing import Optional, Sequence

import numpy as np

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from lens_jax.data.records import encode_record  # noqa: E402

_WORDS = ("a", "the", "red", "blue", "soft", "bright", "wooden", "table", "window", "light", "shadow", "tree",
          "street", "cat", "sky", "cloud", "mountain", "river", "glass", "old", "small", "large", "left", "right",
          "behind", "near", "under", "warm", "cold", "metal", "sign", "text", "reads", "green", "yellow", "house")


def make_image(rng: np.random.Generator, width: int, height: int):
    """A PIL RGB image: smooth colour field + soft ellipses/rectangles + grain."""
    from PIL import Image, ImageDraw, ImageFilter
    base = rng.integers(0, 256, (rng.integers(2, 6), rng.integers(2, 6), 3), dtype=np.uint8)
    im = Image.fromarray(base).resize((width, height), Image.Resampling.BICUBIC)
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 12))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(width // 20, width // 2)), y0 + int(rng.integers(height // 20, height // 2))
        col = tuple(int(c) for c in rng.integers(0, 256, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)((x0, y0, x1, y1), fill=col)
    im = im.filter(ImageFilter.GaussianBlur(radius=max(1.0, min(width, height) / 300)))
    arr = np.asarray(im, dtype=np.int16)
    arr = arr + rng.normal(0, 6, (height, width, 1)).astype(np.int16)        # luminance grain
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def jpeg_bytes(im, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def caption(rng: np.random.Generator, lo: int, hi: int) -> str:
    return " ".join(rng.choice(_WORDS, int(rng.integers(lo, hi + 1)))) + "."


def random_size(rng: np.random.Generator, min_side: int, max_side: int, max_ratio: float = 2.2):
    """(W, H) with log-uniform aspect ratio in [1/max_ratio, max_ratio] and the long side in range."""
    r = float(np.exp(rng.uniform(-np.log(max_ratio), np.log(max_ratio))))
    long_side = int(rng.integers(min_side, max_side + 1))
    if r >= 1:
        w, h = long_side, max(16, int(round(long_side / r)))
    else:
        w, h = max(16, int(round(long_side * r))), long_side
    return w, h


def make_records(num: int, seed: int = 0, min_side: int = 400, max_side: int = 1600,
                 sizes: Optional[Sequence[tuple]] = None, quality: int = 90):
    """Yields `num` encoded records (bytes)."""
    rng = np.random.default_rng(seed)
    for i in range(num):
        w, h = sizes[i % len(sizes)] if sizes else random_size(rng, min_side, max_side)
        im = make_image(rng, w, h)
        yield encode_record(id=f"synthetic/{seed}/{i:07d}", image=jpeg_bytes(im, quality), width=w, height=h,
                            caption=caption(rng, 60, 120), brief=caption(rng, 3, 8))


def write_shards(out_dir: str, records: Sequence[bytes], num_shards: int = 1) -> list:
    """Writes records contiguously into `num_shards` ArrayRecord files (group_size 1); returns the paths."""
    from array_record.python.array_record_module import ArrayRecordWriter
    os.makedirs(out_dir, exist_ok=True)
    records = list(records)
    paths = []
    per = -(-len(records) // num_shards)
    for s in range(num_shards):
        p = os.path.join(out_dir, f"shard-{s:05d}-of-{num_shards:05d}.array_record")
        w = ArrayRecordWriter(p, "group_size:1")
        for r in records[s * per:(s + 1) * per]:
            w.write(r)
        w.close()
        paths.append(p)
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--num", type=int, default=400)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min_side", type=int, default=400)
    ap.add_argument("--max_side", type=int, default=1600)
    ap.add_argument("--quality", type=int, default=90)
    a = ap.parse_args(argv)
    recs = list(make_records(a.num, a.seed, a.min_side, a.max_side, quality=a.quality))
    paths = write_shards(a.out, recs, a.shards)
    mb = sum(os.path.getsize(p) for p in paths) / 2 ** 20
    print(f"wrote {a.num} records in {len(paths)} shards to {a.out} ({mb:.1f} MiB)")


if __name__ == "__main__":
    main()
