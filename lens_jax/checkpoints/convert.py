"""Convert official PyTorch-layout safetensors checkpoints into lens_jax Orbax weights checkpoints.

Kinds:
  lens_dit   the Lens / Lens-Turbo transformer (`transformer/` of the official release; fp32 or bf16)
  flux2_vae  the diffusers FLUX.2 autoencoder (`vae/`; uses `config.json` beside the weights if present)
  gpt_oss    Hugging Face GPT-OSS-20B (plain or MXFP4 experts, dequantised); only the layers the encoder
             needs are converted

Every kind validates names and shapes from the safetensors headers before reading any tensor, then
streams tensor by tensor. `load_converted(directory)` restores (kind, model config, variables).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Dict, Optional, Tuple

import ml_dtypes
import numpy as np

from lens_jax.checkpoints import orbax_io
from lens_jax.configs.base import DTYPES as CONFIG_DTYPES
from lens_jax.checkpoints.safetensors_io import open_checkpoint

KINDS = ("lens_dit", "flux2_vae", "gpt_oss")
DEFAULT_PRESETS = {"lens_dit": "lens_3p8b", "flux2_vae": "flux2", "gpt_oss": "gpt_oss_20b"}
# Output dtypes of a conversion: the config dtype names, or 'source' (keep each tensor's own dtype).
DTYPES = {**{name: np.dtype(dt) for name, dt in CONFIG_DTYPES.items()}, "source": None}


def model_config(kind: str, preset: Optional[str], overrides: Optional[Dict[str, Any]] = None):
    """The architecture config for a kind and preset name (with optional field overrides)."""
    overrides = dict(overrides or {})
    preset = preset or DEFAULT_PRESETS[kind]
    if kind == "lens_dit":
        from lens_jax.models.mmdit import mmdit_config
        return mmdit_config(preset, **overrides)
    if kind == "flux2_vae":
        from lens_jax.models.vae import vae_config
        return vae_config(preset, **overrides)
    if kind == "gpt_oss":
        from lens_jax.models.gpt_oss import gpt_oss_config
        return gpt_oss_config(preset, **overrides)
    raise ValueError(f"unknown checkpoint kind {kind!r}; choose one of {KINDS}")


def convert(kind: str, src: str, preset: Optional[str] = None, dtype: str = "bfloat16",
            progress: Optional[Callable[[str], None]] = None) -> Tuple[Any, Dict[str, Any]]:
    """Reads a safetensors checkpoint; returns (variables, meta) with NumPy leaves."""
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; choose one of {KINDS}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    out_dtype = DTYPES[dtype]
    reader = open_checkpoint(src)
    if kind == "lens_dit":
        from lens_jax.checkpoints.lens_convert import convert_lens_dit
        cfg = model_config(kind, preset)
        variables = {"params": convert_lens_dit(reader, cfg, dtype=out_dtype, progress=progress)}
    elif kind == "flux2_vae":
        from lens_jax.checkpoints.vae_convert import config_from_diffusers, convert_vae
        cfg_json = os.path.join(src if os.path.isdir(src) else os.path.dirname(src), "config.json")
        if preset is None and os.path.exists(cfg_json):
            with open(cfg_json) as f:
                cfg = config_from_diffusers(json.load(f))
        else:
            cfg = model_config(kind, preset)
        variables = convert_vae(reader, cfg, dtype=out_dtype)
    else:
        from lens_jax.checkpoints.gpt_oss_convert import convert_gpt_oss
        cfg = model_config(kind, preset)
        variables = convert_gpt_oss(reader, cfg, dtype=out_dtype or np.dtype(ml_dtypes.bfloat16))
    meta = {"kind": kind, "preset": preset or DEFAULT_PRESETS[kind], "config": dataclasses.asdict(cfg),
            "source": os.path.abspath(src), "dtype": dtype, "num_source_tensors": len(reader)}
    return variables, meta


def convert_to_orbax(kind: str, src: str, dst: str, preset: Optional[str] = None, dtype: str = "bfloat16",
                     overwrite: bool = False, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """convert() then save an Orbax weights checkpoint at `dst`; prints progress through `log`."""
    t0 = time.time()
    count = [0]

    def progress(name):
        count[0] += 1
        if count[0] % 100 == 0:
            log(f"  converted {count[0]} tensors ({time.time() - t0:.0f}s), last: {name}")

    variables, meta = convert(kind, src, preset, dtype, progress)
    n = sum(int(np.prod(np.shape(x))) for x in _leaves(variables))
    meta["num_parameters"] = n
    log(f"read {meta['num_source_tensors']} tensors, {n:,} values, in {time.time() - t0:.1f}s; writing {dst}")
    orbax_io.save_weights(dst, variables, meta, overwrite=overwrite)
    log(f"done in {time.time() - t0:.1f}s")
    return meta


def load_converted(directory: str):
    """Restores a converted checkpoint: (kind, model config, variables as jax arrays)."""
    meta = orbax_io.load_meta(directory)
    kind = meta["kind"]
    cfg_fields = meta["config"]
    cls = type(model_config(kind, meta["preset"]))
    cfg = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg_fields.items()})
    return kind, cfg, orbax_io.restore_weights(directory)


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree
