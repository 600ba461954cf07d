"""RL prompts of the shapes world with rule-checkable rubrics, from a taxonomy of compositions (LENS_SPEC §8.10).

ShapesEval's pools hold every prompt of GenEval's six templates (lens_jax/eval/shapes_eval.py), so RL here
trains on other compositions, in the world's brief-caption style, and the gain is measured on the templates it
never saw. The taxonomy (data/rl/shapes_taxonomy.json, lens_jax/posttrain/taxonomy.py format) names them:
category -> sub-category (a composition kind below) -> items (the first object's shape):

  coloured count           "two red circles"                               counting
  coloured relation        "a red circle left of a blue square"            position
  three coloured objects   "a red circle, a blue square and a green triangle"  objects
  coloured mixed counts    "two red circles and a blue square"             attributes

No prompt uses a held-out (colour, shape) combination of the world config (those stay unseen). Each record:
{"id", "prompt", "category", "sub_category", "item", "rubrics": {name: check}, "metadata": {"include": [...],
"exclude"?: [...]}, "source": "shapes"}; metadata uses GenEval's clause schema, which is what the
disjointness check of lens_jax/posttrain/prompts.py compares against every evaluation set.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from lens_jax.data.synthetic import BRIEF_PREFIXES, NUMBER_WORDS, ShapesWorldConfig, _count_phrase, _join
from lens_jax.posttrain import shapes_rubrics as R

KINDS = {"coloured count": "counting", "coloured relation": "position", "three coloured objects": "objects",
         "coloured mixed counts": "attributes"}
MIXED_COUNTS = ((2, 1), (1, 2), (3, 1), (1, 3), (2, 2))
MAX_OBJECTS = 4

Group = Tuple[str, str, int]          # (shape, colour, count)


def _rubrics(groups: Sequence[Group], relation: Optional[Tuple[int, str, int]] = None) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for shape, color, n in groups:
        out[f"Object Count Consistency ({shape})"] = R.count_check(shape, n)
        out[f"Color Accuracy ({shape})"] = R.color_check(shape, color)
    if relation is not None:
        a, rel, b = relation
        out["Object Placement and Spatial Reasoning"] = R.relation_check(groups[a][0], rel, groups[b][0])
    out["No Extra Objects"] = R.only_check([g[0] for g in groups])
    return out


def _metadata(groups: Sequence[Group], relation: Optional[Tuple[int, str, int]] = None) -> dict:
    """GenEval clauses; a relation 'A rel B' becomes B's clause first and A's with position [rel, 0]."""
    if relation is not None:
        a, rel, b = relation
        (sb, cb, nb), (sa, ca, na) = groups[b], groups[a]
        return {"include": [{"class": sb, "count": nb, "color": cb},
                            {"class": sa, "count": na, "color": ca, "position": [rel, 0]}]}
    meta = {"include": [{"class": s, "count": n, "color": c} for s, c, n in groups]}
    if len(groups) == 1:
        meta["exclude"] = [{"class": groups[0][0], "count": groups[0][2] + 1}]
    return meta


def _text(groups: Sequence[Group], relation, rng: np.random.Generator) -> str:
    prefix = BRIEF_PREFIXES[int(rng.integers(len(BRIEF_PREFIXES)))]
    if relation is not None:
        a, rel, b = relation
        body = f"{_count_phrase(1, groups[a][1] + ' ' + groups[a][0])} {rel} " \
               f"{_count_phrase(1, groups[b][1] + ' ' + groups[b][0])}"
    else:
        body = _join([_count_phrase(n, f"{c} {s}") for s, c, n in groups])
    return prefix + body


def compositions(kind: str, item: str, cfg: ShapesWorldConfig) -> Iterator[Tuple[List[Group], Optional[tuple]]]:
    """Every composition of `kind` whose first object is the shape `item`, held-out combinations left out."""
    if kind not in KINDS:
        raise ValueError(f"unknown shapes composition {kind!r}; choose one of {sorted(KINDS)}")
    if item not in cfg.shapes:
        raise ValueError(f"shape {item!r} is not in this world (shapes: {cfg.shapes})")
    others = [s for s in cfg.shapes if s != item]
    ok = lambda s: cfg.allowed_colors(s, training=True)  # noqa: E731
    if kind == "coloured count":
        for n in range(2, MAX_OBJECTS + 1):
            for c in ok(item):
                yield [(item, c, n)], None
    elif kind == "coloured relation":
        for b in others:
            for ca, cb in itertools.product(ok(item), ok(b)):
                if ca != cb:
                    for rel in R.RELATIONS:
                        yield [(item, ca, 1), (b, cb, 1)], (0, rel, 1)
    elif kind == "three coloured objects":
        for b, c in itertools.permutations(others, 2):
            for cols in itertools.product(ok(item), ok(b), ok(c)):
                if len(set(cols)) == 3:
                    yield [(item, cols[0], 1), (b, cols[1], 1), (c, cols[2], 1)], None
    else:
        for b in others:
            for (na, nb) in MIXED_COUNTS:
                if na + nb > MAX_OBJECTS:
                    continue
                for ca, cb in itertools.product(ok(item), ok(b)):
                    if ca != cb:
                        yield [(item, ca, na), (b, cb, nb)], None


def _record_id(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]


def make_shapes_rl_prompts(taxonomy, cfg: ShapesWorldConfig, *, seed: int = 0, limit: int = 0) -> List[dict]:
    """RL prompt records (module docstring) for every (category, kind, shape) item of `taxonomy`; with
    `limit` > 0, that many drawn with equal shares per category (seeded)."""
    records: Dict[str, dict] = {}
    for category, kind, item in taxonomy.items():
        for groups, rel in compositions(kind, item, cfg):
            meta = _metadata(groups, rel)
            rid = _record_id(meta)
            if rid in records:
                continue
            rng = np.random.default_rng([int(seed), int(rid[:8], 16)])
            records[rid] = {"id": rid, "prompt": _text(groups, rel, rng), "category": category,
                            "sub_category": kind, "item": item, "rubrics": _rubrics(groups, rel),
                            "metadata": meta, "source": "shapes"}
    out = list(records.values())
    if limit and limit < len(out):
        rng = np.random.default_rng([int(seed), 0x51])
        by_cat: Dict[str, List[dict]] = {}
        for r in out:
            by_cat.setdefault(r["category"], []).append(r)
        cats = sorted(by_cat)
        picked: List[dict] = []
        pools = {c: [by_cat[c][i] for i in rng.permutation(len(by_cat[c]))] for c in cats}
        while len(picked) < limit and any(pools.values()):
            for c in cats:
                if pools[c] and len(picked) < limit:
                    picked.append(pools[c].pop())
        out = picked
    return out


def write_shapes_prompts(taxonomy_path: str, out_path: str, *, seed: int = 0, limit: int = 0, world=None) -> dict:
    """Writes make_shapes_rl_prompts(...) as JSONL (after the disjointness check against ShapesEval's pools);
    world: a ShapesWorldConfig or shapes-world options (`world_from_options`); None = the tiny experiment's."""
    from lens_jax.posttrain.prompts import assert_disjoint, shapes_eval_sets
    from lens_jax.posttrain.taxonomy import load_taxonomy
    cfg = world_from_options(world)
    records = make_shapes_rl_prompts(load_taxonomy(taxonomy_path), cfg, seed=seed, limit=limit)
    assert_disjoint(records, shapes_eval_sets(cfg))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, out_path)
    counts: Dict[str, int] = {}
    for r in records:
        counts[r["category"]] = counts.get(r["category"], 0) + 1
    return {"written": len(records), "skipped": 0, "reused": 0, "per_category": counts, "out": out_path}


def world_from_options(world=None) -> ShapesWorldConfig:
    """A ShapesWorldConfig from itself, a dict of world options (+ image_size, seed), or None (the tiny world)."""
    from lens_jax.data.synthetic import world_config
    if isinstance(world, ShapesWorldConfig):
        return world
    if world is None:
        from lens_jax.configs.base import load_experiment
        c = load_experiment("pretrain", "tiny")
        return world_config(c.data.world, image_size=int(c.data.image_size), seed=int(c.seed))
    opts = dict(world)
    fields = {k: opts.pop(k) for k in ("image_size", "seed") if k in opts}
    return world_config(opts, **fields)


__all__ = ["KINDS", "compositions", "make_shapes_rl_prompts", "write_shapes_prompts", "NUMBER_WORDS"]
