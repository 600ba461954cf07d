"""DiffusionNFT and Flow-GRPO: the loss's sanity properties, old-policy schedules, reward mappings."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens_jax.posttrain import rewards
from lens_jax.posttrain.nft import NFTConfig, nft_terms, old_policy_decay


def _setup(b=6, n=5, c=3, seed=0):
    k = jax.random.split(jax.random.key(seed), 4)
    x0 = jax.random.normal(k[0], (b, n, c))
    eps = jax.random.normal(k[1], (b, n, c))
    t = jax.random.uniform(k[2], (b,), minval=0.05, maxval=0.95)
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    w = jax.random.normal(k[3], (c, c)) * 0.3            # a linear "policy" v_theta = x_t @ W
    return x0, eps, t, x_t, w


@pytest.mark.parametrize("space", ["x0", "velocity"])
@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_constant_reward_gives_zero_gradient_at_the_old_policy(space, beta):
    x0, eps, t, x_t, w = _setup()
    cfg = NFTConfig(beta=beta, kl_weight=0.0, space=space)

    def loss(w_theta, r):
        per, _ = nft_terms(x_t @ w_theta, x_t @ w, None, x0, x_t, eps, t, r, cfg)
        return jnp.mean(per)
    g_half = jax.grad(loss)(w, jnp.full((6,), 0.5))
    assert float(jnp.max(jnp.abs(g_half))) < 1e-6
    g_pos = jax.grad(loss)(w, jnp.ones((6,)))            # r = 1 does move theta
    assert float(jnp.max(jnp.abs(g_pos))) > 1e-3


def test_gradient_at_the_old_policy_follows_2r_minus_1_and_kl_vanishes_at_the_reference():
    x0, eps, t, x_t, w = _setup()
    cfg = NFTConfig(beta=1.0, kl_weight=0.0, space="velocity")

    def loss(w_theta, r):
        return jnp.mean(nft_terms(x_t @ w_theta, x_t @ w, None, x0, x_t, eps, t, r, cfg)[0])
    g1 = jax.grad(loss)(w, jnp.ones((6,)))
    g0 = jax.grad(loss)(w, jnp.zeros((6,)))
    np.testing.assert_allclose(np.asarray(g1), -np.asarray(g0), atol=1e-6)   # sign of (2r - 1)

    cfg_kl = NFTConfig(beta=1.0, kl_weight=1.0)

    def kl_loss(w_theta):
        _, parts = nft_terms(x_t @ w_theta, x_t @ w, x_t @ w, x0, x_t, eps, t, jnp.full((6,), 0.5), cfg_kl)
        return jnp.mean(parts["kl"])
    assert float(kl_loss(w)) == 0.0
    assert float(jnp.max(jnp.abs(jax.grad(kl_loss)(w)))) == 0.0
    assert float(kl_loss(w * 1.1)) > 0


def test_old_policy_schedules():
    t1, t2 = old_policy_decay("type1"), old_policy_decay("type2")
    assert [round(float(t1(i)), 6) for i in (0, 1, 100, 499, 500, 10_000)] == [0.0, 0.001, 0.1, 0.499, 0.5, 0.5]
    assert [round(float(t2(i)), 6) for i in (0, 74, 75, 76, 100, 300)] == [0.0, 0.0, 0.0, 0.0075, 0.1875, 0.999]
    assert float(old_policy_decay("constant:0.3")(7)) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        old_policy_decay("type3")


def test_nft_weight_mappings_are_invariant_to_shift_and_scale():
    rng = np.random.default_rng(0)
    r = rng.random((5, 8))
    r[2] = 0.25                                          # a zero-variance group
    for mapping in ("lens", "reference"):
        a, w, m = rewards.nft_weights(r, mapping)
        b, w2, _ = rewards.nft_weights(3.0 * r + 7.0, mapping)
        np.testing.assert_allclose(a, b, atol=1e-6)
        np.testing.assert_array_equal(w, w2)
        assert m["zero_std_ratio"] == pytest.approx(0.2)
        assert not w[2].any() and w[[0, 1, 3, 4]].all()
        assert a.min() >= 0 and a.max() <= 1
    # the reference form is invariant to a per-group shift; the Lens form uses the global std
    shift = np.arange(5)[:, None] * 10.0
    a, _, _ = rewards.nft_weights(r, "reference")
    b, _, _ = rewards.nft_weights(r + shift, "reference")
    np.testing.assert_allclose(a, b, atol=1e-6)
    lens, _, _ = rewards.nft_weights(np.array([[0.0, 1.0], [0.0, 0.1]]), "lens")
    assert lens[0, 1] == 1.0 and 0.5 < lens[1, 1] < 1.0  # clip(A, -1, 1) with Z = the batch std


def test_grpo_advantages_and_missing_verdicts():
    r = np.array([[0.0, 1.0, 0.5, np.nan], [1.0, 1.0, 1.0, 1.0]])
    a, w, m = rewards.grpo_advantages(r)
    assert w.tolist() == [[1, 1, 1, 0], [0, 0, 0, 0]] and m["zero_std_ratio"] == 0.5
    np.testing.assert_allclose(a[0, :3], (r[0, :3] - 0.5) / np.std(r[0, :3]), atol=1e-6)
    a2, _, _ = rewards.grpo_advantages(r * 2 + 1)
    np.testing.assert_allclose(a, a2, atol=1e-6)
    assert np.all(np.abs(rewards.grpo_advantages(np.array([[0.0] * 99 + [1.0]]))[0]) <= 5.0)


def test_aggregate_leaves_missing_verdicts_out():
    g = rewards.GLOBAL_RUBRIC_NAME
    assert rewards.aggregate({"a": 1, "b": None, g: 0}) == 0.5
    assert rewards.aggregate({"a": None}) is None
    how = rewards.Aggregation(global_weight=2.0)
    assert rewards.aggregate({"a": 1, g: 0}, how) == pytest.approx(1 / 3)
    assert rewards.aggregate({"a": 1, "b": 1, g: 0}, rewards.Aggregation(gate_global=True, gate_cap=0.2)) == 0.2
