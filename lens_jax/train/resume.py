"""Where a training run starts from (JAX_STYLE rule 10), first match wins:

  1. this workdir's newest checkpoint that restores (a broken one falls back to the previous step);
  2. `resume_from`: another run's workdir, checkpoints directory or one step's directory — every
     checkpointed net (weights, optimiser, EMA), step, RNG and the data-iterator position; that directory is
     only read;
  3. a fresh state at step 0: nets with a `load` (weights-only initialisation: a converted checkpoint or
     another run's weights, see `weights_from`) take those weights with a fresh optimiser and EMA = weights;
     the others are initialised from the seed.

Nets that are not checkpointed (`Net.checkpoint=False`, frozen) are rebuilt at every start from their `load`
(or their seeded init). Everything is restored into the *current* mesh: the abstract state built from this
run's mesh and sharding rules is the restore target, so the device count may differ from the saving run's.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Dict, Optional

from lens_jax.configs.base import ConfigError
from lens_jax.train.checkpoints import TrainCheckpointer, find_checkpoint_dir
from lens_jax.train.state import TrainSpec


@dataclasses.dataclass
class Start:
    state: Any
    step: int
    origin: str                       # 'workdir' | 'resume_from' | 'init_from' | 'scratch'
    description: str
    data_state: Optional[Dict[str, Any]] = None


def open_run(path: str, option: str):
    """(checkpoints dir, step or None, read-only TrainCheckpointer) of another run named by `option`."""
    try:
        ckpt_dir, step = find_checkpoint_dir(path)
    except FileNotFoundError as e:
        raise ConfigError(f"{option}: {e}") from None
    return ckpt_dir, step, TrainCheckpointer(ckpt_dir, read_only=True)


def weights_from(path: str, net: str, *, option: str, part: str = "params", kind: str = "",
                 model_config=None, log=print) -> Callable[[Any], Any]:
    """A `Net.load`: abstract sharded weights -> the weights of `path`, which is either
    * a converted weights directory (lens_jax.json; tools/convert_checkpoint.py or a recipe), checked to be
      of `kind` (if given) and, when `model_config` is given, to hold that exact model config; or
    * a run workdir / checkpoints directory / step directory: net `net`'s `part` ('params' or 'ema') of the
      newest (or named) step, optimiser state never read.
    option: the config option that named `path` (for error messages)."""
    from lens_jax.checkpoints import orbax_io

    def load(abstract):
        p = os.path.abspath(path)
        if os.path.exists(os.path.join(p, orbax_io.META_FILE)):
            meta = orbax_io.load_meta(p)
            if kind and meta.get("kind") != kind:
                raise ConfigError(f"{option}={p} holds a {meta.get('kind')!r} checkpoint, not {kind}")
            if model_config is not None:
                from lens_jax.checkpoints.convert import model_config as converted_config
                cls = type(converted_config(meta["kind"], meta["preset"]))
                cfg = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()})
                if cfg != model_config:
                    diff = {k: (getattr(cfg, k), getattr(model_config, k)) for k in meta["config"]
                            if getattr(cfg, k) != getattr(model_config, k, None)}
                    raise ConfigError(f"{option}={p}: its model config differs from this run's "
                                      f"(field: checkpoint vs run): {diff}")
            return orbax_io.restore_weights(p, {"params": abstract})["params"]
        ckpt_dir, step, ckpt = open_run(p, option)
        try:
            step = step if step is not None else ckpt.latest_step()
            if step is None:
                raise ConfigError(f"{option}={p}: no checkpoint in {ckpt_dir}")
            weights = ckpt.restore_weights(step, net, abstract, part=part)
            log(f"{option}: {net} {part} of {ckpt_dir} step {step}")
            return weights
        finally:
            ckpt.close()
    return load


def _saved(spec: TrainSpec, abstract):
    return dict(abstract, nets={n: abstract["nets"][n] for n, net in spec.nets.items() if net.checkpoint})


def _rebuild_unsaved(spec: TrainSpec, mesh, abstract, state):
    """Adds the nets that are not checkpointed (frozen): from their load, else their seeded init."""
    nets = dict(state["nets"])
    for name, net in spec.nets.items():
        if not net.checkpoint:
            params = net.load(abstract["nets"][name]["params"]) if net.load else spec.init_weights(mesh, name)
            nets[name] = {"params": params}
    return dict(state, nets={n: nets[n] for n in spec.names})


def resolve_start(ckpt: TrainCheckpointer, spec: TrainSpec, mesh, *, resume_from: str = "",
                  log=print) -> Start:
    """The train state to start from, following the order in the module docstring."""
    abstract, _ = spec.abstract(mesh)
    saved = _saved(spec, abstract)
    got = ckpt.restore_latest(saved, log=log)
    if got is not None:
        step, state, data_state = got
        return Start(_rebuild_unsaved(spec, mesh, abstract, state), step, "workdir",
                     f"resumed from {ckpt.directory} step {step}", data_state)
    if ckpt.all_steps():
        log(f"warning: no checkpoint in {ckpt.directory} restores; continuing down the resume order")
    if resume_from:
        src_dir, src_step, src = open_run(resume_from, "config.resume_from")
        try:
            got = src.restore_latest(saved, step=src_step, log=log)
        finally:
            src.close()
        if got is None:
            raise ConfigError(f"config.resume_from={resume_from}: no checkpoint in {src_dir} restores")
        step, state, data_state = got
        return Start(_rebuild_unsaved(spec, mesh, abstract, state), step, "resume_from",
                     f"resumed from {src_dir} step {step} (config.resume_from)", data_state)
    loaded = {n: net.load(abstract["nets"][n]["params"]) for n, net in spec.nets.items() if net.load is not None}
    state = spec.create(mesh, loaded)
    trained_loaded = sorted(n for n in loaded if spec[n].checkpoint)
    if trained_loaded:
        return Start(state, 0, "init_from", f"initialised {', '.join(trained_loaded)} from their weight sources "
                                            "(fresh optimiser, step 0)")
    return Start(state, 0, "scratch", "initialised from scratch")

