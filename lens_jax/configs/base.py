"""Shared configuration defaults. Experiment files in `experiments/` hold only deltas over these.

Every value lives in one place: the model architecture in the model presets (`lens_jax/models/*`),
training defaults here, and per-experiment deltas in `experiments/<phase>.py`.
"""
from __future__ import annotations

import importlib.util
import os

import jax.numpy as jnp
import ml_collections

from lens_jax.models import attention as attention_lib
from lens_jax.models import remat as remat_lib


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the option to set."""


# The one table of dtype names a config may use (compute, parameter and checkpoint dtypes).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_of(name: str, option: str = "dtype"):
    """The jnp dtype of a config dtype name; ConfigError naming `option` otherwise."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ConfigError(f"{option}={name!r}; choose one of {tuple(DTYPES)}") from None
EXPERIMENTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                               "experiments")


def parse_variant(arg, variants, experiment: str) -> str:
    """The variant name of `experiments/<experiment>.py[:arg]`: '' / None -> variants[0]; 'variant=x' -> x.

    Raises ValueError listing the valid variants.
    """
    variant = (arg or variants[0]).strip()
    if variant.startswith("variant="):
        variant = variant[len("variant="):]
    if variant not in variants:
        raise ValueError(f"unknown variant {variant!r} of experiments/{experiment}.py; "
                         f"valid variants: {list(variants)}")
    return variant


def load_experiment(name: str, arg=None) -> ml_collections.ConfigDict:
    """get_config(arg) of experiments/<name>.py, for experiment files that extend another one."""
    path = os.path.join(EXPERIMENTS_DIR, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_lens_experiment_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def model_config(preset: str = "lens_3p8b") -> ml_collections.ConfigDict:
    """The DiT: a preset name from lens_jax.models.mmdit.PRESETS plus runtime choices."""
    return ml_collections.ConfigDict(dict(
        preset=preset,
        attention="cudnn",          # lens_jax.models.attention registry: xla | cudnn | einsum
        remat_policy="full",        # lens_jax.models.remat registry
        scan_layers=True,
        dtype="bfloat16",           # compute dtype
        param_dtype="float32",      # master weights
    ))


def text_encoder_config() -> ml_collections.ConfigDict:
    """The frozen GPT-OSS encoder and its prompt template (LENS_SPEC §4)."""
    return ml_collections.ConfigDict(dict(
        preset="gpt_oss_20b",
        checkpoint="",              # converted Orbax weights (tools/convert_checkpoint.py --kind=gpt_oss)
        tokenizer="",               # local tokenizer directory or tokenizer.json
        date="2026-05-23",          # Harmony template date, pinned for reproducible features
        max_length=512,
        txt_offset=97,              # -1: computed from the tokenizer
        pad_id=199999,              # -1: the tokenizer's <|endoftext|>
        trim_to=64,                 # > 0: run the encoder only up to the batch's longest prompt, rounded up
        dtype="bfloat16",
    ))


def vae_config() -> ml_collections.ConfigDict:
    """The frozen FLUX.2 VAE (LENS_SPEC §3)."""
    return ml_collections.ConfigDict(dict(
        preset="flux2",
        checkpoint="",              # converted Orbax weights (tools/convert_checkpoint.py --kind=flux2_vae)
        dtype="bfloat16",
    ))


def optim_config(lr: float) -> ml_collections.ConfigDict:
    """AdamW (0.9, 0.999) with global-norm clipping 1.0 and a constant LR (LENS_SPEC §6.1, §12.2); built by
    lens_jax/train/optim.py for every phase and recipe."""
    return ml_collections.ConfigDict(dict(
        lr=lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=1.0, warmup_steps=0,
        schedule="constant",        # constant | cosine (to final_lr_fraction * lr at the last step)
        final_lr_fraction=0.0,
        # (regex over '/'-joined parameter paths, lr multiplier or None = frozen), first match wins; () = train all
        policy=(),
    ))


def trainer_config(c: ml_collections.ConfigDict, *, checkpoint_every: int, log_every: int) -> None:
    """The trainer's run settings (lens_jax/train/trainer.py), set on an experiment's top level."""
    c.log_every = log_every
    c.checkpoint_every = checkpoint_every  # 0 = only at the end (and on SIGTERM)
    c.keep_checkpoints = 3          # keep the newest N checkpoints ...
    c.keep_every = 0                # ... plus every K-th step's checkpoint for good (0 = off)
    c.resume_from = ""              # if this workdir has no checkpoint: another run's workdir, checkpoints/ or
                                    # checkpoints/STEP dir; full state + data position, continues its step count
    c.max_nonfinite_steps = 20      # abort after this many non-finite (skipped) steps in a row; 0 = never
    c.tensorboard = True            # TensorBoard event files under WORKDIR/tensorboard (tensorboardX)


def validate_trainer(config) -> None:
    """Checks the trainer_config keys; raises ConfigError naming the option."""
    if config.num_steps < 0:
        raise ConfigError("config.num_steps must be non-negative")
    if config.log_every <= 0:
        raise ConfigError(f"config.log_every={config.log_every} must be positive")
    if config.checkpoint_every < 0 or config.keep_every < 0:
        raise ConfigError("config.checkpoint_every and config.keep_every must be >= 0 (0 = off)")
    if config.keep_checkpoints < 1:
        raise ConfigError(f"config.keep_checkpoints={config.keep_checkpoints} must be at least 1")
    if config.max_nonfinite_steps < 0:
        raise ConfigError(f"config.max_nonfinite_steps={config.max_nonfinite_steps} must be >= 0 (0 = never abort)")
    if config.resume_from and not os.path.exists(config.resume_from):
        raise ConfigError(f"config.resume_from={config.resume_from} does not exist")


def shapes_world_config() -> ml_collections.ConfigDict:
    """Shapes-world layout and geometry (`config.data.world`), defaulting to ShapesWorldConfig's random world.

    layout: random (random distinct cells of the 3x3 grid) | canonical (cells follow from the object count and
    caption order); grid_span: distance between cell centres / (image_size / 3); jitter: offset within a cell as
    a fraction of the largest (0 = cell centres); side_fractions: object side / image side for the small, medium
    and large sizes; count_weights: relative frequencies of 1..4 objects per training scene (() = uniform);
    backgrounds / sizes: the background colours and object sizes training scenes draw from; relation_prob: the
    share of two-object brief captions that are relation phrases ("a red circle left of a blue square").
    See lens_jax/data/synthetic.py and RESULTS.md (sessions 6-8).
    """
    from lens_jax.data.synthetic import WORLD_FIELDS, ShapesWorldConfig
    defaults = ShapesWorldConfig()
    return ml_collections.ConfigDict({f: getattr(defaults, f) for f in WORLD_FIELDS})


def timestep_config() -> ml_collections.ConfigDict:
    """Logit-normal sigma sampling; mu from the image-token count (LENS_SPEC §6.2)."""
    return ml_collections.ConfigDict(dict(
        mu=-1.0,                    # < 0: resolution rule mu(n) = mu_lo + (mu_hi - mu_lo)(n - n_lo)/(n_hi - n_lo)
        mu_lo=1.0, mu_hi=1.3, n_lo=256, n_hi=4096,
        std=1.0,
    ))


def sample_config(num_steps: int = 20, guidance: float = 5.0) -> ml_collections.ConfigDict:
    """Sampler settings (LENS_SPEC §7): Euler, FLUX.2 empirical-mu shift, CFG with norm rescale."""
    return ml_collections.ConfigDict(dict(
        num_steps=num_steps, guidance=guidance, height=1024, width=1024, seed=0, negative_prompt="",
        mu=-1.0,                    # sigma-schedule shift; < 0 = FLUX.2 empirical mu (token count, steps)
        prompts="",                 # ';'-separated, or use prompt_file
        prompt_file="",
        batch_size=4,
    ))


def split_turbo(arg) -> tuple:
    """(pretrain variant, turbo?) of a sample / eval variant: 'turbo' = the Lens model with the Turbo preset,
    '<variant>_turbo' (e.g. 'tiny_turbo') = that variant's model with it; anything else as is."""
    arg = (arg or "").strip()
    if arg == "turbo":
        return "stage1", True
    if arg.endswith("_turbo"):
        return arg[:-len("_turbo")], True
    return arg or None, False


def apply_turbo(c: ml_collections.ConfigDict, variant: str) -> None:
    """The Turbo preset (LENS_SPEC §7.4-7.5): a distilled student's 4 steps at guidance 1, so the sampler makes one
    conditional pass per step and computes no unconditional branch (a distill run's weights: its 'student'), on
    the sigma grid experiments/distill.py distils that variant's student for (its distill.student_mu)."""
    d = load_experiment("distill", "tiny" if variant == "tiny" else "lens").distill
    for section in ("sample", "eval"):
        if section in c:
            c[section].num_steps = int(d.student_steps)
            c[section].guidance = 1.0
            c[section].mu = float(d.student_mu)


def reasoner_config() -> ml_collections.ConfigDict:
    """The prompt rewriter in front of the DiT (LENS_SPEC §9; lens_jax/reasoner/). backend 'none' = off."""
    return ml_collections.ConfigDict(dict(
        backend="none",             # none | rules (shapes world) | api (OpenAI-compatible chat) | local (GPT-OSS)
        system_prompt="",           # the rewriter's system prompt, or a built-in name: general | geneval (api,
                                    # local; '' = geneval) | rules ('' = the default directives)
        system_prompt_file="",      # a file holding the system prompt (wins over system_prompt); a search's
                                    # best_system_prompt.txt carries its dev prompts in a sibling .dev.json
        fit_token_cap=True,         # cut a rewrite (at a word) so the templated prompt fits the encoder's cap
        api=ml_collections.ConfigDict(dict(
            base_url="https://api.openai.com/v1", model="gpt-4.1", api_key_env="OPENAI_API_KEY",
            timeout_s=60.0, max_retries=5, backoff_s=1.0, concurrency=16,
            temperature=-1.0,       # < 0 = the server's default
            max_tokens=0,           # 0 = the server's default
            cache_dir="",           # '' = WORKDIR/reasoner_cache
        )),
        local=ml_collections.ConfigDict(dict(
            checkpoint="",          # a GPT-OSS directory with lm_head/; '' = config.text_encoder.checkpoint
                                    # (then the encoder's weights are reused, loaded once)
            temperature=0.7, top_p=1.0, max_new_tokens=1024, seed=0, reasoning_effort="low", batch_size=8,
        )),
    ))


def validate_common(config: ml_collections.ConfigDict) -> None:
    """Checks names and ranges shared by the DiT phases; raises ConfigError naming the option."""
    m = config.model
    try:
        attention_lib.get_attention(m.attention)
        remat_lib.check(m.remat_policy)
    except ValueError as e:
        raise ConfigError(f"config.model: {e}") from None
    for key in ("dtype", "param_dtype"):
        if m[key] not in DTYPES:
            raise ConfigError(f"config.model.{key}={m[key]!r}; choose one of {tuple(DTYPES)}")
