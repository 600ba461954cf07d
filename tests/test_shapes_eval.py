"""Tests for ShapesEval (lens_jax/eval/shapes_eval.py): the evaluator checks itself on ground truth."""
import collections
import math

import numpy as np
import pytest
from scipy import ndimage

from lens_jax.data.synthetic import COLORS, Scene, ShapesWorldConfig, example, place_object, render
from lens_jax.eval import shapes_eval as se

CFG = ShapesWorldConfig()


@pytest.fixture(scope="module")
def prompts():
    return se.make_eval_prompts(CFG, seed=0)


@pytest.fixture(scope="module")
def gt_images(prompts):
    rng = np.random.default_rng(123)
    return [[se.render_prompt_ground_truth(p, rng, CFG, background="random") for _ in range(2)]
            for p in prompts]


def _perturb(img, rng, sigma=1.0, noise=8.0):
    x = ndimage.gaussian_filter(img.astype(np.float32), (sigma, sigma, 0)) + rng.normal(0, noise, img.shape)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def test_prompts_schema(prompts):
    assert len(prompts) == sum(se.GENEVAL_TASK_SIZES.values()) == 553
    tags = collections.Counter(p["tag"] for p in prompts)
    assert dict(tags) == se.GENEVAL_TASK_SIZES
    assert [p["index"] for p in prompts] == list(range(len(prompts)))
    held = set(CFG.active_heldout)
    for p in prompts:
        assert p["prompt"].startswith("a photo of ")
        for c in p["include"]:
            assert c["class"] in CFG.shapes and c["count"] >= 1
        assert p["unseen"] == any((c.get("color"), c["class"]) in held for c in p["include"])
        if p["unseen"]:
            assert p["tag"] in se.COLOR_TASKS
    by = {p["prompt"]: p for p in prompts}
    assert by["a photo of three triangles"]["exclude"] == [{"class": "triangle", "count": 4}]
    assert by["a photo of a circle left of a square"]["include"] == [
        {"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}]
    assert "a photo of a red triangle" in by and by["a photo of a red triangle"]["unseen"]
    assert any(p["tag"] == "color_attr" and p["unseen"] for p in prompts)
    n_unseen = sum(p["unseen"] for p in prompts)
    assert 30 <= n_unseen <= 70
    # deterministic
    assert se.make_eval_prompts(CFG, seed=0) == prompts
    assert len(se.make_eval_prompts(CFG, seed=0, per_task=5)) == 30


def test_ground_truth_scores_perfect(prompts, gt_images):
    res = se.evaluate(gt_images, prompts)
    assert set(res["tasks"]) == set(se.TASKS)
    assert res["num_images"] == 2 * len(prompts) and res["num_prompts"] == len(prompts)
    assert res["overall"] >= 0.98, res
    assert min(res["tasks"].values()) >= 0.97, res
    assert res["unseen"] >= 0.98 and res["seen"] >= 0.98
    assert res["partial"] >= 0.98


def test_ground_truth_fixed_background_and_float_input(prompts):
    rng = np.random.default_rng(7)
    sub = prompts[::5]
    imgs = [[se.render_prompt_ground_truth(p, rng, CFG)] for p in sub]
    assert all(im[0][0, 0].tolist() == [255, 255, 255] for im in imgs)  # eval background: white
    assert se.evaluate(imgs, sub)["overall"] >= 0.98
    as_float = [[im[0].astype(np.float32) / 127.5 - 1.0] for im in imgs]
    assert se.evaluate(as_float, sub)["overall"] >= 0.98


def test_robust_to_blur_and_noise(prompts, gt_images):
    rng = np.random.default_rng(0)
    imgs = [[_perturb(l[0], rng, sigma=1.0, noise=8.0)] for l in gt_images]
    res = se.evaluate(imgs, prompts)
    assert res["overall"] >= 0.9, res
    # soft (supersampled) renders are also read exactly
    cfg_aa = ShapesWorldConfig(antialias=4)
    sub = prompts[::4]
    imgs = [[se.render_prompt_ground_truth(p, rng, cfg_aa, background="random")] for p in sub]
    assert se.evaluate(imgs, sub)["overall"] >= 0.95


def test_blank_and_mismatched_score_low(prompts, gt_images):
    blank = [[np.full((64, 64, 3), 255, np.uint8), np.zeros((64, 64, 3), np.uint8)] for _ in prompts]
    res = se.evaluate(blank, prompts)
    assert res["overall"] < 0.3 and res["overall"] == 0.0
    rng = np.random.default_rng(1)
    noise = [[rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)] for _ in prompts]
    assert se.evaluate(noise, prompts)["overall"] < 0.3
    mismatched = []
    for p in prompts:
        others = [q for q in prompts if q["tag"] == p["tag"] and q["prompt"] != p["prompt"]]
        mismatched.append(others[int(rng.integers(len(others)))])
    res = se.evaluate(gt_images, mismatched)
    assert res["overall"] < 0.3, res
    assert res["tasks"]["counting"] < 0.1 and res["tasks"]["colors"] < 0.1


def test_detector_recovers_training_scenes():
    cfg = ShapesWorldConfig(seed=11)
    for i in range(150):
        ex = example(i, cfg)
        scene = Scene.from_json(ex["metadata"])
        dets = se.detect_objects(ex["image"])
        got = sorted((d["color"], d["shape"]) for d in dets)
        want = sorted((o.color, o.shape) for o in scene.objects)
        assert got == want, (i, got, want)
        for o in scene.objects:  # bbox centres within a pixel of the truth
            d = min(dets, key=lambda d: (d["centroid"][0] - o.cx) ** 2 + (d["centroid"][1] - o.cy) ** 2)
            x0, y0, x1, y1 = d["bbox"]
            assert abs((x0 + x1) / 2 - o.cx) <= 1.5 and abs((y0 + y1) / 2 - o.cy) <= 1.5


def test_diamond_and_large_images():
    cfg = ShapesWorldConfig(shapes=("circle", "square", "triangle", "diamond"), image_size=128)
    prompts = se.make_eval_prompts(cfg, seed=0, per_task=8)
    rng = np.random.default_rng(0)
    imgs = [[se.render_prompt_ground_truth(p, rng, cfg, background="random")] for p in prompts]
    assert se.evaluate(imgs, prompts)["overall"] >= 0.98


def test_rules():
    rng = np.random.default_rng(0)
    red_c = place_object("circle", "red", "medium", 1, 0, rng, CFG)
    blue_s = place_object("square", "blue", "medium", 1, 2, rng, CFG)
    img = render(Scene([red_c, blue_s], "white", 64))
    meta = {p["prompt"]: p for p in se.make_eval_prompts(CFG, 0)}
    for a, b in [("red", "blue"), ("blue", "red")]:
        p = se.make_prompt("color_attr", [{"class": "circle", "count": 1, "color": a},
                                          {"class": "square", "count": 1, "color": b}], cfg=CFG)
        meta[p["prompt"]] = p
    assert meta["a photo of a blue circle and a red square"]["unseen"]  # (blue, circle) held out
    assert se.score_image(img, meta["a photo of a circle left of a square"])
    assert se.score_image(img, meta["a photo of a square right of a circle"])
    assert not se.score_image(img, meta["a photo of a circle right of a square"])
    assert not se.score_image(img, meta["a photo of a circle above a square"])
    assert se.score_image(img, meta["a photo of a circle and a square"])
    assert se.score_image(img, meta["a photo of a red circle and a blue square"])
    assert not se.score_image(img, meta["a photo of a blue circle and a red square"])
    assert se.score_image(img, meta["a photo of a circle"])  # extra objects are allowed (GenEval)
    assert not se.score_image(img, meta["a photo of two circles"])
    ok, partial = se.score_image_partial(img, meta["a photo of two circles"])
    assert not ok and math.isclose(partial, 0.75)  # count clause 0.5, exclude clause 1
    # counting: an extra object of the class fails the exclude clause
    objs = [place_object("triangle", "green", "small", r, c, rng, CFG) for r, c in [(0, 0), (0, 2), (2, 1)]]
    img3 = render(Scene(objs, "black", 64))
    assert se.score_image(img3, meta["a photo of three triangles"])
    assert not se.score_image(img3, meta["a photo of two triangles"])
    assert not se.score_image(img3, meta["a photo of four triangles"])


def test_relative_position_rule():
    # GenEval: shrink by 0.1 * (w_a + w_b), normalise by ||offset||, threshold 0.5
    assert se.relative_position((0, 0, 10, 10), (20, 0, 30, 10)) == {"left of"}
    assert se.relative_position((0, 0, 10, 10), (20, 20, 30, 30)) == {"left of", "above"}
    assert se.relative_position((0, 30, 10, 40), (10, 0, 20, 10)) == {"below"}
    assert se.relative_position((0, 0, 10, 10), (1, 1, 11, 11)) == set()


def test_unknown_and_tiny_components_ignored():
    img = np.full((64, 64, 3), 255, np.uint8)
    img[10:12, 10:12] = COLORS["red"]        # tiny speck
    img[30:34, 5:60] = COLORS["blue"]        # long bar: not a shape class
    dets = se.detect_objects(img)
    assert all(d["shape"] == "unknown" for d in dets)
    assert not any(d["color"] == "red" for d in dets)


def test_save_grid(tmp_path):
    from PIL import Image
    imgs = [example(i, CFG)["image"] for i in range(5)]
    path = tmp_path / "grid.png"
    grid = se.save_grid(imgs, str(path), ncol=3, pad=2)
    assert grid.shape == (2 * 66 + 2, 3 * 66 + 2, 3)
    loaded = np.asarray(Image.open(path))
    np.testing.assert_array_equal(loaded, grid)
    np.testing.assert_array_equal(grid[2:66, 2:66], imgs[0])


def _one_object_image(shape="circle", color="red", background="white", row=1, col=1):
    cfg = ShapesWorldConfig()
    obj = place_object(shape, color, "large", row, col, np.random.default_rng(0), cfg)
    return render(Scene(objects=[obj], background=background, image_size=64))


def test_integrity_gate_rejects_clutter_but_not_clean_images(prompts, gt_images):
    meta = se.make_prompt("single_object", [{"class": "circle", "count": 1}])
    clean = _one_object_image()
    dets, integ = se.analyze_image(clean)
    assert integ == {"spurious": 0, "clutter_frac": 0.0, "clean": True}
    # The same circle plus a smear and specks: GenEval's rules still find "a circle", the gate does not.
    cluttered = clean.copy()
    cluttered[50:53, 4:40] = COLORS["green"]                       # a bar: a spurious, unknown component
    for y, x in ((5, 5), (5, 58), (58, 58), (20, 56)):             # specks below the detection area
        cluttered[y:y + 3, x:x + 3] = COLORS["blue"]
    dets, integ = se.analyze_image(cluttered)
    assert integ["spurious"] == 1 and integ["clutter_frac"] > se.MAX_CLUTTER_FRAC and not integ["clean"]
    assert se.score_detections(dets, meta)[0]                       # rules alone pass
    res = se.evaluate([[cluttered]], [meta])
    assert res["overall"] == 0.0 and res["overall_rules_only"] == 1.0 and res["integrity"] == 0.0
    assert se.evaluate([[cluttered]], [meta], integrity=False)["overall"] == 1.0
    # Off-palette paint near nothing recognised is clutter too (here: a mid-grey square on white).
    grey = clean.copy()
    grey[2:12, 2:12] = (128, 128, 128)
    assert not se.analyze_image(grey)[1]["clean"]
    # Ground truth (blurred and noisy as well) passes the gate.
    rng = np.random.default_rng(5)
    res = se.evaluate([[_perturb(im, rng, 1.3, 12.0) for im in ims] for ims in gt_images], prompts)
    assert res["integrity"] >= 0.99 and res["overall"] >= 0.98 and res["overall"] == res["overall_rules_only"]


def test_attribute_diagnostics_say_which_words_an_image_honours(prompts, gt_images):
    """Ground truth honours every attribute; blanks honour none; a recoloured scene keeps its shapes and counts
    but loses its colours -- the failure analysis can tell these apart."""
    d = se.evaluate(gt_images, prompts)["diagnostics"]
    assert d["blank"] == 0.0 and d["shape_present"] == 1.0 and d["count_exact"] == 1.0 and d["color_present"] == 1.0
    assert 1.0 <= d["objects"] <= 4.0
    blank = [[np.full((64, 64, 3), 255, np.uint8)] for _ in prompts]
    d = se.evaluate(blank, prompts)["diagnostics"]
    assert d == {"blank": 1.0, "objects": 0.0, "shape_present": 0.0, "count_exact": 0.0, "color_present": 0.0}
    # Same scenes, every object in a colour the prompt did not ask for.
    colour_prompts = [p for p in prompts if p["tag"] == "colors"]
    rng = np.random.default_rng(5)
    recoloured = []
    for p in colour_prompts:
        wanted = p["include"][0]["color"]
        scene = se.ground_truth_scene(p, rng, CFG)
        other = next(c for c in CFG.colors if c != wanted)
        for o in scene.objects:
            o.color = other
        recoloured.append([render(scene)])
    d = se.evaluate(recoloured, colour_prompts)["diagnostics"]
    assert d["color_present"] == 0.0 and d["shape_present"] == 1.0 and d["count_exact"] == 1.0 and d["blank"] == 0.0
    checks = se.prompt_attribute_checks([], {"include": [{"class": "circle", "count": 1}]})
    assert "color_present" not in checks     # only prompts that name a colour are counted
