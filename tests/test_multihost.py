"""Two JAX processes on loopback (CPU devices, gloo collectives), each feeding its own half of every global
batch, train, checkpoint, restore and train on with the same losses as one process holding all devices.

The worker is tests/multihost_worker.py; each process gets 2 CPU devices, the one-process reference 4.
"""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from lens_jax.train import distributed

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "multihost_worker.py")
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "XLA_FLAGS"))}
    env["PYTHONPATH"] = os.path.dirname(HERE) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _launch(workdir, num_processes, local_devices, port=0):
    procs = []
    for pid in range(num_processes):
        log = open(os.path.join(workdir, f"process_{pid}.log"), "w")
        cmd = [sys.executable, WORKER, f"--num_processes={num_processes}", f"--process_id={pid}", f"--port={port}",
               f"--local_devices={local_devices}", f"--workdir={workdir}"]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env()), log))
    return procs


def _wait(procs, workdir):
    deadline = time.time() + TIMEOUT_S
    codes = []
    for p, log in procs:
        try:
            codes.append(p.wait(timeout=max(1, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            codes.append("timeout")
        log.close()
    if any(c != 0 for c in codes):
        logs = []
        for i in range(len(procs)):
            with open(os.path.join(workdir, f"process_{i}.log")) as f:
                logs.append(f"--- process {i} (exit {codes[i]}) ---\n" + "".join(f.readlines()[-40:]))
        pytest.fail("worker failed:\n" + "\n".join(logs))
    with open(os.path.join(workdir, "result.json")) as f:
        return json.load(f)


def test_two_processes_match_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    # The reference runs first, then the two processes together (2 CPU cores in CI).
    ref = _wait(_launch(str(one), 1, 4), str(one))
    got = _wait(_launch(str(two), 2, 2, port=_free_port()), str(two))

    assert ref["process_count"] == 1 and got["process_count"] == 2
    assert ref["device_count"] == got["device_count"] == 4
    assert got["rows"] == [0, 1, 2, 3] and ref["rows"] == list(range(8))   # process 0 fed rows 0..3 of 8
    assert got["steps"] == ref["steps"] == [1, 2, 3, 4, 5, 6]
    # Resumed from its own checkpoint at step 4, data-iterator state restored per process.
    assert got["origins"] == ["scratch", "workdir"] and got["resumed_step"] == 4
    assert got["data_state"] == {"step": 4}
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(got["data_iter_files"])
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5)


def test_detect_reads_coordinator_and_slurm_variables(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE", "SLURM_")):
            monkeypatch.delenv(k, raising=False)
    assert distributed.detect() is None
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert distributed.detect() is None                               # a one-task job: single process
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert distributed.detect() == {"launcher": "slurm"}
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        distributed.detect()
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    monkeypatch.setenv("JAX_LOCAL_DEVICE_IDS", "0,1")
    assert distributed.detect() == dict(launcher="env", coordinator_address="10.0.0.1:1234", num_processes=2,
                                        process_id=1, local_device_ids=[0, 1])
    monkeypatch.setenv("LENS_JAX_DISTRIBUTED", "0")
    assert distributed.detect() is None


def test_process_rows_of_a_single_process_is_the_whole_batch():
    from lens_jax.train import sharding as sharding_lib
    mesh = sharding_lib.make_mesh((4, 1, 2))
    assert distributed.process_rows(sharding_lib.batch_sharding(mesh, 3), 16).tolist() == list(range(16))
