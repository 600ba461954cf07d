"""The reasoner behind an OpenAI-compatible chat endpoint (GPT-4.1 / GPT-5.x, or vLLM / SGLang serving a local
model), through the official `openai` client with posttrain/chat.py's retries, timeouts, concurrency limit and
on-disk cache. The API key comes only from the environment variable named by `api_key_env`.

One request per distinct prompt: messages = [system: the rewriter prompt, user: the prompt]. The cache key is
(backend, model, system prompt, prompt, temperature); a reply is cached only when it cleans to a non-empty prompt.
"""
from __future__ import annotations

import os
from typing import List

from lens_jax.posttrain.chat import ChatConfig, ChatRequest, ChatService
from lens_jax.reasoner.base import RawRewrite, Rewriter
from lens_jax.reasoner.cleaning import clean_rewrite


class ApiRewriter(Rewriter):
    """Rewrites through `chat` (a ChatConfig, or an open ChatService) under `system_prompt`."""

    name = "api"

    def __init__(self, chat, system_prompt: str, token_budget=None, check_reachable: bool = True):
        super().__init__(token_budget)
        self.chat = chat if isinstance(chat, ChatService) else ChatService(chat)
        self.system_prompt = system_prompt
        if check_reachable and not isinstance(chat, ChatService):
            self.chat.check_reachable()      # JudgeUnavailableError naming the URL: fail before any work

    def describe(self) -> dict:
        c = self.chat.config
        return {"backend": self.name, "base_url": c.base_url, "model": c.model, "temperature": c.temperature,
                "system_prompt": self.system_prompt}

    def _rewrite_batch(self, prompts: List[str]) -> List[RawRewrite]:
        c = self.chat.config
        reqs = [ChatRequest([{"role": "system", "content": self.system_prompt}, {"role": "user", "content": p}],
                            ("reasoner", c.model, self.system_prompt, p, c.temperature),
                            cache_if=lambda text: bool(clean_rewrite(text)))
                for p in prompts]
        return [(r.text, r.error) for r in self.chat.map(reqs, desc="reasoner")]

    def close(self) -> None:
        self.chat.close()


def chat_config(api_cfg) -> ChatConfig:
    """A ChatConfig from config.reasoner.api (no key: only the name of its environment variable)."""
    return ChatConfig(base_url=api_cfg.base_url, model=api_cfg.model, api_key_env=api_cfg.api_key_env,
                      timeout_s=float(api_cfg.timeout_s), max_retries=int(api_cfg.max_retries),
                      backoff_s=float(api_cfg.backoff_s), concurrency=int(api_cfg.concurrency),
                      temperature=None if api_cfg.temperature < 0 else float(api_cfg.temperature),
                      max_tokens=int(api_cfg.max_tokens) or None, cache_dir=api_cfg.cache_dir)


def open_chat(api_cfg, workdir: str) -> ChatService:
    """A reachable ChatService for config.reasoner.api (cache '' = WORKDIR/reasoner_cache); raises
    JudgeUnavailableError naming the URL otherwise."""
    cfg = chat_config(api_cfg)
    cfg.cache_dir = cfg.cache_dir or os.path.join(workdir, "reasoner_cache")
    chat = ChatService(cfg)
    chat.check_reachable()
    return chat
