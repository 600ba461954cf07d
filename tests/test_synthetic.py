"""Tests for the shapes world (lens_jax/data/synthetic.py)."""
import json

import numpy as np
import pytest

from lens_jax.data import synthetic as sw
from lens_jax.data.synthetic import (COLORS, BACKGROUNDS, Scene, ShapesWorldConfig, ShapesWorldSource,
                                     brief_caption, dense_caption, example, make_grain_dataset,
                                     render, sample_scene)

CFG = ShapesWorldConfig(seed=3)


def test_example_deterministic():
    for i in (0, 1, 17, 12345):
        a, b = example(i, CFG), example(i, ShapesWorldConfig(seed=3))
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["dense"] == b["dense"] and a["brief"] == b["brief"] and a["metadata"] == b["metadata"]
    # different index / seed -> different example (overwhelmingly likely)
    assert example(0, CFG)["dense"] != example(1, CFG)["dense"]
    assert example(0, CFG)["metadata"] != example(0, ShapesWorldConfig(seed=4))["metadata"]


def test_image_format_and_palette():
    ex = example(5, CFG)
    img = ex["image"]
    assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
    scene = Scene.from_json(ex["metadata"])
    allowed = {COLORS[o.color] for o in scene.objects} | {BACKGROUNDS[scene.background]}
    present = {tuple(int(v) for v in p) for p in img.reshape(-1, 3)}
    assert present == allowed  # hard edges: exactly the palette colours of the scene
    np.testing.assert_array_equal(render(scene), img)  # metadata round-trips to the same render


def test_scene_constraints_and_heldout():
    held = set(CFG.active_heldout)
    assert held  # the default config holds some combinations out
    S = CFG.image_size
    counts = set()
    for i in range(2000):
        scene = Scene.from_json(example(i, CFG)["metadata"])
        n = len(scene.objects)
        counts.add(n)
        assert CFG.min_objects <= n <= CFG.max_objects
        assert scene.background in CFG.backgrounds
        cells = set()
        for o in scene.objects:
            assert (o.color, o.shape) not in held, (i, o)
            assert o.shape in CFG.shapes and o.color in CFG.colors
            assert o.side >= S / 6  # objects are reasonably large
            x0, y0, x1, y1 = o.bbox
            assert 0 <= x0 and 0 <= y0 and x1 <= S and y1 <= S
            cells.add((o.row, o.col))
        assert len(cells) == n  # one object per grid cell -> no overlap
        for a in scene.objects:
            for b in scene.objects:
                if a is not b:
                    ax0, ay0, ax1, ay1 = a.bbox
                    bx0, by0, bx1, by1 = b.bbox
                    gap = max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)
                    assert gap >= 2.0  # boxes separated by >= 2 px
    assert counts == {1, 2, 3, 4}


def test_heldout_can_be_disabled_for_eval_scenes():
    rng = np.random.default_rng(0)
    cfg = ShapesWorldConfig(shapes=("triangle",), colors=("red", "blue"), heldout_combos=(("red", "triangle"),))
    seen = {o.color for _ in range(200) for o in sample_scene(rng, cfg, training=True).objects}
    assert seen == {"blue"}
    seen = {o.color for _ in range(200) for o in sample_scene(rng, cfg, training=False).objects}
    assert seen == {"red", "blue"}


def test_captions_dense_long_brief_short():
    dense_len, brief_len = [], []
    for i in range(300):
        ex = example(i, CFG)
        scene = Scene.from_json(ex["metadata"])
        dense, brief = ex["dense"], ex["brief"]
        dense_len.append(len(dense.split()))
        brief_len.append(len(brief.split()))
        low = dense.lower()
        for o in scene.objects:  # every object's colour+shape is mentioned
            assert f"{o.color} {o.shape}" in low, (dense, o)
        assert scene.background in low
        n = len(scene.objects)
        assert (sw.NUMBER_WORDS[n] in low) or (n == 1 and "single" in low)
        # the brief caption names every shape class present
        for o in scene.objects:
            assert o.shape in brief
    assert np.mean(dense_len) > 40 and min(dense_len) > 30
    assert np.mean(brief_len) < 15
    assert np.mean(dense_len) > 4 * np.mean(brief_len)


def test_caption_relations_and_variety():
    rng = np.random.default_rng(0)
    cfg = ShapesWorldConfig()
    a = sw.place_object("circle", "red", "medium", 1, 0, rng, cfg)
    b = sw.place_object("square", "blue", "medium", 1, 2, rng, cfg)
    scene = Scene([a, b], "white", 64)
    texts = {dense_caption(scene, np.random.default_rng(s)) for s in range(20)}
    assert len(texts) > 5  # template variety
    for t in texts:
        assert "to the left of the blue square" in t
    briefs = {brief_caption(scene, np.random.default_rng(s)) for s in range(50)}
    assert len(briefs) > 5
    assert any("left of" in t or "right of" in t for t in briefs)


def test_relation_captions_name_the_pair_in_both_orders():
    rng = np.random.default_rng(0)
    a = sw.place_object("circle", "red", "medium", 0, 1, rng, CFG)
    b = sw.place_object("square", "blue", "medium", 2, 1, rng, CFG)
    scene = Scene([a, b], "white", 64)
    briefs = {brief_caption(scene, np.random.default_rng(s)) for s in range(400)}
    assert any("circle above a" in t for t in briefs) and any("square below a" in t for t in briefs)
    assert not any("circle below" in t or "square above" in t for t in briefs)  # never the wrong way round


def test_relation_prob_sets_how_often_two_object_captions_are_relations():
    rng = np.random.default_rng(0)
    a = sw.place_object("circle", "red", "medium", 1, 0, rng, CFG)
    b = sw.place_object("square", "blue", "medium", 1, 2, rng, CFG)
    two = Scene([a, b], "white", 64)
    three = Scene([a, b, sw.place_object("triangle", "green", "medium", 0, 1, rng, CFG)], "white", 64)

    def share(scene, p, n=2000, phrase=("left of", "right of")):
        caps = [brief_caption(scene, np.random.default_rng(s), p) for s in range(n)]
        return np.mean([any(r in c for r in phrase) for c in caps]), caps

    assert share(two, 0.0)[0] == 0.0 and share(two, 1.0)[0] == 1.0
    assert abs(share(two, 0.25)[0] - 0.25) < 0.03 and abs(share(two, 0.6)[0] - 0.6) < 0.03
    # The default keeps the earlier split of two-object captions: relation 1/4, colour+shape 1/2, shape-only 1/4.
    caps = share(two, 0.25)[1]
    plain = [c for c in caps if "left of" not in c and "right of" not in c]
    assert abs(np.mean(["red" in c for c in plain]) - 2 / 3) < 0.04
    assert share(three, 1.0)[0] == 0.0                                  # only two-object scenes get relations
    cfg = sw.world_config({"relation_prob": 0.5}, image_size=64, seed=0)
    assert cfg.relation_prob == 0.5
    with pytest.raises(ValueError, match="relation_prob must be in"):
        sw.world_config({"relation_prob": 1.5})


def _scene_cells(cfg, n_scenes=600):
    out = []
    for i in range(n_scenes):
        ex = example(i, cfg)
        out.append((Scene.from_json(ex["metadata"]), ex["brief"], ex["image"]))
    return out


def test_canonical_layout_cells_follow_count_and_caption_order():
    cfg = ShapesWorldConfig(layout="canonical", seed=1)
    allowed = {n: {tuple(c) for c in opts} for n, opts in sw.CANONICAL_CELLS.items()}
    pairs_seen = set()
    for scene, brief, _ in _scene_cells(cfg):
        cells = tuple((o.row, o.col) for o in scene.objects)
        assert cells in allowed[len(scene.objects)], (cells, brief)
        if len(cells) == 2:
            pairs_seen.add(cells)
        # caption order = reading order of the cells: the objects' words appear in that order
        if not any(r in brief for r in sw.INVERSE_RELATION):  # relation captions may name the pair either way
            names = [o.shape for o in scene.objects]
            pos = [brief.index(nm) for nm in dict.fromkeys(names)]
            assert pos == sorted(pos), (brief, names)
    assert pairs_seen == allowed[2]  # side by side and stacked both occur
    with pytest.raises(ValueError, match="at most 4"):
        ShapesWorldConfig(layout="canonical", max_objects=5)
    with pytest.raises(ValueError, match="unknown layout"):
        ShapesWorldConfig(layout="spiral")


def test_token_aligned_geometry_and_zero_jitter():
    # 80 px, grid_span 1.2: cell centres at 8, 40, 72 px = the centres of 16-px tokens 0, 2 and 4.
    cfg = ShapesWorldConfig(image_size=80, grid_span=1.2, jitter=0.0,
                            side_fractions=(11 / 80, 13 / 80, 15 / 80), seed=2)
    for scene, _, img in _scene_cells(cfg, 200):
        assert img.shape == (80, 80, 3)
        for o in scene.objects:
            assert (o.cx, o.cy) == pytest.approx((8 + 32 * o.col, 8 + 32 * o.row))
            assert min(abs(o.side - s) for s in (11, 13, 15)) < 1e-9
            x0, y0, x1, y1 = o.bbox
            assert 16 * (2 * o.col) <= x0 and x1 <= 16 * (2 * o.col + 1)  # inside its token
    # the default geometry is unchanged: centres at 1/6, 1/2, 5/6 of the side plus jitter
    rng = np.random.default_rng(0)
    o = sw.place_object("circle", "red", "large", 2, 0, rng, ShapesWorldConfig(jitter=0.0))
    assert (o.cx, o.cy, o.side) == pytest.approx((64 / 6, 5 * 64 / 6, 0.27 * 64))
    with pytest.raises(ValueError, match="crosses the image border"):
        ShapesWorldConfig(image_size=80, grid_span=1.3)
    with pytest.raises(ValueError, match="does not fit a grid cell"):
        ShapesWorldConfig(side_fractions=(0.18, 0.23, 0.33))
    with pytest.raises(ValueError, match="jitter"):
        ShapesWorldConfig(jitter=1.5)


def test_count_weights():
    import collections
    cfg = ShapesWorldConfig(layout="canonical", count_weights=(6, 0, 1, 1), seed=4)
    counts = collections.Counter(len(Scene.from_json(example(i, cfg)["metadata"]).objects) for i in range(800))
    assert counts[2] == 0 and 0.68 < counts[1] / 800 < 0.82 and counts[3] > 50 and counts[4] > 50
    for bad in ((1, 1), (1, -1, 1, 1), (0, 0, 0, 0)):
        with pytest.raises(ValueError, match="count_weights"):
            ShapesWorldConfig(count_weights=bad)


def test_world_config_from_an_experiment_block():
    from lens_jax.configs import base
    block = base.shapes_world_config()
    assert sw.world_config(block, image_size=64, seed=0) == ShapesWorldConfig(image_size=64, seed=0)
    block.layout = "canonical"
    assert sw.world_config(block, seed=3).layout == "canonical"
    with pytest.raises(ValueError, match="unknown shapes-world option"):
        sw.world_config({"layuot": "canonical"})


def test_world_config_restricts_backgrounds_and_sizes():
    """The tiny experiment's one-background, one-size world: every training scene uses them, the dense caption
    names them, and bad values fail with the option's name."""
    cfg = sw.world_config({"backgrounds": ["white"], "sizes": ("medium",)}, image_size=64, seed=0)
    assert cfg.backgrounds == ("white",) and cfg.sizes == ("medium",)
    for i in range(40):
        scene = Scene.from_json(example(i, cfg)["metadata"])
        assert scene.background == "white"
        assert {o.size for o in scene.objects} == {"medium"}
    assert "white background" in example(0, cfg)["dense"]
    with pytest.raises(ValueError, match="backgrounds"):
        sw.world_config({"backgrounds": "white"})
    with pytest.raises(ValueError, match="unknown background"):
        sw.world_config({"backgrounds": ["beige"]})
    with pytest.raises(ValueError, match="sizes"):
        sw.world_config({"sizes": []})


def test_source_protocol():
    src = ShapesWorldSource(CFG, 10)
    assert len(src) == 10
    assert src[3]["dense"] == example(3, CFG)["dense"]
    with pytest.raises(IndexError):
        src[10]


@pytest.mark.parametrize("caption", ["dense", "brief", "mixed"])
def test_grain_pipeline(caption):
    ds = make_grain_dataset(CFG, size=20, batch_size=4, seed=1, caption=caption, num_epochs=None)
    it = iter(ds)
    batches = [next(it) for _ in range(7)]  # > 1 epoch (5 batches per epoch): repeat before batch
    for b in batches:
        assert b["image"].shape == (4, 64, 64, 3) and b["image"].dtype == np.float32
        assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
        assert b["caption"].shape == (4,) and all(isinstance(c, str) and c for c in b["caption"])
        assert b["metadata"].shape == (4,) and b["index"].shape == (4,)
        json.loads(b["metadata"][0])
    first_epoch = np.concatenate([b["index"] for b in batches[:5]])
    assert sorted(first_epoch.tolist()) == list(range(20))  # a shuffled permutation per epoch
    # images match the source examples
    i = int(batches[0]["index"][0])
    np.testing.assert_allclose(batches[0]["image"][0], example(i, CFG)["image"] / 127.5 - 1.0, atol=1e-6)
    if caption != "mixed":
        assert batches[0]["caption"][0] == example(i, CFG)[caption]
    # deterministic in the seed
    again = next(iter(make_grain_dataset(CFG, size=20, batch_size=4, seed=1, caption=caption)))
    np.testing.assert_array_equal(again["index"], batches[0]["index"])
    assert list(again["caption"]) == list(batches[0]["caption"])


def test_grain_uint8_finite_epochs():
    ds = make_grain_dataset(CFG, size=10, batch_size=4, caption="brief", shuffle=False, num_epochs=2,
                            image_format="uint8", drop_remainder=True)
    batches = list(ds)
    assert len(batches) == 5
    assert batches[0]["image"].dtype == np.uint8
    assert batches[0]["index"].tolist() == [0, 1, 2, 3]


def test_mixed_uses_both_caption_kinds():
    ds = make_grain_dataset(CFG, size=64, batch_size=64, seed=0, caption="mixed", num_epochs=1)
    b = ds[0]
    lens = np.array([len(c.split()) for c in b["caption"]])
    assert (lens > 30).any() and (lens < 15).any()
