"""Shapes-world RL prompts, rubrics and the rule judge; prompt files; disjointness from evaluation sets."""
import json

import numpy as np
import pytest

from lens_jax.data.synthetic import world_config
from lens_jax.eval import shapes_eval
from lens_jax.posttrain import prompts as P
from lens_jax.posttrain import shapes_rubrics as R
from lens_jax.posttrain.rewards import RuleJudge, score_rollouts
from lens_jax.posttrain.shapes_prompts import make_shapes_rl_prompts, world_from_options, write_shapes_prompts
from lens_jax.posttrain.taxonomy import load_taxonomy

TAXONOMY = "data/rl/shapes_taxonomy.json"


@pytest.fixture(scope="module")
def world():
    return world_from_options(None)


@pytest.fixture(scope="module")
def records(world):
    return make_shapes_rl_prompts(load_taxonomy(TAXONOMY), world, seed=0, limit=400)


def test_rubric_sentences_round_trip_through_the_parser():
    cases = [(R.count_check("circle", 3), R.Check("count", shape="circle", count=3)),
             (R.count_check("square", 1), R.Check("count", shape="square", count=1)),
             (R.color_check("triangle", "red"), R.Check("color", shape="triangle", color="red")),
             (R.relation_check("circle", "left of", "square"),
              R.Check("relation", shape="circle", relation="left of", other="square")),
             (R.only_check(["circle", "square", "triangle"]),
              R.Check("only", shapes=("circle", "square", "triangle"))),
             (R.GLOBAL_RUBRIC, R.Check("integrity"))]
    for text, check in cases:
        assert R.parse_check(text) == check, text
    for bad in ("", "Is the image pretty?", "The image contains exactly seven hexagons.",
                "Every circle in the image is mauve."):
        with pytest.raises(R.RubricError):
            R.parse_check(bad)


def test_rl_prompts_are_disjoint_from_every_shapes_eval_prompt(world, records):
    cats = P.category_counts(records)
    assert set(cats) == {"counting", "position", "objects", "attributes"} and min(cats.values()) >= 60
    P.assert_disjoint(records, P.shapes_eval_sets(world))       # raises on any collision
    held = set(world.active_heldout)
    for r in records:
        for c in r["metadata"]["include"]:
            assert (c["color"], c["class"]) not in held
    # the check does catch collisions: an evaluation template in the RL set, by metadata or by text
    ev = shapes_eval.make_eval_prompts(world, seed=0, per_task=2)
    leak = dict(records[0], prompt="A photo of " + ev[-1]["prompt"][len("a photo of "):].upper() + ".")
    with pytest.raises(ValueError, match="also evaluation prompts"):
        P.assert_disjoint([leak], P.shapes_eval_sets(world))
    leak2 = dict(records[0], prompt="something else", metadata={"include": list(reversed(ev[0]["include"]))})
    with pytest.raises(ValueError, match="also evaluation prompts"):
        P.assert_disjoint([leak2], [("mine", ev)])


def test_the_rule_judge_passes_ground_truth_renders_and_fails_wrong_ones(world, records):
    rng = np.random.default_rng(0)
    judge = RuleJudge()
    picked = [r for r in records if r["category"] in ("counting", "position", "objects")][::40][:12]
    imgs, wrong = [], []
    for r in picked:
        meta = {"prompt": r["prompt"], **r["metadata"]}
        imgs.append(shapes_eval.render_prompt_ground_truth(meta, rng, world))
        wrong.append(np.full_like(imgs[-1], 255))                # a blank white image
    recs = [dict(r, rubrics=dict(r["rubrics"], **{R.GLOBAL_RUBRIC_NAME: R.GLOBAL_RUBRIC})) for r in picked]
    good = score_rollouts(judge, imgs, recs)
    assert np.all(good.rewards == 1.0), good.rewards
    bad = score_rollouts(judge, wrong, recs)
    assert np.all(bad.rewards < 0.7) and good.metrics["pass/Object Count Consistency"] == 1.0


def test_prompt_files_with_bad_rubrics_give_clear_errors(tmp_path):
    good = {"prompt": "two red circles", "category": "counting", "rubrics": {"n": R.count_check("circle", 2)}}
    cases = {"missing": {"prompt": "x", "category": "c"}, "empty": dict(good, rubrics={}),
             "list": dict(good, rubrics=["a"]), "blank check": dict(good, rubrics={"n": " "})}
    for name, rec in cases.items():
        f = tmp_path / f"{name.replace(' ', '_')}.jsonl"
        f.write_text(json.dumps(good) + "\n" + json.dumps(rec) + "\n")
        with pytest.raises(P.PromptFileError, match=r"line 2: .*rubric"):
            P.load_rl_prompts(str(f))
    f = tmp_path / "ok.jsonl"
    f.write_text(json.dumps(good) + "\n")
    (rec,) = P.load_rl_prompts(str(f))
    assert rec["rubrics"][R.GLOBAL_RUBRIC_NAME] == R.GLOBAL_RUBRIC


def test_write_shapes_prompts_writes_a_loadable_file(tmp_path):
    out = tmp_path / "rl.jsonl"
    summary = write_shapes_prompts(TAXONOMY, str(out), seed=1, limit=40)
    recs = P.load_rl_prompts(str(out))
    assert summary["written"] == len(recs) == 40
    assert all(len(r["rubrics"]) <= 11 for r in recs)
