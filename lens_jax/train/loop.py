"""The generic training loop: batches in, jitted steps, metrics, checkpoints, signals, abort rule.

    result = train_loop(state, train_step, source, mesh=..., batch_shardings=..., options=LoopOptions(...),
                        checkpointer=ckpt, writer=writer, progress=progress, config_json=..., on_step=...)

`source` is an iterator of this process's rows of each global batch (a dict of NumPy arrays, or a tuple
of such dicts for micro-batches) with `get_state() -> JSON-able dict` and `set_state(dict)`; its state
after s batches is saved with the train state of step s (checkpoint item 'data_iter'). A Grain
DatasetIterator fits; `StepIndexedSource` wraps a pure function of the step (the latent cache). A source
may also have `metrics() -> {name: number}`: it is called right after each batch is drawn, and its values
(e.g. data statistics of that batch) are merged into that step's logged row.

The step's metrics are whatever the phase's objectives return (lens_jax/train/step.py); the loop reads only
`skipped` (the number of non-finite updates the step left out).

Per step:
  * the step's metrics are fetched one step late (after the next step is dispatched), so the host
    never stalls the device queue; a step with a skipped (non-finite) update is counted here;
    `max_nonfinite_steps` such steps in a row (0 = never) raise NonFiniteError naming the step range;
  * rows go to metrics.jsonl / TensorBoard every `log_every` steps and at the last step: the step's
    metrics plus skipped_total, step_time_s, tokens_per_s and mfu (when the device's peak is known); before a
    checkpoint of step s is written every row up to s is on disk;
  * SIGTERM sets a flag; after the current step every process agrees to stop, saves a checkpoint,
    waits for it to be written and returns `preempted=True` (the caller exits 0).

Fault injection for tests: LENS_JAX_FAULT="STEP:SIGNAL" (e.g. "6:KILL", "7:TERM") makes the process
send itself that signal right after step STEP (after its checkpoint save, if any, was started).
"""
from __future__ import annotations

import collections
import dataclasses
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, Mapping, Optional

import jax
import numpy as np

from lens_jax.train import distributed


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class StopTraining(Exception):
    """Raised by a batch source that cannot go on (e.g. its judge service stays down): the loop stops before
    the step it could not feed, saves the checkpoint of the steps done and returns with `stopped` = the reason."""


class StepIndexedSource:
    """Batches from a pure function of the step: `batch_fn(step)` -> this process's rows of batch `step`.

    The state is only the step, so a resumed run sees exactly the batches an uninterrupted run sees.
    """

    def __init__(self, batch_fn: Callable[[int], Any], step: int = 0):
        self.batch_fn, self.step = batch_fn, int(step)

    def __iter__(self):
        return self

    def __next__(self):
        batch = self.batch_fn(self.step)
        self.step += 1
        return batch

    def get_state(self) -> Dict[str, Any]:
        return {"step": self.step}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])


@dataclasses.dataclass
class LoopOptions:
    num_steps: int
    log_every: int = 1
    max_nonfinite_steps: int = 0          # abort after this many skipped steps in a row; 0 = never
    tokens_per_step: float = 0.0          # global tokens per step (tokens/s)
    flops_per_step: Optional[float] = None  # model FLOPs per step (MFU)
    peak_flops: Optional[float] = None    # peak FLOP/s of all devices together (MFU)


@dataclasses.dataclass
class LoopResult:
    state: Any
    step: int
    preempted: bool
    skipped_total: int
    last_metrics: Dict[str, float]
    stopped: str = ""                     # why the source stopped the run early (StopTraining), else ''



class StopSignal:
    """Installs a SIGTERM handler that only sets a flag; restores the previous handler on exit."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals, self.flag, self._previous = signals, False, {}

    def _handler(self, signum, frame):
        self.flag = True
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}
        return False


def _fault_hook():
    spec = os.environ.get("LENS_JAX_FAULT", "").strip()
    if not spec:
        return None
    at, sig = spec.split(":")
    return int(at), getattr(signal, "SIG" + sig.upper().replace("SIG", ""))


def _headline(m: Mapping[str, float], as_dict: bool = False):
    """The losses, gradient norms, first learning rate and MFU of a metrics row (the progress line)."""
    keys = [k for k in m if k.split("/")[-1] == "loss"] + [k for k in m if k.split("/")[-1] == "grad_norm"]
    lrs = [k for k in m if k.startswith("lr/")]
    out = {k: m[k] for k in keys}
    if lrs:
        out["lr" if len(lrs) == 1 else lrs[0]] = m[lrs[0]]
    if "mfu" in m:
        out["mfu"] = m["mfu"]
    return out if as_dict else ", ".join(f"{k}={v:.4g}" for k, v in out.items())


def _scalar(x) -> int:
    return int(np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x))


def train_loop(state, train_step: Callable, source, *, mesh, batch_shardings: Mapping[str, Any],
               options: LoopOptions, checkpointer=None, config_json: str = "{}", writer=None, progress=None,
               on_step: Optional[Callable[[int, Any], None]] = None, log: Callable[[str], None] = print) -> LoopResult:
    """Runs `train_step` from the state's step to options.num_steps (see the module docstring)."""
    primary = distributed.is_primary()
    say = log if primary else (lambda *_: None)
    step = _scalar(state["step"])
    fault = _fault_hook()
    pending = collections.deque()
    track = dict(streak=0, streak_start=None, skipped_total=0, t_last=time.time(), last_step=step, last={})

    def to_device(local):
        if isinstance(local, (tuple, list)):
            return tuple(distributed.to_global(b, batch_shardings) for b in local)
        return distributed.to_global(local, batch_shardings)

    source_metrics = getattr(source, "metrics", None)
    if not callable(source_metrics):
        source_metrics = None

    def handle(s: int, metrics, data_metrics=None) -> None:
        m = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
        track["last"] = m
        if m.get("skipped", 0) > 0:
            track["skipped_total"] += 1
            track["streak"] += 1
            if track["streak"] == 1:
                track["streak_start"] = s
            if track["streak"] == 1 or track["streak"] % 10 == 0:
                say(f"warning: non-finite loss/gradient at step {s} ({_headline(m)}): update skipped "
                    f"({track['streak']} in a row)")
        else:
            track["streak"], track["streak_start"] = 0, None
        if s % options.log_every == 0 or s == options.num_steps:
            now = time.time()
            dt = (now - track["t_last"]) / max(1, s - track["last_step"])
            track["t_last"], track["last_step"] = now, s
            m.update(skipped_total=track["skipped_total"], step_time_s=dt,
                     tokens_per_s=options.tokens_per_step / dt if dt > 0 else 0.0)
            if options.flops_per_step and options.peak_flops and dt > 0:
                m["mfu"] = options.flops_per_step / dt / options.peak_flops
            if data_metrics:
                m.update(data_metrics)
            if writer is not None:
                writer.write(s, m)
            if progress is not None and primary:
                progress.print(s, **_headline(m, as_dict=True))
        elif progress is not None and primary:
            progress.tick(s)
        n = options.max_nonfinite_steps
        if n and track["streak"] >= n:
            last = checkpointer.latest_step() if checkpointer is not None else None
            raise NonFiniteError(
                f"{track['streak']} steps in a row with a non-finite loss or gradient (steps "
                f"{track['streak_start']}-{s}; {_headline(m)}); their updates "
                f"were skipped. Stopping (config.max_nonfinite_steps={n}); the last checkpoint is "
                f"{'step ' + str(last) if last is not None else 'none'}. Lower the learning rate or check the data.")

    def drain() -> None:
        while pending:
            handle(*pending.popleft())

    def save(s: int) -> bool:
        if checkpointer is None:
            return False
        drain()                      # every metrics row up to s is on disk before checkpoint s exists
        if writer is not None:
            writer.flush()
        return checkpointer.save(s, state, config_json, data_state=source.get_state())

    preempted = False
    stopped = ""
    with StopSignal() as stop:
        while step < options.num_steps:
            try:
                batch = next(source)
            except StopTraining as e:
                stopped = str(e) or type(e).__name__
                say(f"the batch source stopped the run before step {step + 1}: {stopped}")
                break
            data_metrics = dict(source_metrics()) if source_metrics is not None else None
            batch = to_device(batch)
            with jax.set_mesh(mesh):
                state, metrics = train_step(state, batch)
            step += 1
            pending.append((step, metrics, data_metrics))
            while len(pending) > 1:
                handle(*pending.popleft())
            if checkpointer is not None and checkpointer.should_save(step):
                save(step)
            if on_step is not None:
                on_step(step, state)
            if fault is not None and fault[0] == step:
                os.kill(os.getpid(), fault[1])
                time.sleep(0.5)          # let the signal arrive before the next check
            if distributed.any_process(stop.flag):
                drain()
                preempted = True
                break
        drain()
        if preempted:
            saved = save(step)
            if checkpointer is not None:
                checkpointer.wait()
            say(f"SIGTERM: {'saved checkpoint' if saved else 'checkpoint already on disk for'} step {step} "
                f"in {checkpointer.directory if checkpointer else '(no checkpointer)'}; exiting cleanly")
        else:
            save(step)
    return LoopResult(state=state, step=step, preempted=preempted, skipped_total=track["skipped_total"],
                      last_metrics=track["last"], stopped=stopped)
