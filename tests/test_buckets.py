"""Resolution buckets (LENS_SPEC §5.5): the lens27 table, generated tables, bucket assignment, token
positions and the cover-resize + centre-crop."""
import io
import math

import numpy as np
import pytest
from PIL import Image

from lens_jax.data import buckets as B
from lens_jax.models.mmdit import image_positions

# LENS_SPEC §5.5, verbatim: base side -> (buckets W x H, tokens per image, per-GPU batch).
SPEC = {
    512: ("352×704, 384×672, 416×640, 448×608, 512×512, 608×448, 640×416, 672×384, 704×352",
          (968, 1008, 1040, 1064, 1024, 1064, 1040, 1008, 968), 24),
    768: ("544×1088, 576×1024, 640×960, 672×896, 768×768, 896×672, 960×640, 1024×576, 1088×544",
          (2312, 2304, 2400, 2352, 2304, 2352, 2400, 2304, 2312), 10),
    1024: ("736×1472, 768×1376, 832×1248, 864×1152, 1024×1024, 1152×864, 1248×832, 1376×768, 1472×736",
           (4232, 4128, 4056, 3888, 4096, 3888, 4056, 4128, 4232), 6),
}


def test_lens27_table_equals_the_spec():
    t = B.bucket_table("lens27")
    assert t.sides == (512, 768, 1024) and len(t.labels()) == 27
    for a, side in enumerate(t.sides):
        text, tokens, _ = SPEC[side]
        want = tuple(tuple(int(x) for x in s.strip().split("×")) for s in text.split(","))
        assert t.buckets[a] == want
        assert tuple(B.num_tokens(w, h) for w, h in t.buckets[a]) == tokens
        assert all(w % 16 == 0 and h % 16 == 0 for w, h in t.buckets[a])
        # aspect ratios in table order, W:H from 1:2 to 2:1, transposes around 1:1
        aspects = [w / h for w, h in t.buckets[a]]
        assert aspects == sorted(aspects) and t.buckets[a][4] == (side, side)
        assert t.buckets[a][::-1] == tuple((h, w) for w, h in t.buckets[a])
        assert t.max_tokens(a) == max(tokens)


def test_padding_waste_under_ten_percent_within_each_lens27_area():
    t = B.bucket_table("lens27")
    for a, side in enumerate(t.sides):
        worst = max(t.padding_fractions(a))
        assert 0 < worst < 0.10, (side, worst)
    assert t.max_tokens(0) == 1064 and min(t.padding_fractions(0)) == 0.0      # 968 -> 1064 at 512²


def test_lens27_per_device_batches_have_about_equal_token_budgets():
    t = B.bucket_table("lens27")
    budgets = [SPEC[s][2] * t.max_tokens(a) for a, s in enumerate(t.sides)]   # padded slots per device
    assert max(budgets) / min(budgets) < 1.07                                  # ~24K tokens each


@pytest.mark.parametrize("area", [0, 1, 2])
def test_each_lens_ratio_maps_to_its_own_bucket(area):
    t = B.bucket_table("lens27")
    for i, (a, b) in enumerate(B.LENS_RATIOS):
        for scale in (37, 100, 211):                     # any image size with that exact W:H ratio
            assert B.assign_bucket(a * scale, b * scale, t.buckets[area]) == i, (a, b)
        w, h = t.buckets[area][i]
        assert B.assign_bucket(w, h, t.buckets[area]) == i


def test_assignment_is_nearest_in_log_aspect_over_the_whole_range():
    bs = B.bucket_table("lens27").buckets[0]
    logs = [math.log(w / h) for w, h in bs]
    prev = 0
    for r in np.exp(np.linspace(math.log(0.5), math.log(2.0), 241)):      # 1:2 ... 2:1, in-between ratios too
        w, h = int(round(1000 * r)), 1000
        got = B.assign_bucket(w, h, bs)
        dist = [abs(x - math.log(w / h)) for x in logs]
        assert dist[got] == pytest.approx(min(dist), abs=1e-12)
        assert got >= prev                                                  # monotone in the aspect ratio
        prev = got
    assert B.assign_bucket(1250, 1000, bs) == 5          # 5:4 -> 4:3 (608x448)
    assert B.assign_bucket(1000, 1000, bs) == 4
    assert B.assign_bucket(600, 700, bs) == 3            # 6:7 -> 3:4 (448x608)
    assert B.assign_bucket(100, 1000, bs) == 0           # beyond 1:2 -> the 1:2 bucket
    assert B.assign_bucket(3000, 1000, bs) == 8
    with pytest.raises(ValueError):
        B.assign_bucket(0, 10, bs)


def test_make_buckets_generates_multiple_of_16_buckets_near_the_base_area():
    for side in (256, 512, 1024, 1440):
        bs = B.make_buckets(side)
        assert len(bs) == 9
        for (w, h), (a, b) in zip(bs, B.LENS_RATIOS):
            assert w % 16 == 0 and h % 16 == 0
            assert abs(math.log((w / h) / (a / b))) < 0.08
            assert abs(w * h / side ** 2 - 1) < 0.08
    tiny = B.make_buckets(64)                         # 64 px: coinciding buckets kept once
    assert len(set(tiny)) == len(tiny) and (64, 64) in tiny and (48, 96) in tiny and (96, 48) in tiny
    t = B.bucket_table("ar9:64,96,128")
    assert t.sides == (64, 96, 128) and t.buckets[0] == tiny
    assert B.bucket_table("", 512).buckets == (((512, 512),),)
    assert B.bucket_table("ar9", 256).buckets == (B.make_buckets(256),)
    with pytest.raises(ValueError, match="unknown bucket table"):
        B.bucket_table("lens28")
    with pytest.raises(ValueError, match="increasing"):
        B.bucket_table("ar9:128,64")


def test_bucket_positions_match_the_mmdit_grid():
    pos, mask = B.bucket_positions(608, 448, 1064)
    h, w = 448 // 16, 608 // 16
    assert pos.shape == (1064, 3) and pos.dtype == np.int32 and mask.dtype == bool
    np.testing.assert_array_equal(pos[:h * w], image_positions(h, w))
    assert mask[:h * w].all() and not mask[h * w:].any() and not pos[h * w:].any()
    with pytest.raises(ValueError):
        B.bucket_positions(1024, 1024, 1064)


def _jpeg(arr, exif=None):
    buf = io.BytesIO()
    kw = {"exif": exif} if exif is not None else {}
    Image.fromarray(arr).save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def test_resize_center_crop_covers_and_centres():
    # 300 x 100 image: left third red, middle green, right third blue; crop to a square keeps the middle.
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, :100, 0] = 255
    arr[:, 100:200, 1] = 255
    arr[:, 200:, 2] = 255
    out = np.asarray(B.resize_center_crop(Image.fromarray(arr), 64, 64))
    assert out.shape == (64, 64, 3)
    assert out[..., 1].mean() > 250 and out[..., 0].mean() < 5 and out[..., 2].mean() < 5
    # Width-bound: a tall crop of a wide image keeps full height; a wide crop of a tall image keeps full width.
    for (w, h, ow, oh) in [(300, 100, 32, 96), (100, 300, 96, 32), (98, 188, 48, 96), (111, 177, 112, 160)]:
        got = B.resize_center_crop(Image.new("RGB", (w, h)), ow, oh)
        assert got.size == (ow, oh)


def test_decode_resize_draft_matches_full_decode_and_honours_exif():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    arr = np.asarray(Image.fromarray(small).resize((1600, 1200), Image.Resampling.BICUBIC))
    data = _jpeg(arr)
    a = B.decode_resize(data, 608, 448, draft=True)
    b = B.decode_resize(data, 608, 448, draft=False)
    assert a.shape == b.shape == (448, 608, 3) and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 2.0
    # EXIF orientation 6 (rotate 90° on display): a stored 1600x1200 image displays as 1200x1600.
    exif = Image.Exif()
    exif[0x0112] = 6
    rot = _jpeg(arr, exif=exif.tobytes())
    _, size, orientation = B.open_image(rot)
    assert size == (1200, 1600) and orientation == 6
    assert B.decode_resize(rot, 448, 608).shape == (608, 448, 3)
    with pytest.raises(Exception):
        B.decode_resize(data[: len(data) // 2], 64, 64)          # truncated JPEG raises (counted as corrupt)
