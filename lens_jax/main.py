"""The single entry point: `python -m lens_jax.main --config=experiments/<phase>.py[:variant] --workdir=DIR`.

The experiment file's `get_config(arg)` returns a locked ml_collections ConfigDict; `--config.a.b=v`
overrides a value and an unknown key fails. `config.phase` picks what runs:

  pretrain      DiT pretraining (flow matching), with periodic samples and evaluation
  vae           the recipe of a small FLUX.2-architecture VAE (research scale) and its latent BN statistics
  text_encoder  the recipe of a sentencepiece tokenizer and a small GPT-OSS-architecture LM on captions
  rl            RL post-training of the DiT (DiffusionNFT or Flow-GRPO) with rubric rewards from a judge
  distill       a few-step Turbo student from a teacher DiT (DMD2 + decoupled-DMD + adversarial, TTUR, IDA)
  sample        render prompts with a trained DiT
  eval          synthetic GenEval (ShapesEval) of a trained DiT, in GenEval's file protocol

Without --config the embedded default is the tiny CPU pretraining run (experiments/pretrain.py:tiny).

Output is quiet by default: the phase's own lines and a progress bar. absl's `--verbosity=0` (or -v 0) shows
the INFO logs of JAX, Orbax and absl again.
"""
import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from lens_jax.configs.base import ConfigError

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEFAULT_CONFIG = os.path.join(_REPO, "experiments", "pretrain.py") + ":tiny"

PHASES = {
    "pretrain": "lens_jax.phases.pretrain",
    "vae": "lens_jax.recipes.vae",
    "text_encoder": "lens_jax.recipes.text_encoder",
    "rl": "lens_jax.phases.rl",
    "sample": "lens_jax.phases.sample",
    "eval": "lens_jax.phases.evaluate",
    "prompt_search": "lens_jax.phases.prompt_search",
    "distill": "lens_jax.phases.distill",
}

config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Experiment file[:variant].", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, samples and evaluations are written.")


def run(config, workdir: str):
    """Runs `config.phase` in `workdir` (also callable from notebooks and tests)."""
    if config.phase not in PHASES:
        raise ValueError(f"unknown phase {config.phase!r}; choose one of {sorted(PHASES)}")
    os.makedirs(workdir, exist_ok=True)
    if config.get("compile_only", False):
        # Memory planning: compile the full-scale step on fake CPU devices and report (lens_jax/train/compile_only.py).
        if config.phase not in ("pretrain", "rl", "distill"):
            raise ConfigError(f"config.compile_only is supported for phases 'pretrain', 'rl' and 'distill', not "
                              f"{config.phase!r}")
        from lens_jax.train import compile_only
        return compile_only.run(config, workdir)
    module = importlib.import_module(PHASES[config.phase])
    return module.run(config, workdir)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = flags.FLAGS.config
    if not flags.FLAGS["verbosity"].present:      # quiet unless asked: warnings and errors only
        logging.set_verbosity(logging.WARNING)
    workdir = flags.FLAGS.workdir or os.path.join("runs", f"{config.phase}_{config.get('name', 'run')}")
    if config.get("compile_only", False):
        # Before anything starts the JAX backend: N fake CPU devices (as XLA_FLAGS=--xla_force_host_platform_device_count=N).
        from lens_jax.train.compile_only import setup_fake_devices
        if int(config.get("compile_only_devices", 8)) > 0:     # 0: this machine's own devices
            setup_fake_devices(int(config.compile_only_devices))
    try:
        run(config, workdir)
    except (ConfigError, FileNotFoundError) as e:   # configuration and input errors: one clear line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
