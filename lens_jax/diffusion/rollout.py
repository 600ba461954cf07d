"""RL rollout samplers: a deterministic second-order ODE sampler and Flow-GRPO's SDE sampler with log-probs.

Both integrate the flow x_sigma = (1 - sigma) x0 + sigma eps from sigma = 1 to 0 over a sigma grid (e.g.
`schedules.sampling_sigmas`), with a model_fn of lens_jax/diffusion/sampler.py (velocity v = eps - x0) and
optional CFG (guidance 1 = CFG-free, one conditional call per model evaluation). Each runs as one jit.

ODE solvers (`ode_sample`, LENS_SPEC §8.4 step 1):
  euler   x' = x + (sigma' - sigma) v                                          1 model call per step
  heun    Euler predictor, trapezoidal corrector; the step to sigma = 0 is Euler  2 calls per step (last: 1)
  dpm2    DPM-Solver++(2M): the multistep second-order exponential integrator in the data prediction
          x0 = x - sigma v, with alpha = 1 - sigma and lambda = log(alpha / sigma):
            x' = (sigma' / sigma) x + (alpha' - alpha sigma' / sigma) D,
            D = (1 + 1/(2 r)) x0_i - 1/(2 r) x0_{i-1},  r = h_{i-1} / h_i,  h = lambda' - lambda;
          the first step (sigma = 1: lambda = -inf) and the step to sigma = 0 are first order (D = x0_i),
          so it is second order on every other step at 1 model call per step.

SDE (`sde_sample`, LENS_SPEC §8.7), the step sigma -> sigma + d (d < 0), noise level a:
  s = a sqrt(sigma / (1 - sigma)) (sigma = 1 replaced by the grid's second value in the denominator),
  mean = x (1 + s^2 d / (2 sigma)) + v (1 + s^2 (1 - sigma) / (2 sigma)) d,  x' = mean + s sqrt(-d) z.
  Every step but the last is stochastic and recorded (its Gaussian log-prob, averaged over latent
  dimensions); the step to sigma = 0 is the deterministic Euler step (no noise is left in the image).
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lens_jax.diffusion.sampler import _join_model_fn, _prepare_text, _split_model_fn, _velocity

ODE_SOLVERS = ("euler", "heun", "dpm2")
LOG_2PI = math.log(2.0 * math.pi)


def _check_sigmas(sigmas) -> np.ndarray:
    s = np.asarray(jax.device_get(sigmas), np.float64)
    if s.ndim != 1 or s.shape[0] < 2 or not np.all(np.diff(s) < 0) or s[-1] != 0.0 or s[0] > 1.0:
        raise ValueError(f"sigmas must be a strictly decreasing grid in (0, 1] ending at 0; got {s}")
    return s


def dpm2_coefficients(sigmas) -> np.ndarray:
    """[T, 4] float32 rows (a, b, c, d): x' = a x + b (c x0_i + d x0_{i-1}) for DPM-Solver++(2M)."""
    s = _check_sigmas(sigmas)
    alpha = 1.0 - s
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(s)                       # -inf at sigma = 1, +inf at sigma = 0
    t = len(s) - 1
    rows = []
    for i in range(t):
        a = s[i + 1] / s[i]
        b = alpha[i + 1] - alpha[i] * s[i + 1] / s[i]
        first_order = i == 0 or s[i + 1] == 0.0 or not np.isfinite(lam[i - 1])
        if first_order:
            c, d = 1.0, 0.0
        else:
            r = (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
            c, d = 1.0 + 0.5 / r, -0.5 / r
        rows.append((a, b, c, d))
    return np.asarray(rows, np.float32)


def sde_coefficients(sigmas, noise_level: float = 0.7) -> Dict[str, np.ndarray]:
    """Per-step Flow-GRPO coefficients for the T - 1 stochastic steps: mean = cx x + cv v, std; float32."""
    s = _check_sigmas(sigmas)
    if len(s) < 3:
        raise ValueError("the SDE sampler needs at least 2 steps (the last one is deterministic)")
    sig, nxt = s[:-2], s[1:-1]
    d = nxt - sig
    denom = 1.0 - np.where(sig == 1.0, s[1], sig)
    std_sigma = float(noise_level) * np.sqrt(sig / denom)
    cx = 1.0 + std_sigma ** 2 * d / (2.0 * sig)
    cv = (1.0 + std_sigma ** 2 * (1.0 - sig) / (2.0 * sig)) * d
    std = std_sigma * np.sqrt(-d)
    return {"cx": cx.astype(np.float32), "cv": cv.astype(np.float32), "std": std.astype(np.float32),
            "sigma": sig.astype(np.float32), "sigma_next": nxt.astype(np.float32)}


def gaussian_log_prob(x: jax.Array, mean: jax.Array, std, img_mask: Optional[jax.Array] = None) -> jax.Array:
    """log N(x; mean, std^2 I) averaged over every axis but the first: [B, ...] -> [B] float32.

    img_mask: optional [B, N] token validity of x [B, N, C]; the mean then runs over valid tokens only."""
    x, mean = x.astype(jnp.float32), mean.astype(jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    lp = -jnp.square(x - mean) / (2.0 * jnp.square(std)) - jnp.log(std) - 0.5 * LOG_2PI
    return masked_token_mean(lp, img_mask)


def masked_token_mean(x: jax.Array, img_mask: Optional[jax.Array] = None) -> jax.Array:
    """Per-example mean of x [B, N, ...] over its valid tokens (img_mask [B, N]; None = all) -> [B] float32."""
    x = x.astype(jnp.float32)
    if img_mask is None:
        return jnp.mean(x.reshape(x.shape[0], -1), axis=1)
    valid = img_mask.astype(jnp.float32)
    per_token = jnp.sum(x.reshape(x.shape[:2] + (-1,)), axis=2)                        # [B, N]
    count = jnp.sum(valid, axis=1) * math.prod(x.shape[2:])
    return jnp.sum(per_token * valid, axis=1) / jnp.maximum(count, 1.0)


def _inputs(x, txt, txt_mask, img_pos, img_mask, uncond_txt, uncond_mask, guidance):
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 3:
        raise ValueError(f"x must be [B, N, C]; got {x.shape}")
    b, n, _ = x.shape
    use_cfg = float(guidance) != 1.0
    t, m = _prepare_text(txt, txt_mask, uncond_txt, uncond_mask, use_cfg, b)
    pos = jnp.asarray(img_pos, jnp.int32)
    pos = jnp.broadcast_to(pos, (b, n, 3)) if pos.ndim == 2 else pos
    if pos.shape != (b, n, 3):
        raise ValueError(f"img_pos must be [N, 3] or [B, N, 3] with N = {n}; got {tuple(pos.shape)}")
    mask = None
    if img_mask is not None:
        mask = jnp.asarray(img_mask).astype(bool)
        if mask.shape != (b, n):
            raise ValueError(f"img_mask must be [B, N] = {(b, n)}; got {tuple(mask.shape)}")
        x = jnp.where(mask[..., None], x, 0.0)           # padded token slots stay exactly zero
    if use_cfg:
        pos = jnp.concatenate([pos, pos], 0)
        mask = None if mask is None else jnp.concatenate([mask, mask], 0)
    return x, t, m, pos, mask, use_cfg


@partial(jax.jit, static_argnums=(0, 1, 2))
def _ode_loop(static_fn, solver, use_cfg, params, x, sigmas, coefs, txt, txt_mask, pos, img_mask, guidance):
    fn = _join_model_fn(static_fn, params)

    def vel(x, s):
        return _velocity(fn, x, s, txt, txt_mask, pos, img_mask, guidance, use_cfg)

    num = sigmas.shape[0] - 1
    if solver == "euler":
        return jax.lax.fori_loop(0, num, lambda i, x: x + (sigmas[i + 1] - sigmas[i]) * vel(x, sigmas[i]), x)
    if solver == "heun":
        def body(i, x):
            s, s2 = sigmas[i], sigmas[i + 1]
            v = vel(x, s)
            xe = x + (s2 - s) * v
            corrected = x + (s2 - s) * 0.5 * (v + vel(xe, jnp.maximum(s2, 1e-6)))
            return jax.lax.cond(s2 > 0, lambda: corrected, lambda: xe)
        return jax.lax.fori_loop(0, num, body, x)

    def body(i, carry):                                   # dpm2
        x, x0_prev = carry
        x0 = x - sigmas[i] * vel(x, sigmas[i])
        a, b, c, d = coefs[i, 0], coefs[i, 1], coefs[i, 2], coefs[i, 3]
        return a * x + b * (c * x0 + d * x0_prev), x0
    x, _ = jax.lax.fori_loop(0, num, body, (x, jnp.zeros_like(x)))
    return x


def ode_sample(model_fn, x_init, sigmas, txt, txt_mask, *, img_pos, solver: str = "dpm2", guidance: float = 1.0,
               img_mask=None, uncond_txt=None, uncond_mask=None) -> jax.Array:
    """Deterministic rollouts: noise x_init [B, N, C] -> latents [B, N, C] float32 at sigma = 0.

    sigmas: [T + 1] decreasing grid from <= 1 to 0; txt [B or 1, S, F], txt_mask [B or 1, S]; img_pos [N, 3] or
    [B, N, 3]; solver one of ODE_SOLVERS (module docstring); guidance 1 = CFG-free; img_mask: optional [B, N]
    bool token validity (images of several aspect ratios padded to N tokens; padded slots stay zero)."""
    if solver not in ODE_SOLVERS:
        raise ValueError(f"solver={solver!r}; choose one of {ODE_SOLVERS}")
    coefs = jnp.asarray(dpm2_coefficients(sigmas))
    x, t, m, pos, mask, use_cfg = _inputs(x_init, txt, txt_mask, img_pos, img_mask, uncond_txt, uncond_mask,
                                          guidance)
    static_fn, params = _split_model_fn(model_fn)
    return _ode_loop(static_fn, solver, use_cfg, params, x, jnp.asarray(sigmas, jnp.float32), coefs, t, m, pos,
                     mask, jnp.float32(guidance))


@partial(jax.jit, static_argnums=(0, 1))
def _sde_loop(static_fn, use_cfg, params, x, key, co, last, txt, txt_mask, pos, img_mask, guidance):
    fn = _join_model_fn(static_fn, params)
    valid = None if img_mask is None else img_mask[:x.shape[0]]       # the conditional half under CFG

    def step(x, inp):
        k, cx, cv, std, s = inp
        v = _velocity(fn, x, s, txt, txt_mask, pos, img_mask, guidance, use_cfg)
        mean = cx * x + cv * v
        z = jax.random.normal(k, x.shape, jnp.float32)
        if valid is not None:
            z = jnp.where(valid[..., None], z, 0.0)
        x_next = mean + std * z
        return x_next, (x, x_next, gaussian_log_prob(x_next, mean, std, valid))

    keys = jax.random.split(key, co["std"].shape[0])
    x_last, (xs, xs_next, logps) = jax.lax.scan(step, x, (keys, co["cx"], co["cv"], co["std"], co["sigma"]))
    s, s2 = last
    x0 = x_last + (s2 - s) * _velocity(fn, x_last, s, txt, txt_mask, pos, img_mask, guidance, use_cfg)
    return x0, xs, xs_next, logps


def sde_sample(model_fn, x_init, sigmas, txt, txt_mask, key, *, img_pos, noise_level: float = 0.7,
               guidance: float = 1.0, img_mask=None, uncond_txt=None, uncond_mask=None) -> Dict[str, Any]:
    """Flow-GRPO rollouts with per-step log-probs (module docstring); img_mask as in `ode_sample` (no noise
    enters padded slots, log-probs average over valid tokens).

    Returns {'x0': [B, N, C] latents at sigma 0, 'x': [T-1, B, N, C] the state before each stochastic step,
    'x_next': [T-1, B, N, C] the state after it, 'log_prob': [T-1, B] float32 (mean over latent dims),
    'sigma', 'sigma_next', 'cx', 'cv', 'std': [T-1] the steps' coefficients (host NumPy)}."""
    co = sde_coefficients(sigmas, noise_level)
    s = _check_sigmas(sigmas)
    x, t, m, pos, mask, use_cfg = _inputs(x_init, txt, txt_mask, img_pos, img_mask, uncond_txt, uncond_mask,
                                          guidance)
    static_fn, params = _split_model_fn(model_fn)
    dev = {k: jnp.asarray(v) for k, v in co.items() if k in ("cx", "cv", "std", "sigma")}
    x0, xs, xs_next, logps = _sde_loop(static_fn, use_cfg, params, x, key, dev,
                                       (jnp.float32(s[-2]), jnp.float32(s[-1])), t, m, pos, mask,
                                       jnp.float32(guidance))
    return dict(x0=x0, x=xs, x_next=xs_next, log_prob=logps, **co)
