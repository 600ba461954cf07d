"""Mixed aspect-ratio rollouts: a padded, masked rollout of a bucket equals that bucket's own rollout, and the
NFT / GRPO losses of a padded batch equal the unpadded ones."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens_jax.data.buckets import bucket_positions, make_buckets
from lens_jax.diffusion import rollout
from lens_jax.diffusion.sampler import make_model_fn
from lens_jax.diffusion.schedules import sampling_sigmas
from lens_jax.models.mmdit import MMDiT, dummy_inputs, image_positions, mmdit_config

BUCKETS = make_buckets(64)                     # Lens's ratios at 64² area: 48x96, 48x80, 64x64, 80x48, 96x48


@pytest.fixture(scope="module")
def dit():
    cfg = mmdit_config("tiny")
    model = MMDiT(cfg, scan_layers=False)
    params = nn.meta.unbox(model.init(jax.random.key(0), **dummy_inputs(cfg, batch=1, h=2, w=2, text_len=3))["params"])
    return cfg, model, params


def _text(cfg, b, s=5, seed=4):
    txt = jax.random.normal(jax.random.key(seed), (b, s, cfg.num_text_layers * cfg.text_dim))
    mask = jnp.ones((b, s), bool).at[:, -1].set(False)
    return txt, mask


def _padded(buckets, n_max):
    pm = [bucket_positions(w, h, n_max) for w, h in buckets]
    return np.stack([p for p, _ in pm]), np.stack([m for _, m in pm])


@pytest.mark.parametrize("kind", ["ode", "sde"])
def test_a_padded_rollout_equals_each_buckets_own_rollout(dit, kind):
    cfg, model, params = dit
    fn = make_model_fn(model, params)
    buckets = [BUCKETS[0], BUCKETS[2], BUCKETS[3]]            # 1:2, 1:1, 5:3
    n_max = max((w // 16) * (h // 16) for w, h in buckets)
    pos, mask = _padded(buckets, n_max)
    b = len(buckets)
    x = jax.random.normal(jax.random.key(1), (b, n_max, cfg.in_channels))
    txt, tmask = _text(cfg, b)
    sig = sampling_sigmas(16, 4)
    key = jax.random.key(7)
    if kind == "ode":
        out = rollout.ode_sample(fn, x, sig, txt, tmask, img_pos=pos, img_mask=mask, solver="dpm2", guidance=3.0)
    else:
        res = rollout.sde_sample(fn, x, sig, txt, tmask, key, img_pos=pos, img_mask=mask, guidance=3.0)
        x_pad, x_next, lp = (np.asarray(res[k]) for k in ("x", "x_next", "log_prob"))
        co = res
        out = res["x0"]
    out = np.asarray(out)
    for i, (w, h) in enumerate(buckets):
        n = (w // 16) * (h // 16)
        assert np.all(out[i, n:] == 0.0), "padded token slots must stay zero"
        if kind == "ode":
            own = rollout.ode_sample(fn, x[i:i + 1, :n], sig, txt[i:i + 1], tmask[i:i + 1],
                                     img_pos=image_positions(h // 16, w // 16), solver="dpm2", guidance=3.0)
            np.testing.assert_allclose(out[i, :n], np.asarray(own)[0], rtol=2e-4, atol=2e-4)
        else:
            # the recorded log-probs are the Gaussian densities of the valid tokens of the unpadded step
            from lens_jax.diffusion.sampler import _velocity
            xi, xn = x_pad[:, i, :n], x_next[:, i, :n]
            assert np.all(x_pad[:, i, n:] == 0.0) and np.all(x_next[:, i, n:] == 0.0)
            cond = np.asarray(txt[i:i + 1]), np.asarray(tmask[i:i + 1])
            u = np.zeros_like(cond[0]), np.zeros_like(cond[1])
            t2 = jnp.concatenate([cond[0], u[0]]), jnp.concatenate([cond[1], u[1]])
            p2 = jnp.asarray(np.stack([image_positions(h // 16, w // 16)] * 2))
            for j in range(xi.shape[0]):
                v = _velocity(fn, jnp.asarray(xi[j:j + 1]), float(co["sigma"][j]), t2[0], t2[1], p2, None, 3.0, True)
                mean = co["cx"][j] * xi[j:j + 1] + co["cv"][j] * np.asarray(v)
                ref = rollout.gaussian_log_prob(jnp.asarray(xn[j:j + 1]), jnp.asarray(mean), co["std"][j])
                np.testing.assert_allclose(lp[j, i], float(ref[0]), rtol=1e-4, atol=1e-4)
    assert out.shape == (b, n_max, cfg.in_channels)


def test_masked_token_mean_ignores_padding_and_matches_the_unpadded_mean():
    x = jax.random.normal(jax.random.key(0), (2, 6, 3))
    mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    got = rollout.masked_token_mean(x.at[0, 4:].set(1e6), mask)
    np.testing.assert_allclose(np.asarray(got), [float(jnp.mean(x[0, :4])), float(jnp.mean(x[1]))], rtol=1e-6)
    lp = rollout.gaussian_log_prob(x.at[0, 4:].set(9.0), jnp.zeros_like(x), 0.5, mask)
    ref = rollout.gaussian_log_prob(x[:1, :4], jnp.zeros_like(x[:1, :4]), 0.5)
    np.testing.assert_allclose(float(lp[0]), float(ref[0]), rtol=1e-6)


def test_nft_terms_of_a_padded_batch_equal_the_unpadded_ones():
    from lens_jax.posttrain.nft import NFTConfig, nft_terms
    n, n_max, c = 6, 9, 4
    v = jax.random.normal(jax.random.key(9), (5, 2, n, c))
    t = jnp.array([0.3, 0.7])
    x0, eps = v[3], v[4]
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    mask = jnp.arange(n_max)[None, :] < n
    mask = jnp.broadcast_to(mask, (2, n_max))
    pad = lambda a: jnp.concatenate([a, 5.0 * jnp.ones((2, n_max - n, c))], 1)  # noqa: E731
    r, cfg = jnp.array([0.9, 0.2]), NFTConfig(kl_weight=0.1)
    l0, parts0 = nft_terms(v[0], v[1], v[2], x0, x_t, eps, t, r, cfg)
    l1, parts1 = nft_terms(pad(v[0]), pad(v[1]), pad(v[2]), pad(x0), pad(x_t), pad(eps), t, r, cfg, img_mask=mask)
    np.testing.assert_allclose(np.asarray(l1), np.asarray(l0), rtol=1e-5)
    for k in parts0:
        np.testing.assert_allclose(np.asarray(parts1[k]), np.asarray(parts0[k]), rtol=1e-5)


def test_nft_objective_ignores_what_sits_in_padded_slots(dit):
    from lens_jax.posttrain.nft import NFTConfig, nft_objective
    cfg, model, params = dit
    w, h = BUCKETS[1]
    n_max = 16
    pos, mask = _padded([(w, h), (64, 64)], n_max)
    txt, tmask = _text(cfg, 2)
    x0 = jax.random.normal(jax.random.key(2), (2, n_max, cfg.in_channels)) * jnp.asarray(mask)[..., None]
    theta = jax.tree.map(lambda a: a + 0.01 * jnp.ones_like(a), params)
    p = {"dit": theta, "dit.ema": params}
    obj = nft_objective(model, NFTConfig(kl_weight=0.1), reference=lambda q: q["dit.ema"])
    batch = dict(txt=txt, txt_mask=tmask, r=jnp.array([0.9, 0.2]), weight=jnp.ones(2), img_pos=jnp.asarray(pos),
                 img_mask=jnp.asarray(mask), x0=x0)
    loss, _ = obj.loss_fn(p, batch, jax.random.key(5))
    junk = jnp.where(jnp.asarray(mask)[..., None], x0, 50.0)
    loss_junk, _ = obj.loss_fn(p, dict(batch, x0=junk), jax.random.key(5))
    assert np.isfinite(float(loss)) and abs(float(loss)) > 0
    np.testing.assert_allclose(float(loss_junk), float(loss), rtol=1e-5)
