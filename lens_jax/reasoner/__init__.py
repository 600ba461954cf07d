"""The reasoner: a prompt rewriter in front of the DiT (LENS_SPEC §9), and the training-free search of its system
prompt (search.py, the `prompt_search` phase).

    rewriter = build_rewriter(config, encoders, workdir)     # None when config.reasoner.backend == 'none'
    prompts = rewriter.rewrite(short_prompts)

Backends (base.Rewriter): RuleRewriter (rules.py, the shapes world's directive-driven rewriter), ApiRewriter
(api.py, any OpenAI-compatible chat endpoint), LocalRewriter (local.py, the text encoder's GPT-OSS run
generatively in JAX).
"""
from __future__ import annotations

import os
from typing import Optional

from lens_jax.configs.base import ConfigError
from lens_jax.reasoner.base import Rewriter, RewriteRecord, TokenBudget
from lens_jax.reasoner.system_prompts import resolve_system_prompt

BACKENDS = ("none", "rules", "api", "local")
DEV_SUFFIX = ".dev.json"


def dev_file(system_prompt_file: str) -> str:
    """The development-set sidecar the prompt search writes next to a system prompt file."""
    return os.path.splitext(system_prompt_file)[0] + DEV_SUFFIX


def dev_prompts(config) -> list:
    """The prompts the configured system prompt was searched on (its sidecar, if any): evaluation leaves them
    out, so a searched prompt is never scored on the prompts it was tuned on."""
    import json
    r = config.reasoner
    if r.backend == "none" or not r.system_prompt_file or not os.path.isfile(dev_file(r.system_prompt_file)):
        return []
    with open(dev_file(r.system_prompt_file), encoding="utf-8") as f:
        return list(json.load(f)["dev_prompts"])


def validate(config) -> None:
    r = config.reasoner
    if r.backend not in BACKENDS:
        raise ConfigError(f"config.reasoner.backend={r.backend!r}; choose one of {BACKENDS}")


def build_rewriter(config, encoders, workdir: str, system_prompt: Optional[str] = None,
                   chat=None) -> Optional[Rewriter]:
    """The rewriter of config.reasoner (None for backend 'none'); `system_prompt` overrides the configured one
    (the search builds one rewriter per candidate this way); `chat`: an open ChatService for backend 'api' to
    share (one client, cache and reachability check for every candidate)."""
    validate(config)
    r = config.reasoner
    if r.backend == "none":
        return None
    if system_prompt is None:
        system_prompt = resolve_system_prompt(r.system_prompt, r.system_prompt_file, r.backend)
    budget = TokenBudget(encoders.tokenizer, encoders.prompt) if r.fit_token_cap else None
    if r.backend == "rules":
        from lens_jax.data.synthetic import world_config
        from lens_jax.reasoner.rules import RuleRewriter
        world = world_config(config.data.world, image_size=config.data.image_size, seed=config.seed)
        return RuleRewriter(system_prompt, shapes=world.shapes, token_budget=budget)
    if r.backend == "api":
        from lens_jax.reasoner.api import ApiRewriter, open_chat
        if chat is not None:
            return ApiRewriter(chat, system_prompt, token_budget=budget, check_reachable=False)
        return ApiRewriter(open_chat(r.api, workdir), system_prompt, token_budget=budget)
    from lens_jax import build
    from lens_jax.models.gpt_oss_decode import load_lm
    from lens_jax.reasoner.local import LocalRewriter
    loc = r.local
    te_dir = build.resolve_path(config.text_encoder.checkpoint, "config.text_encoder.checkpoint")
    lm_dir = build.resolve_path(loc.checkpoint, "config.reasoner.local.checkpoint") if loc.checkpoint else te_dir
    shared = getattr(encoders.encode_text, "params", None) if os.path.samefile(lm_dir, te_dir) else None
    lm_config, params = load_lm(lm_dir, encoder_params=shared)
    return LocalRewriter(params, lm_config, encoders.tokenizer, system_prompt, temperature=loc.temperature,
                         top_p=loc.top_p, max_new_tokens=loc.max_new_tokens, seed=loc.seed,
                         reasoning_effort=loc.reasoning_effort, date=encoders.prompt.date,
                         batch_size=loc.batch_size, token_budget=budget)



__all__ = ["BACKENDS", "Rewriter", "RewriteRecord", "TokenBudget", "build_rewriter", "dev_prompts", "validate"]
