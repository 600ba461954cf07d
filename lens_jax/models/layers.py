"""Small Linen building blocks shared by the models, each parameter tagged with logical axis names.

Logical axis names used across lens_jax (the config's `sharding.rules` maps them to mesh axes):

  params:      'layers' (scan axis), 'embed' (model width), 'mlp' (MLP hidden), 'heads', 'kv_heads',
               'head_dim', 'qkv' (the 3 of fused QKV), 'mod' (adaLN chunks), 'text_embed' (encoder
               width), 'vocab', 'expert', 'conv_in', 'conv_out', 'norm' (norm scales), None.
  activations: 'act_batch', 'act_seq', 'act_embed', 'act_heads', 'act_mlp', 'act_kv'.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple, Union

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Axes = Tuple[Optional[str], ...]

default_kernel_init = nn.initializers.lecun_normal()


def logical(init: Callable, axes: Axes) -> Callable:
    """Wraps an initializer so the created parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, axes)


def constrain(x: jax.Array, axes: Axes) -> jax.Array:
    """Activation sharding constraint by logical names (a no-op without rules or mesh)."""
    return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis with a learnable scale; computed in float32.

    y = x / sqrt(mean(x^2) + eps) * scale, returned in `dtype` (or x's dtype when None).
    """
    eps: float = 1e-6
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    axis_name: Optional[str] = "norm"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", logical(nn.initializers.ones, (self.axis_name,)),
                           (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        y = y * scale.astype(jnp.float32)
        return y.astype(self.dtype or x.dtype)


def _lora_spec(module: nn.Module):
    """The `lora` attribute (a lens_jax.models.lora.LoraSpec) of the nearest enclosing module that has one."""
    m = module.parent
    while isinstance(m, nn.Module):
        spec = getattr(m, "lora", None)
        if spec is not None:
            return spec
        m = m.parent
    return None


class Dense(nn.Module):
    """Linear layer y = x @ kernel + bias over the trailing `len(in_axes)` input axes.

    `features` may be an int or a tuple (the kernel is [*in_dims, *features]); `kernel_axes` names
    every kernel axis, the bias takes the names of the output axes.

    Low-rank adapters: when an enclosing module carries `lora` (a LoraSpec, e.g. `MMDiT(lora=...)`) whose
    `targets` regex fully matches this layer's '/'-joined module path, the layer also owns `lora_a`
    [*in_dims, r] (axes: the kernel's input axes, None) and `lora_b` [r, *features] (axes: None, the kernel's
    output axes; zero-initialised) and computes y = x @ kernel + bias + (alpha / r) (x @ lora_a) @ lora_b,
    unmerged (lens_jax/models/lora.py merges them into the kernel for inference).
    """
    features: Union[int, Sequence[int]]
    kernel_axes: Axes
    use_bias: bool = True
    n_in_axes: int = 1
    dtype: Optional[Dtype] = None
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = default_kernel_init
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        feats = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        in_dims = x.shape[-self.n_in_axes:]
        if len(self.kernel_axes) != len(in_dims) + len(feats):
            raise ValueError(f"kernel_axes {self.kernel_axes} do not match kernel rank {len(in_dims) + len(feats)}")
        n_in = math.prod(in_dims)

        def init(key, shape, dtype):
            # Fan-in/fan-out as if the kernel were 2-D [prod(in), prod(out)].
            flat = self.kernel_init(key, (n_in, math.prod(feats)), dtype)
            return flat.reshape(shape)

        kernel = self.param("kernel", logical(init, self.kernel_axes), (*in_dims, *feats), self.param_dtype)
        dtype = self.dtype or x.dtype
        contract = tuple(range(x.ndim - self.n_in_axes, x.ndim))
        y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype),
                                ((contract, tuple(range(self.n_in_axes))), ((), ())))
        lora = _lora_spec(self)
        if lora is not None and lora.applies_to("/".join(self.scope.path)):
            r = int(lora.rank)
            in_axes, out_axes = self.kernel_axes[:self.n_in_axes], self.kernel_axes[self.n_in_axes:]

            def init_a(key, shape, dtype):
                return self.kernel_init(key, (n_in, r), dtype).reshape(shape)
            a = self.param("lora_a", logical(init_a, (*in_axes, None)), (*in_dims, r), self.param_dtype)
            b_ = self.param("lora_b", logical(nn.initializers.zeros, (None, *out_axes)), (r, *feats),
                            self.param_dtype)
            xa = jax.lax.dot_general(x.astype(dtype), a.astype(dtype),
                                     ((contract, tuple(range(self.n_in_axes))), ((), ())))
            y = y + lora.scale * jax.lax.dot_general(xa, b_.astype(dtype), (((xa.ndim - 1,), (0,)), ((), ())))
        if self.use_bias:
            bias = self.param("bias", logical(self.bias_init, self.kernel_axes[self.n_in_axes:]),
                              feats, self.param_dtype)
            y = y + bias.astype(dtype)
        return y
