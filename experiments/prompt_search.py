"""Training-free search of the reasoner's system prompt (phase 'prompt_search'; LENS_SPEC §9.4, §9.6).

Variants:
  tiny  the shapes world: the rule rewriter's directives mutated, scored by ShapesEval with a frozen tiny DiT
        (trained on dense or mixed captions: a brief-trained one has no use for dense rewrites)
  api   the same search with text system prompts written by an OpenAI-compatible endpoint
        (config.reasoner.api: base URL, model, key from $OPENAI_API_KEY) and rewrites by that endpoint

  python -m lens_jax.main --config=experiments/prompt_search.py:tiny --workdir=runs/search \
      --config.search.checkpoint=runs/tiny_dense
  python -m lens_jax.main --config=experiments/eval.py:tiny --workdir=runs/tiny_dense \
      --config.reasoner.backend=rules --config.reasoner.system_prompt_file=runs/search/search/best_system_prompt.txt
"""
import ml_collections

from lens_jax.configs import base

VARIANTS = ("tiny", "api")


def get_config(arg=None):
    variant = base.parse_variant(arg, VARIANTS, "prompt_search")
    c = base.load_experiment("pretrain", "tiny")
    c.phase = "prompt_search"
    c.name = variant
    c.reasoner.backend = "rules"
    c.search = ml_collections.ConfigDict(dict(
        checkpoint="",              # the frozen DiT: a run workdir / checkpoints dir / converted weights; '' = workdir
        params="",                  # which weights of a run ('' = the EMA when kept)
        seeds=("default", "minimal"),   # the first population: built-in names or system-prompt files
        proposer="mutation",        # mutation (rule directives) | llm (config.reasoner.api rewrites the prompt)
        rounds=5,
        beam=2,                     # parents per round: the best candidates so far
        children=3,                 # proposals per parent per round
        max_candidates=24,
        patience=2,                 # stop after this many rounds without a gain of min_delta
        min_delta=0.0,
        dev_fraction=0.5,           # share of each task's distinct prompts that may be searched on
        dev_pool_per_task=8,        # round-0 pool: development prompts per task
        dev_size=24,                # the high-variance development set scored in rounds >= 1
        samples_per_prompt=2,
        heldout_per_task=24,        # the held-out report: prompts per task, images per prompt
        heldout_samples_per_prompt=4,
        seed=0,
    ))
    if variant == "api":
        c.reasoner.backend = "api"
        c.search.seeds = ("general", "geneval")
        c.search.proposer = "llm"
    return c
