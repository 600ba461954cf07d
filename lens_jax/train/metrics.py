"""Training observability: metrics.jsonl, TensorBoard event files, a progress bar, and MFU.

`MetricsWriter` appends one JSON object per logged step to WORKDIR/metrics.jsonl (full float precision)
and, with `tensorboard=True`, writes the same scalars to TensorBoard event files under
WORKDIR/tensorboard (tensorboardX; no TensorFlow). Rows are written by a background thread, so the training
loop never waits on the disk; `flush()` / `close()` wait for them (and re-raise a write error). On resume from
step s, `resume_at=s` first rewrites metrics.jsonl without the rows of steps > s (written by the interrupted
run after its last checkpoint) and purges those steps from TensorBoard, so the files equal an uninterrupted
run's.

`Progress` is a tqdm bar (shown on interactive terminals only) plus one permanent line per logged step.

MFU = model FLOPs per step / step time / (peak FLOP/s per device x devices). Model FLOPs per step are
3x the DiT's analytic forward FLOPs (lens_jax/models/flops.py; remat recompute is not counted). The
per-device peak comes from `config.peak_tflops` or the table below (dense bf16 tensor-core/MXU peaks); on
CPU or an unknown device MFU is reported only when `config.peak_tflops` is set.
"""
from __future__ import annotations

import json
import math
import os
import queue
import sys
import threading
import time
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

# Dense bf16 peak TFLOP/s per device, by substring of jax's device_kind (first match wins).
PEAK_TFLOPS = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0),
    ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0),
    ("TPU v6 lite", 918.0), ("TPU v6e", 918.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0),
    ("TPU v5", 459.0), ("TPU v4", 275.0), ("TPU v3", 123.0),
)


def peak_tflops_per_device(device_kind: str, platform: str, override: float = 0.0) -> Optional[float]:
    """Peak TFLOP/s of one device: the override if > 0, else the table (None on CPU or unknown kinds)."""
    if override and override > 0:
        return float(override)
    if platform == "cpu":
        return None
    for key, peak in PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            return peak
    return None


def train_flops_per_step(dit_config, global_batch: int, n_img: int, n_txt: int) -> float:
    """3 x analytic forward FLOPs of the global batch (lens_jax/models/flops.py)."""
    from lens_jax.models.flops import train_flops
    return train_flops(dit_config, global_batch, n_img, n_txt)


def _py(v: Any):
    v = np.asarray(v)
    if v.ndim == 0:
        return v.item()
    return v.tolist()


def truncate_jsonl(path: str, last_step: int) -> int:
    """Rewrites `path` keeping rows with step <= last_step (and unparsable-free lines); returns rows dropped."""
    if not os.path.exists(path):
        return 0
    keep, dropped = [], 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:     # a line cut by a kill mid-write
                dropped += 1
                continue
            if int(row.get("step", -1)) > last_step:
                dropped += 1
            else:
                keep.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return dropped


class MetricsWriter:
    """metrics.jsonl (+ TensorBoard scalars), written off the main thread. Only the writing process should
    create one."""

    def __init__(self, workdir: str, filename: str = "metrics.jsonl", tensorboard: bool = False,
                 resume_at: Optional[int] = None, log: Callable[[str], None] = print, prefix: str = "train/"):
        self.path = os.path.join(workdir, filename)
        self.prefix = prefix
        dropped = 0
        if resume_at is not None:
            dropped = truncate_jsonl(self.path, resume_at)
            if dropped:
                log(f"{filename}: dropped {dropped} rows after step {resume_at} (written after the last checkpoint)")
        self._f = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                log("warning: tensorboardX is not installed; no TensorBoard event files (pip install tensorboardX)")
            else:
                # purge_step hides events of steps >= purge_step left by an interrupted run.
                purge = resume_at is not None and (dropped or resume_at > 0)
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                         purge_step=resume_at + 1 if purge else None,
                                         flush_secs=10)
        self._queue: "queue.Queue" = queue.Queue()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._work, name="lens_jax-metrics", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            row = self._queue.get()
            try:
                if row is None:
                    return
                if self._error is None:
                    self._write(row)
            except BaseException as e:   # noqa: BLE001 - reported on the main thread by flush / close
                self._error = e
            finally:
                self._queue.task_done()

    def _write(self, row: Dict[str, Any]) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{self.prefix}{k}", v, int(row["step"]))

    def write(self, step: int, metrics: Mapping[str, Any]) -> Dict[str, Any]:
        """Queues one row (values converted to Python numbers now); returns it."""
        row = {"step": int(step), **{k: _py(v) for k, v in metrics.items()}}
        self._queue.put(row)
        return row

    def flush(self) -> None:
        self._queue.join()
        if self._error is not None:
            raise RuntimeError(f"writing {self.path} failed: {self._error}") from self._error
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._f.close()
        if self._tb is not None:
            self._tb.close()
        if self._error is not None:
            raise RuntimeError(f"writing {self.path} failed: {self._error}") from self._error


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


class Progress:
    """A tqdm progress bar (interactive terminals only) and permanent lines for logged steps.

    `print(step, **values)` writes a line ('step 25/100 loss=0.5 ... | 3.20 it/s, ETA 1m02s') above the bar;
    `tick(step)` only moves the bar. Non-interactive output (logs, CI) gets the lines and no bar.
    """

    def __init__(self, total: int, start: int = 0, label: str = "step", stream=None,
                 interactive: Optional[bool] = None):
        from tqdm.auto import tqdm
        self.total, self.start, self.label = total, start, label
        self.stream = stream or sys.stdout
        self.t0 = time.time()
        if interactive is None:
            interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interactive = interactive
        self._bar = tqdm(total=total, initial=start, desc=label, file=self.stream, disable=not interactive,
                         dynamic_ncols=True, leave=False, unit=label)
        self._pos = start

    def line(self, step: int, **values) -> str:
        done = step - self.start
        elapsed = time.time() - self.t0
        rate = done / elapsed if elapsed > 0 and done > 0 else float("nan")
        eta = (self.total - step) / rate if rate and not math.isnan(rate) else float("nan")
        frac = min(1.0, step / self.total) if self.total else 1.0
        vals = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        return (f"{self.label} {step}/{self.total} ({100 * frac:.1f}%) {vals} | {rate:.2f} it/s, "
                f"ETA {_fmt_time(eta)}")

    def _move(self, step: int) -> None:
        if step > self._pos:
            self._bar.update(step - self._pos)
            self._pos = step

    def print(self, step: int, **values) -> None:
        self._move(step)
        line = self.line(step, **values)
        if self.interactive:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def tick(self, step: int) -> None:
        self._move(step)

    def close(self) -> None:
        self._bar.close()


def plot_metrics(workdir: str, panels: Sequence[Tuple[str, Sequence[str]]], path: str) -> Optional[str]:
    """Plots WORKDIR/metrics.jsonl: one panel per (title, [metric keys]) against the step, saved as PNG at `path`.
    Keys missing from every row are left out; returns the path, or None when there is nothing to plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = []
    src = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(src):
        return None
    with open(src) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    panels = [(t, [k for k in keys if any(k in r for r in rows)]) for t, keys in panels]
    panels = [(t, keys) for t, keys in panels if keys]
    if not rows or not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for k in keys:
            pts = [(r["step"], r[k]) for r in rows if k in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k.split("/", 1)[-1], lw=1.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
