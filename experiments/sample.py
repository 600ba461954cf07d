"""Render prompts with a trained DiT (the pretrain experiment's model settings, phase='sample').

Variants: a pretrain variant (stage1 | stage2 | tiny; default tiny) for its model settings, or 'turbo' /
'tiny_turbo': the Turbo preset for a distilled student (4 steps, guidance 1, one conditional pass per step;
weights 'student' of a distill run):
  python -m lens_jax.main --config=experiments/sample.py:tiny_turbo --config.sample.checkpoint=runs/distill_tiny \
      --workdir=DIR --config.sample.prompts='a photo of a red circle'

  python -m lens_jax.main --config=experiments/sample.py:tiny --workdir=DIR \
      --config.sample.prompts='a photo of a red circle;a photo of two blue squares'
  python -m lens_jax.main --config=experiments/sample.py:tiny --workdir=DIR --config.sample.prompt_file=prompts.txt
"""
from lens_jax.configs.base import apply_turbo, load_experiment, split_turbo


def get_config(arg=None):
    variant, turbo = split_turbo(arg)
    c = load_experiment("pretrain", variant or "tiny")
    c.phase = "sample"
    c.sample.checkpoint = ""        # converted lens_dit weights or a run (workdir / checkpoints / step dir); '' = this workdir
    c.sample.params = ""            # which weights of a run: 'dit', 'dit.ema', 'student', ...; '' = the EMA when kept
    c.sample.batch_size = 16
    if turbo:
        apply_turbo(c, variant)
    return c
