"""Reasoner system prompts: the general rewriting rules (LENS_SPEC §9.2), the GenEval-specific emphasis (§9.3), the
shapes-world rule directives, and loading a system prompt from config (text or file)."""
from __future__ import annotations

import os

from lens_jax.configs.base import ConfigError

#: The general rules of the Lens rewriter, paraphrased (LENS_SPEC §9.2).
GENERAL = """You rewrite a user's request into one prompt for a text-to-image model that was trained on long, dense \
image captions.
Rules:
1. Output exactly one concrete, faithful, single-scene prompt. No meta text, questions, alternatives or hedging words.
2. Keep every entity, attribute, action, relation and setting the user specified. Add only consistent visual detail \
that introduces no new important objects.
3. When several subjects of the same kind appear, describe each one separately (appearance, colour, size, material, \
pose, position), so that counts become explicit.
4. Cover the whole implied scene: subjects, their relations and the environment.
5. Resolve simple, unambiguous inferences into visible results.
6. Leave an already detailed prompt (nearly) unchanged.
7. Answer in the user's language. Plain text only: no lists, no markdown, no quotes around the prompt."""

#: GenEval emphasis (LENS_SPEC §9.3), appended to GENERAL for object-composition benchmarks.
GENEVAL = GENERAL + """
For this task: stay faithful to exactly the objects, counts and colours asked for; use detector-friendly layouts \
with every object fully visible and well separated; state exact counts and colours; make left/right/above/below \
relations unmistakable by placing the objects clearly apart. Write 45 to 120 words."""

#: The line the official GPT-OSS backend appends to the rewriter prompt (LENS_SPEC §9.1).
PRIVATE_REASONING = "Keep your reasoning private and answer with the final prompt only."

BUILTIN = {"general": GENERAL, "geneval": GENEVAL}


def builtin_rules() -> str:
    """The default shapes-world directive text (lens_jax/reasoner/rules.py DEFAULT_DIRECTIVES)."""
    from lens_jax.reasoner.rules import DEFAULT_DIRECTIVES
    return DEFAULT_DIRECTIVES.to_text()


def resolve_system_prompt(text: str, path: str, backend: str) -> str:
    """The system prompt of config.reasoner: `path` (a file) wins over `text`; `text` may name a built-in
    ('general', 'geneval'; 'rules' for the rule backend); '' = the backend's default. Raises ConfigError for a
    missing or empty file."""
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config.reasoner.system_prompt_file={path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not text.strip():
            raise ConfigError(f"config.reasoner.system_prompt_file={path!r} is empty")
        return text
    if backend == "rules":
        return builtin_rules() if text in ("", "rules") else text
    return BUILTIN.get(text or "geneval", text)
