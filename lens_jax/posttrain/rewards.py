"""Judges, rubric rewards and the group-relative mappings of RL (LENS_SPEC §8.3-8.4, §8.7).

One judge interface: `judge(image, prompt, rubric_check, rubric_name="") -> 0 | 1 | None` and
`judge_batch([JudgeItem]) -> [0 | 1 | None]` (None: no verdict, never scored as 0 or 1). Implementations:
  RuleJudge                    the shapes world's rules (lens_jax/posttrain/shapes_rubrics.py), in-process
  vlm_judge.VLMJudge           any OpenAI-compatible chat endpoint (GPT-4.1-mini, vLLM, SGLang, or
                               tools/serve_rule_judge.py serving the rules over HTTP)

`score_rollouts` turns one rollout batch into rewards: every image x every rubric of its prompt judged,
r_raw = the aggregate of its verdicts (`aggregate`: the mean by default, LENS_SPEC §8.3), plus per-rubric pass
rates and verdict counts. The mappings from raw rewards to what the losses use work on [G, K] arrays
(G groups = prompts, K images per prompt):
  nft_weights(..., 'lens')       r = 1/2 + 1/2 clip((R - mean_group) / Z, -1, 1), Z = the batch's std
  nft_weights(..., 'reference')  A = (R - mean_group) / std_group clipped to +-5, r = clip(A / 10 + 1/2, 0, 1)
  grpo_advantages                A = (R - mean_group) / std (group std, or the batch's with global_std)
A group whose rewards are all equal carries no signal: it is dropped (valid = False) and counted in
zero_std_ratio.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from lens_jax.posttrain.judging import JudgeItem
from lens_jax.posttrain.shapes_rubrics import GLOBAL_RUBRIC_NAME, RubricError, rubric_family

STD_EPS = 1e-6


class RuleJudge:
    """The shapes-world rule judge behind the judge interface; analyses each distinct image once per batch."""

    def __init__(self):
        self.stats = {"requests": 0, "failed": 0, "unparseable": 0}

    def judge(self, image, prompt: str, rubric_check: str, rubric_name: str = "") -> Optional[int]:
        return self.judge_batch([JudgeItem(np.asarray(image), prompt, rubric_name, rubric_check)])[0]

    def judge_batch(self, items: Sequence[JudgeItem]) -> List[Optional[int]]:
        from lens_jax.posttrain import shapes_rubrics as R
        cache: Dict[int, tuple] = {}
        out: List[Optional[int]] = []
        for it in items:
            self.stats["requests"] += 1
            try:
                check = R.parse_check(it.rubric)
            except RubricError:
                self.stats["unparseable"] += 1
                out.append(None)
                continue
            key = id(it.image)
            if key not in cache:
                cache[key] = R.analyze(np.asarray(it.image))
            out.append(R.verdict(check, *cache[key]))
        return out

    def close(self):
        pass


@dataclasses.dataclass(frozen=True)
class Aggregation:
    """How an image's verdicts become r_raw: the (weighted) mean of the available verdicts, the global rubric
    weighted by `global_weight`; with `gate_global`, an image failing the global rubric gets at most `gate_cap`."""
    global_weight: float = 1.0
    gate_global: bool = False
    gate_cap: float = 0.0


def aggregate(verdicts: Dict[str, Optional[int]], how: Aggregation = Aggregation()) -> Optional[float]:
    """r_raw of one image from {rubric name: 0 | 1 | None}; None when no verdict is available."""
    num = den = 0.0
    for name, v in verdicts.items():
        if v is None:
            continue
        w = how.global_weight if name == GLOBAL_RUBRIC_NAME else 1.0
        num += w * v
        den += w
    if den == 0:
        return None
    r = num / den
    if how.gate_global and verdicts.get(GLOBAL_RUBRIC_NAME) == 0:
        r = min(r, how.gate_cap)
    return float(r)


@dataclasses.dataclass
class Scores:
    rewards: np.ndarray            # [n] float32 r_raw per image (NaN: no verdict at all)
    metrics: Dict[str, float]      # reward mean/std, pass rates, verdict counts


def score_rollouts(judge, images: Sequence[np.ndarray], prompts: Sequence[dict],
                   how: Aggregation = Aggregation()) -> Scores:
    """Judges every image against every rubric of its prompt record (prompts[i] for images[i])."""
    items, owners = [], []
    for i, (img, p) in enumerate(zip(images, prompts)):
        for name, check in p["rubrics"].items():
            items.append(JudgeItem(img, p["prompt"], name, check))
            owners.append((i, name))
    verdicts = judge.judge_batch(items)
    per_image: List[Dict[str, Optional[int]]] = [dict() for _ in images]
    fam: Dict[str, List[int]] = {}
    missing = 0
    for (i, name), v in zip(owners, verdicts):
        per_image[i][name] = v
        if v is None:
            missing += 1
        else:
            fam.setdefault(rubric_family(name), []).append(int(v))
    rewards = np.array([np.nan if (r := aggregate(d, how)) is None else r for d in per_image], np.float32)
    ok = rewards[np.isfinite(rewards)]
    m = {"reward/mean": float(ok.mean()) if ok.size else float("nan"),
         "reward/std": float(ok.std()) if ok.size else float("nan"),
         "judge/verdicts": float(len(verdicts) - missing), "judge/missing": float(missing),
         "judge/images_without_verdict": float(np.sum(~np.isfinite(rewards)))}
    for f, vs in sorted(fam.items()):
        m[f"pass/{f}"] = float(np.mean(vs))
    return Scores(rewards, m)


def _groups(rewards: np.ndarray) -> np.ndarray:
    r = np.asarray(rewards, np.float64)
    if r.ndim != 2:
        raise ValueError(f"rewards must be [groups, images per group]; got {r.shape}")
    return r


def _valid_groups(r: np.ndarray) -> np.ndarray:
    """[G] bool: the group has >= 2 judged images and unequal rewards."""
    finite = np.isfinite(r)
    n = finite.sum(1)
    filled = np.where(finite, r, np.nan)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)      # all-NaN groups (no verdicts) are invalid
        spread = np.nanmax(filled, 1) - np.nanmin(filled, 1)
    return (n >= 2) & (np.nan_to_num(spread) > STD_EPS)


def group_stats(rewards) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean [G, 1], std [G, 1], valid [G]) over each group's judged images."""
    r = _groups(rewards)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean = np.nanmean(r, 1, keepdims=True)
        std = np.nanstd(r, 1, keepdims=True)
    return mean, std, _valid_groups(r)


def nft_weights(rewards, mapping: str = "lens", clip: float = 5.0) -> Tuple[np.ndarray, np.ndarray, Dict[str, float]]:
    """(r [G, K] in [0, 1], weight [G, K] in {0, 1}, metrics) for DiffusionNFT (module docstring).

    weight is 0 for images of dropped groups and for images without a verdict (their r is set to 1/2)."""
    r = _groups(rewards)
    mean, std, valid = group_stats(r)
    finite = np.isfinite(r)
    if mapping == "lens":
        z = np.nanstd(np.where(finite, r, np.nan)) if finite.any() else 0.0
        a = (r - mean) / max(float(z), STD_EPS)
        out = 0.5 + 0.5 * np.clip(a, -1.0, 1.0)
    elif mapping == "reference":
        a = np.clip((r - mean) / np.maximum(std, STD_EPS), -clip, clip)
        out = np.clip(a / 10.0 + 0.5, 0.0, 1.0)
    else:
        raise ValueError(f"NFT reward mapping {mapping!r}; choose 'lens' or 'reference'")
    weight = (valid[:, None] & finite).astype(np.float32)
    out = np.where(weight > 0, out, 0.5).astype(np.float32)
    return out, weight, {"zero_std_ratio": float(1.0 - valid.mean()) if valid.size else 1.0,
                         "nft/r_mean": float(out[weight > 0].mean()) if weight.any() else 0.5}


def grpo_advantages(rewards, global_std: bool = False, clip: float = 5.0
                    ) -> Tuple[np.ndarray, np.ndarray, Dict[str, float]]:
    """(A [G, K] clipped to +-clip, weight [G, K], metrics) for Flow-GRPO (module docstring)."""
    r = _groups(rewards)
    mean, std, valid = group_stats(r)
    finite = np.isfinite(r)
    if global_std:
        std = np.full_like(std, np.nanstd(np.where(finite, r, np.nan)) if finite.any() else 0.0)
    a = np.clip((r - mean) / np.maximum(std, STD_EPS), -clip, clip)
    weight = (valid[:, None] & finite).astype(np.float32)
    a = np.where(weight > 0, a, 0.0).astype(np.float32)
    return a, weight, {"zero_std_ratio": float(1.0 - valid.mean()) if valid.size else 1.0}
