"""The FLUX.2 autoencoder (diffusers `AutoencoderKLFlux2`) in Flax Linen, NHWC layout (LENS_SPEC §3).

Architecture (same as the FLUX.1 / SD VAE, with 32 latent channels):

  encoder: conv_in 3x3 -> down_blocks_i (layers_per_block ResNet blocks, then a stride-2 conv except in
           the last stage) -> mid_block (ResNet, single-head self-attention, ResNet) -> GroupNorm -> SiLU
           -> conv_out 3x3 to 2*latent_channels -> quant_conv 1x1 -> (mean, logvar), logvar clamped to
           [-30, 20].
  decoder: post_quant_conv 1x1 -> conv_in 3x3 -> mid_block -> up_blocks_i (layers_per_block + 1 ResNet
           blocks, then nearest 2x upsampling + conv 3x3 except in the last stage) -> GroupNorm -> SiLU
           -> conv_out 3x3 to RGB.

Flax module names mirror the diffusers state-dict names with '.N' folded into '_N'
(`encoder.down_blocks.0.resnets.1.conv1.weight` -> `encoder/down_blocks_0/resnets_1/conv1/kernel`), so
`lens_jax.checkpoints.vae_convert` converts mechanically.

The latent BatchNorm of FLUX.2 (affine-free, over the 2x2-patchified 4*latent_channels latent) is *frozen*:
its running statistics live in a separate, never-updated variable collection `latent_stats` with entries
`mean` and `var` (shape [4*latent_channels]). The token helpers `encode_to_tokens` / `decode_from_tokens`
implement the official encode and decode paths around the DiT (LENS_SPEC §3.2-3.3).

GroupNorm statistics and the attention softmax are computed in float32 whatever `dtype` is.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from lens_jax.models.layers import Dense, logical
from lens_jax.models.presets import from_preset

Dtype = Any

CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")
LINEAR_AXES = ("conv_in", "conv_out")
LOGVAR_RANGE = (-30.0, 20.0)


# ----------------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of `AutoencoderKLFlux2`. Defaults are the released FLUX.2 VAE.

    Only the `DownEncoderBlock2D` / `UpDecoderBlock2D` block types and SiLU exist in FLUX.2, so the block
    types are implied by `len(block_out_channels)`.
    """
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
    decoder_block_out_channels: Optional[Tuple[int, ...]] = None  # None: same as block_out_channels
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 32
    norm_num_groups: int = 32
    norm_eps: float = 1e-6  # every GroupNorm of the encoder/decoder (diffusers hard-codes 1e-6)
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    batch_norm_eps: float = 1e-4
    batch_norm_momentum: float = 0.1  # informational: the statistics are frozen in lens_jax
    patch_size: Tuple[int, int] = (2, 2)

    def __post_init__(self):
        # Accept lists (e.g. from JSON) but store tuples so the config stays hashable.
        for f in ("block_out_channels", "decoder_block_out_channels", "patch_size"):
            v = getattr(self, f)
            if v is not None and not isinstance(v, tuple):
                object.__setattr__(self, f, tuple(v))
        self.validate()

    @property
    def decoder_channels(self) -> Tuple[int, ...]:
        return self.decoder_block_out_channels or self.block_out_channels

    @property
    def downsample_factor(self) -> int:
        """Spatial factor between image and latent (8 for FLUX.2)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def packed_channels(self) -> int:
        """Channels of the patchified latent, i.e. DiT token width (128 for FLUX.2)."""
        return self.patch_size[0] * self.patch_size[1] * self.latent_channels

    def validate(self) -> None:
        if self.act_fn != "silu":
            raise ValueError(f"VAEConfig.act_fn={self.act_fn!r}: only 'silu' is supported")
        if not self.block_out_channels:
            raise ValueError("VAEConfig.block_out_channels must not be empty")
        if len(self.decoder_channels) != len(self.block_out_channels):
            raise ValueError("decoder_block_out_channels must have as many stages as block_out_channels")
        for c in (*self.block_out_channels, *self.decoder_channels):
            if c % self.norm_num_groups:
                raise ValueError(f"channel count {c} is not divisible by norm_num_groups={self.norm_num_groups}")
        if len(self.patch_size) != 2 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be two positive ints, got {self.patch_size}")


PRESETS = {
    "flux2": VAEConfig(),
    # Same 8x downsampling as FLUX.2 (so image/token shapes match), ~0.1 M parameters.
    "tiny": VAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8,
                      latent_channels=16),
}


def vae_config(name: str = "flux2", **overrides) -> VAEConfig:
    """Returns preset `name` with `overrides` applied; raises ValueError on unknown names or fields."""
    return from_preset("VAE", PRESETS, name, overrides)


# ----------------------------------------------------------------------------------------------------
# Building blocks


def _conv(features: int, kernel: int, name: str, dtype: Optional[Dtype], param_dtype: Dtype,
          stride: int = 1, padding=None) -> nn.Conv:
    """A Conv2d (NHWC, HWIO kernel) with logical axis names on kernel and bias."""
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding, dtype=dtype,
                   param_dtype=param_dtype, name=name,
                   kernel_init=logical(nn.initializers.lecun_normal(), CONV_AXES),
                   bias_init=logical(nn.initializers.zeros, ("conv_out",)))


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over the channel (last) axis of [B, H, W, C]; statistics in float32.

    Output is cast to `dtype` (or x's dtype when None).
    """
    num_groups: int
    eps: float = 1e-6
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        g = self.num_groups
        scale = self.param("scale", logical(nn.initializers.ones, ("norm",)), (c,), self.param_dtype)
        bias = self.param("bias", logical(nn.initializers.zeros, ("norm",)), (c,), self.param_dtype)
        xf = x.astype(jnp.float32).reshape(*x.shape[:-1], g, c // g)
        axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)  # spatial axes and channels-in-group
        mean = jnp.mean(xf, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype or x.dtype)


class ResnetBlock(nn.Module):
    """diffusers ResnetBlock2D without time embedding: x [B,H,W,Cin] -> [B,H,W,Cout].

    out = shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x)))))), shortcut a 1x1 conv when Cin != Cout.
    """
    out_channels: int
    groups: int
    eps: float
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(GroupNorm(self.groups, self.eps, name="norm1", **kw)(x))
        h = _conv(self.out_channels, 3, "conv1", **kw)(h)
        h = nn.silu(GroupNorm(self.groups, self.eps, name="norm2", **kw)(h))
        h = _conv(self.out_channels, 3, "conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, "conv_shortcut", **kw)(x)
        return x.astype(h.dtype) + h


class SpatialSelfAttention(nn.Module):
    """The VAE mid-block attention: one head of width C over the H*W positions, with residual.

    x [B,H,W,C] -> x + to_out(softmax(q k^T / sqrt(C)) v), q/k/v = Linear(GroupNorm(x)). Logits and softmax
    are computed in float32. Memory is O((H*W)^2) per sample (1 GiB of float32 logits per image at 1024²).
    """
    groups: int
    eps: float
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        dtype = self.dtype or x.dtype
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GroupNorm(self.groups, self.eps, name="group_norm", **kw)(x).reshape(b, hh * ww, c)
        q = Dense(c, LINEAR_AXES, name="to_q", **kw)(h)
        k = Dense(c, LINEAR_AXES, name="to_k", **kw)(h)
        v = Dense(c, LINEAR_AXES, name="to_v", **kw)(h)
        logits = jnp.einsum("btc,bsc->bts", q, k, preferred_element_type=jnp.float32) * (c ** -0.5)
        probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
        o = jnp.einsum("bts,bsc->btc", probs, v.astype(dtype))
        o = Dense(c, LINEAR_AXES, name="to_out_0", **kw)(o)
        return x.astype(o.dtype) + o.reshape(b, hh, ww, c)


class MidBlock(nn.Module):
    """UNetMidBlock2D: ResNet -> (attention) -> ResNet at constant width."""
    groups: int
    eps: float
    add_attention: bool = True
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResnetBlock(c, self.groups, self.eps, name="resnets_0", **kw)(x)
        if self.add_attention:
            x = SpatialSelfAttention(self.groups, self.eps, name="attentions_0", **kw)(x)
        return ResnetBlock(c, self.groups, self.eps, name="resnets_1", **kw)(x)


class DownEncoderBlock(nn.Module):
    """DownEncoderBlock2D: `num_layers` ResNet blocks, then (optionally) a stride-2 3x3 conv.

    The downsampling conv pads only bottom/right by one (diffusers `Downsample2D(padding=0)`).
    """
    out_channels: int
    num_layers: int
    add_downsample: bool
    groups: int
    eps: float
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, self.eps, name=f"resnets_{j}", **kw)(x)
        if self.add_downsample:
            x = _Downsample(self.out_channels, name="downsamplers_0", **kw)(x)
        return x


class _Downsample(nn.Module):
    channels: int
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _conv(self.channels, 3, "conv", self.dtype, self.param_dtype, stride=2,
                     padding=((0, 1), (0, 1)))(x)


class _Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv (diffusers `Upsample2D(use_conv=True)`)."""
    channels: int
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(self.channels, 3, "conv", self.dtype, self.param_dtype)(x)


class UpDecoderBlock(nn.Module):
    """UpDecoderBlock2D: `num_layers` ResNet blocks, then (optionally) 2x upsampling."""
    out_channels: int
    num_layers: int
    add_upsample: bool
    groups: int
    eps: float
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock(self.out_channels, self.groups, self.eps, name=f"resnets_{j}", **kw)(x)
        if self.add_upsample:
            x = _Upsample(self.out_channels, name="upsamplers_0", **kw)(x)
        return x


class Encoder(nn.Module):
    """Image [B,H,W,in_channels] -> moments [B,H/f,W/f,2*latent_channels] (before quant_conv)."""
    config: VAEConfig
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chans = cfg.block_out_channels
        x = _conv(chans[0], 3, "conv_in", **kw)(x)
        for i, c in enumerate(chans):
            x = DownEncoderBlock(c, cfg.layers_per_block, i < len(chans) - 1, cfg.norm_num_groups, cfg.norm_eps,
                                 name=f"down_blocks_{i}", **kw)(x)
        x = MidBlock(cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_add_attention, name="mid_block", **kw)(x)
        x = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(x))
        return _conv(2 * cfg.latent_channels, 3, "conv_out", **kw)(x)


class Decoder(nn.Module):
    """Latent [B,h,w,latent_channels] (after post_quant_conv) -> image [B,h*f,w*f,out_channels]."""
    config: VAEConfig
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        chans = tuple(reversed(cfg.decoder_channels))
        x = _conv(chans[0], 3, "conv_in", **kw)(z)
        x = MidBlock(cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_add_attention, name="mid_block", **kw)(x)
        for i, c in enumerate(chans):
            x = UpDecoderBlock(c, cfg.layers_per_block + 1, i < len(chans) - 1, cfg.norm_num_groups, cfg.norm_eps,
                               name=f"up_blocks_{i}", **kw)(x)
        x = nn.silu(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out", **kw)(x))
        return _conv(cfg.out_channels, 3, "conv_out", **kw)(x)


# ----------------------------------------------------------------------------------------------------
# The autoencoder


class FluxVAE(nn.Module):
    """The FLUX.2 VAE, NHWC. Variables: `params` and the frozen `latent_stats` {mean, var} [4*latent_channels].

    Usage:
      model = FluxVAE(vae_config("flux2"))
      variables = model.init(rng, images)                    # __call__ creates every variable
      mean = model.apply(variables, images, method=FluxVAE.encode)
      images = model.apply(variables, latents, method=FluxVAE.decode)

    `latent_stats` is only needed by the token helpers; `apply({'params': p}, ...)` works for encode/decode.
    """
    config: VAEConfig = VAEConfig()
    dtype: Optional[Dtype] = None  # computation dtype (None: the input's); norms/softmax stay float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        if cfg.use_quant_conv:
            self.quant_conv = _conv(2 * cfg.latent_channels, 1, "quant_conv", **kw)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = _conv(cfg.latent_channels, 1, "post_quant_conv", **kw)
        if self.is_initializing() or self.has_variable("latent_stats", "mean"):
            n = cfg.packed_channels
            self.latent_mean = self.variable("latent_stats", "mean", logical(jnp.zeros, ("norm",)), (n,), jnp.float32)
            self.latent_var = self.variable("latent_stats", "var", logical(jnp.ones, ("norm",)), (n,), jnp.float32)

    def encode_moments(self, x: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """Image x [B,H,W,3] in [-1,1] -> (mean, logvar), each [B,H/8,W/8,latent_channels]; logvar clamped."""
        h = self.encoder(x)
        if self.config.use_quant_conv:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def encode(self, x: jax.Array) -> jax.Array:
        """Image x [B,H,W,3] in [-1,1] -> posterior mode (= mean) [B,H/8,W/8,latent_channels]."""
        return self.encode_moments(x)[0]

    def encode_sample(self, x: jax.Array, rng: jax.Array) -> jax.Array:
        """A posterior sample mean + exp(logvar/2) * eps, [B,H/8,W/8,latent_channels]."""
        mean, logvar = self.encode_moments(x)
        eps = jax.random.normal(rng, mean.shape, jnp.float32).astype(mean.dtype)
        return mean + jnp.exp(0.5 * logvar) * eps

    def decode(self, z: jax.Array) -> jax.Array:
        """Latent z [B,h,w,latent_channels] -> image [B,8h,8w,3], not clamped."""
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode_to_image(self, z: jax.Array) -> jax.Array:
        """`decode` clamped to [-1, 1]."""
        return jnp.clip(self.decode(z), -1.0, 1.0)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Reconstruction decode(encode(x)) [B,H,W,3]; used by `init` so that one call creates everything."""
        return self.decode(self.encode(x))


# ----------------------------------------------------------------------------------------------------
# Patchify, latent normalisation and the token paths (LENS_SPEC §3.2-3.3)


def patchify(z: jax.Array, patch_size: Tuple[int, int] = (2, 2)) -> jax.Array:
    """[B, p*h, q*w, C] -> [B, h, w, C*p*q], packed channel k = (p*q)*c + q*p1 + p2 (channel-major).

    For the 2x2 FLUX.2 patch: k = 4c + 2p1 + p2, identical to diffusers `Flux2Pipeline._patchify_latents`.
    """
    p, q = patch_size
    b, hh, ww, c = z.shape
    if hh % p or ww % q:
        raise ValueError(f"latent spatial shape {(hh, ww)} is not divisible by patch size {patch_size}")
    z = z.reshape(b, hh // p, p, ww // q, q, c)
    z = z.transpose(0, 1, 3, 5, 2, 4)  # [B, h, w, C, p1, p2]
    return z.reshape(b, hh // p, ww // q, c * p * q)


def unpatchify(zp: jax.Array, patch_size: Tuple[int, int] = (2, 2)) -> jax.Array:
    """Inverse of `patchify`: [B, h, w, C*p*q] -> [B, p*h, q*w, C]."""
    p, q = patch_size
    b, h, w, k = zp.shape
    if k % (p * q):
        raise ValueError(f"packed channel count {k} is not divisible by {p * q}")
    c = k // (p * q)
    z = zp.reshape(b, h, w, c, p, q).transpose(0, 1, 4, 2, 5, 3)  # [B, h, p1, w, p2, C]
    return z.reshape(b, h * p, w * q, c)


def normalize_latents(zp: jax.Array, mean: jax.Array, var: jax.Array, eps: float = 1e-4) -> jax.Array:
    """Frozen BatchNorm over packed channels: (zp - mean) / sqrt(var + eps); zp [..., K], mean/var [K]."""
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.sqrt(jnp.asarray(var, jnp.float32) + eps)
    return ((zp.astype(jnp.float32) - mean) / std).astype(zp.dtype)


def denormalize_latents(zn: jax.Array, mean: jax.Array, var: jax.Array, eps: float = 1e-4) -> jax.Array:
    """Inverse of `normalize_latents`: zn * sqrt(var + eps) + mean."""
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.sqrt(jnp.asarray(var, jnp.float32) + eps)
    return (zn.astype(jnp.float32) * std + mean).astype(zn.dtype)


def _stats(variables) -> Tuple[jax.Array, jax.Array]:
    stats = nn.meta.unbox(variables["latent_stats"])
    return stats["mean"], stats["var"]


def encode_to_tokens(model: FluxVAE, variables, images: jax.Array) -> jax.Array:
    """Images [B,H,W,3] in [-1,1] -> normalised DiT tokens [B, (H/16)*(W/16), 4*latent_channels].

    encode (posterior mode) -> patchify -> frozen-BN normalise -> flatten (h, w) row-major.
    """
    cfg = model.config
    z = model.apply(variables, images, method=FluxVAE.encode)
    zp = patchify(z, cfg.patch_size)
    mean, var = _stats(variables)
    zn = normalize_latents(zp, mean, var, cfg.batch_norm_eps)
    b, h, w, k = zn.shape
    return zn.reshape(b, h * w, k)


def decode_from_tokens(model: FluxVAE, variables, tokens: jax.Array, h: int, w: int) -> jax.Array:
    """Normalised tokens [B, h*w, 4*latent_channels] -> images [B, 16h, 16w, 3] clamped to [-1, 1].

    The official decode path: unflatten row-major -> de-normalise -> unpatchify -> decode -> clamp.
    """
    cfg = model.config
    b, n, k = tokens.shape
    if n != h * w:
        raise ValueError(f"{n} tokens do not form a {h}x{w} grid")
    mean, var = _stats(variables)
    zp = denormalize_latents(tokens.reshape(b, h, w, k), mean, var, cfg.batch_norm_eps)
    z = unpatchify(zp, cfg.patch_size)
    return model.apply(variables, z, method=FluxVAE.decode_to_image)
