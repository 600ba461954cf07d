"""Render prompts with a trained DiT (the pretrain experiment's model settings, phase='sample').

  python -m lens_jax.main --config=experiments/sample.py:tiny --workdir=DIR \
      --config.sample.prompts='a photo of a red circle;a photo of two blue squares'
  python -m lens_jax.main --config=experiments/sample.py:tiny --workdir=DIR --config.sample.prompt_file=prompts.txt
"""
from lens_jax.configs.base import load_experiment


def get_config(arg=None):
    c = load_experiment("pretrain", arg or "tiny")
    c.phase = "sample"
    c.sample.checkpoint = ""        # converted lens_dit weights or a run (workdir / checkpoints / step dir); '' = this workdir
    c.sample.params = ""            # which weights of a run: 'dit', 'dit.ema', ...; '' = the EMA when the run keeps one
    c.sample.batch_size = 16
    return c
