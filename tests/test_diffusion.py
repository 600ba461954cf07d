"""Tests for lens_jax.diffusion: objective (spec §6.2), schedules (§7.1) and the Euler/CFG sampler (§7.2–7.5)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lens_jax.diffusion import objective, sampler, schedules
from lens_jax.models.mmdit import MMDiT, dummy_inputs, image_positions, mmdit_config


# ----------------------------------------------------------------------------- schedules (§7.1)

@pytest.mark.parametrize("tokens,steps,mu", [
    (4096, 20, 2.198), (4096, 4, 2.291), (8100, 4, 1.828), (8100, 20, 1.828), (8100, 50, 1.828),
    (4096, 50, 2.023), (4232, 20, 2.210), (2304, 20, 2.034), (1024, 20, 1.916),
])
def test_empirical_mu_worked_values(tokens, steps, mu):
    assert round(schedules.compute_empirical_mu(tokens, steps), 3) == pytest.approx(mu, abs=1e-9)


def test_empirical_mu_formula_branches():
    a1, b1, a2, b2 = 8.73809524e-5, 1.89833333, 1.6927e-4, 0.45666666
    L = 3000
    m10, m200 = a1 * L + b1, a2 * L + b2
    assert schedules.compute_empirical_mu(L, 10) == pytest.approx(m10, abs=1e-12)
    assert schedules.compute_empirical_mu(L, 200) == pytest.approx(m200, abs=1e-12)
    assert schedules.compute_empirical_mu(4301, 7) == pytest.approx(a2 * 4301 + b2, abs=1e-12)


SIGMAS_1024_20 = [1.000, 0.994, 0.988, 0.981, 0.973, 0.964, 0.955, 0.944, 0.931, 0.917, 0.900, 0.881, 0.857,
                  0.829, 0.794, 0.750, 0.692, 0.614, 0.500, 0.322]


@pytest.mark.parametrize("tokens,steps,expected", [
    (4096, 20, SIGMAS_1024_20),
    (4096, 4, [1.000, 0.967, 0.908, 0.767]),
    (8100, 4, [1.000, 0.949, 0.861, 0.675]),
])
def test_sampling_sigmas_match_spec(tokens, steps, expected):
    s = schedules.sampling_sigmas(tokens, steps)
    assert s.dtype == np.float32 and s.shape == (steps + 1,)
    np.testing.assert_allclose(s[:-1], expected, atol=5e-4 + 1e-6)
    assert s[-1] == 0.0
    assert np.all(np.diff(s) < 0)


@pytest.mark.parametrize("tokens,steps,tail", [
    (4096, 50, (0.240, 0.134)), (4232, 20, (0.503, 0.324)), (2304, 20, (0.459, 0.287)), (1024, 20, (0.430, 0.263)),
])
def test_sampling_sigmas_tails(tokens, steps, tail):
    s = schedules.sampling_sigmas(tokens, steps)
    np.testing.assert_allclose(s[-3:-1], tail, atol=5e-4 + 1e-6)
    assert s[0] == 1.0 and s[-1] == 0.0 and np.all(np.diff(s) < 0)


def test_shift_sigmas_is_logit_shift():
    s = np.linspace(0.05, 0.95, 19)
    mu = 1.7
    out = schedules.shift_sigmas(s, mu)
    np.testing.assert_allclose(np.log(out / (1 - out)), mu + np.log(s / (1 - s)), atol=1e-10)
    np.testing.assert_allclose(out, np.exp(mu) / (np.exp(mu) + (1 / s - 1)), rtol=1e-12)
    assert schedules.shift_sigmas(0.0, mu) == 0.0 and schedules.shift_sigmas(1.0, mu) == 1.0
    np.testing.assert_allclose(np.asarray(schedules.shift_sigmas(jnp.asarray(s, jnp.float32), mu)), out, atol=1e-6)
    # mu override
    np.testing.assert_allclose(schedules.sampling_sigmas(4096, 4, mu=0.0), [1.0, 0.75, 0.5, 0.25, 0.0], atol=1e-7)


# ----------------------------------------------------------------------------- training objective (§6.2)

@pytest.mark.parametrize("tokens,mu", [(1024, 1.06), (2304, 1.16), (4096, 1.30)])
def test_timestep_mu_table(tokens, mu):
    assert round(objective.timestep_mu(tokens), 2) == pytest.approx(mu, abs=1e-9)


def test_timestep_mu_array_and_endpoints():
    assert objective.timestep_mu(256) == pytest.approx(1.0)
    assert objective.timestep_mu(4096) == pytest.approx(1.3)
    arr = objective.timestep_mu(jnp.array([1024, 4096]))
    np.testing.assert_allclose(np.asarray(arr), [1.06, 1.3], atol=1e-6)


@pytest.mark.parametrize("mu", [1.06, 1.3])
def test_sigma_sampler_statistics(mu):
    s = np.asarray(objective.sample_sigma(jax.random.key(0), 200_000, mu), np.float64)
    assert s.shape == (200_000,)
    assert np.all((s > 0) & (s < 1))
    logit = np.log(s / (1 - s))
    assert abs(logit.mean() - mu) < 0.02
    assert abs(logit.std() - 1.0) < 0.02


def test_sigma_sampler_per_sample_mu_and_std():
    mu = jnp.array([-2.0, 3.0] * 50_000)
    s = np.asarray(objective.sample_sigma(jax.random.key(1), 100_000, mu, std=0.5), np.float64)
    logit = np.log(s / (1 - s))
    assert abs(logit[0::2].mean() + 2.0) < 0.02 and abs(logit[1::2].mean() - 3.0) < 0.02
    assert abs(logit[0::2].std() - 0.5) < 0.02


def test_loss_zero_and_hand_mse():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(2, 5, 4)).astype(np.float32)
    target = rng.normal(size=(2, 5, 4)).astype(np.float32)
    loss, per = objective.flow_matching_loss(jnp.asarray(pred), jnp.asarray(pred))
    assert float(loss) == 0.0 and np.all(np.asarray(per) == 0)
    loss, per = objective.flow_matching_loss(jnp.asarray(pred), jnp.asarray(target))
    np.testing.assert_allclose(float(loss), np.mean((pred - target) ** 2), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(per), np.mean((pred - target) ** 2, axis=(1, 2)), rtol=1e-6)


def test_loss_mask_excludes_padding():
    rng = np.random.default_rng(1)
    pred = rng.normal(size=(2, 6, 3)).astype(np.float32)
    target = rng.normal(size=(2, 6, 3)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], bool)
    loss, per = objective.flow_matching_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mask))
    se = (pred - target) ** 2
    np.testing.assert_allclose(float(loss), se[mask].mean(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(per), [se[0, :4].mean(), se[1, :2].mean()], rtol=1e-6)
    pred2 = pred.copy()
    pred2[~mask] = 1e3
    pred2[1, 5] = np.nan
    loss2, per2 = objective.flow_matching_loss(jnp.asarray(pred2), jnp.asarray(target), jnp.asarray(mask))
    assert float(loss2) == float(loss)
    np.testing.assert_array_equal(np.asarray(per2), np.asarray(per))


def test_noise_latents_endpoints_and_velocity():
    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    x0 = jax.random.normal(k1, (3, 8, 4))
    eps = jax.random.normal(k2, (3, 8, 4))
    np.testing.assert_array_equal(objective.noise_latents(x0, eps, jnp.zeros(3)), x0)
    np.testing.assert_array_equal(objective.noise_latents(x0, eps, jnp.ones(3)), eps)
    sigma = jax.random.uniform(k3, (3,))
    xs = objective.noise_latents(x0, eps, sigma)
    s = np.asarray(sigma)[:, None, None]
    np.testing.assert_allclose(xs, (1 - s) * np.asarray(x0) + s * np.asarray(eps), atol=1e-6)
    v = objective.velocity_target(x0, eps)
    np.testing.assert_allclose(v, np.asarray(eps) - np.asarray(x0), atol=0)
    np.testing.assert_allclose(xs - s * np.asarray(v), x0, atol=1e-5)        # x0 = x_sigma - sigma v
    np.testing.assert_allclose(xs + (1 - s) * np.asarray(v), eps, atol=1e-5)  # eps = x_sigma + (1 - sigma) v


def test_caption_dropout():
    b, s, f = 4000, 3, 2
    txt = jnp.ones((b, s, f))
    mask = jnp.ones((b, s), bool).at[:, -1].set(False)
    keep_f, keep_m = objective.caption_dropout(jax.random.key(0), txt, mask, 0.0)
    np.testing.assert_array_equal(keep_f, txt)
    np.testing.assert_array_equal(keep_m, mask)
    drop_f, drop_m = objective.caption_dropout(jax.random.key(0), txt, mask, 1.0)
    assert not np.any(np.asarray(drop_f)) and not np.any(np.asarray(drop_m))
    f_, m_ = objective.caption_dropout(jax.random.key(3), txt, mask, 0.1)
    dropped = ~np.asarray(m_).any(axis=1)
    assert abs(dropped.mean() - 0.1) < 0.02
    np.testing.assert_array_equal(np.asarray(f_).any(axis=(1, 2)), ~dropped)   # whole-text drop
    np.testing.assert_array_equal(np.asarray(m_)[~dropped], np.asarray(mask)[~dropped])


# ----------------------------------------------------------------------------- CFG (§7.3, §7.5)

def _rand(shape, seed):
    return jax.random.normal(jax.random.key(seed), shape)


def test_cfg_identity_at_one():
    c, u = _rand((2, 7, 16), 0), _rand((2, 7, 16), 1)
    np.testing.assert_array_equal(sampler.cfg_combine(c, u, 1.0), c)
    np.testing.assert_array_equal(jax.jit(sampler.cfg_combine)(c, u, jnp.float32(1.0)), c)


@pytest.mark.parametrize("g", [0.0, 2.5, 5.0])
def test_cfg_norm_and_direction(g):
    c, u = _rand((2, 7, 16), 2), _rand((2, 7, 16), 3)
    out = np.asarray(sampler.cfg_combine(c, u, g))
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(np.asarray(c), axis=-1), rtol=1e-5)
    comb = np.asarray(u) + g * (np.asarray(c) - np.asarray(u))
    cos = np.sum(out * comb, -1) / (np.linalg.norm(out, axis=-1) * np.linalg.norm(comb, axis=-1))
    np.testing.assert_allclose(cos, 1.0, atol=1e-5)


def test_cfg_zero_comb_tokens():
    c = _rand((1, 3, 8), 4)
    g = 2.0
    # token 0: comb = u + g (c - u) = 0 when u = g c / (g - 1) ... choose u so comb == 0 exactly: u = 2c at g = 2.
    u = c.at[0, 1:].set(0.0).at[0, 0].set(2.0 * c[0, 0])
    out = np.asarray(sampler.cfg_combine(c, u, g))
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[0, 0], np.zeros(8))
    np.testing.assert_allclose(out[0, 1:], np.asarray(c)[0, 1:], rtol=1e-6)   # u = 0 -> comb = g c -> rescaled to c
    z = jnp.zeros((1, 2, 8))
    np.testing.assert_array_equal(sampler.cfg_combine(z, z, 5.0), z)


def test_cfg_bf16_inputs_keep_dtype():
    c, u = _rand((1, 4, 8), 5).astype(jnp.bfloat16), _rand((1, 4, 8), 6).astype(jnp.bfloat16)
    assert sampler.cfg_combine(c, u, 3.0).dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- sampler (§7.2)

class PointFlow:
    """Exact rectified flow of a point mass at x*: v(x, sigma) = (x - x*) / sigma (Euler is exact on it).

    Records the batch size of every call (python-side counter).
    """

    def __init__(self, target):
        self.target = target
        self.batches = []

    def __call__(self, x, img_pos, txt, txt_mask, sigma, img_mask=None):
        self.batches.append(x.shape[0])
        assert img_pos.shape == (x.shape[0], x.shape[1], 3) and txt.shape[0] == x.shape[0]
        assert txt_mask.shape == txt.shape[:2] and sigma.shape == (x.shape[0],)
        reps = x.shape[0] // self.target.shape[0]            # [cond; uncond] both flow to x*
        return (x - jnp.tile(self.target, (reps, 1, 1))) / sigma[:, None, None]


def _text(b, s=5, f=6, seed=7):
    feats = jax.random.normal(jax.random.key(seed), (b, s, f))
    mask = jnp.arange(s)[None, :] < jnp.array([3, 5, 1, 4][:b])[:, None]
    return feats * mask[..., None], mask


@pytest.mark.parametrize("loop", ["scan", "python"])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_sampler_lands_on_point(loop, guidance):
    b, h, w, c = 2, 3, 4, 8
    target = jax.random.normal(jax.random.key(11), (b, h * w, c))
    fn = PointFlow(target)
    x0 = jax.random.normal(jax.random.key(12), (b, h * w, c))
    sig = schedules.sampling_sigmas(h * w, 6)
    txt, mask = _text(b)
    seen = []
    out = sampler.euler_sample(fn, x0, sig, txt, mask, guidance=guidance, img_pos=image_positions(h, w), loop=loop,
                               callback=lambda i, n, s, x: seen.append((i, n, s)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(target), atol=1e-4)
    assert [i for i, _, _ in seen] == list(range(6)) and all(n == 6 for _, n, _ in seen)
    np.testing.assert_allclose([s for _, _, s in seen], sig[:-1], rtol=1e-6)
    expected_b = b if guidance == 1.0 else 2 * b
    if loop == "python":
        assert fn.batches == [expected_b] * 6
    else:
        assert fn.batches and set(fn.batches) == {expected_b}   # traced once


def test_sampler_intermediate_points_on_line():
    """After each Euler step x stays on the straight line x* + sigma (x_init - x*)."""
    target = jnp.full((1, 4, 2), 3.0)
    x0 = jnp.zeros((1, 4, 2))
    sig = schedules.sampling_sigmas(4, 4)
    xs = []
    sampler.euler_sample(PointFlow(target), x0, sig, jnp.zeros((1, 2, 3)), jnp.ones((1, 2), bool), guidance=1.0,
                         img_pos=image_positions(2, 2), loop="python", callback=lambda i, n, s, x: xs.append(x))
    for i, x in enumerate(xs):
        np.testing.assert_allclose(np.asarray(x), 3.0 * (1 - sig[i + 1]), atol=1e-5)


def test_sampler_cfg_batches_cond_and_uncond_with_padding():
    b, n, c = 2, 4, 3
    calls = []

    def fn(x, img_pos, txt, txt_mask, sigma, img_mask=None):
        calls.append((x.shape, txt.shape, np.asarray(txt_mask), np.asarray(txt)))
        return jnp.ones_like(x)

    cond = _text(b, s=5, f=6)
    uncond = (jnp.ones((1, 2, 6)), jnp.ones((1, 2), bool))     # batch-1 negative prompt, shorter text
    sampler.euler_sample(fn, jnp.zeros((b, n, c)), np.array([1.0, 0.5, 0.0], np.float32), *cond, *uncond,
                         guidance=3.0, img_pos=image_positions(2, 2), loop="python")
    assert len(calls) == 2
    xshape, tshape, m, t = calls[0]
    assert xshape == (2 * b, n, c) and tshape == (2 * b, 5, 6)
    np.testing.assert_array_equal(m[:b], np.asarray(cond[1]))
    np.testing.assert_array_equal(m[b:], np.array([[1, 1, 0, 0, 0]] * b, bool))
    np.testing.assert_array_equal(t[b:, 2:], 0.0)
    # default uncond: zeros + all-false mask
    calls.clear()
    sampler.euler_sample(fn, jnp.zeros((b, n, c)), np.array([1.0, 0.0], np.float32), *cond, guidance=3.0,
                         img_pos=image_positions(2, 2), loop="python")
    _, _, m, t = calls[0]
    assert not m[b:].any() and not t[b:].any()


def test_sampler_scan_and_python_agree_with_cfg():
    """A text-dependent analytic model: scan and python loops give the same result under CFG."""
    b, n, c = 2, 6, 4
    w = jax.random.normal(jax.random.key(20), (6, c))

    def fn(x, img_pos, txt, txt_mask, sigma, img_mask=None):
        ctx = jnp.sum(txt * txt_mask[..., None], axis=1) @ w                    # [B', C]
        return (x - ctx[:, None, :]) / sigma[:, None, None] + 0.1 * jnp.sin(x)

    x0 = jax.random.normal(jax.random.key(21), (b, n, c))
    sig = schedules.sampling_sigmas(n, 5)
    cond = _text(b, s=4, f=6)
    a = sampler.euler_sample(fn, x0, sig, *cond, guidance=5.0, img_pos=image_positions(2, 3), loop="scan")
    p = sampler.euler_sample(fn, x0, sig, *cond, guidance=5.0, img_pos=image_positions(2, 3), loop="python")
    np.testing.assert_allclose(np.asarray(a), np.asarray(p), rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(np.asarray(a)))


@pytest.fixture(scope="module")
def tiny_model():
    cfg = mmdit_config("tiny")
    model = MMDiT(cfg)
    params = model.init(jax.random.key(0), **dummy_inputs(cfg, batch=1, h=2, w=2, text_len=4))["params"]
    return model, params


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_sample_latents_tiny_mmdit(tiny_model, guidance):
    model, params = tiny_model
    cfg = model.config
    f = cfg.num_text_layers * cfg.text_dim
    feats = jax.random.normal(jax.random.key(1), (1, 5, f))
    mask = jnp.arange(5)[None] < 3
    feats = feats * mask[..., None]
    out = sampler.sample_latents(model, params, jax.random.key(2), (feats, mask), h=3, w=4, num_steps=3,
                                 guidance=guidance, batch=2)
    assert out.shape == (2, 12, cfg.in_channels) and out.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out)))


def test_make_model_fn_matches_apply_and_python_loop(tiny_model):
    model, params = tiny_model
    cfg = model.config
    fn = sampler.make_model_fn(model, params)
    inp = dummy_inputs(cfg, batch=2, h=2, w=3, text_len=4)
    x = jax.random.normal(jax.random.key(3), inp["img"].shape)
    sig = jnp.array([0.7, 0.2])
    direct = model.apply({"params": params}, x, inp["img_pos"], inp["txt"], inp["txt_mask"], sig)
    np.testing.assert_allclose(np.asarray(fn(x, inp["img_pos"], inp["txt"], inp["txt_mask"], sig)),
                               np.asarray(direct), rtol=1e-5, atol=1e-6)
    # leaves of the bound fn are the parameters (passed to the scan jit as arguments, not constants)
    assert len(jax.tree.leaves(fn)) == len(jax.tree.leaves(params))
    sig_grid = schedules.sampling_sigmas(6, 2)
    a = sampler.euler_sample(fn, x, sig_grid, inp["txt"], inp["txt_mask"], guidance=2.0, img_pos=inp["img_pos"])
    p = sampler.euler_sample(fn, x, sig_grid, inp["txt"], inp["txt_mask"], guidance=2.0, img_pos=inp["img_pos"],
                             loop="python")
    np.testing.assert_allclose(np.asarray(a), np.asarray(p), rtol=1e-4, atol=1e-5)


def test_sampler_with_the_exact_denoiser_of_a_finite_set_draws_clean_shapes_world_images():
    """End-to-end check of everything after the DiT: schedule, Euler/CFG loop, VAE decode and ShapesEval.

    For data that is a finite set {x_i}, E[x0 | x_sigma] is a softmax-weighted mean of the x_i, so the exact
    velocity is (x - E[x0 | x]) / sigma. Driven by it, the sampler must land on (decoded) training images: clean
    1-4 object scenes. A DiT that draws blobs is then the DiT's fault, not the sampler's.
    """
    from lens_jax.data import synthetic
    from lens_jax.eval import shapes_eval
    from lens_jax.pipeline import FrozenVAE, to_uint8

    world = synthetic.ShapesWorldConfig(image_size=64, seed=3)
    images = np.stack([synthetic.example(i, world)["image"] for i in range(96)]).astype(np.float32) / 127.5 - 1
    vae = FrozenVAE("data/tiny/vae")
    data = jnp.asarray(vae.encode_tokens(images), jnp.float32)           # [96, 16, C] normalised tokens
    flat = data.reshape(data.shape[0], -1)

    def exact_velocity(x, pos, txt, mask, sigma, **kw):
        s = sigma[0]
        d2 = jnp.sum((x.reshape(x.shape[0], 1, -1) - (1 - s) * flat[None]) ** 2, -1)
        x0 = (jax.nn.softmax(-d2 / (2 * s * s), -1) @ flat).reshape(x.shape)
        return (x - x0) / s

    b = 16
    x = jax.random.normal(jax.random.key(0), (b,) + data.shape[1:])
    out = sampler.euler_sample(exact_velocity, x, schedules.sampling_sigmas(16, 20), jnp.zeros((b, 1, 8)),
                               jnp.zeros((b, 1), bool), guidance=1.0, img_pos=image_positions(4, 4), loop="python")
    nearest = jnp.min(jnp.linalg.norm(out.reshape(b, 1, -1) - flat[None], axis=-1), axis=1)
    assert float(jnp.max(nearest)) < 0.05 * float(jnp.linalg.norm(flat[0]))   # landed on training examples
    assert len({int(i) for i in jnp.argmin(jnp.linalg.norm(out.reshape(b, 1, -1) - flat[None], axis=-1), 1)}) > b // 2
    for im in np.asarray(to_uint8(vae.decode_tokens(out, 4, 4))):
        dets, integrity = shapes_eval.analyze_image(im)
        assert 1 <= len(dets) <= 4 and integrity["clean"]
