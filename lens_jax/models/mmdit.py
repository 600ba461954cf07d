"""The Lens denoiser: a 48-block, all double-stream MMDiT (LENS_SPEC §2).

Inputs are token sequences with explicit per-token positions and validity, so one batch can hold
several aspect ratios padded to a common length:

  img        [B, N, 128]  normalised, 2x2-patchified FLUX.2 latent tokens
  img_pos    [B, N, 3]    int32 (frame, row, col) positions; see `image_positions`
  txt        [B, S, 4*E]  four GPT-OSS layers concatenated on channels (layers 5, 11, 17, 23)
  txt_mask   [B, S]       bool, right-padded text validity (all False = unconditional)
  sigma      [B]          noise level in [0, 1] (1 = pure noise)
  img_mask   [B, N]       optional bool image-token validity (None = all valid)

Output: the velocity [B, N, 128] in the same space (zero at padded image tokens). With `features=(i, j, ...)`
the call returns (velocity, feats): feats[k] [B, N, D] is the image stream's hidden state after block
features[k] (0-based), taken from the same forward pass (a discriminator on the DiT's features needs no second
copy of the model; lens_jax/posttrain/distill.py).

Parameter layout (Flax kernels are [in, out]; blocks stacked on a leading 'layers' axis by nn.scan):
  img_in, txt_norm_{0..3}, txt_in, timestep_embedder/{linear_1,linear_2},
  transformer_blocks/{img_mod,txt_mod,img_norm1,img_norm2,txt_norm1,txt_norm2,
                      attn/{img_qkv,txt_qkv,norm_q,norm_k,norm_added_q,norm_added_k,to_out,to_add_out},
                      img_mlp/{w1,w2,w3}, txt_mlp/{w1,w2,w3}},
  norm_out_linear, proj_out.
The fused QKV kernel is stored as [D, 3, heads, head_dim] (a free reshape of the official
[D, 3*heads*head_dim] with output layout (3, heads, head_dim)) so tensor parallelism can shard heads;
the attention out-projections are [heads, head_dim, D].
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from lens_jax.models import attention as attention_lib
from lens_jax.models import remat as remat_lib
from lens_jax.models.layers import Dense, RMSNorm, constrain
from lens_jax.models.presets import from_preset

Dtype = Any


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
    """Architecture of the Lens MMDiT. Defaults are the released `lens_3p8b` model."""
    num_layers: int = 48
    num_heads: int = 24
    head_dim: int = 64
    in_channels: int = 128          # 32 VAE channels x 2 x 2
    out_channels: int = 128         # proj_out width (2*2*32)
    text_dim: int = 2880            # GPT-OSS hidden size E
    num_text_layers: int = 4        # selected encoder layers, each with its own RMSNorm
    mlp_dim: int = 4096             # SwiGLU hidden, int(hidden * 8 / 3)
    rope_axes: Tuple[int, int, int] = (8, 28, 28)   # (frame, height, width), sum = head_dim
    rope_theta: float = 10000.0
    timestep_dim: int = 256
    timestep_scale: float = 1000.0
    norm_eps: float = 1e-6          # block pre-norms and final LayerNorm
    qk_norm_eps: float = 1e-5
    text_norm_eps: float = 1e-5

    @property
    def hidden(self) -> int:
        return self.num_heads * self.head_dim

    def validate(self) -> None:
        if sum(self.rope_axes) != self.head_dim:
            raise ValueError(f"rope_axes {self.rope_axes} must sum to head_dim {self.head_dim}")
        if any(a % 2 for a in self.rope_axes):
            raise ValueError(f"rope_axes {self.rope_axes} must all be even")
        if self.timestep_dim % 2:
            raise ValueError("timestep_dim must be even")
        for f in ("num_layers", "num_heads", "head_dim", "in_channels", "out_channels", "text_dim",
                  "num_text_layers", "mlp_dim"):
            if getattr(self, f) <= 0:
                raise ValueError(f"{f} must be positive, got {getattr(self, f)}")


PRESETS = {
    # The released Lens / Lens-Turbo / Lens-Base transformer: 4,104,225,152 parameters.
    "lens_3p8b": MMDiTConfig(),
    # Small configurations for CPU tests and the research loop.
    "small": MMDiTConfig(num_layers=6, num_heads=6, head_dim=32, mlp_dim=512, rope_axes=(4, 14, 14),
                         text_dim=256, timestep_dim=128),
    # The CPU research loop (experiments/pretrain.py:tiny): matches the shipped tiny VAE (16 latent channels
    # -> 64 packed) and tiny text encoder (4 layers x 96).
    "shapes_tiny": MMDiTConfig(num_layers=4, num_heads=4, head_dim=32, mlp_dim=341, rope_axes=(8, 12, 12),
                               in_channels=64, out_channels=64, text_dim=96, timestep_dim=128),
    "tiny": MMDiTConfig(num_layers=2, num_heads=2, head_dim=16, mlp_dim=85, rope_axes=(4, 6, 6),
                        text_dim=24, timestep_dim=32),
}


def mmdit_config(name: str = "lens_3p8b", **overrides) -> MMDiTConfig:
    """A preset by name, with optional field overrides; raises on unknown names or fields."""
    cfg = from_preset("MMDiT", PRESETS, name, overrides)
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------- positions and RoPE

def image_positions(h: int, w: int) -> np.ndarray:
    """Positions [h*w, 3] (frame, row, col) of an h x w token grid, row-major, centred (spec §2.4).

    Rows run -ceil(h/2) ... floor(h/2)-1 and columns likewise; the frame index is 0.
    """
    r = np.arange(h) - (h - h // 2)
    c = np.arange(w) - (w - w // 2)
    rr, cc = np.meshgrid(r, c, indexing="ij")
    return np.stack([np.zeros_like(rr), rr, cc], axis=-1).reshape(h * w, 3).astype(np.int32)


def text_positions(img_pos: jax.Array, img_mask: Optional[jax.Array], seq_len: int) -> jax.Array:
    """Text positions [B, S, 3]: token k sits at (s+k, s+k, s+k) with s = max(h//2, w//2).

    s is derived per sample from the valid image positions: the largest row is h//2 - 1 and the
    largest column w//2 - 1, so s = max(max_row, max_col) + 1.
    """
    rc = img_pos[..., 1:].astype(jnp.int32)
    if img_mask is not None:
        rc = jnp.where(img_mask[..., None], rc, jnp.iinfo(jnp.int32).min)
    start = jnp.max(rc, axis=(1, 2)) + 1                                # [B]
    k = start[:, None] + jnp.arange(seq_len, dtype=jnp.int32)[None]    # [B, S]
    return jnp.repeat(k[..., None], 3, axis=-1)


def rope_angles(pos: jax.Array, axes: Tuple[int, ...], theta: float) -> jax.Array:
    """Rotation angles [B, T, head_dim/2] for positions [B, T, 3] (float32).

    Axis a with dimension d contributes d/2 complex pairs with frequencies theta^(-2j/d); pairs are
    laid out frame, then height, then width.
    """
    parts = []
    for a, d in enumerate(axes):
        omega = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        parts.append(pos[..., a:a + 1].astype(jnp.float32) * jnp.asarray(omega, jnp.float32))
    return jnp.concatenate(parts, axis=-1)


def apply_rope(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Interleaved (adjacent-pair) complex rotation of x [B, T, H, Dh] by angles [B, T, Dh/2]."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def timestep_features(sigma: jax.Array, dim: int, scale: float = 1000.0) -> jax.Array:
    """[cos, sin] sinusoidal features [B, dim] of scale*sigma (diffusers Timesteps, flip_sin_to_cos)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = scale * sigma.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


# ----------------------------------------------------------------------------- blocks

class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases."""
    hidden: int
    mlp_dim: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x):
        kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(Dense(self.mlp_dim, ("embed", "mlp"), name="w1", **kw)(x)) * \
            Dense(self.mlp_dim, ("embed", "mlp"), name="w3", **kw)(x)
        h = constrain(checkpoint_name(h, "mlp_hidden"), ("act_batch", "act_seq", "act_mlp"))
        return Dense(self.hidden, ("mlp", "embed"), name="w2", **kw)(h)


class JointAttention(nn.Module):
    """Fused-QKV joint attention over [image, text] with per-stream projections and QK-norms."""
    config: MMDiTConfig
    attention: str
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, x_img, x_txt, ang_img, ang_txt, mask, prefix_lengths):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        qkv_axes = ("embed", "qkv", "heads", "head_dim")
        out_axes = ("heads", "head_dim", "embed")

        def project(x, qkv_name, nq, nk, ang):
            qkv = Dense((3, c.num_heads, c.head_dim), qkv_axes, name=qkv_name, **kw)(x)   # [B,T,3,H,Dh]
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
            q = RMSNorm(c.qk_norm_eps, name=nq, axis_name="head_dim", **kw)(q)
            k = RMSNorm(c.qk_norm_eps, name=nk, axis_name="head_dim", **kw)(k)
            return apply_rope(q, ang), apply_rope(k, ang), v

        qi, ki, vi = project(x_img, "img_qkv", "norm_q", "norm_k", ang_img)
        qt, kt, vt = project(x_txt, "txt_qkv", "norm_added_q", "norm_added_k", ang_txt)
        n = x_img.shape[1]
        q, k, v = (jnp.concatenate(p, axis=1) for p in ((qi, qt), (ki, kt), (vi, vt)))
        heads = ("act_batch", "act_seq", "act_heads", "act_kv")
        q, k, v = (constrain(checkpoint_name(t, "qkv"), heads) for t in (q, k, v))
        o = attention_lib.get_attention(self.attention)(q, k, v, mask=mask, prefix_lengths=prefix_lengths)
        o = constrain(checkpoint_name(o.astype(self.dtype), "attn_out"), heads)
        a_img = Dense(c.hidden, out_axes, n_in_axes=2, name="to_out", **kw)(o[:, :n])
        a_txt = Dense(c.hidden, out_axes, n_in_axes=2, name="to_add_out", **kw)(o[:, n:])
        return a_img, a_txt


class DoubleStreamBlock(nn.Module):
    """One Lens block: adaLN-modulated joint attention and SwiGLU for each stream (spec §2.3).

    Called as a scan body: carry = (img [B,N,D], txt [B,S,D]); returns (carry, None).
    """
    config: MMDiTConfig
    attention: str
    dtype: Dtype
    param_dtype: Dtype
    lora: Optional[Any] = None      # the MMDiT's LoraSpec (a scanned block's parent is no module to ask)

    @nn.compact
    def __call__(self, carry, temb, ang_img, ang_txt, mask, prefix_lengths):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        img, txt = carry
        act = nn.silu(temb)

        def modulation(name):
            m = Dense(6 * c.hidden, ("embed", "mod"), name=name, **kw)(act)     # [B, 6D]
            return [t[:, None, :] for t in jnp.split(m, 6, axis=-1)]

        ish1, isc1, ig1, ish2, isc2, ig2 = modulation("img_mod")
        tsh1, tsc1, tg1, tsh2, tsc2, tg2 = modulation("txt_mod")

        def norm(name, x, scale, shift):
            return RMSNorm(c.norm_eps, name=name, axis_name="norm", **kw)(x) * (1 + scale) + shift

        a_img, a_txt = JointAttention(c, self.attention, name="attn", **kw)(
            norm("img_norm1", img, isc1, ish1), norm("txt_norm1", txt, tsc1, tsh1),
            ang_img, ang_txt, mask, prefix_lengths)
        img = img + ig1 * a_img
        txt = txt + tg1 * a_txt
        img = img + ig2 * SwiGLU(c.hidden, c.mlp_dim, name="img_mlp", **kw)(norm("img_norm2", img, isc2, ish2))
        txt = txt + tg2 * SwiGLU(c.hidden, c.mlp_dim, name="txt_mlp", **kw)(norm("txt_norm2", txt, tsc2, tsh2))
        img = constrain(img.astype(self.dtype), ("act_batch", "act_seq", "act_embed"))
        txt = constrain(txt.astype(self.dtype), ("act_batch", "act_seq", "act_embed"))
        return (img, txt), None


# ----------------------------------------------------------------------------- model

class MMDiT(nn.Module):
    """The Lens MMDiT. See the module docstring for inputs, outputs and parameter names.

    Attributes:
      config: architecture (`MMDiTConfig`, e.g. `mmdit_config('lens_3p8b')`).
      attention: kernel name from `lens_jax.models.attention` ('xla', 'cudnn', 'einsum').
      remat_policy: name from `lens_jax.models.remat` ('none', 'full', 'dots', ...).
      scan_layers: stack blocks with nn.scan (parameters get a leading 'layers' axis).
      dtype: compute dtype (e.g. bfloat16); norms, softmax, RoPE run in float32.
      param_dtype: parameter storage dtype (float32 master weights by default).
      lora: optional `lens_jax.models.lora.LoraSpec`: low-rank adapters (`lora_a`, `lora_b`) on the Dense
        layers whose module path its `targets` regex matches (layers.Dense); None = the plain model.
    """
    config: MMDiTConfig
    attention: str = "xla"
    remat_policy: str = "none"
    scan_layers: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: Optional[Any] = None

    @nn.compact
    def __call__(self, img, img_pos, txt, txt_mask, sigma, img_mask=None, features: Tuple[int, ...] = ()):
        c = self.config
        features = tuple(int(i) for i in features)
        if any(not 0 <= i < c.num_layers for i in features) or len(set(features)) != len(features):
            raise ValueError(f"features={features}: distinct block indices in [0, {c.num_layers}) expected")
        attention_lib.get_attention(self.attention)   # fail early on an unknown name
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, n, _ = img.shape
        s = txt.shape[1]
        if txt.shape[-1] != c.num_text_layers * c.text_dim:
            raise ValueError(f"text features have {txt.shape[-1]} channels; expected "
                             f"{c.num_text_layers} x {c.text_dim} = {c.num_text_layers * c.text_dim}")
        if img.shape[-1] != c.in_channels:
            raise ValueError(f"image tokens have {img.shape[-1]} channels; expected {c.in_channels}")
        if img_pos.shape != (b, n, 3) or txt_mask.shape != (b, s) or sigma.shape != (b,):
            raise ValueError(f"shape mismatch: img {img.shape}, img_pos {img_pos.shape}, txt {txt.shape}, "
                             f"txt_mask {txt_mask.shape}, sigma {sigma.shape}")

        # Embeddings.
        x_img = Dense(c.hidden, ("in_channels", "embed"), name="img_in", **kw)(img)
        chunks = jnp.split(txt, c.num_text_layers, axis=-1)
        normed = [RMSNorm(c.text_norm_eps, name=f"txt_norm_{i}", axis_name="text_norm", **kw)(t)
                  for i, t in enumerate(chunks)]
        x_txt = Dense(c.hidden, ("text_embed", "embed"), name="txt_in", **kw)(jnp.concatenate(normed, axis=-1))
        x_img = constrain(x_img.astype(self.dtype), ("act_batch", "act_seq", "act_embed"))
        x_txt = constrain(x_txt.astype(self.dtype), ("act_batch", "act_seq", "act_embed"))

        temb = timestep_features(sigma, c.timestep_dim, c.timestep_scale)
        temb = TimestepEmbedder(c.hidden, name="timestep_embedder", **kw)(temb)

        # RoPE angles and the key-validity mask for the joint [image, text] sequence.
        ang_img = rope_angles(img_pos, c.rope_axes, c.rope_theta)
        ang_txt = rope_angles(text_positions(img_pos, img_mask, s), c.rope_axes, c.rope_theta)
        txt_mask = txt_mask.astype(bool)
        img_valid = jnp.ones((b, n), bool) if img_mask is None else img_mask.astype(bool)
        mask = jnp.concatenate([img_valid, txt_mask], axis=1)
        # Right-padded text after an all-valid image keeps the valid keys a prefix (spec §2.7).
        prefix_lengths = None if img_mask is not None else n + jnp.sum(txt_mask, axis=1).astype(jnp.int32)

        block = DoubleStreamBlock
        if remat_lib.uses_remat(self.remat_policy):
            block = nn.remat(block, policy=remat_lib.get_policy(self.remat_policy), prevent_cse=not self.scan_layers)
        carry = (x_img, x_txt)
        args = (temb, ang_img, ang_txt, mask, prefix_lengths)
        feats = []
        if self.scan_layers and features:
            # The tapped hidden states are written into a [k + 1, B, N, D] buffer carried through the scan (row k
            # takes the untapped layers); the update is linear, so autodiff keeps no per-layer copy of it.
            slots = np.full((c.num_layers,), len(features), np.int32)
            slots[list(features)] = np.arange(len(features), dtype=np.int32)

            def tapped(mdl, carry3, slot, *a):
                (img_h, txt_h), _ = mdl((carry3[0], carry3[1]), *a)
                buf = jax.lax.dynamic_update_index_in_dim(carry3[2], img_h, slot, 0)
                return (img_h, txt_h, buf), None
            stack = nn.scan(tapped, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(0,) + (nn.broadcast,) * 5, length=c.num_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            buf = jnp.zeros((len(features) + 1,) + x_img.shape, x_img.dtype)
            (x_img, x_txt, buf), _ = stack(block(c, self.attention, name="transformer_blocks", lora=self.lora, **kw),
                                           carry + (buf,), jnp.asarray(slots), *args)
            feats = [buf[k] for k in range(len(features))]
            carry = (x_img, x_txt)
        elif self.scan_layers:
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=(nn.broadcast,) * 5, length=c.num_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            carry, _ = stack(c, self.attention, name="transformer_blocks", lora=self.lora, **kw)(carry, *args)
        else:
            taps = {}
            for i in range(c.num_layers):
                carry, _ = block(c, self.attention, name=f"transformer_blocks_{i}", lora=self.lora, **kw)(carry, *args)
                if i in features:
                    taps[i] = carry[0]
            feats = [taps[i] for i in features]
        x_img = carry[0]

        # Final layer: LayerNorm without affine, modulated by (scale, shift) -- scale first (spec §2.8).
        mod = Dense(2 * c.hidden, ("embed", "mod"), name="norm_out_linear", **kw)(nn.silu(temb))
        scale, shift = (t[:, None, :] for t in jnp.split(mod, 2, axis=-1))
        xf = x_img.astype(jnp.float32)
        mu = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
        xn = ((xf - mu) * jax.lax.rsqrt(var + c.norm_eps)).astype(self.dtype)
        x_img = xn * (1 + scale) + shift
        out = Dense(c.out_channels, ("embed", "out_channels"), name="proj_out", **kw)(x_img)
        if img_mask is not None:
            out = jnp.where(img_mask[..., None], out, 0)
        return (out, tuple(feats)) if features else out


class TimestepEmbedder(nn.Module):
    """temb = linear_2(silu(linear_1(phi))) with phi the sinusoidal features (spec §2.5)."""
    hidden: int
    dtype: Dtype
    param_dtype: Dtype

    @nn.compact
    def __call__(self, phi):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Dense(self.hidden, ("time_freq", "time_embed"), name="linear_1", **kw)(phi)
        return Dense(self.hidden, ("time_embed", "embed"), name="linear_2", **kw)(nn.silu(h))


# ----------------------------------------------------------------------------- helpers

def dummy_inputs(config: MMDiTConfig, batch: int = 1, h: int = 4, w: int = 4, text_len: int = 8,
                 dtype=jnp.float32):
    """Shaped inputs (zeros) for init / eval_shape / compilation."""
    pos = jnp.broadcast_to(jnp.asarray(image_positions(h, w)), (batch, h * w, 3))
    return dict(img=jnp.zeros((batch, h * w, config.in_channels), dtype), img_pos=pos,
                txt=jnp.zeros((batch, text_len, config.num_text_layers * config.text_dim), dtype),
                txt_mask=jnp.ones((batch, text_len), bool), sigma=jnp.zeros((batch,), jnp.float32))


def abstract_params(model: MMDiT):
    """Parameter shapes (boxed with logical names) without allocating, via jax.eval_shape."""
    inputs = dummy_inputs(model.config)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), **inputs))["params"]


def count_params(tree) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(tree))))


def apply_official(model: MMDiT, params, x, sigma, context, mask):
    """Runs the model with the official PyTorch call convention.

    Args:
      x: [B, 128, h, w] patchified, normalised latents (channels first).
      sigma: [B] noise levels in [0, 1].
      context: [B, S, 4*E] text features (layers concatenated on channels, offset already stripped).
      mask: [B, S] bool text mask (right-padded).
    Returns:
      [B, 128, h, w] velocity.
    """
    b, ch, h, w = x.shape
    tokens = jnp.transpose(x, (0, 2, 3, 1)).reshape(b, h * w, ch)
    pos = jnp.broadcast_to(jnp.asarray(image_positions(h, w)), (b, h * w, 3))
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (b,))
    out = model.apply({"params": params}, tokens, pos, context, jnp.asarray(mask, bool), sigma)
    return jnp.transpose(out.reshape(b, h, w, -1), (0, 3, 1, 2))
