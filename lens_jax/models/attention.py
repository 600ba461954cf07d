"""Attention kernels chosen by name from the config.

Every kernel has the signature

    attend(q, k, v, *, mask, prefix_lengths) -> [B, T, H, Dh]

with q, k, v of shape [B, T, H, Dh] (layout BTNH), `mask` a bool [B, T] key-validity mask, and
`prefix_lengths` an int32 [B] count of valid keys *when the valid keys form a prefix* of the sequence
(else None). Attention is bidirectional with scale 1/sqrt(Dh); only keys are masked. Queries at padded
positions produce finite values that callers ignore.

Kernels:
  'einsum'  plain einsum + float32 softmax reference (any backend; the tolerance baseline);
  'xla'     jax.nn.dot_product_attention(implementation='xla');
  'cudnn'   jax.nn.dot_product_attention(implementation='cudnn'): cuDNN flash attention on NVIDIA GPUs
            (bf16/fp16 inputs). Uses `key_value_seq_lengths` when the valid keys form a prefix (the
            reference additive mask expressed as sequence lengths, spec §2.7), else the boolean mask.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp

AttentionFn = Callable[..., jax.Array]
_REGISTRY: Dict[str, AttentionFn] = {}


def register(name: str):
    def deco(fn: AttentionFn) -> AttentionFn:
        _REGISTRY[name] = fn
        return fn
    return deco


def get_attention(name: str) -> AttentionFn:
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention implementation {name!r}; choose one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def available() -> list:
    return sorted(_REGISTRY)


@register("einsum")
def einsum_attention(q, k, v, *, mask: Optional[jax.Array] = None, prefix_lengths=None) -> jax.Array:
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _sdpa(q, k, v, mask, prefix_lengths, implementation):
    if prefix_lengths is not None and implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=prefix_lengths.astype(jnp.int32),
                                            implementation=implementation)
    m = None if mask is None else mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=m, implementation=implementation)


@register("xla")
def xla_attention(q, k, v, *, mask=None, prefix_lengths=None) -> jax.Array:
    return _sdpa(q, k, v, mask, prefix_lengths, "xla")


@register("cudnn")
def cudnn_attention(q, k, v, *, mask=None, prefix_lengths=None) -> jax.Array:
    return _sdpa(q, k, v, mask, prefix_lengths, "cudnn")
