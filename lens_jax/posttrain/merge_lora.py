"""Merging an RL run's LoRA adapters into its DiT as a converted `lens_dit` weights checkpoint (what
tools/convert_checkpoint.py writes for official weights), so `sample` / `eval` / `distill` and the official-layout
exporter read it. The run's config.json gives the model preset and the LoRA spec; `params` picks the trained
policy ('dit') or the old policy ('dit.ema'). A run without adapters (full fine-tuning) is written as is.
"""
from __future__ import annotations

import dataclasses
import json
import os


def merge_run(run: str, out: str, params: str = "dit", step=None, overwrite: bool = False, log=print) -> dict:
    import jax
    import ml_collections
    import numpy as np

    from lens_jax import build
    from lens_jax.checkpoints import orbax_io
    from lens_jax.configs.base import ConfigError
    from lens_jax.models import lora as lora_lib
    from lens_jax.train.resume import open_run
    from lens_jax.train.sharding import make_mesh

    cfg_path = os.path.join(run, "config.json")
    if not os.path.exists(cfg_path):
        raise ConfigError(f"--run={run} has no config.json (is it an rl workdir?)")
    with open(cfg_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if config.get("phase") != "rl":
        raise ConfigError(f"--run={run} is a {config.get('phase')!r} run, not an rl run")
    model = build.build_dit(config)
    spec = build.lora_spec(config)
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    target = build.abstract_dit_params(config, model, mesh)
    ckpt_dir, named_step, ckpt = open_run(os.path.abspath(run), "--run")
    try:
        s = step if step is not None else (named_step if named_step is not None else ckpt.latest_step())
        if s is None:
            raise ConfigError(f"no checkpoint in {ckpt_dir}")
        net, part = (params[:-4], "ema") if params.endswith(".ema") else (params, "params")
        weights = ckpt.restore_weights(int(s), net, target, part=part)   # an EMA's frozen base: from params
    finally:
        ckpt.close()
    merged = lora_lib.merge(weights, spec) if spec is not None else weights
    merged = jax.tree.map(np.asarray, merged)
    cfg = dataclasses.asdict(model.config)
    meta = {"kind": "lens_dit", "preset": config.model.preset, "config": cfg, "source": os.path.abspath(run),
            "step": int(s), "params": params, "lora": None if spec is None else dataclasses.asdict(spec),
            "num_parameters": int(sum(x.size for x in jax.tree.leaves(merged)))}
    orbax_io.save_weights(out, {"params": merged}, meta, overwrite=overwrite)
    log(f"merged {params} of {ckpt_dir} step {s}"
        + (f" (LoRA rank {spec.rank}, scale {spec.scale:g})" if spec else " (no adapters)") + f" -> {out}")
    return meta
