"""The reasoner run by the local GPT-OSS in JAX (LENS_SPEC §9.1 backend 1): the text encoder's own weights plus its
final norm and LM head, decoded with a KV cache (lens_jax/models/gpt_oss_decode.py).

Each prompt is rendered as a Harmony generation conversation (system message with `reasoning_effort`, the
rewriter prompt + a keep-your-reasoning-private line as developer instructions, the user turn, the generation
prompt ``<|start|>assistant``), sampled at `temperature` / `top_p` until ``<|return|>`` (or `max_new_tokens`), and
the ``final`` channel is parsed from the decoded text (`cleaning.clean_rewrite`). A completion without a final
channel (the budget ran out during the analysis) is an empty rewrite: the original prompt is kept and counted.
"""
from __future__ import annotations

from typing import List

from lens_jax.reasoner.base import RawRewrite, Rewriter
from lens_jax.reasoner.system_prompts import PRIVATE_REASONING
from lens_jax.text.harmony import DEFAULT_DATE, render_generation_prompt

STOP_TOKENS = ("<|return|>", "<|call|>")


class LocalRewriter(Rewriter):
    """GPT-OSS generation in JAX. params: the GptOssLM tree; config: its GptOssConfig; tokenizer: the encoder's."""

    name = "local"

    def __init__(self, params, config, tokenizer, system_prompt: str, *, temperature: float = 0.7,
                 top_p: float = 1.0, max_new_tokens: int = 1024, seed: int = 0, reasoning_effort: str = "low",
                 date: str = DEFAULT_DATE, batch_size: int = 8, dtype=None, token_budget=None):
        super().__init__(token_budget)
        self.params, self.config, self.tokenizer = params, config, tokenizer
        self.system_prompt = system_prompt
        self.temperature, self.top_p, self.max_new_tokens = float(temperature), float(top_p), int(max_new_tokens)
        self.seed, self.reasoning_effort, self.date = int(seed), reasoning_effort, date
        self.batch_size, self.dtype = int(batch_size), dtype
        vocab = tokenizer.get_vocab()
        self.stop_ids = [vocab[t] for t in STOP_TOKENS if t in vocab]
        if not self.stop_ids:
            raise ValueError(f"the tokenizer has none of the stop tokens {STOP_TOKENS}; it is not a Harmony tokenizer")
        self._calls = 0

    def describe(self) -> dict:
        return {"backend": self.name, "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "reasoning_effort": self.reasoning_effort,
                "system_prompt": self.system_prompt}

    def render(self, prompt: str) -> str:
        return render_generation_prompt(prompt, self.system_prompt + "\n\n" + PRIVATE_REASONING, self.date,
                                        self.reasoning_effort)

    def _rewrite_batch(self, prompts: List[str]) -> List[RawRewrite]:
        import jax.numpy as jnp

        from lens_jax.models.gpt_oss_decode import generate
        out: List[RawRewrite] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            ids = [list(self.tokenizer(self.render(p), add_special_tokens=False)["input_ids"]) for p in chunk]
            self._calls += 1
            res = generate(self.params, self.config, ids, max_new_tokens=self.max_new_tokens, stop_ids=self.stop_ids,
                           temperature=self.temperature, top_p=self.top_p, seed=self.seed + self._calls,
                           dtype=self.dtype or jnp.float32)
            out.extend((self.tokenizer.decode(toks, skip_special_tokens=False), None) for toks in res.tokens)
        return out
