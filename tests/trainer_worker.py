"""A toy two-net phase on the shared trainer, run as a subprocess by tests/test_trainer.py (SIGKILL / resume):

  python tests/trainer_worker.py --workdir=DIR [--steps=12]       # LENS_JAX_FAULT="STEP:KILL" kills it

Nets: 'critic' (Adam, EMA with a ramped rate) and 'gen' (SGD + momentum) trained by two objectives per step
(the critic 3 times on its own slice of the batch, then the generator), a frozen 'base' that is not
checkpointed and is rebuilt from its seed at every start; batches are a pure function of the step.
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=12)
    a = p.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, REPO)
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np
    import optax

    from lens_jax.configs import base
    from lens_jax.train import sharding as sharding_lib
    from lens_jax.train.loop import LoopOptions, StepIndexedSource
    from lens_jax.train.state import Net, TrainSpec
    from lens_jax.train.step import Objective
    from lens_jax.train.trainer import fit, one_device_mesh

    c = ml_collections.ConfigDict()
    c.num_steps = a.steps
    base.trainer_config(c, checkpoint_every=4, log_every=1)
    c.tensorboard = False
    spec = TrainSpec([
        Net("critic", init=lambda k: {"w": jax.random.normal(k, (4, 4)) * 0.1}, optimizer=optax.adam(1e-2),
            ema_decay=lambda step: jnp.minimum(0.9, 0.1 * step.astype(jnp.float32))),
        Net("gen", init=lambda k: {"w": jax.random.normal(k, (4,))}, optimizer=optax.sgd(1e-2, momentum=0.9)),
        Net("base", init=lambda k: {"w": jax.random.normal(k, (4,))}, checkpoint=False),
    ], seed=1)

    def critic_loss(p, batch, rng):
        x = batch["x"] + 0.01 * jax.random.normal(rng, batch["x"].shape)
        pred = x @ p["critic"]["w"]
        return jnp.mean((pred - (x * p["gen"]["w"] + p["base"]["w"])) ** 2), {"pred_mean": jnp.mean(pred)}

    def gen_loss(p, batch, rng):
        del rng
        return jnp.mean((batch["x"] @ p["critic.ema"]["w"] - batch["x"] * p["gen"]["w"]) ** 2 + p["gen"]["w"] ** 2), {}

    objectives = [Objective(critic_loss, ("critic",), name="critic", repeats=3,
                            select_fn=lambda b, r: {"x": b["x"][2 * r:2 * r + 2]}),
                  Objective(gen_loss, ("gen",), name="gen")]

    def batch(step):
        return {"x": np.random.default_rng([7, step]).standard_normal((6, 4)).astype(np.float32)}

    def make_source(start):
        src = StepIndexedSource(batch, start.step)
        if start.data_state is not None:
            src.set_state(start.data_state)
        return src

    mesh = one_device_mesh()
    res = fit(c, a.workdir, spec, objectives, make_source, mesh=mesh,
              batch_shardings={"x": sharding_lib.batch_sharding(mesh, 2)},
              options=LoopOptions(num_steps=a.steps, log_every=1), say=lambda m: print(m, flush=True))
    print(f"done at step {res.step} ({res.start.origin})", flush=True)


if __name__ == "__main__":
    main()
