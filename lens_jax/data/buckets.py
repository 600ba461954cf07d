"""Resolution buckets for mixed-resolution training (LENS_SPEC §5.5) and the image resize they imply.

A *bucket table* is a list of base areas, each with its aspect-ratio buckets (W x H pixels, multiples of
16). One DiT token covers 16 x 16 pixels (8x VAE downsampling, then 2x2 patchify; LENS_SPEC §3.2-3.3), so
a W x H bucket has (H/16) x (W/16) tokens, laid out row-major.

Tables (`bucket_table(spec, resolution)`):

  ''                  one square bucket of side `resolution` (stage 1: fixed 512 x 512)
  'lens27'            the 27 stage-2 buckets, exactly LENS_SPEC §5.5 (3 areas x 9 aspect ratios)
  'ar9'               the 9 Lens aspect ratios generated at base side `resolution` (`make_buckets`)
  'ar9:64,96,128'     the 9 Lens aspect ratios at each listed base side (e.g. CPU-scale mixed areas)

Within a base area, examples of different aspect ratios share one batch: image tokens are padded to the
area's largest bucket (`max_tokens`), each token carrying its own position and validity mask.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

#: Pixels per DiT token side: 8x VAE downsampling x 2x2 patchify.
TOKEN_PIXELS = 16

#: The nine Lens aspect ratios, W:H, in table order (LENS_SPEC §5.5).
LENS_RATIOS: Tuple[Tuple[int, int], ...] = ((1, 2), (9, 16), (2, 3), (3, 4), (1, 1), (4, 3), (3, 2), (16, 9),
                                            (2, 1))

#: The 27 stage-2 training buckets, W x H, per base side (LENS_SPEC §5.5, verbatim).
LENS27: Tuple[Tuple[int, Tuple[Tuple[int, int], ...]], ...] = (
    (512, ((352, 704), (384, 672), (416, 640), (448, 608), (512, 512), (608, 448), (640, 416), (672, 384),
           (704, 352))),
    (768, ((544, 1088), (576, 1024), (640, 960), (672, 896), (768, 768), (896, 672), (960, 640), (1024, 576),
           (1088, 544))),
    (1024, ((736, 1472), (768, 1376), (832, 1248), (864, 1152), (1024, 1024), (1152, 864), (1248, 832),
            (1376, 768), (1472, 736))),
)


def num_tokens(width: int, height: int) -> int:
    """DiT image tokens of a W x H image (one per 16 x 16 pixels)."""
    return (width // TOKEN_PIXELS) * (height // TOKEN_PIXELS)


def token_grid(width: int, height: int) -> Tuple[int, int]:
    """(h, w) token grid of a W x H image."""
    return height // TOKEN_PIXELS, width // TOKEN_PIXELS


@dataclass(frozen=True)
class BucketTable:
    """Base areas (by base side) and, per area, its buckets as (W, H) pairs."""
    sides: Tuple[int, ...]
    buckets: Tuple[Tuple[Tuple[int, int], ...], ...]

    def __post_init__(self):
        if len(self.sides) != len(self.buckets) or not self.sides:
            raise ValueError("a bucket table needs one bucket list per base side")
        for side, bs in zip(self.sides, self.buckets):
            if not bs:
                raise ValueError(f"base side {side} has no buckets")
            for w, h in bs:
                if w <= 0 or h <= 0 or w % TOKEN_PIXELS or h % TOKEN_PIXELS:
                    raise ValueError(f"bucket {w}x{h} (base {side}) is not a positive multiple of {TOKEN_PIXELS}")

    @property
    def num_areas(self) -> int:
        return len(self.sides)

    def max_tokens(self, area: int) -> int:
        """Token slots of one example of base area `area` (index): its largest bucket's token count."""
        return max(num_tokens(w, h) for w, h in self.buckets[area])

    def label(self, area: int, bucket: int) -> str:
        """Stable name of a bucket, e.g. '512:352x704' (base side: W x H)."""
        w, h = self.buckets[area][bucket]
        return f"{self.sides[area]}:{w}x{h}"

    def labels(self) -> Tuple[str, ...]:
        return tuple(self.label(a, b) for a in range(self.num_areas) for b in range(len(self.buckets[a])))

    def padding_fractions(self, area: int) -> Tuple[float, ...]:
        """Per bucket, the fraction of the area's token slots that are padding."""
        n = self.max_tokens(area)
        return tuple(1.0 - num_tokens(w, h) / n for w, h in self.buckets[area])


def make_buckets(base_side: int, ratios: Sequence[Tuple[int, int]] = LENS_RATIOS,
                 multiple: int = TOKEN_PIXELS) -> Tuple[Tuple[int, int], ...]:
    """Buckets (W, H) of about base_side² pixels at the given W:H ratios, sides multiples of `multiple`.

    W = round(base * sqrt(r) / m) * m and H = round(base / sqrt(r) / m) * m (at least m each); buckets that
    coincide after rounding (tiny bases) are kept once, in ratio order. This does not reproduce the
    hand-picked Lens table exactly (use 'lens27' for that); it is for other areas, e.g. 64-px CPU runs.
    """
    if base_side <= 0 or multiple <= 0 or multiple % TOKEN_PIXELS:
        raise ValueError(f"base_side {base_side} and multiple {multiple} (a multiple of {TOKEN_PIXELS}) "
                         "must be positive")
    out = []
    for a, b in ratios:
        r = a / b
        w = max(multiple, int(round(base_side * math.sqrt(r) / multiple)) * multiple)
        h = max(multiple, int(round(base_side / math.sqrt(r) / multiple)) * multiple)
        if (w, h) not in out:
            out.append((w, h))
    return tuple(out)


def bucket_table(spec: str = "", resolution: int = 512) -> BucketTable:
    """The bucket table named by `spec` ('', 'lens27', 'ar9', 'ar9:S1,S2,...'; see the module docstring)."""
    spec = (spec or "").strip()
    if spec == "":
        if resolution % TOKEN_PIXELS:
            raise ValueError(f"resolution {resolution} is not a multiple of {TOKEN_PIXELS}")
        return BucketTable((resolution,), (((resolution, resolution),),))
    if spec == "lens27":
        return BucketTable(tuple(s for s, _ in LENS27), tuple(b for _, b in LENS27))
    if spec == "ar9" or spec.startswith("ar9:"):
        sides = (resolution,) if spec == "ar9" else tuple(int(s) for s in spec[4:].split(",") if s.strip())
        if not sides or list(sides) != sorted(set(sides)):
            raise ValueError(f"bucket spec {spec!r}: list base sides in increasing order")
        return BucketTable(sides, tuple(make_buckets(s) for s in sides))
    raise ValueError(f"unknown bucket table {spec!r}; use '', 'lens27', 'ar9' or 'ar9:S1,S2,...'")


def assign_bucket(width: int, height: int, buckets: Sequence[Tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio W/H is nearest the image's in |log| distance (ties: first)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height}")
    la = math.log(width / height)
    dist = [abs(math.log(w / h) - la) for w, h in buckets]
    return int(min(range(len(dist)), key=lambda i: (round(dist[i], 12), i)))


def bucket_positions(width: int, height: int, n_max: int) -> Tuple[np.ndarray, np.ndarray]:
    """Token positions [n_max, 3] int32 and validity [n_max] bool of a W x H image padded to n_max tokens.

    Valid tokens come first (row-major, `mmdit.image_positions`: centred rows/cols, frame 0); padded slots
    have position 0 and mask False.
    """
    from lens_jax.models.mmdit import image_positions
    h, w = token_grid(width, height)
    n = h * w
    if n > n_max:
        raise ValueError(f"{width}x{height} has {n} tokens > n_max {n_max}")
    pos = np.zeros((n_max, 3), np.int32)
    pos[:n] = image_positions(h, w)
    mask = np.zeros((n_max,), bool)
    mask[:n] = True
    return pos, mask


# ----------------------------------------------------------------------------- resize

def _crop_box(w: int, h: int, out_w: int, out_h: int) -> Tuple[float, float, float, float]:
    """The centred source box (left, top, right, bottom) that an aspect-preserving cover resize keeps."""
    if out_w * h >= out_h * w:            # width-bound: keep the full width, crop rows
        cw, ch = float(w), min(float(h), out_h * w / out_w)
    else:                                 # height-bound: keep the full height, crop columns
        cw, ch = min(float(w), out_w * h / out_h), float(h)
    left, top = max(0.0, (w - cw) / 2.0), max(0.0, (h - ch) / 2.0)
    return left, top, left + cw, top + ch


def resize_center_crop(image, width: int, height: int, resample: Optional[int] = None):
    """PIL image -> W x H: aspect-preserving resize so the image covers W x H, then a centre crop.

    Done as one `Image.resize` over the centred source box (bicubic by default; large reductions first
    box-reduce with `reducing_gap=3`, which is visually lossless).
    """
    from PIL import Image
    resample = Image.Resampling.BICUBIC if resample is None else resample
    box = _crop_box(image.width, image.height, width, height)
    return image.resize((width, height), resample=resample, box=box, reducing_gap=3.0)


def _to_rgb(im):
    from PIL import Image
    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    return im.convert("RGB")


def open_image(data: bytes):
    """Opens encoded image bytes (header only; nothing decoded yet), EXIF-orientation aware size.

    Returns (PIL image, (width, height) after EXIF orientation, EXIF orientation 1-8).
    """
    from PIL import Image
    im = Image.open(io.BytesIO(data))
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block is not a broken image
        orientation = 1
    w, h = im.size
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return im, (w, h), orientation if orientation in range(1, 9) else 1


def decode_resize(data: bytes, width: int, height: int, draft: bool = True, resample: Optional[int] = None,
                  opened=None) -> np.ndarray:
    """Encoded image bytes -> uint8 [H, W, 3] RGB at exactly the bucket size (cover resize + centre crop).

    `draft=True` lets the JPEG decoder scale by 1/2, 1/4 or 1/8 in the DCT domain while staying at least
    as large as the resize needs (PIL `Image.draft`), which is most of the decode time saved on large
    images; the final bicubic resize is unchanged. Raises on undecodable or truncated data.
    """
    from PIL import ImageOps
    im, (w, h), orientation = opened if opened is not None else open_image(data)
    if draft and im.format == "JPEG":
        scale = max(width / w, height / h)
        need = (math.ceil(w * scale), math.ceil(h * scale))
        im.draft("RGB", need[::-1] if orientation in (5, 6, 7, 8) else need)   # draft sees the stored size
    im.load()
    if orientation != 1:
        im = ImageOps.exif_transpose(im)
    im = _to_rgb(im)
    out = resize_center_crop(im, width, height, resample)
    arr = np.asarray(out, dtype=np.uint8)
    if arr.shape != (height, width, 3):
        raise ValueError(f"resize produced {arr.shape}, expected {(height, width, 3)}")
    return arr
