"""metrics.jsonl writer (one JSON object per logged step, full float precision) and a console line."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Dict, Mapping

import numpy as np


def _py(v: Any):
    v = np.asarray(v)
    if v.ndim == 0:
        return v.item()
    return v.tolist()


class MetricsWriter:
    def __init__(self, workdir: str, filename: str = "metrics.jsonl"):
        self.path = os.path.join(workdir, filename)
        self._f = open(self.path, "a")

    def write(self, step: int, metrics: Mapping[str, Any]) -> Dict[str, Any]:
        row = {"step": int(step), **{k: _py(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        return row

    def close(self) -> None:
        self._f.close()


class Progress:
    """A one-line progress report with ETA for long loops."""

    def __init__(self, total: int, start: int = 0, label: str = "step"):
        self.total, self.start, self.label = total, start, label
        self.t0 = time.time()

    def line(self, step: int, **values) -> str:
        done = step - self.start
        elapsed = time.time() - self.t0
        rate = done / elapsed if elapsed > 0 and done > 0 else float("nan")
        eta = (self.total - step) / rate if rate and not math.isnan(rate) else float("nan")
        vals = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
        return f"{self.label} {step}/{self.total} {vals} | {rate:.2f} it/s, ETA {eta:.0f}s"

    def print(self, step: int, **values) -> None:
        print(self.line(step, **values), file=sys.stdout, flush=True)
