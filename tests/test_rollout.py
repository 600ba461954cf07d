"""Rollout samplers: ODE solvers and the Flow-GRPO SDE against a closed-form Gaussian flow."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens_jax.diffusion import rollout
from lens_jax.diffusion.schedules import sampling_sigmas

M, S = 0.7, 0.5          # data: x0 ~ N(M, S^2) in every dimension


def gaussian_velocity(x, img_pos, txt, txt_mask, sigma, img_mask=None):
    """The exact velocity E[eps - x0 | x_sigma] of x_sigma = (1 - sigma) x0 + sigma eps."""
    s = sigma[:, None, None]
    var = (1 - s) ** 2 * S ** 2 + s ** 2
    centred = x - (1 - s) * M
    e_x0 = M + (1 - s) * S ** 2 / var * centred
    e_eps = s / var * centred
    return e_eps - e_x0


def _inputs(b=4096, n=2, c=2):
    x = jax.random.normal(jax.random.key(0), (b, n, c))
    return x, jnp.zeros((1, 3, 4)), jnp.ones((1, 3), bool), jnp.zeros((n, 3), jnp.int32)


@pytest.mark.parametrize("solver,steps,tol", [("euler", 40, 0.05), ("heun", 10, 0.02), ("dpm2", 10, 0.02)])
def test_ode_solvers_reach_the_data_distribution(solver, steps, tol):
    x, txt, mask, pos = _inputs()
    sig = sampling_sigmas(4, steps, mu=0.5)
    x0 = np.asarray(rollout.ode_sample(gaussian_velocity, x, sig, txt, mask, img_pos=pos, solver=solver))
    assert abs(x0.mean() - M) < tol and abs(x0.std() - S) < 2 * tol


def test_second_order_solvers_beat_euler_at_the_same_step_count():
    x, txt, mask, pos = _inputs(b=512)
    sig = sampling_sigmas(4, 6, mu=0.5)
    fine = np.asarray(rollout.ode_sample(gaussian_velocity, x, sampling_sigmas(4, 400, mu=0.5), txt, mask,
                                         img_pos=pos, solver="euler"))
    err = {s: np.abs(np.asarray(rollout.ode_sample(gaussian_velocity, x, sig, txt, mask, img_pos=pos, solver=s))
                     - fine).mean() for s in rollout.ODE_SOLVERS}
    assert err["dpm2"] < 0.8 * err["euler"] and err["heun"] < 0.6 * err["euler"], err


def test_sde_and_ode_give_the_same_x0_statistics():
    x, txt, mask, pos = _inputs(b=8192)
    sig = sampling_sigmas(4, 40, mu=0.5)
    ode = np.asarray(rollout.ode_sample(gaussian_velocity, x, sig, txt, mask, img_pos=pos, solver="dpm2"))
    out = rollout.sde_sample(gaussian_velocity, x, sig, txt, mask, jax.random.key(3), img_pos=pos, noise_level=0.7)
    sde = np.asarray(out["x0"])
    assert abs(sde.mean() - ode.mean()) < 0.03 and abs(sde.std() - ode.std()) < 0.03
    assert abs(sde.mean() - M) < 0.03 and abs(sde.std() - S) < 0.04
    assert not np.allclose(sde, ode, atol=1e-2)          # the SDE really is stochastic
    assert out["x"].shape == (39,) + x.shape and out["log_prob"].shape == (39, x.shape[0])


def test_sde_log_prob_is_the_gaussian_density_of_the_recorded_step():
    x, txt, mask, pos = _inputs(b=8, n=3, c=2)
    sig = sampling_sigmas(6, 5, mu=0.5)
    out = rollout.sde_sample(gaussian_velocity, x, sig, txt, mask, jax.random.key(1), img_pos=pos)
    for j in range(out["x"].shape[0]):
        xj, xn = np.asarray(out["x"][j], np.float64), np.asarray(out["x_next"][j], np.float64)
        s, s2 = float(out["sigma"][j]), float(out["sigma_next"][j])
        d = s2 - s
        a = 0.7 * np.sqrt(s / (1 - (sig[1] if s == 1.0 else s)))
        v = np.asarray(gaussian_velocity(jnp.asarray(xj, jnp.float32), None, None, None, jnp.full((8,), s)), np.float64)
        mean = xj * (1 + a * a * d / (2 * s)) + v * (1 + a * a * (1 - s) / (2 * s)) * d
        std = a * np.sqrt(-d)
        direct = (-(xn - mean) ** 2 / (2 * std ** 2) - np.log(std) - 0.5 * np.log(2 * np.pi)).reshape(8, -1).mean(1)
        np.testing.assert_allclose(np.asarray(out["log_prob"][j]), direct, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out["x"][1:]), np.asarray(out["x_next"][:-1]))


def test_bad_grids_are_rejected():
    x, txt, mask, pos = _inputs(b=2)
    with pytest.raises(ValueError, match="strictly decreasing"):
        rollout.ode_sample(gaussian_velocity, x, np.array([1.0, 0.5, 0.6, 0.0]), txt, mask, img_pos=pos)
    with pytest.raises(ValueError, match="solver"):
        rollout.ode_sample(gaussian_velocity, x, sampling_sigmas(4, 3), txt, mask, img_pos=pos, solver="rk4")
