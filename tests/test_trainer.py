"""The trainer of named sub-networks: frozen and trainable nets, several optimisers and update rules, EMA
schedules, non-finite skips, weights-only initialisation of one net, and bit-identical SIGKILL/resume."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lens_jax.configs.base import optim_config
from lens_jax.train import sharding as sharding_lib
from lens_jax.train.checkpoints import TrainCheckpointer
from lens_jax.train.optim import make_optimizer
from lens_jax.train.resume import resolve_start, weights_from
from lens_jax.train.state import Net, TrainSpec, bytes_per_device
from lens_jax.train.step import Mean, Objective
from lens_jax.train.trainer import jit_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESH = sharding_lib.make_mesh((1, 1, 1), jax.devices()[:1])


def _vec(n, scale=1.0):
    return lambda k: {"w": jax.random.normal(k, (n,)) * scale}


def _run(spec, objectives, batch, n=1, state=None):
    state = spec.create(MESH) if state is None else state
    fn, _ = jit_step(spec, objectives, MESH, None, donate=False)
    metrics = []
    with jax.set_mesh(MESH):
        for _ in range(n):
            state, m = fn(state, batch)
            metrics.append(jax.tree.map(float, m))
    return state, metrics


def _np(tree):
    return jax.tree.map(np.asarray, tree)


def _equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_a_frozen_net_has_no_optimizer_state_and_gets_no_update():
    spec = TrainSpec([Net("student", init=_vec(4), optimizer=optax.adam(0.1)), Net("teacher", init=_vec(4))])
    abstract, _ = spec.abstract(MESH)
    assert set(abstract["nets"]["teacher"]) == {"params"} and set(abstract["nets"]["student"]) == {"params",
                                                                                                 "opt_state"}
    sizes = bytes_per_device(abstract)
    assert sizes["teacher"] == {"params": 16, "opt_state": 0, "ema": 0}
    assert sizes["student"]["opt_state"] >= 2 * 16                   # Adam's two moments (+ the count)

    def loss(p, batch, rng):   # the student chases the teacher
        return jnp.sum((p["student"]["w"] - p["teacher"]["w"]) ** 2), {}
    state0 = spec.create(MESH)
    state, _ = _run(spec, [Objective(loss, ("student",))], {"x": jnp.zeros(1)}, n=3, state=state0)
    assert _equal(state["nets"]["teacher"], state0["nets"]["teacher"])
    assert not _equal(state["nets"]["student"]["params"], state0["nets"]["student"]["params"])
    with pytest.raises(ValueError, match="frozen"):
        jit_step(spec, [Objective(loss, ("teacher",))], MESH, None)


def test_two_trainable_nets_follow_their_own_optimizers():
    spec = TrainSpec([Net("a", init=_vec(3), optimizer=optax.sgd(0.1)),
                      Net("b", init=_vec(3), optimizer=optax.sgd(0.01, momentum=0.5))])

    def loss(p, batch, rng):
        return jnp.sum(p["a"]["w"] ** 2) + jnp.sum(p["a"]["w"] * p["b"]["w"]) + jnp.sum(p["b"]["w"] ** 2) / 2, {}
    state0 = _np(spec.create(MESH))
    state, (m1, m2) = _run(spec, [Objective(loss, ("a", "b"))], {"x": jnp.zeros(1)}, n=2)
    a, b = state0["nets"]["a"]["params"]["w"], state0["nets"]["b"]["params"]["w"]
    ga, gb = 2 * a + b, a + b                                         # step 1 gradients
    a1, b1, mom = a - 0.1 * ga, b - 0.01 * gb, gb
    ga, gb = 2 * a1 + b1, a1 + b1                                     # step 2
    mom = 0.5 * mom + gb
    np.testing.assert_allclose(state["nets"]["a"]["params"]["w"], a1 - 0.1 * ga, rtol=1e-6)
    np.testing.assert_allclose(state["nets"]["b"]["params"]["w"], b1 - 0.01 * mom, rtol=1e-6)
    assert {"grad_norm/a", "grad_norm/b", "update_norm/a", "update_norm/b", "param_norm/a"} <= set(m1)


def test_a_policy_freezes_leaves_inside_a_net():
    opt = optim_config(0.1)
    opt.policy = (("head/.*", 0.5), ("body/.*", None))
    tx, _ = make_optimizer(opt, 10)
    spec = TrainSpec([Net("m", init=lambda k: {"body": {"w": jnp.ones(5)}, "head": {"w": jnp.ones(2)}},
                          optimizer=tx, policy=opt.policy, ema_decay=0.9)])
    abstract, _ = spec.abstract(MESH)
    mu = abstract["nets"]["m"]["opt_state"][1][0].mu
    assert isinstance(mu["body"]["w"], optax.MaskedNode) and mu["head"]["w"].shape == (2,)
    assert isinstance(abstract["nets"]["m"]["ema"]["body"]["w"], optax.MaskedNode)

    def loss(p, batch, rng):
        return jnp.sum(p["m"]["body"]["w"] * p["m"]["head"]["w"][0]) + jnp.sum(p["m"]["head"]["w"]), {}
    state, _ = _run(spec, [Objective(loss, ("m",))], {"x": jnp.zeros(1)})
    np.testing.assert_array_equal(state["nets"]["m"]["params"]["body"]["w"], np.ones(5))
    assert np.all(np.asarray(state["nets"]["m"]["params"]["head"]["w"]) < 1)
    full = spec.eval_params(state, "m.ema")                            # frozen leaves filled from the params
    np.testing.assert_array_equal(full["body"]["w"], np.ones(5))


def test_two_update_rules_per_step_converge_to_the_known_solution():
    # critic c learns c = 2 g (4 updates per step); generator g minimises (g - 3)^2: the fixed point g = 3, c = 6.
    spec = TrainSpec([Net("critic", init=lambda k: {"w": jnp.zeros(())}, optimizer=optax.sgd(0.2)),
                      Net("gen", init=lambda k: {"w": jnp.zeros(())}, optimizer=optax.sgd(0.1))])
    fit = Objective(lambda p, b, r: ((p["critic"]["w"] - 2 * p["gen"]["w"]) ** 2, {}), ("critic",), name="fit",
                    repeats=4)
    gen = Objective(lambda p, b, r: ((p["gen"]["w"] - 3.0) ** 2 + 0 * p["critic"]["w"], {}), ("gen",), name="gen")
    state, metrics = _run(spec, [fit, gen], {"x": jnp.zeros(1)}, n=60)
    assert abs(float(state["nets"]["gen"]["params"]["w"]) - 3.0) < 1e-3
    assert abs(float(state["nets"]["critic"]["params"]["w"]) - 6.0) < 1e-2
    assert {"fit/loss", "gen/loss", "fit/skipped", "gen/skipped", "skipped"} <= set(metrics[-1])


def test_after_fn_mixes_exactly_and_a_ramped_ema_uses_the_step_rate():
    spec = TrainSpec([Net("student", init=_vec(4), optimizer=optax.sgd(0.0),
                          ema_decay=lambda step: jnp.minimum(0.9, 0.5 + 0.1 * step.astype(jnp.float32))),
                      Net("fake", init=_vec(4), optimizer=optax.sgd(0.0))])

    def ida(params, step):
        return {"fake": jax.tree.map(lambda f, s: 0.97 * f + 0.03 * s, params["fake"], params["student"])}
    obj = Objective(lambda p, b, r: (jnp.sum(p["student"]["w"] ** 2), {}), ("student",), after_fn=ida)
    s0 = _np(spec.create(MESH))
    state, _ = _run(spec, [obj], {"x": jnp.zeros(1)}, n=2)
    f, s = s0["nets"]["fake"]["params"]["w"], s0["nets"]["student"]["params"]["w"]
    np.testing.assert_allclose(state["nets"]["fake"]["params"]["w"], 0.97 * (0.97 * f + 0.03 * s) + 0.03 * s,
                               rtol=1e-6)
    # lr 0: params stay s, so the EMA (= s at init) stays s whatever the rate; move the EMA start to see it
    s0b = spec.create(MESH)
    s0b["nets"]["student"]["ema"] = {"w": jnp.zeros(4)}
    state, _ = _run(spec, [obj], {"x": jnp.zeros(1)}, n=2, state=s0b)
    d0, d1 = 0.5, 0.6                                                   # the rates of steps 0 and 1
    np.testing.assert_allclose(state["nets"]["student"]["ema"]["w"], (1 - d1) * s + d1 * (1 - d0) * s, rtol=1e-6)


def test_a_non_finite_update_leaves_every_net_unchanged():
    spec = TrainSpec([Net("a", init=_vec(4), optimizer=optax.adam(0.1), ema_decay=0.9),
                      Net("b", init=_vec(4), optimizer=optax.adam(0.1), ema_decay=0.9),
                      Net("frozen", init=_vec(4))])

    def loss(p, batch, rng):
        v = jnp.sum(p["a"]["w"] * p["b"]["w"] * batch["x"]) + jnp.sum(p["frozen"]["w"])
        return v, {"v": Mean(v, 1.0)}
    obj = Objective(loss, ("a", "b"))
    state, _ = _run(spec, [obj], {"x": jnp.ones(4)}, n=2)
    before = _np(state)
    state, (m,) = _run(spec, [obj], {"x": jnp.full(4, jnp.nan)}, n=1, state=state)
    assert m["skipped"] == 1 and int(state["step"]) == int(before["step"]) + 1
    assert _equal(state["nets"], before["nets"])


def test_micro_batches_weight_losses_and_means():
    spec = TrainSpec([Net("a", init=lambda k: {"w": jnp.ones(())}, optimizer=optax.sgd(1.0))])

    def loss(p, batch, rng):
        return jnp.mean(batch["x"]) * p["a"]["w"], {"n": Mean(jnp.sum(batch["x"] > 0), batch["x"].shape[0])}
    obj = Objective(loss, ("a",), weight_fn=lambda b: jnp.asarray(b["x"].shape[0], jnp.float32))
    _, (m,) = _run(spec, [obj], ({"x": jnp.ones(2)}, {"x": -jnp.ones(6)}))
    assert m["loss"] == pytest.approx((2 * 1 - 6 * 1) / 8) and m["n"] == pytest.approx(2 / 8)
    assert m["loss_mb0"] == 1.0 and m["loss_mb1"] == -1.0


def test_weights_only_initialisation_of_one_net_from_another_run(tmp_path):
    spec = TrainSpec([Net("teacher", init=_vec(4), optimizer=optax.adam(0.1)),
                      Net("student", init=_vec(4), optimizer=optax.adam(0.1))], seed=3)
    trained = spec.create(MESH)
    trained["nets"]["teacher"]["params"]["w"] = trained["nets"]["teacher"]["params"]["w"] + 5
    ck = TrainCheckpointer(str(tmp_path / "run" / "checkpoints"), nets=spec.names)
    ck.save(9, trained, "{}")
    ck.close()
    # A new run: its student starts from the other run's teacher, its teacher from its own seed.
    new = TrainSpec([Net("teacher", init=_vec(4), optimizer=optax.adam(0.1)),
                     Net("student", init=_vec(4), optimizer=optax.adam(0.1),
                         load=weights_from(str(tmp_path / "run"), "teacher", option="init", log=lambda *_: None))],
                    seed=4)
    ck = TrainCheckpointer(str(tmp_path / "new" / "checkpoints"), nets=new.names)
    start = resolve_start(ck, new, MESH, log=lambda *_: None)
    ck.close()
    assert start.origin == "init_from" and start.step == 0
    np.testing.assert_array_equal(start.state["nets"]["student"]["params"]["w"],
                                  trained["nets"]["teacher"]["params"]["w"])
    scratch = new.create(MESH)
    np.testing.assert_array_equal(start.state["nets"]["teacher"]["params"]["w"], scratch["nets"]["teacher"]["params"]["w"])
    assert float(start.state["nets"]["student"]["opt_state"][0].count) == 0        # fresh optimiser


def _worker(workdir, fault=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env.pop("LENS_JAX_FAULT", None)
    if fault:
        env["LENS_JAX_FAULT"] = fault
    p = subprocess.run([sys.executable, os.path.join(REPO, "tests", "trainer_worker.py"), f"--workdir={workdir}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout + p.stderr


def test_sigkill_and_resume_of_a_two_net_state_is_bit_identical(tmp_path):
    rc, out = _worker(str(tmp_path / "ref"))
    assert rc == 0, out[-3000:]
    # right after step 10: checkpoint 8 may be half-written, checkpoint 4 is complete (a save waits for the last)
    rc, out = _worker(str(tmp_path / "killed"), fault="10:KILL")
    assert rc == -9, out[-3000:]
    rc, out = _worker(str(tmp_path / "killed"))
    assert rc == 0 and "resumed from" in out and "(workdir)" in out, out[-3000:]
    rows = [[json.loads(l) for l in open(tmp_path / d / "metrics.jsonl")] for d in ("ref", "killed")]
    assert [r["step"] for r in rows[1]] == list(range(1, 13))
    for key in ("critic/loss", "gen/loss", "critic/grad_norm", "gen/grad_norm", "critic/pred_mean"):
        assert [r[key] for r in rows[1]] == [r[key] for r in rows[0]], key
    saved = sorted(os.listdir(tmp_path / "killed" / "checkpoints" / "12"))
    assert "critic" in saved and "gen" in saved and "base" not in saved     # the frozen base is rebuilt, not saved
