"""Distillation (LENS_SPEC §10; lens_jax/posttrain/distill.py, phase `distill`): each term's sign and gradient path,
TTUR / IDA on the trainer, the DM + CA gradient at the CFG teacher's distribution, the feature tap, bad input,
and SIGKILL / resume bit-identity of the phase."""
import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens_jax.models.mmdit import MMDiT, dummy_inputs, mmdit_config
from lens_jax.posttrain import distill as D
from lens_jax.train.state import Net, TrainSpec
from lens_jax.train.step import make_train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, H, W, S = 4, 2, 2, 4


def _cfg(**kw):
    base = dict(student_sigmas=(1.0, 0.9, 0.7), feature_layers=(0, 1), guidance=4.0)
    base.update(kw)
    return D.DistillConfig(**base)


@pytest.fixture(scope="module")
def setup():
    cfg = mmdit_config("tiny")
    model = MMDiT(cfg, scan_layers=False)
    dummy = dummy_inputs(cfg, batch=1, h=H, w=W, text_len=S)
    disc = D.FeatureDiscriminator(num_features=2, width=16, timestep_dim=32)
    init = lambda k: model.init(k, **dummy)["params"]  # noqa: E731
    params = {n: nn.meta.unbox(init(jax.random.key(i))) for i, n in enumerate(("student", "fake", "teacher"))}
    feats = [jnp.zeros((1, H * W, cfg.hidden))] * 2
    params["disc"] = nn.meta.unbox(disc.init(jax.random.key(9), feats, jnp.zeros((1,)))["params"])
    rng = np.random.default_rng(0)
    batch = dict(img=jnp.asarray(rng.normal(size=(B, H * W, cfg.in_channels)), jnp.float32),
                 img_pos=jnp.broadcast_to(dummy["img_pos"], (B, H * W, 3)),
                 txt=jnp.asarray(rng.normal(size=(B, S, cfg.num_text_layers * cfg.text_dim)), jnp.float32),
                 txt_mask=jnp.asarray(np.arange(S)[None] < np.array([4, 3, 2, 1])[:, None]))
    return dict(model=model, disc=disc, params=params, batch=batch, init=init, dummy=dummy, feats=feats)


def _norm(tree):
    return float(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def _spec(s, lr=1e-3):
    import optax
    from lens_jax.train.sharding import DEFAULT_RULES
    tx = optax.adamw(lr, b1=0.0, b2=0.9)
    disc_init = lambda k: s["disc"].init(k, s["feats"], jnp.zeros((1,)))["params"]  # noqa: E731
    r = DEFAULT_RULES
    return TrainSpec([Net("student", init=s["init"], rules=r, optimizer=tx),
                      Net("fake", init=s["init"], rules=r, optimizer=tx),
                      Net("disc", init=disc_init, rules=r, optimizer=optax.adamw(1e-2, b1=0.0, b2=0.9)),
                      Net("teacher", init=s["init"], rules=r)], seed=3)


def _one_device_mesh():
    from lens_jax.train.sharding import make_mesh
    return make_mesh((1, 1, 1), jax.devices()[:1])


def test_feature_tap_matches_between_scan_and_unrolled_and_changes_nothing():
    cfg = mmdit_config("tiny")
    inp = dummy_inputs(cfg, batch=2, h=2, w=3, text_len=4)
    inp = dict(inp, img=jax.random.normal(jax.random.key(1), inp["img"].shape),
               txt=jax.random.normal(jax.random.key(2), inp["txt"].shape), sigma=jnp.array([0.2, 0.9]))
    scan, unrolled = MMDiT(cfg, scan_layers=True), MMDiT(cfg, scan_layers=False)
    p = nn.meta.unbox(scan.init(jax.random.key(0), **inp)["params"])
    pu = {k: v for k, v in p.items() if k != "transformer_blocks"}
    for i in range(cfg.num_layers):
        pu[f"transformer_blocks_{i}"] = jax.tree.map(lambda x: x[i], p["transformer_blocks"])
    v0 = scan.apply({"params": p}, **inp)
    v1, f1 = scan.apply({"params": p}, **inp, features=(1, 0))
    v2, f2 = unrolled.apply({"params": pu}, **inp, features=(1, 0))
    np.testing.assert_array_equal(v0, v1)
    np.testing.assert_allclose(v1, v2, atol=1e-5)
    assert len(f1) == 2 and f1[0].shape == (2, 6, cfg.hidden)
    for a, b in zip(f1, f2):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert float(jnp.max(jnp.abs(f1[0] - f1[1]))) > 0           # block 1 and block 0 differ
    with pytest.raises(ValueError, match="distinct block indices"):
        scan.apply({"params": p}, **inp, features=(cfg.num_layers,))


def test_one_step_trains_student_fake_disc_and_never_the_teacher(setup):
    s = setup
    spec = _spec(s)
    objs = D.distill_objectives(s["model"], s["disc"], _cfg(), ttur=2)
    mesh = _one_device_mesh()
    state = spec.create(mesh)
    before = jax.tree.map(np.asarray, state["nets"])
    step = jax.jit(make_train_step(spec, objs))
    state, m = step(state, s["batch"])
    after = state["nets"]
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), before["teacher"]["params"],
                                     jax.tree.map(np.asarray, after["teacher"]["params"])))
    for n in ("student", "fake", "disc"):
        diff = jax.tree.map(lambda a, b: a - np.asarray(b), before[n]["params"], after[n]["params"])
        assert _norm(diff) > 0, n
    for k in ("critic/fake_loss", "critic/disc_loss", "critic/r1", "critic/d_real", "critic/d_fake",
              "student/dm_loss", "student/ca_loss", "student/gen_adv_loss", "skipped"):
        assert k in m and np.isfinite(float(m[k])), k
    assert int(m["skipped"]) == 0
    # Two critic updates ran (the Adam count of the fake score's optimiser state is 2, the student's 1).
    counts = [int(x) for x in jax.tree.leaves(after["fake"]["opt_state"]) if np.asarray(x).dtype == np.int32]
    assert counts and all(c == 2 for c in counts)
    counts = [int(x) for x in jax.tree.leaves(after["student"]["opt_state"]) if np.asarray(x).dtype == np.int32]
    assert counts and all(c == 1 for c in counts)


def test_student_update_leaves_disc_alone_and_ida_mixes_exactly(setup):
    s = setup
    spec = _spec(s)
    _, student = D.distill_objectives(s["model"], s["disc"], _cfg(ida_mix=0.03), ttur=1)
    state = spec.create(_one_device_mesh())
    before = jax.tree.map(np.asarray, state["nets"])
    state, _ = jax.jit(make_train_step(spec, [student]))(state, s["batch"])
    after = jax.tree.map(np.asarray, state["nets"])
    for n in ("disc", "teacher"):
        assert jax.tree.all(jax.tree.map(np.array_equal, before[n]["params"], after[n]["params"])), n
    assert _norm(jax.tree.map(np.subtract, before["student"]["params"], after["student"]["params"])) > 0
    want = jax.tree.map(lambda f, t: 0.97 * f + 0.03 * t, before["fake"]["params"], after["student"]["params"])
    got = after["fake"]["params"]
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    # The fake score's optimiser state is not touched by the student update.
    assert jax.tree.all(jax.tree.map(np.array_equal, before["fake"]["opt_state"], after["fake"]["opt_state"]))


def test_student_loss_has_no_gradient_into_fake_score(setup):
    s = setup
    loss = D.student_loss_fn(D.make_apply(s["model"]), s["disc"], _cfg())
    g = jax.jit(jax.grad(lambda p: loss(p, s["batch"], jax.random.key(0))[0]))(s["params"])
    assert _norm(g["fake"]) == 0.0                   # used only under stop_gradient
    assert _norm(g["student"]) > 0


def test_r1_term_reaches_only_the_discriminator(setup):
    s = setup
    apply = D.make_apply(s["model"])
    trained = {n: s["params"][n] for n in ("student", "fake", "disc")}

    def grads(gamma):       # the teacher is a constant of the objective, as in the trainer
        loss = D.critic_loss_fn(apply, s["disc"], _cfg(r1_gamma=gamma))
        return jax.jit(jax.grad(lambda p: loss(dict(p, teacher=s["params"]["teacher"]), s["batch"],
                                                jax.random.key(4))[0]))(trained)
    with_r1, without = grads(1.0), grads(0.0)
    r1 = jax.tree.map(jnp.subtract, with_r1, without)
    assert _norm(r1["disc"]) > 0
    for n in ("student", "fake"):
        assert _norm(r1[n]) == 0.0, n
    # The critic loss as a whole never reaches the student (its sample is stop-gradient).
    assert _norm(with_r1["student"]) == 0.0
    assert _norm(with_r1["fake"]) > 0


def test_adversarial_term_flows_through_frozen_teacher_features_into_the_sample(setup):
    s = setup
    apply = D.make_apply(s["model"])
    cfg = _cfg(lambda_d=0.0, lambda_g=1.0)
    loss = D.student_loss_fn(apply, s["disc"], cfg)
    g = jax.jit(jax.grad(lambda p: loss(p, s["batch"], jax.random.key(1))[0]))(s["params"])
    assert _norm(g["student"]) > 0                    # only L_G is on: its gradient reaches the student
    none = D.student_loss_fn(apply, s["disc"], _cfg(lambda_d=0.0, lambda_g=0.0))
    g0 = jax.jit(jax.grad(lambda p: none(p, s["batch"], jax.random.key(1))[0]))(s["params"])
    assert _norm(g0["student"]) == 0.0
    # d/dx of L_G(x) goes through the teacher: other teacher weights give another input gradient.
    t = jnp.full((B,), 0.5)

    def l_g(x, teacher):
        return jnp.mean(jax.nn.softplus(-D.discriminate(apply, s["disc"], teacher, s["params"]["disc"], s["batch"],
                                                        x, t, cfg)))
    x = s["batch"]["img"]
    grad_x = jax.jit(jax.grad(l_g))
    gx = grad_x(x, s["params"]["teacher"])
    gx2 = grad_x(x, s["params"]["fake"])
    assert float(jnp.max(jnp.abs(gx))) > 0 and float(jnp.max(jnp.abs(gx - gx2))) > 0


def _gaussian_velocity(mean, var):
    """Exact flow velocity of data N(mean, var I) under x_t = (1 - t) x0 + t eps."""
    def v(x_t, t):
        tt = t[:, None, None]
        x0 = mean + (1 - tt) * var / ((1 - tt) ** 2 * var + tt ** 2) * (x_t - (1 - tt) * mean)
        return (x_t - x0) / tt
    return v


def test_dm_plus_ca_gradient_vanishes_at_the_cfg_teacher_distribution():
    """Toy: conditional data N(+1, 0.25), unconditional N(-0.5, 0.25). A fake score equal to the CFG teacher's
    velocity (the student's distribution is the guided teacher's) gives DM + CA = 0 at a shared t, so the student
    parameter gets no gradient; a fake score at the conditional teacher (student = unguided teacher) does not."""
    w = 4.0
    cfg = _cfg(guidance=w, normalise=False)
    v_c, v_u = _gaussian_velocity(1.0, 0.25), _gaussian_velocity(-0.5, 0.25)
    z = jax.random.normal(jax.random.key(0), (8, 4, 3))
    eps = jax.random.normal(jax.random.key(1), z.shape)
    t = jnp.linspace(0.1, 0.9, 8)

    def grad_theta(fake_v):
        def loss(theta):
            x0 = z + theta
            x0s = jax.lax.stop_gradient(x0)
            x_t = D.noised(x0s, eps, t)
            c, u = D.x0_of(x_t, t, v_c(x_t, t)), D.x0_of(x_t, t, v_u(x_t, t))
            f = D.x0_of(x_t, t, fake_v(x_t, t))
            step_dm, step_ca, _ = D.dmd_gradients(x0s, c, f, c, u, cfg)
            return jnp.mean(D.surrogate(x0, step_dm) + D.surrogate(x0, step_ca))
        return jax.grad(loss)(jnp.float32(0.3))

    cfg_v = lambda x, t: v_u(x, t) + w * (v_c(x, t) - v_u(x, t))  # noqa: E731
    assert abs(float(grad_theta(cfg_v))) < 1e-5
    g_c = float(grad_theta(v_c))
    assert abs(g_c) > 1e-2
    # Sign: the surrogate's descent direction moves x0 along +g; CFG pushes towards the conditional mean (+1)
    # away from the unconditional one, so theta's gradient is negative (theta grows).
    assert g_c < 0


def test_rescaled_cfg_target_vanishes_at_the_sampled_cfg_teacher():
    """With cfg_rescale the CA term aims at the sampler's guided teacher (per-token norm rescale): a fake score equal
    to that guided velocity gives DM + CA = 0."""
    from lens_jax.diffusion.sampler import cfg_combine
    w = 4.0
    v_c, v_u = _gaussian_velocity(1.0, 0.25), _gaussian_velocity(-0.5, 0.25)

    def apply(params, batch, x, t):      # a toy teacher: conditional rows have a valid caption
        cond = jnp.any(batch["txt_mask"], axis=1)[:, None, None]
        return jnp.where(cond, v_c(x, t), v_u(x, t))
    b = 6
    batch = dict(txt=jnp.ones((b, 2, 3)), txt_mask=jnp.ones((b, 2), bool), img_pos=jnp.zeros((b, 4, 3), jnp.int32))
    x_t = jax.random.normal(jax.random.key(0), (b, 4, 3))
    t = jnp.linspace(0.2, 0.8, b)
    cfg = _cfg(guidance=w, normalise=False, cfg_rescale=True)
    c, u = D.teacher_cfg_x0(apply, None, batch, x_t, t, w, True)
    fake = D.x0_of(x_t, t, cfg_combine(v_c(x_t, t), v_u(x_t, t), w))
    step_dm, step_ca, _ = D.dmd_gradients(x_t, c, fake, c, u, cfg)
    np.testing.assert_allclose(step_dm + step_ca, 0.0, atol=1e-5)
    c0, u0 = D.teacher_cfg_x0(apply, None, batch, x_t, t, w, False)      # plain: u is the unconditional X0
    np.testing.assert_allclose(u0, D.x0_of(x_t, t, v_u(x_t, t)), rtol=1e-6)
    assert float(jnp.max(jnp.abs(u - u0))) > 1e-3                        # the rescale changes the target


def test_surrogate_gradient_is_minus_the_step():
    x0 = jax.random.normal(jax.random.key(0), (2, 3, 4))
    step = jax.random.normal(jax.random.key(1), x0.shape)
    g = jax.grad(lambda x: jnp.sum(D.surrogate(x, step)))(x0)
    np.testing.assert_allclose(g, -step / 12.0, rtol=1e-6)


def test_bad_recipe_values():
    with pytest.raises(ValueError, match="decreasing grid"):
        _cfg(student_sigmas=(0.9, 0.5))
    with pytest.raises(ValueError, match="feature_layers"):
        _cfg(feature_layers=())
    with pytest.raises(ValueError, match="t_dm"):
        _cfg(t_dm=(0.5, 0.2))
    cfg = mmdit_config("tiny")
    model = MMDiT(cfg)
    disc = D.FeatureDiscriminator(num_features=2)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="ttur"):
            D.distill_objectives(model, disc, _cfg(), ttur=bad)


# ----------------------------------------------------------------------------- the phase

def _converted(path, preset, scan_layers=False):
    from lens_jax.checkpoints import orbax_io
    cfg = mmdit_config(preset)
    m = MMDiT(cfg, scan_layers=scan_layers)
    p = jax.tree.map(np.asarray, nn.meta.unbox(m.init(jax.random.key(0), **dummy_inputs(cfg))["params"]))
    orbax_io.save_weights(str(path), {"params": p},
                          {"kind": "lens_dit", "preset": preset, "config": dataclasses.asdict(cfg)})
    return str(path)


MICRO = ["--config.num_steps=6", "--config.data.num_examples=48", "--config.batch_size=4",
         "--config.distill.ttur=2", "--config.distill.student_steps=2", "--config.eval.enabled=False",
         "--config.distill.sample_every=0", "--config.log_every=1", "--config.checkpoint_every=2",
         "--config.model.scan_layers=True"]        # one traced block instead of four: a smaller compile


def _config(**overrides):
    from lens_jax.configs.base import load_experiment
    c = load_experiment("distill", "tiny")
    c.update_from_flattened_dict(overrides)
    return c


def test_phase_rejects_bad_input(tmp_path):
    from lens_jax.configs.base import ConfigError
    from lens_jax.phases import distill as phase
    student = _converted(tmp_path / "student", "shapes_tiny")
    for bad in (0, -2):
        with pytest.raises(ConfigError, match="ttur"):
            phase.validate(_config(init_from=student, **{"distill.ttur": bad}))
    with pytest.raises(TypeError, match="ttur"):              # the locked config refuses a fractional ratio
        _config(init_from=student, **{"distill.ttur": 1.5})
    with pytest.raises(ConfigError, match="init_from"):
        phase.validate(_config())
    with pytest.raises(ConfigError, match="feature_layers"):
        phase.validate(_config(init_from=student, **{"distill.feature_layers": (7,)}))
    with pytest.raises(ConfigError, match="dataset"):        # no real-image source
        phase.validate(_config(init_from=student, **{"data.source": "shards", "data.path": ""}))
    other = _converted(tmp_path / "other", "tiny")
    with pytest.raises(ConfigError, match="one architecture"):
        phase.check_same_dit(_config(init_from=student), other, "config.distill.teacher")
    phase.check_same_dit(_config(init_from=student), student, "config.distill.teacher")


def test_phase_teacher_of_another_architecture_stops_with_a_clear_error(tmp_path):
    student = _converted(tmp_path / "student", "shapes_tiny")
    other = _converted(tmp_path / "other", "tiny")
    rc, out = _run(tmp_path / "run", student, f"--config.distill.teacher={other}")
    assert rc == 2 and "one architecture" in out, out[-2000:]


def _run(workdir, init, *extra, fault=""):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "LENS_JAX_FAULT")}
    env["JAX_PLATFORMS"] = "cpu"
    if fault:
        env["LENS_JAX_FAULT"] = fault
    r = subprocess.run([sys.executable, "-m", "lens_jax.main", "--config=experiments/distill.py:tiny",
                        f"--workdir={workdir}", f"--config.init_from={init}", *MICRO, *extra],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    return r.returncode, r.stdout + r.stderr


def _rows(workdir):
    return {r["step"]: r for r in (json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl")))}


@pytest.mark.slow
def test_phase_sigkill_and_rerun_continue_bit_identically(tmp_path):
    init = _converted(tmp_path / "init", "shapes_tiny", scan_layers=True)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    rc, out = _run(ref, init)
    assert rc == 0, out[-3000:]
    rc, out = _run(killed, init, fault="5:KILL")
    assert rc == -9, out[-3000:]
    rc, out = _run(killed, init)
    assert rc == 0, out[-3000:]
    import re
    m = re.search(r"resumed from \S+ step (\d+)", out)
    assert m and int(m.group(1)) in (2, 4), out[-2000:]          # continued, did not start over
    a, b = _rows(ref), _rows(killed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    keys = [k for k in a[6] if k.endswith("loss") or k.startswith("critic/d_") or k.endswith("grad_norm")]
    assert any(k.startswith("critic/") for k in keys) and any(k.startswith("student/") for k in keys)
    for s in range(1, 7):
        assert {k: b[s][k] for k in keys} == {k: a[s][k] for k in keys}    # exact float equality


def test_turbo_preset_samples_the_students_grid_at_guidance_one():
    from lens_jax.configs.base import load_experiment
    tiny = load_experiment("distill", "tiny")
    for name in ("eval", "sample"):
        c = load_experiment(name, "tiny_turbo")
        section = c.eval if name == "eval" else c.sample
        assert (section.num_steps, section.guidance, section.mu) == (4, 1.0, tiny.distill.student_mu)
        assert c.model.preset == "shapes_tiny"
        lens = load_experiment(name, "turbo")
        section = lens.eval if name == "eval" else lens.sample
        assert (section.num_steps, section.guidance, section.mu) == (4, 1.0, -1.0)   # the shifted 1024² grid
        assert lens.model.preset == "lens_3p8b"
    assert load_experiment("eval", "tiny").eval.num_steps == 20                      # plain variants unchanged


def test_distill_variants_hold_the_recipe():
    from lens_jax.configs.base import load_experiment
    c = load_experiment("distill", "lens")
    d = c.distill
    assert (d.guidance, d.ttur, d.ida_mix, d.lambda_d, d.lambda_g, d.r1_gamma, d.r1_alpha, d.student_steps) == \
        (5.0, 4, 0.03, 0.1, 1e-3, 1.0, 0.1, 4)
    assert (c.optim.lr, c.optim.b1, c.optim.b2, c.disc_optim.lr, c.disc_optim.b1, c.disc_optim.b2) == \
        (5e-7, 0.0, 0.9, 1e-4, 0.0, 0.9)
    assert c.num_steps <= 1000 and c.batch_size == 32 and tuple(c.data.per_device_batch)[-1] == 4
    from lens_jax.phases.distill import student_sigmas
    np.testing.assert_allclose(student_sigmas(c), (1.0, 0.967, 0.908, 0.767), atol=1e-3)   # LENS_SPEC §10.5


def test_sequential_teacher_calls_equal_the_batched_ones(setup):
    s = setup
    apply = D.make_apply(s["model"])
    x = jnp.concatenate([s["batch"]["img"]] * 3, 0) * 0.7
    t = jnp.linspace(0.1, 0.9, 3 * B)
    p = s["params"]
    outs = [D.discriminate(apply, s["disc"], p["teacher"], p["disc"], s["batch"], x, t,
                           _cfg(sequential_teacher=seq), rows=3) for seq in (False, True)]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    cfgs = [D.teacher_cfg_x0(apply, p["teacher"], s["batch"], x[:B], t[:B], 4.0, True, sequential=seq)
            for seq in (False, True)]
    for a, b in zip(*cfgs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
