"""Multi-process (multi-host) set-up and host <-> global array helpers.

`initialize_from_env()` calls `jax.distributed.initialize` when the environment says this is one of
several processes, and does nothing otherwise. It must run before JAX touches a device. It looks at,
in this order:

  1. JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES, JAX_PROCESS_ID and optionally
     JAX_LOCAL_DEVICE_IDS (comma-separated) — any launcher (torchrun-style scripts, Kubernetes, two
     shells on one machine);
  2. SLURM: SLURM_JOB_ID plus SLURM_NTASKS (or SLURM_STEP_NUM_TASKS) > 1 and SLURM_PROCID, i.e. a job
     step started with `srun`; JAX derives the coordinator (first node of SLURM_STEP_NODELIST, a port
     from the job id), the process count and id from the SLURM variables itself.

LENS_JAX_DISTRIBUTED=0 turns detection off. On the CPU platform several processes need a collectives
backend: gloo is selected unless `jax_cpu_collectives_implementation` was already set.

Batches: every process feeds only the rows of the global batch that live on its own devices
(`process_rows`), and `to_global` assembles the global jax.Array with
`jax.make_array_from_process_local_data`. With one process this is a plain host-to-device transfer.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional

import jax
import numpy as np


def _env_int(name: str) -> Optional[int]:
    v = os.environ.get(name, "").strip()
    return int(v) if v else None


def detect() -> Optional[Dict[str, Any]]:
    """The launch the environment describes: None (single process) or a dict with 'launcher' and the
    arguments for jax.distributed.initialize."""
    if os.environ.get("LENS_JAX_DISTRIBUTED", "1") == "0":
        return None
    addr = os.environ.get("JAX_COORDINATOR_ADDRESS", "").strip()
    if addr:
        n, pid = _env_int("JAX_NUM_PROCESSES"), _env_int("JAX_PROCESS_ID")
        if n is None or pid is None:
            raise ValueError("JAX_COORDINATOR_ADDRESS is set: also set JAX_NUM_PROCESSES and JAX_PROCESS_ID")
        if not 0 <= pid < n:
            raise ValueError(f"JAX_PROCESS_ID={pid} must be in [0, JAX_NUM_PROCESSES={n})")
        kwargs: Dict[str, Any] = dict(coordinator_address=addr, num_processes=n, process_id=pid)
        ids = os.environ.get("JAX_LOCAL_DEVICE_IDS", "").strip()
        if ids:
            kwargs["local_device_ids"] = [int(i) for i in ids.split(",")]
        return dict(launcher="env", **kwargs)
    ntasks = _env_int("SLURM_STEP_NUM_TASKS") or _env_int("SLURM_NTASKS")
    if os.environ.get("SLURM_JOB_ID") and ntasks and ntasks > 1 and os.environ.get("SLURM_PROCID"):
        return dict(launcher="slurm")
    return None


def _cpu_only() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    return platforms.strip().lower() == "cpu"


def initialize_from_env(log=print) -> bool:
    """jax.distributed.initialize when several processes were launched; True if multi-process."""
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    launch = detect()
    if launch is None:
        return False
    launcher = launch.pop("launcher")
    if _cpu_only() and jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**launch)
    except RuntimeError as e:
        raise RuntimeError(f"jax.distributed.initialize ({launcher} launch) failed: {e}. It must be called "
                           "before any JAX computation in the process.") from e
    if jax.process_index() == 0:
        log(f"distributed: {jax.process_count()} processes ({launcher}), {jax.device_count()} devices, "
            f"{jax.local_device_count()} per process")
    return True


def is_primary() -> bool:
    return jax.process_index() == 0


def rows_of_devices(sharding, global_batch: int, devices) -> np.ndarray:
    """Sorted global batch rows (axis 0) that `devices` hold under `sharding` (a pure index computation).

    With BATCH_AXES = ('fsdp', 'data') a process's devices may hold strided rows (e.g. rows 0-1 and 4-5 of 8).
    `jax.make_array_from_process_local_data` maps a process's local rows onto its devices in global order:
    device shard k of the distinct sorted shard starts takes local rows [k * shard, (k + 1) * shard) (see
    jax/_src/array.py `_array_from_process_local_data`), so the local data is `global_batch[rows]`.
    """
    index_map = sharding.devices_indices_map((global_batch,))
    rows = set()
    for d in devices:
        sl = index_map[d][0]
        rows.update(range(*sl.indices(global_batch)))
    return np.asarray(sorted(rows), np.int64)


def process_rows(sharding, global_batch: int) -> np.ndarray:
    """Sorted indices of the global batch rows this process's devices hold under `sharding` (batch axis 0).

    Not necessarily one contiguous block: feed `global_batch_array[rows]` (see `rows_of_devices`).
    """
    return rows_of_devices(sharding, global_batch, sharding.addressable_devices)


def take_rows(batch: Mapping[str, np.ndarray], rows: np.ndarray, global_batch: int) -> Dict[str, np.ndarray]:
    """This process's rows of a global host batch (the batch itself when it holds all rows in order)."""
    if len(rows) == global_batch:
        return dict(batch)
    return {k: np.asarray(v)[rows] for k, v in batch.items()}


def to_global(local_batch: Mapping[str, np.ndarray], shardings: Mapping[str, Any],
              global_batch: Optional[int] = None) -> Dict[str, jax.Array]:
    """Global jax.Arrays from this process's rows of each batch entry (leading axis = batch). Without
    `global_batch` the global size is inferred from the sharding (every process holds as many rows)."""
    out = {}
    for k, v in local_batch.items():
        v = np.asarray(v)
        shape = None if global_batch is None else (global_batch,) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(shardings[k], v, shape)
    return out


def host_tree(tree):
    """The tree as host NumPy arrays on every process (a collective when several processes run);
    with one process the tree is returned unchanged."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any (a small collective; no-op with one process)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))
    return bool(np.any(flags))


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
