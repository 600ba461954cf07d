"""Synthetic GenEval of a pretrained DiT: the pretrain experiment's settings with phase='eval'.

  python -m lens_jax.main --config=experiments/eval.py:tiny --workdir=DIR   # DIR = a pretrain workdir
"""
from lens_jax.configs.base import load_experiment


def get_config(arg=None):
    c = load_experiment("pretrain", arg or "tiny")
    c.phase = "eval"
    c.eval.enabled = True
    return c
