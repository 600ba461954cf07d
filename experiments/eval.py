"""Synthetic GenEval of a trained DiT: the pretrain experiment's model settings with phase='eval'.

  python -m lens_jax.main --config=experiments/eval.py:tiny --workdir=DIR            # DIR = a training workdir
  python -m lens_jax.main --config=experiments/eval.py:tiny --workdir=OUT --config.eval.checkpoint=RUN \
      --config.eval.params=dit --config.eval.metadata_file=my_prompts.jsonl            # GenEval's format
"""
from lens_jax.configs.base import load_experiment


def get_config(arg=None):
    c = load_experiment("pretrain", arg or "tiny")
    c.phase = "eval"
    c.eval.enabled = True
    c.eval.checkpoint = ""          # converted lens_dit weights or a run (workdir / checkpoints / step dir); '' = workdir
    c.eval.params = ""              # which weights of a run: 'dit', 'dit.ema', 'student', ...; '' = the EMA if kept
    return c
