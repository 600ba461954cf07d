"""One process of the multi-process training test (tests/test_multihost.py); also runnable by hand:

  python tests/multihost_worker.py --num_processes=1 --local_devices=4 --workdir=/tmp/ref
  python tests/multihost_worker.py --num_processes=2 --process_id=0 --port=12345 --local_devices=2 --workdir=/tmp/mh &
  python tests/multihost_worker.py --num_processes=2 --process_id=1 --port=12345 --local_devices=2 --workdir=/tmp/mh

A tiny MMDiT trains on a synthetic latent cache with the production pieces: distributed.initialize_from_env
(through JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), the global mesh, each process
feeding its own rows of the global batch, train_loop with checkpoints every 2 steps, then a restore of
the last checkpoint (state and per-process data-iterator files) and 2 more steps. Process 0 writes
WORKDIR/result.json with the losses of all steps.
"""
import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--num_processes", type=int, default=1)
    p.add_argument("--process_id", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--local_devices", type=int, default=2)
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--extra_steps", type=int, default=2)
    a = p.parse_args()
    import time
    t0 = time.time()

    def mark(what):
        print(f"[{time.time() - t0:6.1f}s] process {a.process_id}: {what}", flush=True)

    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={a.local_devices}"
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        os.environ.pop(k, None)
    if a.num_processes > 1:
        os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{a.port}", JAX_NUM_PROCESSES=str(a.num_processes),
                          JAX_PROCESS_ID=str(a.process_id))
    sys.path.insert(0, REPO)

    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.config.update("jax_disable_most_optimizations", True)     # compile time dominates on 2 CPU cores

    from lens_jax.train import distributed
    mark("jax imported")
    multi = distributed.initialize_from_env()
    mark("distributed initialised")
    assert multi == (a.num_processes > 1) and jax.process_count() == a.num_processes, (multi, jax.process_count())

    import numpy as np
    from lens_jax.configs.base import optim_config
    from lens_jax.data.latent_cache import EncodedDataset
    from lens_jax.models.mmdit import MMDiT, dummy_inputs, mmdit_config
    from lens_jax.train import sharding as sharding_lib
    from lens_jax.train.checkpoints import TrainCheckpointer
    from lens_jax.train.loop import LoopOptions, StepIndexedSource, train_loop
    from lens_jax.train.metrics import MetricsWriter
    from lens_jax.train.optim import make_optimizer
    from lens_jax.train.resume import resolve_start
    from lens_jax.train.trainer import jit_step
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from fm_setup import dit_spec, fm_objective

    batch_size, seed = 8, 3
    rng = np.random.default_rng(0)
    n = 24
    data = EncodedDataset(img=rng.standard_normal((n, 16, 128)).astype(np.float32),
                          txt=rng.standard_normal((n, 8, 96)).astype(np.float32),
                          mask=np.arange(8)[None] < rng.integers(1, 9, (n, 1)), grid=(4, 4))
    cfg = mmdit_config("tiny", mlp_dim=96, num_layers=1)
    model = MMDiT(cfg)
    total = a.steps + a.extra_steps
    optimizer, schedule = make_optimizer(optim_config(3e-3), total)
    mesh = sharding_lib.make_mesh((-1, 1, 1))
    spec = dit_spec(model, optimizer, schedule, ema_decay=0.9, dummy=dummy_inputs(cfg))
    batch_shardings = {k: sharding_lib.batch_sharding(mesh, v.ndim) for k, v in data.example_batch(1).items()}
    train_step, _ = jit_step(spec, [fm_objective(model)], mesh, batch_shardings)
    my_rows = distributed.process_rows(batch_shardings["img"], batch_size)
    assert len(my_rows) == batch_size // a.num_processes, my_rows

    def batch_fn(step):
        return distributed.take_rows(data.batch(step, batch_size, seed), my_rows, batch_size)

    primary = jax.process_index() == 0
    ckpt_dir = os.path.join(a.workdir, "checkpoints")

    def run(num_steps, resume_log):
        ckpt = TrainCheckpointer(ckpt_dir, nets=spec.names, max_to_keep=2, save_interval_steps=2)
        start = resolve_start(ckpt, spec, mesh, log=resume_log.append)
        source = StepIndexedSource(batch_fn, start.step)
        if start.data_state is not None:
            source.set_state(start.data_state)
        writer = MetricsWriter(a.workdir, resume_at=start.step) if primary else None
        try:
            res = train_loop(start.state, train_step, source, mesh=mesh, batch_shardings=batch_shardings,
                             options=LoopOptions(num_steps=num_steps, log_every=1), checkpointer=ckpt, writer=writer,
                             log=lambda *_: None)
        finally:
            ckpt.close()
            if writer is not None:
                writer.close()
        return start, res

    log1, log2 = [], []
    mark("set up")
    start1, res1 = run(a.steps, log1)
    mark(f"trained {a.steps} steps")
    start2, res2 = run(total, log2)
    mark(f"resumed at {start2.step} and trained to {res2.step}")
    if primary:
        rows = [json.loads(l) for l in open(os.path.join(a.workdir, "metrics.jsonl"))]
        files = sorted(os.listdir(os.path.join(ckpt_dir, str(a.steps), "data_iter")))
        out = dict(losses=[r["loss"] for r in rows], steps=[r["step"] for r in rows], process_count=jax.process_count(),
                   device_count=jax.device_count(), rows=my_rows.tolist(), origins=[start1.origin, start2.origin],
                   resumed_step=start2.step, data_state=start2.data_state, data_iter_files=files,
                   final_step=res2.step)
        with open(os.path.join(a.workdir, "result.json"), "w") as f:
            json.dump(out, f)
    mark(f"done, rows {my_rows.tolist()}")


if __name__ == "__main__":
    main()
