"""Training observability: metrics.jsonl, TensorBoard event files, a progress bar, and MFU.

`MetricsWriter` appends one JSON object per logged step to WORKDIR/metrics.jsonl (full float precision)
and, with `tensorboard=True`, writes the same scalars to TensorBoard event files under
WORKDIR/tensorboard (tensorboardX; no TensorFlow). On resume from step s, `resume_at=s` first rewrites
metrics.jsonl without the rows of steps > s (written by the interrupted run after its last checkpoint)
and purges those steps from TensorBoard, so the files equal an uninterrupted run's.

MFU = model FLOPs per step / step time / (peak FLOP/s per device x devices). Model FLOPs per step are
3x the DiT's analytic forward FLOPs (forward + backward; remat recompute is not counted), from
`forward_flops` in tools/bench_dit.py. The per-device peak comes from `config.peak_tflops` or the
table below (dense bf16 tensor-core/MXU peaks); on CPU or an unknown device MFU is reported only
when `config.peak_tflops` is set.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from typing import Any, Callable, Dict, Mapping, Optional

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


def _bench_dit_module():
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "tools", "bench_dit.py")
    if not os.path.exists(path):
        return None
    spec = importlib.util.spec_from_file_location("_lens_jax_bench_dit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_flops_per_step(dit_config, global_batch: int, n_img: int, n_txt: int) -> Optional[float]:
    """3 x analytic forward FLOPs of the global batch (tools/bench_dit.py); None if tools/ is absent."""
    module = _bench_dit_module()
    if module is None:
        return None
    return 3.0 * module.forward_flops(dit_config, global_batch, n_img, n_txt)


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
    """metrics.jsonl (+ TensorBoard scalars). Only the writing process should create one."""

    def __init__(self, workdir: str, filename: str = "metrics.jsonl", tensorboard: bool = False,
                 resume_at: Optional[int] = None, log: Callable[[str], None] = print):
        self.path = os.path.join(workdir, filename)
        dropped = 0
        if resume_at is not None:
            dropped = truncate_jsonl(self.path, resume_at)
            if dropped:
                log(f"metrics.jsonl: dropped {dropped} rows after step {resume_at} (written after the last checkpoint)")
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

    def write(self, step: int, metrics: Mapping[str, Any]) -> Dict[str, Any]:
        row = {"step": int(step), **{k: _py(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"train/{k}", v, int(step))
        return row

    def flush(self) -> None:
        self._f.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


class Progress:
    """Progress bar with rate and ETA. `print` writes a permanent line (log steps); `tick` redraws a
    transient bar in place when the terminal is interactive (no output otherwise)."""

    def __init__(self, total: int, start: int = 0, label: str = "step", width: int = 24, stream=None):
        self.total, self.start, self.label, self.width = total, start, label, width
        self.stream = stream or sys.stdout
        self.t0 = time.time()
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_tick = 0.0

    def line(self, step: int, **values) -> str:
        done = step - self.start
        elapsed = time.time() - self.t0
        rate = done / elapsed if elapsed > 0 and done > 0 else float("nan")
        eta = (self.total - step) / rate if rate and not math.isnan(rate) else float("nan")
        frac = min(1.0, step / self.total) if self.total else 1.0
        filled = int(round(frac * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        vals = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        return (f"{self.label} {step}/{self.total} [{bar}] {100 * frac:5.1f}% {vals} | {rate:.2f} it/s, "
                f"ETA {_fmt_time(eta)}")

    def print(self, step: int, **values) -> None:
        prefix = "\r\033[K" if self.interactive else ""
        print(prefix + self.line(step, **values), file=self.stream, flush=True)

    def tick(self, step: int) -> None:
        if not self.interactive or time.time() - self._last_tick < 0.2:
            return
        self._last_tick = time.time()
        self.stream.write("\r\033[K" + self.line(step))
        self.stream.flush()
