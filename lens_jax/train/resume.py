"""Where a training run starts from (JAX_STYLE rule 10), first match wins:

  1. this workdir's newest checkpoint that restores (a broken one falls back to the previous step);
  2. `config.resume_from`: another run's workdir, checkpoints directory or one step's directory —
     the full state (params, optimiser, EMA, step, RNG) and the data-iterator position; that directory
     is only read;
  3. `config.init_from`: weights only, at step 0 with a fresh optimiser (and EMA = the weights): a
     converted official checkpoint (tools/convert_checkpoint.py --kind=lens_dit; a directory with
     lens_jax.json) or a pretrain workdir / checkpoints directory (its 'params');
  4. scratch (`config.seed`).

Everything is restored into the *current* mesh: the abstract state built from this run's mesh and
sharding rules is the restore target, so the device count may differ from the saving run's.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, Optional

import jax

from lens_jax.configs.base import ConfigError
from lens_jax.train.checkpoints import TrainCheckpointer, find_checkpoint_dir


@dataclasses.dataclass
class Start:
    state: Any
    step: int
    origin: str                       # 'workdir' | 'resume_from' | 'init_from' | 'scratch'
    description: str
    data_state: Optional[Dict[str, Any]] = None


def _init_weights(path: str, abstract_params, model_config, log) -> Any:
    """Params restored into `abstract_params` (shapes, dtypes, shardings) from `path`."""
    from lens_jax.checkpoints import orbax_io
    path = os.path.abspath(path)
    if os.path.exists(os.path.join(path, orbax_io.META_FILE)):
        from lens_jax.checkpoints.convert import model_config as converted_config
        meta = orbax_io.load_meta(path)
        if meta.get("kind") != "lens_dit":
            raise ConfigError(f"config.init_from={path} holds a {meta.get('kind')!r} checkpoint, not lens_dit")
        cls = type(converted_config("lens_dit", meta["preset"]))
        cfg = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
        if model_config is not None and cfg != model_config:
            diff = {k: (getattr(cfg, k), getattr(model_config, k)) for k in meta["config"]
                    if getattr(cfg, k) != getattr(model_config, k, None)}
            raise ConfigError(f"config.init_from={path}: its DiT config differs from config.model.preset "
                              f"(field: checkpoint vs run): {diff}")
        return orbax_io.restore_weights(path, {"params": abstract_params})["params"]
    ckpt_dir, step, ckpt = _open_other_run(path, "init_from")
    try:
        step = step if step is not None else ckpt.latest_step()
        if step is None:
            raise ConfigError(f"config.init_from={path}: no checkpoint in {ckpt_dir}")
        params = ckpt.restore_params(step, abstract_params)
        log(f"init_from: params of {ckpt_dir} step {step}")
        return params
    finally:
        ckpt.close()


def _open_other_run(path: str, option: str):
    """(checkpoint dir, step or None, read-only TrainCheckpointer) of another run named by config.<option>."""
    try:
        ckpt_dir, step = find_checkpoint_dir(path)
    except FileNotFoundError as e:
        raise ConfigError(f"config.{option}: {e}") from None
    return ckpt_dir, step, TrainCheckpointer(ckpt_dir, read_only=True)


def resolve_start(ckpt: TrainCheckpointer, abstract_state, create_fn: Callable[[], Any], *,
                  resume_from: str = "", init_from: str = "", model_config=None, log=print) -> Start:
    """The train state to start from, following the order in the module docstring.

    `create_fn()` builds a fresh sharded state (scratch); `abstract_state` is the current mesh's target.
    """
    got = ckpt.restore_latest(abstract_state, log=log)
    if got is not None:
        step, state, data_state = got
        return Start(state, step, "workdir", f"resumed from {ckpt.directory} step {step}", data_state)
    if ckpt.all_steps():
        log(f"warning: no checkpoint in {ckpt.directory} restores; continuing down the resume order")
    if resume_from:
        src_dir, src_step, src = _open_other_run(resume_from, "resume_from")
        try:
            got = src.restore_latest(abstract_state, step=src_step, log=log)
        finally:
            src.close()
        if got is None:
            raise ConfigError(f"config.resume_from={resume_from}: no checkpoint in {src_dir} restores")
        step, state, data_state = got
        return Start(state, step, "resume_from", f"resumed from {src_dir} step {step} (config.resume_from)",
                     data_state)
    state = create_fn()
    if init_from:
        params = _init_weights(init_from, abstract_state["params"], model_config, log)
        state = dict(state, params=params)
        if state.get("ema_params") is not None:
            state["ema_params"] = jax.tree.map(lambda p: p.copy(), params)   # own buffers (the step donates)
        return Start(state, 0, "init_from", f"initialised weights from {os.path.abspath(init_from)} "
                                            "(config.init_from; fresh optimiser, step 0)")
    return Start(state, 0, "scratch", "initialised from scratch")
