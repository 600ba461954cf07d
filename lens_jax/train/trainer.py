"""One trainer for every phase: state of named nets, generic step, loop, checkpoints, resume and metrics.

A phase (or recipe) supplies its nets (`TrainSpec`), its objectives (`Objective`s) and a batch source; `fit`
does the rest:

    result = fit(config, workdir, spec, objectives, make_source, mesh=mesh, batch_shardings=...,
                 options=loop_options, say=print)

  * checkpoints in WORKDIR/checkpoints (one Orbax item per checkpointed net, plus train / data_iter / config;
    lens_jax/train/checkpoints.py) every `config.checkpoint_every` steps, at the end and on SIGTERM;
  * the start: this workdir, `config.resume_from`, the nets' weight sources, scratch (lens_jax/train/resume.py);
    `make_source(start)` gets the Start (its step and data-iterator state) and returns the batch source;
  * the step: `make_train_step(spec, objectives, ...)` jitted by `jit_step` -- the same function
    compile_only lowers (lens_jax/train/compile_only.py), so the planned step is the one that runs;
  * metrics.jsonl + TensorBoard (written off the main thread) and a progress bar on the primary process.

Config keys read (every training experiment has them; configs/base.trainer_config): checkpoint_every,
keep_checkpoints, keep_every, resume_from, tensorboard, config.get('grad_accum_steps', 1).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional, Sequence

import jax

from lens_jax.train import distributed
from lens_jax.train.checkpoints import TrainCheckpointer
from lens_jax.train.loop import LoopOptions, LoopResult, train_loop
from lens_jax.train.metrics import MetricsWriter, Progress
from lens_jax.train.resume import Start, resolve_start
from lens_jax.train.state import TrainSpec
from lens_jax.train.step import Objective, jit_train_step, make_train_step


@dataclasses.dataclass
class FitResult:
    loop: LoopResult
    start: Start

    @property
    def state(self):
        return self.loop.state

    @property
    def step(self) -> int:
        return self.loop.step

    @property
    def preempted(self) -> bool:
        return self.loop.preempted


def jit_step(spec: TrainSpec, objectives: Sequence[Objective], mesh, batch_shardings, *, grad_accum_steps: int = 1,
             rules=None, micro_batch_loop: str = "switch", donate: bool = True):
    """(jitted step, state shardings): make_train_step(...) jitted with the state's and batches' shardings."""
    _, shardings = spec.abstract(mesh)
    step = make_train_step(spec, objectives, grad_accum_steps=grad_accum_steps, micro_batch_loop=micro_batch_loop,
                           rules=rules)
    with jax.set_mesh(mesh):
        return jit_train_step(step, mesh, shardings, batch_shardings, donate=donate), shardings


def checkpointer_for(config, workdir: str, spec: TrainSpec) -> TrainCheckpointer:
    return TrainCheckpointer(os.path.join(workdir, "checkpoints"),
                             nets=[n for n, net in spec.nets.items() if net.checkpoint],
                             max_to_keep=config.keep_checkpoints, save_interval_steps=config.checkpoint_every,
                             keep_every=config.keep_every, cleanup_tmp=True)


def fit(config, workdir: str, spec: TrainSpec, objectives: Sequence[Objective], make_source: Callable[[Start], Any],
        *, mesh, batch_shardings, options: LoopOptions, jit_batch_shardings=None, rules=None,
        on_step: Optional[Callable[[int, Any], None]] = None, on_start: Optional[Callable[[Start], None]] = None,
        say: Callable[[str], None] = print, progress_label: str = "step") -> FitResult:
    """Trains `spec`'s nets with `objectives` from the resolved start to options.num_steps (module docstring).

    batch_shardings: the shardings of one micro-batch dict, used by the loop to place every batch (or micro-
    batch); jit_batch_shardings: what the step's batch argument is (default the same; a tuple for micro-batches).
    """
    primary = distributed.is_primary()
    ckpt = checkpointer_for(config, workdir, spec)
    source = writer = progress = None
    try:
        start = resolve_start(ckpt, spec, mesh, resume_from=config.resume_from, log=say)
        if start.origin != "scratch":
            say(start.description)
        if on_start is not None:
            on_start(start)
        step_fn, _ = jit_step(spec, objectives, mesh, jit_batch_shardings or batch_shardings,
                              grad_accum_steps=int(config.get("grad_accum_steps", 1)), rules=rules)
        source = make_source(start)
        if primary:
            writer = MetricsWriter(workdir, tensorboard=config.tensorboard, resume_at=start.step, log=say)
            progress = Progress(options.num_steps, start=start.step, label=progress_label)
        result = train_loop(start.state, step_fn, source, mesh=mesh, batch_shardings=batch_shardings,
                            options=options, checkpointer=ckpt, config_json=config.to_json_best_effort(),
                            writer=writer, progress=progress, on_step=on_step, log=say)
    finally:
        ckpt.close()
        if progress is not None:
            progress.close()
        if writer is not None:
            writer.close()
        if source is not None and hasattr(source, "close"):
            source.close()
    return FitResult(result, start)


def one_device_mesh():
    """A (1, 1, 1) mesh on the first device: the research recipes' mesh."""
    from lens_jax.train.sharding import make_mesh
    return make_mesh((1, 1, 1), jax.devices()[:1])
