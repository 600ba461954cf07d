"""Autoregressive generation with the GPT-OSS causal LM (`GptOssLM` parameter tree) and a per-layer KV cache.

Pure functions over the `GptOssLM` params {embedding, layers_0..layers_{L-1}, final_norm, lm_head}; the layer
math reuses the Flax submodules of :mod:`lens_jax.models.gpt_oss` (`RMSNorm`, `Dense`, `GptOssMoE`) through
`.apply` on parameter sub-trees and its RoPE helpers, so results agree with `GptOssLM.apply` on the same tokens.

Batch layout (B sequences, cache length T, N = num_heads, Kv = num_kv_heads, D = head_dim):
  * prompts are LEFT-padded to a common length P so every sequence ends at cache index P - 1; sequence b's first
    real token sits at cache index `first[b]` = P - len(prompt_b);
  * RoPE position of cache index t in sequence b is t - first[b] (0 at the first real token);
  * `KVCache.k[i]`, `KVCache.v[i]`: [B, T, Kv, D] post-RoPE keys / values of layer i, in the compute dtype;
  * query at cache index t sees key j iff first[b] <= j <= t, and on sliding layers (`config.is_sliding(i)`)
    also j > t - sliding_window (the same window in position space, since both indices share the offset);
    the per-head sink logit joins every softmax denominator, as in the encoder.

`forward` runs S new tokens [B, S] at cache indices start..start+S-1 (prefill: S = P, start = 0; decode: S = 1),
writes their keys / values and returns float32 logits [B, S, V]. `generate` = one jitted prefill plus one jitted
`jax.lax.while_loop` decode; both are compiled once per static shape (B, P, max_new_tokens), config, dtype and
greedy/sampling mode.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from lens_jax.models.gpt_oss import GptOssConfig, GptOssMoE, apply_rope, yarn_inv_freq
from lens_jax.models.gpt_oss_lm import LM_ONLY_KEYS, lm_params_from_parts
from lens_jax.models.layers import Dense, RMSNorm

Params = Dict[str, Any]

#: The text-encoder directory layout written by the `text_encoder` recipe: the LM-only weights live in this
#: subdirectory as an Orbax weights checkpoint of this kind holding {'params': {final_norm, lm_head}}.
LM_HEAD_DIR = "lm_head"
LM_HEAD_KIND = "gpt_oss_lm_head"
ENCODER_KIND = "gpt_oss"


class KVCache(NamedTuple):
    """Per-layer key / value cache (a pytree).

    k, v: tuples of num_layers arrays [B, T, Kv, D] (post-RoPE keys, values) in the compute dtype.
    first: int32 [B], cache index of each sequence's first real token (cache indices below it are padding).
    """
    k: Tuple[jax.Array, ...]
    v: Tuple[jax.Array, ...]
    first: jax.Array


class GenerationResult(NamedTuple):
    """tokens: per prompt, the generated ids up to (excluding) the first stop id; stopped: whether a stop id came."""
    tokens: List[List[int]]
    stopped: List[bool]


def init_cache(config: GptOssConfig, batch: int, length: int, first: jax.Array, dtype=jnp.float32) -> KVCache:
    """A zero cache of `length` slots per sequence; first: int32 [batch] (see `KVCache`)."""
    shape = (batch, length, config.num_kv_heads, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
                   first=jnp.asarray(first, jnp.int32).reshape(batch))


def _rope_at(config: GptOssConfig, positions: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """cos, sin [B, S, D/2] float32 for integer positions [B, S] (same formula as `rope_cos_sin`)."""
    inv_freq, attention_factor = yarn_inv_freq(config)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(freqs) * attention_factor, jnp.sin(freqs) * attention_factor


def _rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """`apply_rope` with per-sequence positions: x [B, S, heads, D], cos / sin [B, S, D/2]."""
    return jax.vmap(lambda xb, cb, sb: apply_rope(xb[None], cb, sb)[0])(x, cos, sin)


def _dense(p: Params, x: jax.Array, features, axes, dtype, n_in: int = 1) -> jax.Array:
    return Dense(features, axes, n_in_axes=n_in, dtype=dtype).apply({"params": p}, x)


def _attention(p: Params, config: GptOssConfig, sliding: bool, x: jax.Array, cos, sin, k_cache, v_cache,
               first: jax.Array, start, dtype):
    """Cached GQA attention with sinks. x [B, S, H] at cache indices start..start+S-1 -> ([B, S, H], k, v)."""
    cfg = config
    n, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    g = n // kv
    b, s, _ = x.shape
    t = k_cache.shape[1]
    q = _rope(_dense(p["q"], x, (n, d), ("embed", "heads", "head_dim"), dtype), cos, sin)
    k = _rope(_dense(p["k"], x, (kv, d), ("embed", "kv_heads", "head_dim"), dtype), cos, sin)
    v = _dense(p["v"], x, (kv, d), ("embed", "kv_heads", "head_dim"), dtype)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, start, 0, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, start, 0, 0))

    qg = q.reshape(b, s, kv, g, d)
    logits = jnp.einsum("bqkgd,btkd->bkgqt", qg, k_cache.astype(q.dtype), preferred_element_type=jnp.float32)
    logits = logits.astype(jnp.float32) * (d ** -0.5)
    qi = start + jnp.arange(s)[:, None]                                  # [S, 1] query cache index
    kj = jnp.arange(t)[None, :]                                          # [1, T] key cache index
    allowed = (kj <= qi)[None] & (kj[None] >= first[:, None, None])      # [B, S, T]
    if sliding:
        allowed = allowed & (kj > qi - cfg.sliding_window)[None]
    logits = jnp.where(allowed[:, None, None], logits, -jnp.inf)
    sink = jnp.broadcast_to(p["sinks"].astype(jnp.float32).reshape(1, kv, g, 1, 1), (b, kv, g, s, 1))
    probs = jax.nn.softmax(jnp.concatenate([logits, sink], axis=-1), axis=-1)[..., :-1]
    out = jnp.einsum("bkgqt,btkd->bqkgd", probs.astype(dtype), v_cache.astype(dtype),
                     preferred_element_type=jnp.float32).astype(dtype).reshape(b, s, n, d)
    y = _dense(p["o"], out, cfg.hidden_size, ("heads", "head_dim", "embed"), dtype, n_in=2)
    return y, k_cache, v_cache


def _hidden(params: Params, config: GptOssConfig, cache: KVCache, tokens: jax.Array, start, dtype):
    """Final-norm hidden states [B, S, H] (in `dtype`) of tokens [B, S] at cache indices start.., and the cache."""
    cfg = config
    b, s = tokens.shape
    idx = start + jnp.arange(s)[None, :]                                 # [1, S]
    real = idx >= cache.first[:, None]                                   # [B, S]
    x = jnp.take(params["embedding"], jnp.clip(tokens.astype(jnp.int32), 0, cfg.vocab_size - 1), axis=0)
    x = jnp.where(real[..., None], x, 0).astype(dtype)
    cos, sin = _rope_at(cfg, jnp.maximum(idx - cache.first[:, None], 0))
    norm = RMSNorm(eps=cfg.rms_eps, dtype=dtype)
    moe = GptOssMoE(cfg, dtype=dtype)
    ks, vs = list(cache.k), list(cache.v)
    for i in range(cfg.num_layers):
        p = params[f"layers_{i}"]
        h = norm.apply({"params": p["input_norm"]}, x)
        a, ks[i], vs[i] = _attention(p["attn"], cfg, cfg.is_sliding(i), h, cos, sin, ks[i], vs[i], cache.first,
                                     start, dtype)
        x = x + a
        h = norm.apply({"params": p["post_attention_norm"]}, x)
        x = x + moe.apply({"params": p["mlp"]}, h)
    x = norm.apply({"params": params["final_norm"]}, x)
    return x, KVCache(tuple(ks), tuple(vs), cache.first)


def _head(params: Params, config: GptOssConfig, x: jax.Array, dtype) -> jax.Array:
    """[..., H] -> float32 logits [..., V] (untied LM head, no bias)."""
    y = Dense(config.vocab_size, ("embed", "vocab"), use_bias=False, dtype=dtype).apply(
        {"params": params["lm_head"]}, x)
    return y.astype(jnp.float32)


def forward(params: Params, config: GptOssConfig, cache: KVCache, tokens: jax.Array, start,
            dtype=jnp.float32) -> Tuple[jax.Array, KVCache]:
    """Runs tokens int32 [B, S] at cache indices start..start+S-1 (start: int or int32 scalar, may be traced).

    Writes their keys / values into the cache and returns (logits float32 [B, S, V], new cache); logits[:, s]
    predicts the token after cache index start + s. Requires start + S <= T. Tokens at indices below
    `cache.first` are padding (their outputs are meaningless, their keys masked).
    """
    x, cache = _hidden(params, config, cache, tokens, start, dtype)
    return _head(params, config, x, dtype), cache


def sample_logits(logits: jax.Array, key: jax.Array, temperature, top_p) -> jax.Array:
    """Nucleus sampling. logits float32 [B, V] -> int32 [B] drawn from softmax(logits / temperature) restricted
    to the smallest set of highest-probability tokens whose mass reaches top_p (top_p >= 1: every token).
    temperature > 0 (use argmax for greedy)."""
    scaled = logits.astype(jnp.float32) / temperature
    desc = -jnp.sort(-scaled, axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p                 # mass strictly before < top_p; keeps #0
    n_keep = jnp.sum(keep, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(desc, n_keep - 1, axis=-1)           # smallest kept logit [B, 1]
    masked = jnp.where((scaled >= threshold) | (top_p >= 1.0), scaled, -jnp.inf)
    return jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)


def _next_token(logits, key, temperature, top_p, greedy: bool):
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample_logits(logits, key, temperature, top_p)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "cache_len", "greedy"))
def _prefill(params, tokens, first, key, temperature, top_p, *, config, dtype, cache_len, greedy):
    """tokens [B, P] left-padded -> (first generated token int32 [B], cache of cache_len slots)."""
    cache = init_cache(config, tokens.shape[0], cache_len, first, dtype)
    x, cache = _hidden(params, config, cache, tokens, 0, dtype)
    logits = _head(params, config, x[:, -1], dtype)                       # only the last position's head
    return _next_token(logits, jax.random.fold_in(key, 0), temperature, top_p, greedy), cache


@functools.partial(jax.jit, static_argnames=("config", "dtype", "max_new_tokens", "greedy"))
def _decode(params, cache, tok0, prompt_len, stop_ids, key, temperature, top_p, *, config, dtype, max_new_tokens,
            greedy):
    """while_loop decode from the first generated token. Returns (tokens int32 [B, max_new_tokens], count)."""
    b = tok0.shape[0]
    out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(tok0)
    done = jnp.isin(tok0, stop_ids)

    def cond(state):
        i, _, _, done = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, cache, out, done = state                       # i tokens emitted; the last sits at cache index P + i - 1
        prev = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)       # [B, 1]
        logits, cache = forward(params, config, cache, prev, prompt_len + i - 1, dtype)
        nxt = _next_token(logits[:, 0], jax.random.fold_in(key, i), temperature, top_p, greedy)
        out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], i, axis=1)
        return i + 1, cache, out, done | jnp.isin(nxt, stop_ids)

    n, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, out, done))
    return out, n


def generate(params: Params, config: GptOssConfig, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             stop_ids: Sequence[int], temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             dtype=jnp.float32, length_bucket: int = 64) -> GenerationResult:
    """Generates up to `max_new_tokens` tokens after each prompt.

    Args:
      params: the `GptOssLM` params tree (any float dtype; cast to `dtype` for compute).
      config: its GptOssConfig.
      prompts: non-empty list of non-empty token-id lists; left-padded to a common length P = len(longest)
        rounded up to a multiple of `length_bucket`.
      max_new_tokens: >= 1; the cache holds P + max_new_tokens slots.
      stop_ids: ids that end a sequence (may be empty); decoding stops once every sequence has emitted one.
      temperature: 0 = greedy argmax; > 0 = sample softmax(logits / temperature) within the top-p nucleus.
      top_p: nucleus mass in (0, 1]; 1.0 = the full distribution.
      seed: `jax.random.key(seed)`; step i uses `fold_in(key, i)` (one key shared by the batch).
      dtype: compute / cache dtype.
    Returns:
      GenerationResult(tokens, stopped): per prompt the new ids before its first stop id, and whether one came.
    Raises:
      ValueError: empty prompt list or prompt, out-of-range ids, or invalid arguments.
    """
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        if min(p) < 0 or max(p) >= config.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, {config.vocab_size})")
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if not temperature >= 0.0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if int(length_bucket) < 1:
        raise ValueError(f"length_bucket={length_bucket} must be >= 1")
    max_new_tokens, bucket = int(max_new_tokens), int(length_bucket)

    longest = max(len(p) for p in prompts)
    plen = -(-longest // bucket) * bucket
    tokens = np.zeros((len(prompts), plen), np.int32)
    first = np.zeros((len(prompts),), np.int32)
    for i, p in enumerate(prompts):
        first[i] = plen - len(p)
        tokens[i, first[i]:] = p
    stops = np.asarray(sorted(set(int(s) for s in stop_ids)) or [-1], np.int32)   # -1 never matches
    greedy = float(temperature) == 0.0
    dtype = jnp.dtype(dtype)
    key = jax.random.key(int(seed))
    temp = jnp.float32(1.0 if greedy else temperature)
    top_p_ = jnp.float32(top_p)

    tok0, cache = _prefill(params, jnp.asarray(tokens), jnp.asarray(first), key, temp, top_p_, config=config,
                           dtype=dtype, cache_len=plen + max_new_tokens, greedy=greedy)
    out, n = _decode(params, cache, tok0, jnp.int32(plen), jnp.asarray(stops), key, temp, top_p_, config=config,
                     dtype=dtype, max_new_tokens=max_new_tokens, greedy=greedy)
    out = np.asarray(out)[:, :int(n)]
    stop_set = set(int(s) for s in stop_ids)
    result, stopped = [], []
    for row in out.tolist():
        cut = next((j for j, t in enumerate(row) if t in stop_set), None)
        result.append(row if cut is None else row[:cut])
        stopped.append(cut is not None)
    return GenerationResult(result, stopped)


# ----------------------------------------------------------------------------------------------------------
# Loading


def _config_from_meta(meta: Dict[str, Any]) -> GptOssConfig:
    fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["config"].items()}
    return GptOssConfig(**fields)


def _cast(tree, dtype):
    """Leaves whose dtype differs from `dtype` are cast; the others are returned as the same objects."""
    if dtype is None:
        return tree
    dt = jnp.dtype(dtype)
    return jax.tree.map(lambda x: x if x.dtype == dt else jnp.asarray(x, dt), tree)


def load_lm(directory: str, *, encoder_params: Optional[Params] = None, dtype=None) -> Tuple[GptOssConfig, Params]:
    """Loads the GPT-OSS causal LM from a text-encoder directory.

    Layout: `<directory>/` an Orbax weights checkpoint of kind 'gpt_oss' ({'params': GptOssEncoder params}, its
    GptOssConfig in `lens_jax.json`) and `<directory>/lm_head/` one of kind 'gpt_oss_lm_head' holding
    {'params': {final_norm, lm_head}} (written by the text_encoder phase, or by
    `tools/convert_checkpoint.py --kind=gpt_oss --gpt_oss_full`).

    Args:
      directory: the text-encoder directory.
      encoder_params: the already-loaded encoder `params` tree {embedding, layers_0..}; when given its arrays are
        reused as they are (no copy) and only `lm_head/` is read.
      dtype: None keeps the stored dtypes; otherwise leaves of another dtype are cast (new arrays), leaves
        already in `dtype` are kept.
    Returns:
      (config, params): the GptOssConfig and the `GptOssLM` params tree.
    Raises:
      FileNotFoundError: no checkpoint at `directory` or no `lm_head/` in it.
      ValueError: wrong kinds, an encoder that does not hold every layer, or a head for another config.
    """
    from lens_jax.checkpoints import orbax_io

    meta = orbax_io.load_meta(directory)
    if meta.get("kind") != ENCODER_KIND:
        raise ValueError(f"{directory} holds a {meta.get('kind')!r} checkpoint, expected {ENCODER_KIND!r}")
    config = _config_from_meta(meta)
    if config.selected_layers[-1] != config.num_layers - 1:
        raise ValueError(
            f"{directory}: the encoder holds layers 0..{config.selected_layers[-1]} of {config.num_layers} "
            f"(selected_layers={config.selected_layers}); the LM needs every layer, i.e. max(selected_layers) == "
            f"num_layers - 1")
    head_dir = os.path.join(directory, meta.get("lm_head", LM_HEAD_DIR))
    if not os.path.isdir(os.path.join(head_dir, orbax_io.TREE_DIR)):
        raise FileNotFoundError(
            f"no LM head checkpoint at {head_dir}; the local reasoner needs the final norm and LM head next to the "
            f"encoder weights: train one with the text_encoder phase (it writes {LM_HEAD_DIR}/) or convert the full "
            f"HF checkpoint with `tools/convert_checkpoint.py --kind=gpt_oss --gpt_oss_full`")
    head_meta = orbax_io.load_meta(head_dir)
    if head_meta.get("kind") != LM_HEAD_KIND:
        raise ValueError(f"{head_dir} holds a {head_meta.get('kind')!r} checkpoint, expected {LM_HEAD_KIND!r}")
    if "config" in head_meta and _config_from_meta(head_meta) != config:
        raise ValueError(f"{head_dir} was saved for another GptOssConfig than {directory}")
    head = orbax_io.restore_weights(head_dir)["params"]
    if sorted(head) != sorted(LM_ONLY_KEYS):
        raise ValueError(f"{head_dir} holds {sorted(head)}, expected {sorted(LM_ONLY_KEYS)}")

    enc = encoder_params if encoder_params is not None else orbax_io.restore_weights(directory)["params"]
    want = ["embedding"] + [f"layers_{i}" for i in range(config.num_layers)]
    missing = [k for k in want if k not in enc]
    if missing:
        raise ValueError(f"the encoder params lack {missing}; expected {want}")
    emb_shape = tuple(np.shape(enc["embedding"]))
    if emb_shape != (config.vocab_size, config.hidden_size):
        raise ValueError(f"encoder embedding has shape {emb_shape}, the config says "
                         f"{(config.vocab_size, config.hidden_size)}")
    params = lm_params_from_parts({k: enc[k] for k in want}, head)
    return config, _cast(params, dtype)
