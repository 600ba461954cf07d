"""Training-free search of the reasoner's system prompt (LENS_SPEC §9.4, §9.6: an OPRO / GEPA-lite loop).

    result = run_search(config, pipeline, make_rewriter, outdir, proposer)

1. The world's distinct evaluation prompts are split per task into a development part and a held-out part
   (`split_prompts`, by a hash of the prompt text; disjoint, checked). Only the development part is searched on.
2. Round 0 scores every seed candidate on a pool of development prompts; the development set is then the
   `dev_size` pool prompts whose accuracy varies most across the seed candidates (p1's choice; ties by task, in
   turn), so rounds compare candidates where the system prompt matters.
3. Each round, the `beam` best candidates so far each get `children` proposals (a textual failure analysis of
   the parent goes to the proposer: `MutationProposer` for the rule backend's directives, `LlmProposer` for an
   OpenAI-compatible endpoint asked to rewrite the system prompt), scored on the development set with the frozen
   DiT and ShapesEval (same noise seeds for every candidate).
4. Stop after `rounds`, at `max_candidates`, or after `patience` rounds without a gain of `min_delta`.
5. The winner, the first seed and no rewriter are evaluated on the held-out prompts.

Files (OUTDIR): candidates.jsonl (every candidate: round, id, parent, origin, system prompt, development score,
per-task scores, analysis), dev_prompts.json, score_by_round.png, best_system_prompt.txt with its development set
in best_system_prompt.dev.json (evaluation with that file leaves those prompts out), heldout.json, heldout.md.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from lens_jax.configs.base import ConfigError
from lens_jax.eval import shapes_eval
from lens_jax.reasoner.base import Rewriter

CANDIDATES_FILE = "candidates.jsonl"
BEST_FILE = "best_system_prompt.txt"


# ----------------------------------------------------------------------------------------------------------------
# Prompt sets


def _h(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_prompts(world, dev_fraction: float) -> Tuple[Dict[str, List[dict]], Dict[str, List[dict]]]:
    """Per task, the world's distinct prompts split into (development, held-out) by the hash of their text: the
    first ceil(dev_fraction * n) in hash order (at least one, and at least one left held out) are development."""
    if not 0.0 < dev_fraction < 1.0:
        raise ConfigError(f"config.search.dev_fraction={dev_fraction} must lie in (0, 1)")
    dev, held = {}, {}
    for tag in shapes_eval.TASKS:
        pool = [shapes_eval.make_prompt(tag, m["include"], m.get("exclude"), world)
                for m in shapes_eval._all_task_metadata(world, tag)]
        pool.sort(key=lambda p: _h(p["prompt"]))
        if len(pool) < 2:
            raise ConfigError(f"task {tag} has {len(pool)} distinct prompt(s); the search needs two to hold one out")
        n_dev = min(len(pool) - 1, max(1, math.ceil(dev_fraction * len(pool))))
        dev[tag], held[tag] = pool[:n_dev], pool[n_dev:]
    check_disjoint([p for ps in dev.values() for p in ps], [p for ps in held.values() for p in ps])
    return dev, held


def check_disjoint(dev: Sequence[dict], heldout: Sequence[dict]) -> None:
    """Raises when a development prompt is also a held-out prompt (by text)."""
    both = {p["prompt"] for p in dev} & {p["prompt"] for p in heldout}
    if both:
        raise AssertionError(f"{len(both)} prompts are in both the development and the held-out set: {sorted(both)[:3]}")


def take(per_task: Dict[str, List[dict]], n: int, rng: np.random.Generator) -> List[dict]:
    """Up to n prompts per task (cycling when a task has fewer distinct prompts), indexed in order."""
    out = []
    for tag in shapes_eval.TASKS:
        pool = per_task.get(tag, [])
        out.extend(shapes_eval._cycle(pool, min(n, len(pool)) if n > 0 else len(pool), rng))
    return [dict(p, index=i) for i, p in enumerate(out)]


# ----------------------------------------------------------------------------------------------------------------
# Scoring and failure analysis


@dataclasses.dataclass
class Scored:
    """A candidate's result on a prompt list: the summary, per-prompt accuracies, records and rewrites."""
    summary: Dict[str, Any]
    per_prompt: List[float]
    records: List[List[dict]]
    rewrites: List[str]


def score(rewriter: Optional[Rewriter], prompts: List[dict], pipeline, config, samples: int) -> Scored:
    """Rewrites `prompts` (None = as written), renders `samples` images per prompt with config.eval's sampler
    settings and fixed noise, and scores them against the original prompts with ShapesEval."""
    e = config.eval
    texts = [p["prompt"] for p in prompts]
    rewrites = rewriter.rewrite(texts) if rewriter is not None else texts
    size = int(config.data.image_size)
    images = pipeline.generate([t for t in rewrites for _ in range(samples)], size, size, e.num_steps, e.guidance,
                               seed=e.seed, batch_size=e.batch_size, mu=None if e.mu < 0 else e.mu)
    records = [[shapes_eval.score_image_record(images[i * samples + j], p) for j in range(samples)]
               for i, p in enumerate(prompts)]
    summary = shapes_eval.summarize(records, prompts, integrity=bool(e.integrity))
    return Scored(summary, summary["per_prompt"], records, rewrites)


def subset(s: Scored, prompts: List[dict], keep: Sequence[int], integrity: bool) -> Scored:
    recs = [s.records[i] for i in keep]
    ps = [prompts[i] for i in keep]
    summary = shapes_eval.summarize(recs, ps, integrity)
    return Scored(summary, summary["per_prompt"], recs, [s.rewrites[i] for i in keep])


def failure_analysis(prompts: List[dict], s: Scored, integrity: bool, max_examples: int = 6) -> str:
    """A textual summary of what went wrong: per-task accuracy, the failure reasons by count, what the images
    honour, and the worst prompts with their rewrite and the reasons."""
    tasks = ", ".join(f"{t} {v:.2f}" for t, v in s.summary["tasks"].items())
    reasons: Dict[str, int] = {}
    for recs, p in zip(s.records, prompts):
        for r in recs:
            if not shapes_eval.image_correct(r, integrity):
                kinds = list(r["reasons"])
                if not r["clean"] and integrity:
                    kinds.append("spurious objects or clutter")
                for k in kinds or ["wrong"]:
                    key = f"{p['tag']}: {k}"
                    reasons[key] = reasons.get(key, 0) + 1
    top = sorted(reasons.items(), key=lambda kv: -kv[1])[:8]
    d = s.summary["diagnostics"]
    lines = [f"Accuracy by task: {tasks} (overall {s.summary['overall']:.3f}).",
             "Most frequent failures: " + ("; ".join(f"{k} ({n} images)" for k, n in top) or "none") + ".",
             "What the images honour: " + ", ".join(f"{k} {v:.2f}" for k, v in d.items()) + "."]
    worst = sorted(range(len(prompts)), key=lambda i: s.per_prompt[i])[:max_examples]
    for i in worst:
        if s.per_prompt[i] >= 1.0:
            break
        found = "; ".join(sorted({x for r in s.records[i] for x in r["reasons"]})) or "integrity"
        lines.append(f"Failed: {prompts[i]['prompt']!r} (accuracy {s.per_prompt[i]:.2f}; {found}); "
                     f"rewrite: {s.rewrites[i][:240]!r}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Proposers


@dataclasses.dataclass
class Candidate:
    id: int
    round: int
    parent: Optional[int]
    origin: str
    system_prompt: str
    score: float = math.nan
    tasks: Dict[str, float] = dataclasses.field(default_factory=dict)
    analysis: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False)


#: Which directives a task's failures point at (the guided half of the mutation proposer's moves).
TASK_DIRECTIVES = {
    "single_object": ("opening", "style_sentence", "background", "target_words"),
    "two_object": ("enumerate_instances", "pair_layout", "state_positions", "count_summary"),
    "counting": ("enumerate_instances", "count_summary", "state_positions"),
    "colors": ("expand_attributes", "color_summary", "unspecified_color"),
    "position": ("state_positions", "relations", "enumerate_instances"),
    "color_attr": ("color_summary", "enumerate_instances", "expand_attributes"),
}


def _admit(stats: Dict[str, int], seen: set, text: str) -> bool:
    """Counts a proposal as new (and remembers it) or as a duplicate of a system prompt already tried."""
    if text in seen:
        stats["duplicates"] += 1
        return False
    seen.add(text)
    stats["proposed"] += 1
    return True


class MutationProposer:
    """Rule-backend proposals: single-directive changes of the parent, half of them aimed at the directives of
    its weakest task (TASK_DIRECTIVES), the rest at random; never a system prompt already tried."""

    def __init__(self, world, seed: int = 0):
        self.world = world
        self.rng = np.random.default_rng(seed)
        self.stats = {"proposed": 0, "duplicates": 0}

    def propose(self, parent: Candidate, n: int, seen: set) -> List[Tuple[str, str]]:
        from lens_jax.reasoner.rules import Directives
        d = Directives.parse(parent.system_prompt)
        moves = d.mutations(self.world.colors, self.world.backgrounds)
        weakest = None
        if parent.tasks:      # the weakest task (ties broken at random)
            low = min(parent.tasks.values())
            weakest = str(self.rng.choice(sorted(t for t, v in parent.tasks.items() if v == low)))
        guided = [m for m in moves if weakest and m[0].split(":")[0] in TASK_DIRECTIVES[weakest]]
        out: List[Tuple[str, str]] = []
        order = list(self.rng.permutation(len(moves)))
        gorder = list(self.rng.permutation(len(guided)))
        while len(out) < n and (order or gorder):
            use_guided = gorder and (len(out) % 2 == 0 or not order)
            desc, new = guided[gorder.pop()] if use_guided else moves[order.pop()]
            text = new.to_text()
            if not _admit(self.stats, seen, text):
                continue
            out.append((f"mutation ({'aimed at ' + weakest if use_guided else 'random'}): {desc}", text))
        return out


PROPOSER_SYSTEM = ("You optimise the system prompt of a prompt rewriter that sits in front of a text-to-image model. "
                   "The rewriter turns short user prompts into the detailed captions the image model was trained on. "
                   "You get the current system prompt, its score on development prompts and an analysis of the "
                   "generated images' failures. Write an improved system prompt that fixes the failures without "
                   "breaking what works. Reply with the new system prompt only.")


def clean_proposal(text: Optional[str]) -> str:
    """A proposed system prompt from a reply: think blocks, Harmony markers and code fences removed, lines kept."""
    if not text:
        return ""
    from lens_jax.reasoner.cleaning import harmony_final
    final = harmony_final(text)
    text = final if final is not None else text
    text = re.sub(r"<think>.*?</think>", " ", text, flags=re.DOTALL | re.IGNORECASE)
    text = re.sub(r"<\|[a-z_]+\|>", " ", text)
    text = re.sub(r"^\s*```[\w+-]*\s*$", "", text, flags=re.MULTILINE)
    return text.strip().strip('"').strip()


class LlmProposer:
    """Proposals by an OpenAI-compatible chat endpoint (posttrain/chat.py ChatService): the parent's system prompt,
    score and failure analysis in, a new system prompt out. `validate(text)` raises ValueError for a reply that is
    not a usable system prompt (e.g. directives that do not parse); such replies are counted and dropped."""

    def __init__(self, chat, validate: Optional[Callable[[str], None]] = None, format_hint: str = ""):
        self.chat, self.validate, self.format_hint = chat, validate, format_hint
        self.stats = {"proposed": 0, "failed": 0, "empty": 0, "invalid": 0, "duplicates": 0}

    def propose(self, parent: Candidate, n: int, seen: set) -> List[Tuple[str, str]]:
        from lens_jax.posttrain.chat import ChatRequest
        user = (f"Current system prompt:\n<<<\n{parent.system_prompt.strip()}\n>>>\n\n"
                f"Score on the development prompts: {parent.score:.3f} (1.0 = every image correct).\n\n"
                f"Failure analysis:\n{parent.analysis}\n\n" + (self.format_hint + "\n\n" if self.format_hint else "")
                + "Write the improved system prompt.")
        reqs = [ChatRequest([{"role": "system", "content": PROPOSER_SYSTEM}, {"role": "user", "content": user}],
                            ("prompt_search", self.chat.config.model, parent.system_prompt, parent.analysis, k),
                            cache_if=lambda t: bool(clean_proposal(t)))
                for k in range(n)]
        out = []
        for k, res in enumerate(self.chat.map(reqs, desc="proposals")):
            if not res.ok:
                self.stats["failed"] += 1
                continue
            text = clean_proposal(res.text)
            if not text:
                self.stats["empty"] += 1
                continue
            if self.validate is not None:
                try:
                    self.validate(text)
                except (ValueError, ConfigError):
                    self.stats["invalid"] += 1
                    continue
            if not _admit(self.stats, seen, text):
                continue
            out.append((f"llm proposal {k} from candidate {parent.id}", text))
        return out


# ----------------------------------------------------------------------------------------------------------------
# The loop


def choose_dev_set(pool: List[dict], per_prompt: List[List[float]], size: int) -> List[int]:
    """Indices of the `size` pool prompts with the highest accuracy variance across candidates (ties and
    zero-variance fill by task, in turn, in pool order)."""
    if size <= 0 or size >= len(pool):
        return list(range(len(pool)))
    var = np.var(np.asarray(per_prompt, np.float64), axis=0)
    ranked = sorted(range(len(pool)), key=lambda i: -var[i])
    chosen = [i for i in ranked if var[i] > 0][:size]
    by_task: Dict[str, List[int]] = {}
    for i in range(len(pool)):
        if i not in chosen:
            by_task.setdefault(pool[i]["tag"], []).append(i)
    while len(chosen) < size and any(by_task.values()):
        for tag in list(by_task):
            if by_task[tag] and len(chosen) < size:
                chosen.append(by_task[tag].pop(0))
    return sorted(chosen)


def run_search(config, pipeline, make_rewriter: Callable[[str], Rewriter], outdir: str, proposer,
               seeds: Sequence[Tuple[str, str]], world, log=print) -> Dict[str, Any]:
    """The search (module docstring). seeds: [(name, system prompt)]; make_rewriter(system_prompt) -> Rewriter."""
    s = config.search
    integrity = bool(config.eval.integrity)
    os.makedirs(outdir, exist_ok=True)
    rng = np.random.default_rng(int(s.seed))
    dev_split, held_split = split_prompts(world, float(s.dev_fraction))
    pool = take(dev_split, int(s.dev_pool_per_task), rng)
    heldout = take(held_split, int(s.heldout_per_task), rng)
    check_disjoint(pool, heldout)
    samples = int(s.samples_per_prompt)
    t0 = time.time()
    cands: List[Candidate] = []
    seen = set()
    path = os.path.join(outdir, CANDIDATES_FILE)
    out_f = open(path, "w", encoding="utf-8")

    def record(c: Candidate, sc: Scored, prompts: List[dict]):
        c.score, c.tasks = sc.summary["overall"], dict(sc.summary["tasks"])
        c.analysis = failure_analysis(prompts, sc, integrity)
        out_f.write(c.to_json() + "\n")
        out_f.flush()
        log(f"  round {c.round} candidate {c.id} ({c.origin}): dev {c.score:.3f}  [{time.time() - t0:.0f}s]")

    # Round 0: the seeds on the whole pool, then the high-variance development set.
    log(f"prompt search: {len(seeds)} seeds on a pool of {len(pool)} development prompts x {samples} samples")
    pool_scores = []
    for name, text in seeds:
        if text in seen:
            continue
        seen.add(text)
        pool_scores.append(score(make_rewriter(text), pool, pipeline, config, samples))
        cands.append(Candidate(len(cands), 0, None, f"seed: {name}", text))
    keep = choose_dev_set(pool, [sc.per_prompt for sc in pool_scores], int(s.dev_size))
    dev = [dict(pool[i], index=j) for j, i in enumerate(keep)]
    with open(os.path.join(outdir, "dev_prompts.json"), "w") as f:
        json.dump(dict(dev=[p["prompt"] for p in dev], pool=[p["prompt"] for p in pool],
                       heldout=[p["prompt"] for p in heldout]), f, indent=2)
    for c, sc in zip(cands, pool_scores):
        record(c, subset(sc, pool, keep, integrity), dev)

    best = max(cands, key=lambda c: c.score)
    stale = 0
    stopped = "rounds"
    for rnd in range(1, int(s.rounds) + 1):
        if len(cands) >= int(s.max_candidates):
            stopped = "max_candidates"
            break
        parents = sorted(cands, key=lambda c: -c.score)[: int(s.beam)]
        new = []
        for parent in parents:
            for origin, text in proposer.propose(parent, int(s.children), seen):
                if len(cands) + len(new) >= int(s.max_candidates):
                    break
                new.append(Candidate(len(cands) + len(new), rnd, parent.id, origin, text))
        if not new:
            stopped = "no new proposals"
            break
        for c in new:
            record(c, score(make_rewriter(c.system_prompt), dev, pipeline, config, samples), dev)
        cands.extend(new)
        round_best = max(new, key=lambda c: c.score)
        if round_best.score > best.score + float(s.min_delta):
            best, stale = round_best, 0
        else:
            stale += 1
            if stale >= int(s.patience):
                stopped = f"no gain of {s.min_delta} in {s.patience} rounds"
                break
    out_f.close()
    log(f"search stopped ({stopped}) after {len(cands)} candidates: best {best.id} ({best.origin}) dev {best.score:.3f}")

    with open(os.path.join(outdir, BEST_FILE), "w", encoding="utf-8") as f:
        f.write(best.system_prompt)
    from lens_jax.reasoner import dev_file
    with open(dev_file(os.path.join(outdir, BEST_FILE)), "w") as f:
        json.dump(dict(dev_prompts=sorted({p["prompt"] for ps in dev_split.values() for p in ps}), candidate=best.id),
                  f, indent=2)
    plot_rounds(cands, os.path.join(outdir, "score_by_round.png"))

    # Held-out report: no rewriter, the first seed, the winner (same prompts, seeds and weights).
    log(f"held-out evaluation on {len(heldout)} prompts x {int(s.heldout_samples_per_prompt)} samples")
    k = int(s.heldout_samples_per_prompt)
    seed_row = score(make_rewriter(seeds[0][1]), heldout, pipeline, config, k)
    rows = {"no rewriter": score(None, heldout, pipeline, config, k), f"seed: {seeds[0][0]}": seed_row,
            f"searched (candidate {best.id})": (seed_row if best.system_prompt == seeds[0][1] else
                                                score(make_rewriter(best.system_prompt), heldout, pipeline, config, k))}
    report = dict(stopped=stopped, candidates=len(cands), best=dataclasses.asdict(best),
                  proposer=getattr(proposer, "stats", {}), seconds=time.time() - t0,
                  heldout={name: dict(overall=r.summary["overall"], tasks=r.summary["tasks"],
                                      integrity=r.summary["integrity"]) for name, r in rows.items()},
                  num_heldout_prompts=len(heldout), num_dev_prompts=len(dev), num_pool_prompts=len(pool))
    table = heldout_table(rows)
    with open(os.path.join(outdir, "heldout.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(outdir, "heldout.md"), "w") as f:
        f.write(table + "\n")
    log(table)
    return report


def heldout_table(rows: Dict[str, Scored]) -> str:
    tasks = list(next(iter(rows.values())).summary["tasks"])
    lines = ["| prompts rendered from | overall | " + " | ".join(tasks) + " | integrity |",
             "|---|---|" + "---|" * len(tasks) + "---|"]
    for name, r in rows.items():
        t = r.summary["tasks"]
        lines.append(f"| {name} | {r.summary['overall']:.3f} | " + " | ".join(f"{t.get(x, math.nan):.3f}" for x in tasks)
                     + f" | {r.summary['integrity']:.3f} |")
    return "\n".join(lines)


def plot_rounds(cands: List[Candidate], path: str) -> None:
    """Every candidate's development score by round, with the best so far."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = [c.round for c in cands]
    ax.scatter(rounds, [c.score for c in cands], s=18, alpha=0.7, label="candidate")
    best, xs, ys = -math.inf, [], []
    for r in range(max(rounds) + 1):
        best = max([best] + [c.score for c in cands if c.round == r])
        xs.append(r)
        ys.append(best)
    ax.plot(xs, ys, "r-o", label="best so far")
    ax.set_xticks(range(max(rounds) + 1))
    ax.set_xlabel("round")
    ax.set_ylabel("synthetic GenEval on the development set")
    ax.set_title("system-prompt search")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
