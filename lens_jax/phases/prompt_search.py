"""The `prompt_search` phase: training-free search of the reasoner's system prompt with a frozen DiT
(lens_jax/reasoner/search.py; LENS_SPEC §9.4).

    python -m lens_jax.main --config=experiments/prompt_search.py:tiny --workdir=OUT \
        --config.search.checkpoint=RUN

The DiT: config.search.checkpoint (a run workdir / checkpoint dir or converted lens_dit weights; '' = WORKDIR)
and config.search.params ('' = the EMA when kept). The rewriter: config.reasoner (backend rules or api, local
also works); the seed population: config.search.seeds (built-in names or files). Proposals: config.search.proposer
'mutation' (rule directives) or 'llm' (config.reasoner.api's endpoint rewrites the system prompt). Writes
WORKDIR/search/ (search.py's module docstring); use the winner with
--config.reasoner.system_prompt_file=WORKDIR/search/best_system_prompt.txt.
"""
from __future__ import annotations

import os

from lens_jax import build, reasoner
from lens_jax.configs.base import ConfigError
from lens_jax.reasoner import search as search_lib
from lens_jax.reasoner.system_prompts import BUILTIN

PROPOSERS = ("mutation", "llm")


def seed_prompts(config):
    """[(name, system prompt)] of config.search.seeds: a file path, or a built-in name (rules backend: 'default',
    'minimal'; api / local: 'general', 'geneval')."""
    from lens_jax.reasoner.rules import DEFAULT_DIRECTIVES, MINIMAL_DIRECTIVES
    rules = {"default": DEFAULT_DIRECTIVES.to_text(), "minimal": MINIMAL_DIRECTIVES.to_text()}
    known = rules if config.reasoner.backend == "rules" else BUILTIN
    out = []
    for name in config.search.seeds:
        if name in known:
            out.append((name, known[name]))
        elif os.path.isfile(name):
            with open(name, encoding="utf-8") as f:
                out.append((os.path.basename(name), f.read()))
        else:
            raise ConfigError(f"config.search.seeds: {name!r} is neither a file nor a built-in seed {sorted(known)}")
    if not out:
        raise ConfigError("config.search.seeds is empty")
    return out


def make_proposer(config, world, chat):
    """The proposer of config.search.proposer; `chat`: the open ChatService of config.reasoner.api (or None)."""
    s, r = config.search, config.reasoner
    if s.proposer not in PROPOSERS:
        raise ConfigError(f"config.search.proposer={s.proposer!r}; choose one of {PROPOSERS}")
    if s.proposer == "mutation":
        if r.backend != "rules":
            raise ConfigError("config.search.proposer='mutation' mutates rule directives; it needs "
                              "config.reasoner.backend='rules' (use proposer='llm' for text system prompts)")
        return search_lib.MutationProposer(world, seed=s.seed)
    validate, hint = None, ""
    if r.backend == "rules":
        from lens_jax.reasoner.rules import DEFAULT_DIRECTIVES, Directives
        validate = Directives.parse
        hint = ("The system prompt is a list of `key: value` directives, one per line, with exactly these keys "
                "(values as in this example):\n" + DEFAULT_DIRECTIVES.to_text())
    return search_lib.LlmProposer(chat, validate=validate, format_hint=hint)


def run(config, workdir: str):
    from lens_jax.data.synthetic import world_config
    reasoner.validate(config)
    if config.reasoner.backend == "none":
        raise ConfigError("the prompt search needs a reasoner: set --config.reasoner.backend=rules|api|local")
    seeds = seed_prompts(config)
    world = world_config(config.data.world, image_size=config.data.image_size, seed=config.seed)
    chat = None
    if config.reasoner.backend == "api" or config.search.proposer == "llm":
        from lens_jax.reasoner.api import open_chat
        chat = open_chat(config.reasoner.api, workdir)     # one client for every candidate and the proposer
    proposer = make_proposer(config, world, chat)
    enc = build.load_encoders(config)
    model = build.build_dit(config, enc)
    params, what = build.restore_dit(config, model, config.search.checkpoint or workdir, params=config.search.params)
    print(f"prompt search with the frozen {what}", flush=True)
    pipeline = build.build_pipeline(model, params, enc)
    make = lambda text: reasoner.build_rewriter(config, enc, workdir, system_prompt=text, chat=chat)  # noqa: E731
    return search_lib.run_search(config, pipeline, make, os.path.join(workdir, "search"), proposer, seeds, world)
