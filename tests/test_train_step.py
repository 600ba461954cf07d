"""The jitted flow-matching train step: it lowers the loss, skips non-finite updates, keeps EMA, and runs
sharded over an 8-device mesh with the same losses as one device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens_jax.configs.base import optim_config
from lens_jax.models.mmdit import MMDiT, dummy_inputs, image_positions, mmdit_config
from lens_jax.train import sharding as sharding_lib
from lens_jax.train.optim import make_optimizer
from lens_jax.train.state import create_train_state
from lens_jax.train.step import make_train_step

CFG = mmdit_config("tiny", mlp_dim=96)   # divisible by the tensor axis
MU_RULE = dict(mu_lo=1.0, mu_hi=1.3, n_lo=256, n_hi=4096)


def _batch(b=8, seed=0):
    rng = np.random.default_rng(seed)
    return dict(img=jnp.asarray(rng.standard_normal((b, 16, 128)), jnp.float32),
                img_pos=jnp.broadcast_to(jnp.asarray(image_positions(4, 4)), (b, 16, 3)),
                txt=jnp.asarray(rng.standard_normal((b, 8, 96)), jnp.float32),
                txt_mask=jnp.asarray(np.arange(8)[None] < rng.integers(1, 9, (b, 1))))


def _setup(mesh_shape=(1, 1, 1), ema=0.0, lr=3e-3):
    mesh = sharding_lib.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
    model = MMDiT(CFG)
    opt, sched = make_optimizer(optim_config(lr), 100)
    state, shardings = create_train_state(model, opt, dummy_inputs(CFG), mesh, sharding_lib.DEFAULT_RULES, 0, ema > 0)
    step = make_train_step(model, opt, sched, mu=-1.0, mu_rule=MU_RULE, sigma_std=1.0, caption_dropout=0.1,
                           ema_decay=ema)
    with jax.set_mesh(mesh):
        fn = jax.jit(step, in_shardings=(shardings, None), out_shardings=(shardings, None))
    return mesh, state, fn


def _run(mesh, state, fn, batch, n):
    losses = []
    with jax.set_mesh(mesh):
        for _ in range(n):
            state, m = fn(state, batch)
            losses.append(float(m["loss"]))
    return state, losses


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    mesh, state, fn = _setup()
    batch = _batch()
    state, losses = _run(mesh, state, fn, batch, 30)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert int(state["step"]) == 30


def test_non_finite_batch_skips_the_update_and_ema_tracks_params():
    mesh, state, fn = _setup(ema=0.9)
    batch = _batch()
    state, _ = _run(mesh, state, fn, batch, 2)
    before = jax.tree.map(np.asarray, state["params"])
    bad = dict(batch, img=batch["img"].at[0, 0, 0].set(jnp.nan))
    with jax.set_mesh(mesh):
        state, m = fn(state, bad)
    assert int(m["skipped"]) == 1 and int(state["step"]) == 3
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state["params"])):
        np.testing.assert_array_equal(a, np.asarray(b))
    ema, params = jax.tree.leaves(state["ema_params"]), jax.tree.leaves(state["params"])
    assert all(np.all(np.isfinite(np.asarray(e))) for e in ema)
    assert any(not np.allclose(np.asarray(e), np.asarray(p)) for e, p in zip(ema, params))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)])
def test_sharded_mesh_gives_the_same_losses_as_one_device(mesh_shape):
    batch = _batch()
    _, ref = _run(*_setup((1, 1, 1)), batch, 5)
    mesh, state, fn = _setup(mesh_shape)
    kernel = state["params"]["transformer_blocks"]["img_mlp"]["w1"]["kernel"]
    assert kernel.sharding.spec == jax.P(None, "fsdp", "tensor")
    _, got = _run(mesh, state, fn, batch, 5)
    np.testing.assert_allclose(got, ref, rtol=1e-4)


def test_indivisible_sharding_is_reported_by_name():
    mesh = sharding_lib.make_mesh((2, 2, 2))
    model = MMDiT(mmdit_config("tiny"))          # mlp_dim 85 cannot be split over tensor=2
    opt, _ = make_optimizer(optim_config(1e-3), 10)
    with pytest.raises(ValueError, match=r"mlp.*85 % 2"):
        create_train_state(model, opt, dummy_inputs(model.config), mesh, sharding_lib.DEFAULT_RULES, 0, False)
