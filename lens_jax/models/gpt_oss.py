"""GPT-OSS decoder as a frozen multi-layer text encoder (LENS_SPEC §4.1–4.2), Flax Linen.

The encoder embeds right-padded token ids, runs the decoder layers 0..max(selected_layers) and returns the
residual-stream outputs of the selected layers (before any final norm), concatenated along channels:

    features[B, S, len(selected_layers) * hidden] = concat([h_5, h_11, h_17, h_23], axis=-1)   (gpt_oss_20b)

Layers past the last selected one and the final norm are never created (no parameters, no compute).

Architecture (matches transformers' `GptOssModel`, eager attention):
  * pre-norm decoder layers: x += Attn(RMSNorm(x)); x += MoE(RMSNorm(x)); RMSNorm eps 1e-5, fp32.
  * attention: GQA (64 query / 8 KV heads, head_dim 64), biases on q/k/v/o, scale 1/sqrt(head_dim), one learnable
    sink logit per head that joins the softmax denominator only (explicit sink column, fp32 softmax). Even
    0-based layers use a causal sliding window (query i sees keys j with i - W < j <= i), odd layers full
    causal attention; both are combined with the key-padding mask.
  * RoPE: YaRN inverse frequencies (`_compute_yarn_parameters` of transformers), rotate-half convention, the
    attention factor 0.1 ln(factor) + 1 multiplied into cos and sin; position ids 0..S-1.
  * MoE: router Linear(+bias) -> top-k logits -> softmax over those k; experts `gate_up_proj` (interleaved:
    gate = even channels, up = odd channels), clamped SwiGLU, `down_proj`, weighted sum.

Parameter tree (`params`), all tagged with logical axis names:
  embedding                               [V, H]        ('vocab', 'embed')
  layers_{i}/input_norm/scale             [H]           ('norm',)
  layers_{i}/attn/q/{kernel [H, N, D], bias [N, D]}     ('embed', 'heads', 'head_dim')
  layers_{i}/attn/{k,v}/{kernel [H, Kv, D], bias}       ('embed', 'kv_heads', 'head_dim')
  layers_{i}/attn/o/{kernel [N, D, H], bias [H]}        ('heads', 'head_dim', 'embed')
  layers_{i}/attn/sinks                   [N]           ('heads',)
  layers_{i}/post_attention_norm/scale    [H]           ('norm',)
  layers_{i}/mlp/router/{kernel [H, E], bias [E]}       ('embed', 'expert')
  layers_{i}/mlp/experts/gate_up_kernel   [E, H, 2I]    ('expert', 'embed', 'mlp')   (gate/up interleaved)
  layers_{i}/mlp/experts/gate_up_bias     [E, 2I]       ('expert', 'mlp')
  layers_{i}/mlp/experts/down_kernel      [E, I, H]     ('expert', 'mlp', 'embed')
  layers_{i}/mlp/experts/down_bias        [E, H]        ('expert', 'embed')
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lens_jax.models.layers import Dense, RMSNorm, constrain, logical
from lens_jax.models.presets import from_preset

Dtype = Any

MOE_IMPLS = ("ragged", "dense")


@dataclasses.dataclass(frozen=True)
class GptOssConfig:
    """GPT-OSS decoder hyper-parameters plus the encoder's selected layers (defaults: gpt-oss-20b)."""
    vocab_size: int = 201088
    hidden_size: int = 2880
    num_layers: int = 24
    num_heads: int = 64
    num_kv_heads: int = 8
    head_dim: int = 64
    sliding_window: int = 128
    rope_theta: float = 150000.0
    # YaRN rope scaling.
    rope_factor: float = 32.0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_original_max_position: int = 4096
    rope_truncate: bool = False
    rms_eps: float = 1e-5
    num_experts: int = 32
    experts_per_token: int = 4
    intermediate_size: int = 2880
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    selected_layers: Tuple[int, ...] = (5, 11, 17, 23)
    moe_impl: str = "ragged"

    def __post_init__(self):
        object.__setattr__(self, "selected_layers", tuple(int(i) for i in self.selected_layers))
        sel = self.selected_layers
        if not sel:
            raise ValueError("GptOssConfig.selected_layers must name at least one layer")
        if list(sel) != sorted(set(sel)):
            raise ValueError(f"GptOssConfig.selected_layers must be sorted and unique, got {sel}")
        if sel[0] < 0 or sel[-1] >= self.num_layers:
            raise ValueError(f"GptOssConfig.selected_layers {sel} must lie in [0, num_layers={self.num_layers})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise ValueError(f"experts_per_token {self.experts_per_token} must be in [1, {self.num_experts}]")
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"unknown moe_impl {self.moe_impl!r}; expected one of {MOE_IMPLS}")
        if self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")

    @property
    def num_built_layers(self) -> int:
        """Decoder layers that are actually created: 0..max(selected_layers)."""
        return self.selected_layers[-1] + 1

    @property
    def feature_dim(self) -> int:
        return len(self.selected_layers) * self.hidden_size

    def is_sliding(self, layer: int) -> bool:
        """Even 0-based layers use the sliding window, odd layers full causal attention (layer 0 slides)."""
        return layer % 2 == 0


PRESETS = {
    "gpt_oss_20b": GptOssConfig(),
    "tiny": GptOssConfig(vocab_size=256, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                         head_dim=16, sliding_window=8, num_experts=8, experts_per_token=2,
                         intermediate_size=32, selected_layers=(1, 3)),
}


def gpt_oss_config(name: str, **overrides) -> GptOssConfig:
    """Returns the preset `name` ('gpt_oss_20b' or 'tiny') with dataclass field overrides applied."""
    return from_preset("GPT-OSS", PRESETS, name, overrides)


# ----------------------------------------------------------------------------------------------------------
# RoPE (YaRN)


def yarn_inv_freq(config: GptOssConfig) -> Tuple[np.ndarray, float]:
    """YaRN inverse frequencies [head_dim // 2] (float32) and the attention factor.

    Follows transformers' `_compute_yarn_parameters` formula for formula (truncate, clamping of the correction
    range, the +0.001 singularity guard, the ramp); evaluated in float64 and rounded once to float32.
    """
    dim = config.head_dim
    base = float(config.rope_theta)
    factor = float(config.rope_factor)
    attention_factor = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0

    def correction_dim(num_rotations):
        return (dim * math.log(config.rope_original_max_position / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = correction_dim(config.rope_beta_fast)
    high = correction_dim(config.rope_beta_slow)
    if config.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001

    # float64 then one rounding to float32: within 1 ulp of transformers' float32 torch.pow path (torch's
    # vectorised powf is not correctly rounded, so bit equality is not reproducible without torch).
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    inv_extra = 1.0 / pos_freqs
    inv_inter = 1.0 / (factor * pos_freqs)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extra_factor = 1.0 - ramp
    inv_freq = (inv_inter * (1.0 - extra_factor) + inv_extra * extra_factor).astype(np.float32)
    return inv_freq, attention_factor


def rope_cos_sin(config: GptOssConfig, seq_len: int) -> Tuple[jax.Array, jax.Array]:
    """cos, sin [S, head_dim // 2] in float32 for positions 0..S-1, attention factor included."""
    inv_freq, attention_factor = yarn_inv_freq(config)
    pos = jnp.arange(seq_len, dtype=jnp.float32)
    freqs = pos[:, None] * jnp.asarray(inv_freq)[None, :]
    return jnp.cos(freqs) * attention_factor, jnp.sin(freqs) * attention_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE. x [B, S, heads, D]; cos/sin [S, D/2] float32. Computed in fp32, returns x.dtype."""
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def attention_mask(valid: jax.Array, window: Optional[int]) -> jax.Array:
    """Boolean mask [B, 1, 1, S, S] (query, key): causal, optional sliding window, key padding.

    Query i may see key j iff j <= i, (window is None or j > i - window) and valid[b, j].
    """
    s = valid.shape[1]
    i = jnp.arange(s)[:, None]
    j = jnp.arange(s)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (j > i - window)
    return (allowed[None] & valid[:, None, :])[:, None, None]


# ----------------------------------------------------------------------------------------------------------
# Modules


class GptOssAttention(nn.Module):
    """GQA self-attention with q/k/v/o biases, YaRN RoPE and per-head sink logits. x [B, S, H] -> [B, S, H]."""
    config: GptOssConfig
    sliding: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, valid: jax.Array) -> jax.Array:
        cfg = self.config
        n, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        g = n // kv
        b, s, _ = x.shape
        dense = lambda feats, axes, name, n_in=1: Dense(  # noqa: E731
            feats, axes, n_in_axes=n_in, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        q = dense((n, d), ("embed", "heads", "head_dim"), "q")(x)
        k = dense((kv, d), ("embed", "kv_heads", "head_dim"), "k")(x)
        v = dense((kv, d), ("embed", "kv_heads", "head_dim"), "v")(x)
        sinks = self.param("sinks", logical(nn.initializers.normal(0.02), ("heads",)), (n,), self.param_dtype)

        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        q = constrain(q, ("act_batch", "act_seq", "act_heads", None))
        k = constrain(k, ("act_batch", "act_seq", "act_kv", None))
        v = constrain(v, ("act_batch", "act_seq", "act_kv", None))

        # Query head h uses KV head h // g (transformers' repeat_kv).
        qg = q.reshape(b, s, kv, g, d)
        logits = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32)
        logits = logits.astype(jnp.float32) * (d ** -0.5)
        mask = attention_mask(valid, cfg.sliding_window if self.sliding else None)  # [B, 1, 1, S, S]
        logits = jnp.where(mask, logits, -jnp.inf)
        sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, kv, g, 1, 1), (b, kv, g, s, 1))
        # The sink column is always finite, so even fully masked rows (padding) give a finite softmax.
        probs = jax.nn.softmax(jnp.concatenate([logits, sink], axis=-1), axis=-1)[..., :-1]
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(self.dtype), v.astype(self.dtype),
                         preferred_element_type=jnp.float32).astype(self.dtype)
        out = out.reshape(b, s, n, d)
        return dense(cfg.hidden_size, ("heads", "head_dim", "embed"), "o", n_in=2)(out)


def clamped_swiglu(gate_up: jax.Array, alpha: float, limit: float) -> jax.Array:
    """[..., 2I] interleaved (gate = even, up = odd channels) -> [..., I]; computed in fp32."""
    gu = gate_up.astype(jnp.float32).reshape(*gate_up.shape[:-1], -1, 2)
    gate, up = gu[..., 0], gu[..., 1]
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
    return (gate * jax.nn.sigmoid(alpha * gate) * (up + 1.0)).astype(gate_up.dtype)


class GptOssExperts(nn.Module):
    """The E clamped-SwiGLU experts applied to routed tokens.

    x [T, H], expert_idx int32 [T, K], weights [T, K] -> [T, H] = sum_k weights[t, k] * expert_{idx[t, k]}(x[t]).
    """
    config: GptOssConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, expert_idx: jax.Array, weights: jax.Array) -> jax.Array:
        cfg = self.config
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        init = nn.initializers.normal(0.02)
        w_gu = self.param("gate_up_kernel", logical(init, ("expert", "embed", "mlp")), (e, h, 2 * i),
                          self.param_dtype).astype(self.dtype)
        b_gu = self.param("gate_up_bias", logical(nn.initializers.zeros, ("expert", "mlp")), (e, 2 * i),
                          self.param_dtype).astype(self.dtype)
        w_dn = self.param("down_kernel", logical(init, ("expert", "mlp", "embed")), (e, i, h),
                          self.param_dtype).astype(self.dtype)
        b_dn = self.param("down_bias", logical(nn.initializers.zeros, ("expert", "embed")), (e, h),
                          self.param_dtype).astype(self.dtype)
        x = x.astype(self.dtype)
        t, k = expert_idx.shape

        if cfg.moe_impl == "dense":
            # Every token through every expert; combine with a [T, E] weight matrix (zero where not routed).
            hid = jnp.einsum("th,ehf->tef", x, w_gu) + b_gu[None]
            act = clamped_swiglu(hid, cfg.swiglu_alpha, cfg.swiglu_limit)
            y = jnp.einsum("tei,eih->teh", act, w_dn) + b_dn[None]
            comb = jnp.sum(jax.nn.one_hot(expert_idx, e, dtype=jnp.float32) * weights[..., None].astype(jnp.float32),
                           axis=1)  # [T, E]
            return jnp.einsum("teh,te->th", y.astype(jnp.float32), comb).astype(self.dtype)

        # 'ragged': the T*K (token, expert) pairs sorted by expert, one grouped matmul per projection.
        flat_e = expert_idx.reshape(-1)                       # [T*K]
        order = jnp.argsort(flat_e, stable=True)              # sorted position -> pair
        sorted_e = flat_e[order]
        xs = x[order // k]                                    # [T*K, H]
        group_sizes = jnp.bincount(flat_e, length=e).astype(jnp.int32)
        hid = jax.lax.ragged_dot(xs, w_gu, group_sizes) + b_gu[sorted_e]
        act = clamped_swiglu(hid, cfg.swiglu_alpha, cfg.swiglu_limit)
        y = jax.lax.ragged_dot(act, w_dn, group_sizes) + b_dn[sorted_e]   # [T*K, H]
        inv = jnp.argsort(order)                              # pair -> sorted position
        y = y[inv].reshape(t, k, h).astype(jnp.float32)
        return jnp.einsum("tkh,tk->th", y, weights.astype(jnp.float32)).astype(self.dtype)


class GptOssMoE(nn.Module):
    """Router (Linear with bias, top-k, softmax over the k) plus experts. x [B, S, H] -> [B, S, H]."""
    config: GptOssConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        b, s, h = x.shape
        xt = x.reshape(b * s, h)
        # Routing is per token, so padded tokens never influence valid tokens' choice of experts.
        router = Dense(cfg.num_experts, ("embed", "expert"), dtype=jnp.float32, param_dtype=self.param_dtype,
                       kernel_init=nn.initializers.normal(0.02), name="router")
        logits = router(xt.astype(jnp.float32))                       # [T, E] fp32
        top_val, top_idx = jax.lax.top_k(logits, cfg.experts_per_token)
        weights = jax.nn.softmax(top_val, axis=-1)                    # [T, K]
        y = GptOssExperts(cfg, dtype=self.dtype, param_dtype=self.param_dtype, name="experts")(
            xt, top_idx.astype(jnp.int32), weights)
        return y.reshape(b, s, h)


class GptOssDecoderLayer(nn.Module):
    """Pre-norm decoder layer. x [B, S, H] -> [B, S, H]."""
    config: GptOssConfig
    sliding: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, valid: jax.Array) -> jax.Array:
        cfg = self.config
        norm = lambda name: RMSNorm(eps=cfg.rms_eps, dtype=self.dtype, param_dtype=self.param_dtype,  # noqa: E731
                                    name=name)
        h = norm("input_norm")(x)
        x = x + GptOssAttention(cfg, self.sliding, dtype=self.dtype, param_dtype=self.param_dtype,
                                name="attn")(h, cos, sin, valid)
        h = norm("post_attention_norm")(x)
        x = x + GptOssMoE(cfg, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(h)
        return constrain(x, ("act_batch", "act_seq", "act_embed"))


#: Standard deviation of the token-embedding initialiser (the HF GPT-OSS initializer_range).
EMBEDDING_INIT_STD = 0.02


def embed_tokens(module: nn.Module, config: GptOssConfig, input_ids: jax.Array, valid: jax.Array) -> jax.Array:
    """Token embedding [B, S, hidden] in `module.dtype`, zero at padded positions.

    Creates the `embedding` parameter [vocab, hidden] on `module` (call from a compact method), so the
    encoder and the LM wrapper share one name, initialiser and logical axes.
    """
    emb = module.param("embedding", logical(nn.initializers.normal(EMBEDDING_INIT_STD), ("vocab", "embed")),
                       (config.vocab_size, config.hidden_size), module.param_dtype)
    # Clip ids (jnp.take would fill out-of-range ids with NaN) and zero padded positions.
    x = jnp.take(emb, jnp.clip(input_ids.astype(jnp.int32), 0, config.vocab_size - 1), axis=0)
    x = jnp.where(valid[..., None], x, 0).astype(module.dtype)
    return constrain(x, ("act_batch", "act_seq", "act_embed"))


class GptOssEncoder(nn.Module):
    """Frozen GPT-OSS text encoder returning the concatenated pre-norm outputs of the selected layers.

    Only layers 0..max(config.selected_layers) exist; there is no final norm and no LM head.
    """
    config: GptOssConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Encodes right-padded token ids.

        Args:
          input_ids: int32 [B, S] token ids (any value at padded positions).
          attention_mask: bool [B, S], True for valid tokens (right padding: valid tokens first).
        Returns:
          features [B, S, len(selected_layers) * hidden] in `dtype`, selected layers in order along channels;
          zero at padded positions.
        """
        cfg = self.config
        b, s = input_ids.shape
        valid = attention_mask.astype(bool)
        x = embed_tokens(self, cfg, input_ids, valid)
        cos, sin = rope_cos_sin(cfg, s)

        feats = []
        for i in range(cfg.num_built_layers):
            x = GptOssDecoderLayer(cfg, cfg.is_sliding(i), dtype=self.dtype, param_dtype=self.param_dtype,
                                   name=f"layers_{i}")(x, cos, sin, valid)
            if i in cfg.selected_layers:
                feats.append(x)
        out = jnp.concatenate(feats, axis=-1)
        return jnp.where(valid[..., None], out, 0).astype(self.dtype)
