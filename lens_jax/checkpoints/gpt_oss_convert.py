"""HuggingFace GPT-OSS safetensors -> `GptOssEncoder` (or, with full=True, `GptOssLM`) variables, MXFP4 or plain.

Source names and layouts (transformers `GptOssForCausalLM`; the MXFP4 names come from its MXFP4 integration):

  model.embed_tokens.weight                              [V, H]
  model.layers.N.input_layernorm.weight                  [H]
  model.layers.N.self_attn.q_proj.{weight [N*D, H], bias [N*D]}
  model.layers.N.self_attn.{k,v}_proj.{weight [Kv*D, H], bias [Kv*D]}
  model.layers.N.self_attn.o_proj.{weight [H, N*D], bias [H]}
  model.layers.N.self_attn.sinks                         [N]
  model.layers.N.post_attention_layernorm.weight         [H]
  model.layers.N.mlp.router.{weight [E, H], bias [E]}
  model.layers.N.mlp.experts.gate_up_proj                [E, H, 2I]       (plain; gate/up interleaved)
  model.layers.N.mlp.experts.gate_up_proj_blocks         [E, 2I, H/32, 16] (MXFP4) + _scales [E, 2I, H/32]
  model.layers.N.mlp.experts.gate_up_proj_bias           [E, 2I]
  model.layers.N.mlp.experts.down_proj                   [E, I, H]        (plain)
  model.layers.N.mlp.experts.down_proj_blocks            [E, H, I/32, 16] (MXFP4) + _scales [E, H, I/32]
  model.layers.N.mlp.experts.down_proj_bias              [E, H]
  model.norm.weight                                      [H]              (full=True only)
  lm_head.weight                                         [V, H]           (full=True only)

Default (encoder): only the embedding and layers 0..max(selected_layers) are converted; later layers, `model.norm`
and `lm_head` may be present and are ignored. full=True (causal LM): every layer plus
`model.norm.weight` -> `final_norm/scale` [H] and `lm_head.weight` -> `lm_head/kernel` [H, V] (transposed), i.e.
the `GptOssLM` parameter tree; all of these must be present. Tensors are read one at a time, so the result never
holds two full copies.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import ml_dtypes
import numpy as np

from lens_jax.checkpoints.keys import check_state_dict, check_tree_shapes, set_path
from lens_jax.checkpoints.mxfp4 import dequantize_mxfp4
from lens_jax.models.gpt_oss import GptOssConfig

Shape = Tuple[int, ...]
WHAT = "GPT-OSS"


def _layer_shapes(c: GptOssConfig, n: int, quantized: bool) -> Dict[str, Shape]:
    h, nh, kv, d = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    e, i = c.num_experts, c.intermediate_size
    p = f"model.layers.{n}."
    out = {
        p + "input_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (nh * d, h),
        p + "self_attn.q_proj.bias": (nh * d,),
        p + "self_attn.k_proj.weight": (kv * d, h),
        p + "self_attn.k_proj.bias": (kv * d,),
        p + "self_attn.v_proj.weight": (kv * d, h),
        p + "self_attn.v_proj.bias": (kv * d,),
        p + "self_attn.o_proj.weight": (h, nh * d),
        p + "self_attn.o_proj.bias": (h,),
        p + "self_attn.sinks": (nh,),
        p + "post_attention_layernorm.weight": (h,),
        p + "mlp.router.weight": (e, h),
        p + "mlp.router.bias": (e,),
        p + "mlp.experts.gate_up_proj_bias": (e, 2 * i),
        p + "mlp.experts.down_proj_bias": (e, h),
    }
    if quantized:
        if h % 32 or i % 32:
            raise ValueError(f"MXFP4 needs hidden_size ({h}) and intermediate_size ({i}) divisible by 32")
        out[p + "mlp.experts.gate_up_proj_blocks"] = (e, 2 * i, h // 32, 16)
        out[p + "mlp.experts.gate_up_proj_scales"] = (e, 2 * i, h // 32)
        out[p + "mlp.experts.down_proj_blocks"] = (e, h, i // 32, 16)
        out[p + "mlp.experts.down_proj_scales"] = (e, h, i // 32)
    else:
        out[p + "mlp.experts.gate_up_proj"] = (e, h, 2 * i)
        out[p + "mlp.experts.down_proj"] = (e, i, h)
    return out


def expected_hf_shapes(config: GptOssConfig, quantized: bool, full: bool = False) -> Dict[str, Shape]:
    """HF GPT-OSS tensor name -> shape.

    Args:
      config: the encoder configuration.
      quantized: MXFP4 expert weights (`*_blocks` / `*_scales`) instead of plain `gate_up_proj` / `down_proj`.
      full: the complete causal-LM checkpoint (all `num_layers` layers, `model.norm.weight`, `lm_head.weight`)
        instead of only what the encoder needs (embedding + layers 0..max(selected_layers)).
    """
    n_layers = config.num_layers if full else config.num_built_layers
    out: Dict[str, Shape] = {"model.embed_tokens.weight": (config.vocab_size, config.hidden_size)}
    for n in range(n_layers):
        out.update(_layer_shapes(config, n, quantized))
    if full:
        out["model.norm.weight"] = (config.hidden_size,)
        out["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    return out


def _shape_of(reader: Mapping[str, Any], name: str) -> Shape:
    shape_fn = getattr(reader, "shape", None)
    if callable(shape_fn):
        return tuple(shape_fn(name))
    return tuple(np.shape(reader[name]))


def is_mxfp4(names) -> bool:
    """True when the checkpoint stores the experts as MXFP4 `*_blocks` / `*_scales`."""
    return any(k.endswith(("_blocks", "_scales")) for k in names)


def ignored_prefixes(config: GptOssConfig, found_names) -> Tuple[str, ...]:
    """Name prefixes that may be present but are not used: later layers, the final norm and the LM head."""
    later = set()
    for k in found_names:
        if k.startswith("model.layers."):
            idx = k.split(".")[2]
            if idx.isdigit() and config.num_built_layers <= int(idx) < config.num_layers:
                later.add(f"model.layers.{int(idx)}.")
    return tuple(sorted(later)) + ("model.norm.", "lm_head.")


def convert_gpt_oss(reader: Mapping[str, Any], config: GptOssConfig, dtype=ml_dtypes.bfloat16,
                    check_target: bool = True, full: bool = False) -> Dict[str, Any]:
    """Converts an HF GPT-OSS checkpoint into `GptOssEncoder` variables (or `GptOssLM` ones with full=True).

    Args:
      reader: name -> array mapping (e.g. `SafetensorsReader`, or a plain dict of NumPy arrays). A `.shape(name)`
        method is used for validation if present, so nothing is loaded before the keys check out.
      config: the encoder configuration (decides which layers are converted).
      dtype: parameter dtype of the result (NumPy / ml_dtypes), default bfloat16.
      check_target: also verify the result against `jax.eval_shape(GptOssEncoder(config).init, ...)` (full=True:
        `GptOssLM(config).init`).
      full: convert the whole causal LM: all `config.num_layers` layers, the final norm and the LM head.
    Returns:
      {'params': nested dict of NumPy arrays}, the unboxed structure of `GptOssEncoder.init` (full=True:
      `GptOssLM.init`, {embedding, layers_0..layers_{L-1}, final_norm, lm_head}).
    Raises:
      CheckpointKeyError listing every missing, unexpected or mis-shaped tensor.
    """
    names = list(reader.keys())
    quantized = is_mxfp4(names)
    expected = expected_hf_shapes(config, quantized, full=full)
    found = {k: _shape_of(reader, k) for k in names}
    check_state_dict(expected, found, WHAT + (" (MXFP4)" if quantized else ""),
                     ignore_unexpected=() if full else ignored_prefixes(config, names))

    c = config
    h, nh, kv, d = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    params: Dict[str, Any] = {}

    def get(name: str) -> np.ndarray:
        return np.asarray(reader[name])

    def put(path: str, value: np.ndarray) -> None:
        set_path(params, path.split("/"), np.ascontiguousarray(np.asarray(value).astype(dtype, copy=False)))

    put("embedding", get("model.embed_tokens.weight"))
    for n in range(c.num_layers if full else c.num_built_layers):
        p, q = f"model.layers.{n}.", f"layers_{n}/"
        put(q + "input_norm/scale", get(p + "input_layernorm.weight"))
        put(q + "post_attention_norm/scale", get(p + "post_attention_layernorm.weight"))
        a = p + "self_attn."
        put(q + "attn/q/kernel", get(a + "q_proj.weight").T.reshape(h, nh, d))
        put(q + "attn/q/bias", get(a + "q_proj.bias").reshape(nh, d))
        for proj in ("k", "v"):
            put(q + f"attn/{proj}/kernel", get(a + f"{proj}_proj.weight").T.reshape(h, kv, d))
            put(q + f"attn/{proj}/bias", get(a + f"{proj}_proj.bias").reshape(kv, d))
        put(q + "attn/o/kernel", get(a + "o_proj.weight").T.reshape(nh, d, h))
        put(q + "attn/o/bias", get(a + "o_proj.bias"))
        put(q + "attn/sinks", get(a + "sinks"))
        m = p + "mlp."
        put(q + "mlp/router/kernel", get(m + "router.weight").T)
        put(q + "mlp/router/bias", get(m + "router.bias"))
        for proj, ours in (("gate_up_proj", "gate_up"), ("down_proj", "down")):
            base = m + "experts." + proj
            if quantized:
                # [E, out, G, 16] -> [E, in, out] (transformers' layout), dequantised straight to `dtype`.
                w = dequantize_mxfp4(get(base + "_blocks"), get(base + "_scales"), dtype=dtype)
            else:
                w = get(base)
            put(q + f"mlp/experts/{ours}_kernel", w)
            del w
            put(q + f"mlp/experts/{ours}_bias", get(base + "_bias"))
    if full:
        put("final_norm/scale", get("model.norm.weight"))
        put("lm_head/kernel", get("lm_head.weight").T)     # [V, H] -> [H, V]

    variables = {"params": params}
    if check_target:
        check_tree_shapes(abstract_variables(config, full=full), variables,
                          WHAT + (" LM" if full else "") + " converted tree")
    return variables


def abstract_variables(config: GptOssConfig, full: bool = False) -> Dict[str, Any]:
    """Unboxed `jax.eval_shape` of `GptOssEncoder(config).init` (full=True: `GptOssLM(config).init`); shapes only,
    nothing allocated."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from lens_jax.models.gpt_oss import GptOssEncoder
    from lens_jax.models.gpt_oss_lm import GptOssLM

    model = GptOssLM(config) if full else GptOssEncoder(config)
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    mask = jax.ShapeDtypeStruct((1, 1), jnp.bool_)
    shapes = jax.eval_shape(model.init, jax.random.key(0), ids, mask)
    return nn.meta.unbox(shapes)
