"""Euler sampler with classifier-free guidance and per-token norm rescale (LENS_SPEC §7.2–7.5).

A *model_fn* is any callable
    model_fn(x [B', N, C] float32, img_pos [B', N, 3] int32, txt [B', S, F], txt_mask [B', S] bool,
             sigma [B'] float32, img_mask=None | [B', N] bool) -> velocity [B', N, C]
(`img_mask` is passed as a keyword only when it is not None). `make_model_fn(model, params)` binds an
`MMDiT` and its parameters into one; the result is a pytree (parameters are leaves, the module is static),
so `euler_sample(loop='scan')` passes the weights into its single jit as arguments, not as baked constants.

Sampling integrates dx/dsigma = v from sigma = 1 (noise) to 0 (data): x <- x + (sigma_next - sigma) v.
With guidance g != 1 each step makes ONE model call on the batch [cond; uncond] (2B rows) and combines
the halves with `cfg_combine`; with g == 1 it makes one conditional call on B rows (spec §7.5).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from lens_jax.diffusion.schedules import sampling_sigmas
from lens_jax.models.mmdit import image_positions

ModelFnType = Callable[..., jax.Array]
# callback(step, num_steps, sigma, x): step is 0-based; sigma (float) is the level just integrated *from*;
# x [B, N, C] is the latent after the step (at sigma_next).
ProgressCallback = Callable[[int, int, float, Any], None]


# ----------------------------------------------------------------------------- guidance

def cfg_combine(cond: jax.Array, uncond: jax.Array, scale) -> jax.Array:
    """CFG with per-token norm rescale: out = comb * ||cond|| / ||comb||, comb = u + g (c - u).

    Norms are L2 over the last (channel) axis of each token; the factor is 1 wherever ||comb|| == 0.
    Computed in float32; returned in cond's dtype. At g == 1 the output is exactly `cond`.

    Args:
      cond: [..., C] conditional velocity c.
      uncond: [..., C] unconditional velocity u.
      scale: guidance g (Python float or a scalar array).
    """
    if cond.shape != uncond.shape:
        raise ValueError(f"cond {cond.shape} and uncond {uncond.shape} must have the same shape")
    c = cond.astype(jnp.float32)
    u = uncond.astype(jnp.float32)
    g = jnp.asarray(scale, jnp.float32)
    comb = u + g * (c - u)
    n_c = jnp.sqrt(jnp.sum(jnp.square(c), axis=-1, keepdims=True))
    n_comb = jnp.sqrt(jnp.sum(jnp.square(comb), axis=-1, keepdims=True))
    nonzero = n_comb > 0
    factor = jnp.where(nonzero, n_c / jnp.where(nonzero, n_comb, 1.0), 1.0)
    out = jnp.where(g == 1.0, c, comb * factor)
    return out.astype(cond.dtype)


# ----------------------------------------------------------------------------- model binding

class ModelFn:
    """A model_fn bound to a Linen module and its parameters (see module docstring for the call signature).

    Registered as a pytree: `params` are the children and the (hashable) module is static aux data.
    Calls run through one cached `jax.jit` per (module, shapes).
    """

    def __init__(self, model: nn.Module, params: Any):
        self.model = model
        self.params = params

    def __call__(self, x, img_pos, txt, txt_mask, sigma, img_mask=None):
        return _apply_model(self.model, self.params, x, img_pos, txt, txt_mask, sigma, img_mask)

    def __repr__(self):
        return f"ModelFn({type(self.model).__name__})"


jax.tree_util.register_pytree_node(
    ModelFn, lambda f: ((f.params,), f.model), lambda model, children: ModelFn(model, children[0]))


def _apply_model_impl(model, params, x, img_pos, txt, txt_mask, sigma, img_mask):
    return model.apply({"params": params}, x, img_pos, txt, txt_mask, sigma, img_mask=img_mask)


_apply_model = jax.jit(_apply_model_impl, static_argnums=(0,))


def make_model_fn(model: nn.Module, params: Any) -> ModelFn:
    """Binds `model` (e.g. `MMDiT`) and its `params` tree (boxed or plain) into a sampler model_fn."""
    return ModelFn(model, nn.meta.unbox(params))


def _split_model_fn(model_fn) -> Tuple[Tuple[str, Any], Any]:
    """(static part, dynamic part) so a ModelFn's weights enter the jit as arguments."""
    if isinstance(model_fn, ModelFn):
        return ("module", model_fn.model), model_fn.params
    return ("callable", model_fn), None


def _join_model_fn(static, params):
    kind, obj = static
    return ModelFn(obj, params) if kind == "module" else obj


# ----------------------------------------------------------------------------- input preparation

def _pad_text(txt: jax.Array, mask: jax.Array, length: int) -> Tuple[jax.Array, jax.Array]:
    extra = length - txt.shape[1]
    if extra == 0:
        return txt, mask
    return (jnp.pad(txt, ((0, 0), (0, extra), (0, 0))),
            jnp.pad(mask, ((0, 0), (0, extra)), constant_values=False))


def _batch_to(a: jax.Array, batch: int, name: str) -> jax.Array:
    if a.shape[0] == batch:
        return a
    if a.shape[0] == 1:
        return jnp.broadcast_to(a, (batch,) + a.shape[1:])
    raise ValueError(f"{name} has batch {a.shape[0]}; expected {batch} or 1")


def _prepare_text(cond_txt, cond_mask, uncond_txt, uncond_mask, use_cfg: bool, batch: int):
    """Text batch for the model: [B, S, F] (no CFG) or [cond; uncond] padded to a common S -> [2B, S, F]."""
    c_txt = _batch_to(jnp.asarray(cond_txt), batch, "cond_txt")
    c_mask = _batch_to(jnp.asarray(cond_mask).astype(bool), batch, "cond_mask")
    if c_txt.ndim != 3 or c_mask.shape != c_txt.shape[:2]:
        raise ValueError(f"expected cond_txt [B, S, F] and cond_mask [B, S]; got {c_txt.shape}, {c_mask.shape}")
    if not use_cfg:
        return c_txt, c_mask
    if (uncond_txt is None) != (uncond_mask is None):
        raise ValueError("pass both uncond_txt and uncond_mask, or neither")
    if uncond_txt is None:     # the empty negative prompt: zeros and an all-false mask (spec §4.4)
        u_txt, u_mask = jnp.zeros_like(c_txt), jnp.zeros_like(c_mask)
    else:
        u_txt = _batch_to(jnp.asarray(uncond_txt), batch, "uncond_txt").astype(c_txt.dtype)
        u_mask = _batch_to(jnp.asarray(uncond_mask).astype(bool), batch, "uncond_mask")
        if u_txt.ndim != 3 or u_txt.shape[-1] != c_txt.shape[-1] or u_mask.shape != u_txt.shape[:2]:
            raise ValueError(f"uncond_txt {u_txt.shape} / uncond_mask {u_mask.shape} do not match "
                             f"cond_txt {c_txt.shape}")
    length = max(c_txt.shape[1], u_txt.shape[1])
    c_txt, c_mask = _pad_text(c_txt, c_mask, length)
    u_txt, u_mask = _pad_text(u_txt, u_mask, length)
    return jnp.concatenate([c_txt, u_txt], 0), jnp.concatenate([c_mask, u_mask], 0)


# ----------------------------------------------------------------------------- Euler steps

def _velocity(fn, x, sigma, txt, txt_mask, img_pos, img_mask, guidance, use_cfg: bool):
    """Guided velocity [B, N, C] float32 at noise level `sigma` (scalar) -- one model call."""
    b = x.shape[0]
    xin = jnp.concatenate([x, x], 0) if use_cfg else x
    s = jnp.full((xin.shape[0],), sigma, jnp.float32)
    kw = {} if img_mask is None else {"img_mask": img_mask}
    v = fn(xin, img_pos, txt, txt_mask, s, **kw).astype(jnp.float32)
    if v.shape != xin.shape:
        raise ValueError(f"model_fn returned {v.shape}; expected {xin.shape}")
    if use_cfg:
        v = cfg_combine(v[:b], v[b:], guidance)
    return v


def _euler_loop_impl(static_fn, callback, use_cfg, params, x, sigmas, txt, txt_mask, img_pos, img_mask,
                     guidance):
    fn = _join_model_fn(static_fn, params)
    num_steps = sigmas.shape[0] - 1

    def body(i, x):
        s, s_next = sigmas[i], sigmas[i + 1]
        v = _velocity(fn, x, s, txt, txt_mask, img_pos, img_mask, guidance, use_cfg)
        x = x + (s_next - s) * v
        if callback is not None:
            jax.debug.callback(lambda i_, s_, x_: callback(int(i_), num_steps, float(s_), x_), i, s, x,
                               ordered=True)
        return x

    return jax.lax.fori_loop(0, num_steps, body, x)


_euler_loop = jax.jit(_euler_loop_impl, static_argnums=(0, 1, 2))


@jax.jit
def _euler_update(x, v, s, s_next):
    return x + (s_next - s) * v


_cfg_combine_jit = jax.jit(cfg_combine)


def euler_sample(model_fn: ModelFnType, x_init: jax.Array, sigmas, cond_txt: jax.Array, cond_mask: jax.Array,
                 uncond_txt: Optional[jax.Array] = None, uncond_mask: Optional[jax.Array] = None,
                 guidance: float = 5.0, *, img_pos, img_mask: Optional[jax.Array] = None, loop: str = "scan",
                 callback: Optional[ProgressCallback] = None) -> jax.Array:
    """Integrates the flow from sigmas[0] to sigmas[-1] with Euler steps and CFG.

    Args:
      model_fn: velocity predictor (module docstring); e.g. `make_model_fn(model, params)`.
      x_init: [B, N, C] initial latent (N(0, I) noise for a full sample).
      sigmas: [T + 1] decreasing noise levels (e.g. `sampling_sigmas`), T = number of steps / model calls.
      cond_txt, cond_mask: [B or 1, S, F] features and [B or 1, S] bool mask of the prompt.
      uncond_txt, uncond_mask: negative prompt ([B or 1, S', F], [B or 1, S']); None = zeros with an
        all-false mask (the empty negative prompt). Ignored when guidance == 1.
      guidance: CFG scale g, a concrete Python number (it selects the graph). g == 1: one conditional pass
        per step on B rows; otherwise one pass on [cond; uncond] (2B rows, text right-padded to a common
        length with zeros / False) combined by `cfg_combine`.
      img_pos: [N, 3] or [B, N, 3] int32 image positions (`image_positions(h, w)`).
      img_mask: optional [B, N] bool image-token validity, forwarded to model_fn.
      loop: 'scan' = the whole loop in one jit (`lax.fori_loop`); 'python' = a host loop calling model_fn
        once per step (for debugging, progress reporting, or call-counting model_fns).
      callback: optional host-side progress hook callback(step, num_steps, sigma, x) called after each step
        (via `jax.debug.callback` in 'scan' mode; for 'scan' it must be hashable and is part of the jit key).
    Returns:
      [B, N, C] float32 latent at sigmas[-1].
    """
    x = jnp.asarray(x_init, jnp.float32)
    if x.ndim != 3:
        raise ValueError(f"x_init must be [B, N, C]; got {x.shape}")
    b, n, _ = x.shape
    sig = np.asarray(sigmas) if not isinstance(sigmas, jax.Array) else sigmas
    if sig.ndim != 1 or sig.shape[0] < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 values; got shape {sig.shape}")
    sig = jnp.asarray(sig, jnp.float32)
    if img_pos is None:
        raise ValueError("img_pos is required ([N, 3] or [B, N, 3]; see image_positions)")
    pos = jnp.asarray(img_pos, jnp.int32)
    pos = _batch_to(pos[None] if pos.ndim == 2 else pos, b, "img_pos")
    if pos.shape != (b, n, 3):
        raise ValueError(f"img_pos must be [N, 3] or [B, N, 3] with N = {n}; got {tuple(jnp.shape(img_pos))}")
    mask_img = None if img_mask is None else _batch_to(jnp.asarray(img_mask).astype(bool), b, "img_mask")

    use_cfg = float(guidance) != 1.0
    txt, txt_mask = _prepare_text(cond_txt, cond_mask, uncond_txt, uncond_mask, use_cfg, b)
    if use_cfg:
        pos = jnp.concatenate([pos, pos], 0)
        if mask_img is not None:
            mask_img = jnp.concatenate([mask_img, mask_img], 0)
    g = jnp.float32(guidance)

    if loop == "scan":
        static_fn, params = _split_model_fn(model_fn)
        return _euler_loop(static_fn, callback, use_cfg, params, x, sig, txt, txt_mask, pos, mask_img, g)
    if loop != "python":
        raise ValueError(f"loop must be 'scan' or 'python'; got {loop!r}")

    host_sig = np.asarray(jax.device_get(sig), np.float32)
    num_steps = host_sig.shape[0] - 1
    kw = {} if mask_img is None else {"img_mask": mask_img}
    for i in range(num_steps):
        s, s_next = host_sig[i], host_sig[i + 1]
        xin = jnp.concatenate([x, x], 0) if use_cfg else x
        v = model_fn(xin, pos, txt, txt_mask, jnp.full((xin.shape[0],), s, jnp.float32), **kw)
        if v.shape != xin.shape:
            raise ValueError(f"model_fn returned {v.shape}; expected {xin.shape}")
        v = v.astype(jnp.float32)
        if use_cfg:
            v = _cfg_combine_jit(v[:b], v[b:], g)
        x = _euler_update(x, v, jnp.float32(s), jnp.float32(s_next))
        if callback is not None:
            callback(i, num_steps, float(s), x)
    return x


# ----------------------------------------------------------------------------- convenience

def sample_latents(model: nn.Module, params: Any, rng: jax.Array, cond, h: int, w: int, num_steps: int = 20,
                   guidance: float = 5.0, uncond=None, batch: Optional[int] = None, *, mu: Optional[float] = None,
                   loop: str = "scan", callback: Optional[ProgressCallback] = None) -> jax.Array:
    """Samples packed latent tokens for an h x w token grid (h, w = image size / 16).

    Builds positions `image_positions(h, w)`, initial noise N(0, I) of shape [B, h*w, C] (C =
    model.config.in_channels, 128 for Lens) and the shifted sigmas `sampling_sigmas(h*w, num_steps, mu)`,
    then runs `euler_sample`.

    Args:
      model, params: the denoiser (e.g. `MMDiT`) and its parameters.
      rng: PRNG key for the initial noise.
      cond: (features [B or 1, S, F], mask [B or 1, S]) prompt conditioning, e.g. a `TextFeatures`.
      h, w: token grid size.
      num_steps: Euler steps (Lens 20, Lens-Turbo 4, Lens-Base 50).
      guidance: CFG scale (Lens 5.0, Turbo 1.0).
      uncond: optional (features, mask) negative prompt; None = zeros + all-false mask.
      batch: number of samples B; None = cond's batch (a batch-1 cond is broadcast to B).
      mu: sampling shift override; None = FLUX.2's empirical mu for (h*w, num_steps).
      loop, callback: see `euler_sample`.
    Returns:
      [B, h*w, C] float32 normalised packed latent tokens (row-major over the h x w grid).
    """
    feats, fmask = cond
    b = int(feats.shape[0]) if batch is None else int(batch)
    channels = int(getattr(getattr(model, "config", None), "in_channels", 128))
    n = h * w
    x = jax.random.normal(rng, (b, n, channels), jnp.float32)
    pos = jnp.asarray(image_positions(h, w))
    sig = sampling_sigmas(n, num_steps, mu)
    u_txt, u_mask = (None, None) if uncond is None else tuple(uncond)
    return euler_sample(make_model_fn(model, params), x, sig, feats, fmask, u_txt, u_mask, guidance,
                        img_pos=pos, loop=loop, callback=callback)
