"""The jitted flow-matching step on the generic trainer: it lowers the loss, skips non-finite updates, keeps EMA,
and runs sharded over an 8-device mesh with the same losses as one device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_setup import dit_spec, fm_objective
from lens_jax.configs.base import optim_config
from lens_jax.models.mmdit import MMDiT, image_positions, mmdit_config
from lens_jax.train import sharding as sharding_lib
from lens_jax.train.optim import make_optimizer
from lens_jax.train.trainer import jit_step

CFG = mmdit_config("tiny", mlp_dim=96)   # divisible by the tensor axis


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
    spec = dit_spec(model, opt, sched, ema_decay=ema)
    state = spec.create(mesh)
    fn, _ = jit_step(spec, [fm_objective(model)], mesh, sharding_lib.batch_shardings(mesh, _batch()), donate=False)
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


def test_non_finite_batch_skips_the_update_and_leaves_params_optimizer_and_ema_unchanged():
    mesh, state, fn = _setup(ema=0.9)
    batch = _batch()
    state, _ = _run(mesh, state, fn, batch, 2)
    before = jax.tree.map(np.asarray, state["nets"])
    bad = dict(batch, img=batch["img"].at[0, 0, 0].set(jnp.nan))
    with jax.set_mesh(mesh):
        state, m = fn(state, bad)
    assert int(m["skipped"]) == 1 and int(state["step"]) == 3
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state["nets"])):
        np.testing.assert_array_equal(a, np.asarray(b))
    with jax.set_mesh(mesh):
        state, m = fn(state, batch)                                     # a finite step moves the EMA again
    ema, params = jax.tree.leaves(state["nets"]["dit"]["ema"]), jax.tree.leaves(state["nets"]["dit"]["params"])
    assert int(m["skipped"]) == 0 and all(np.all(np.isfinite(np.asarray(e))) for e in ema)
    assert any(not np.allclose(np.asarray(e), np.asarray(p)) for e, p in zip(ema, params))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)])
def test_sharded_mesh_gives_the_same_losses_as_one_device(mesh_shape):
    batch = _batch()
    _, ref = _run(*_setup((1, 1, 1)), batch, 5)
    mesh, state, fn = _setup(mesh_shape)
    kernel = state["nets"]["dit"]["params"]["transformer_blocks"]["img_mlp"]["w1"]["kernel"]
    assert kernel.sharding.spec == jax.P(None, "fsdp", "tensor")
    _, got = _run(mesh, state, fn, batch, 5)
    np.testing.assert_allclose(got, ref, rtol=1e-4)


def test_indivisible_sharding_is_reported_by_name():
    mesh = sharding_lib.make_mesh((2, 2, 2))
    model = MMDiT(mmdit_config("tiny"))          # mlp_dim 85 cannot be split over tensor=2
    opt, _ = make_optimizer(optim_config(1e-3), 10)
    with pytest.raises(ValueError, match=r"mlp.*85 % 2"):
        dit_spec(model, opt).create(mesh)
