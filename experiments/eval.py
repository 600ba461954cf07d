"""Synthetic GenEval of a trained DiT: the pretrain experiment's model settings with phase='eval'.

  python -m lens_jax.main --config=experiments/eval.py:tiny --workdir=DIR            # DIR = a training workdir
  python -m lens_jax.main --config=experiments/eval.py:tiny --workdir=OUT --config.eval.checkpoint=RUN \
      --config.eval.params=dit --config.eval.metadata_file=my_prompts.jsonl            # GenEval's format
  python -m lens_jax.main --config=experiments/eval.py:tiny_turbo --workdir=OUT \
      --config.eval.checkpoint=runs/distill_tiny        # the Turbo preset: a distilled student, 4 steps, guidance 1

Variants: a pretrain variant (stage1 | stage2 | tiny; default tiny), or 'turbo' / 'tiny_turbo' (that model with the
Turbo preset: 4 steps, guidance 1, no unconditional branch, weights 'student').
"""
from lens_jax.configs.base import apply_turbo, load_experiment, split_turbo


def get_config(arg=None):
    variant, turbo = split_turbo(arg)
    c = load_experiment("pretrain", variant or "tiny")
    c.phase = "eval"
    c.eval.enabled = True
    c.eval.checkpoint = ""          # converted lens_dit weights or a run (workdir / checkpoints / step dir); '' = workdir
    c.eval.params = ""              # which weights of a run: 'dit', 'dit.ema', 'student', ...; '' = the EMA if kept
    if turbo:
        apply_turbo(c, variant)
    return c
