"""Inference sigma schedules (LENS_SPEC §7.1).

Sampling uses a base grid linspace(1, 1/N, N), the exponential time shift
sigma' = e^mu / (e^mu + (1/sigma - 1))  (equivalently logit(sigma') = mu + logit(sigma)),
with mu from FLUX.2's empirical rule `compute_empirical_mu(L, N)`, then a terminal 0.
These run on the host in float64 and hand back float32 arrays.
"""
from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

# FLUX.2 `compute_empirical_mu` constants (identical to diffusers' Flux2 pipeline).
_A1, _B1 = 8.73809524e-05, 1.89833333
_A2, _B2 = 1.6927e-04, 0.45666666
_MAX_LINEAR_TOKENS = 4300


def compute_empirical_mu(num_tokens: int, num_steps: int) -> float:
    """FLUX.2's sampling shift mu for L = `num_tokens` image tokens and N = `num_steps` Euler steps.

    L > 4300: mu = a2 L + b2 (independent of N). Otherwise mu is the line in N through (10, a1 L + b1) and
    (200, a2 L + b2). Examples: (4096, 20) -> 2.198, (4096, 4) -> 2.291, (1024, 20) -> 1.916.
    """
    L = float(num_tokens)
    if L > _MAX_LINEAR_TOKENS:
        return float(_A2 * L + _B2)
    m_200 = _A2 * L + _B2
    m_10 = _A1 * L + _B1
    slope = (m_200 - m_10) / 190.0
    return float(m_200 + slope * (float(num_steps) - 200.0))


def shift_sigmas(sigmas, mu):
    """Exponential time shift sigma' = e^mu / (e^mu + (1/sigma - 1)).

    Evaluated as e^mu sigma / (e^mu sigma + 1 - sigma), which is the same function but finite at sigma = 0
    (maps 0 -> 0 and 1 -> 1).

    Args:
      sigmas: NumPy array / float (computed in float64) or a JAX array (computed in its float dtype).
      mu: shift location (scalar); the static shift is e^mu.
    Returns:
      Shifted sigmas, same shape; NumPy float64 for NumPy/float input, a JAX array for JAX input.
    """
    if isinstance(sigmas, jax.Array) or isinstance(mu, jax.Array):
        s = jnp.asarray(sigmas)
        s = s if jnp.issubdtype(s.dtype, jnp.floating) else s.astype(jnp.float32)
        e = jnp.exp(jnp.asarray(mu, s.dtype))
    else:
        s = np.asarray(sigmas, np.float64)
        e = np.exp(np.float64(mu))
    return e * s / (e * s + (1.0 - s))


def sampling_sigmas(num_tokens: int, num_steps: int, mu: float | None = None) -> np.ndarray:
    """The sigma grid for `num_steps` Euler steps at `num_tokens` image tokens.

    Args:
      num_tokens: image tokens L = h * w of the packed latent (e.g. 4096 at 1024^2).
      num_steps: number of Euler steps N >= 1.
      mu: shift location; None = `compute_empirical_mu(num_tokens, num_steps)`.
    Returns:
      np.float32 [N + 1]: shifted linspace(1, 1/N, N) followed by a final 0; starts at 1, strictly decreasing.
    """
    if int(num_steps) < 1:
        raise ValueError(f"num_steps must be >= 1; got {num_steps}")
    n = int(num_steps)
    if mu is None:
        mu = compute_empirical_mu(num_tokens, n)
    base = np.linspace(1.0, 1.0 / n, n, dtype=np.float64)
    return np.append(shift_sigmas(base, mu), 0.0).astype(np.float32)
