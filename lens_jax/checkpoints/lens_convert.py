"""Official Lens transformer checkpoint (PyTorch `LensTransformer2DModel` names) <-> lens_jax MMDiT params.

Rules (LENS_SPEC §2.9): Linear weights are transposed ([out, in] -> [in, out]); the 48 blocks are
stacked on a leading 'layers' axis for nn.scan; the fused QKV weight [3D, D] becomes [D, 3, H, Dh];
the attention out-projections [D, D] become [H, Dh, D]; RMSNorm `weight` becomes `scale`.

`convert_lens_dit(reader, config)` reads tensor by tensor into preallocated stacked arrays, so peak
memory is one converted model plus one tensor. `export_official(params, config)` is the inverse.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from lens_jax.checkpoints.keys import check_state_dict, set_path
from lens_jax.models.mmdit import MMDiTConfig

# (official suffix, flax path inside the block/top level, kind)
# kind: 'linear' [out,in]->[in,out]; 'qkv' -> [D,3,H,Dh]; 'out' -> [H,Dh,D]; 'vec' copied;
#       'qkv_bias' [3D] -> [3,H,Dh].
_TOP: List[Tuple[str, Tuple[str, ...], str]] = [
    ("img_in.weight", ("img_in", "kernel"), "linear"),
    ("img_in.bias", ("img_in", "bias"), "vec"),
    ("txt_in.weight", ("txt_in", "kernel"), "linear"),
    ("txt_in.bias", ("txt_in", "bias"), "vec"),
    ("time_text_embed.timestep_embedder.linear_1.weight", ("timestep_embedder", "linear_1", "kernel"), "linear"),
    ("time_text_embed.timestep_embedder.linear_1.bias", ("timestep_embedder", "linear_1", "bias"), "vec"),
    ("time_text_embed.timestep_embedder.linear_2.weight", ("timestep_embedder", "linear_2", "kernel"), "linear"),
    ("time_text_embed.timestep_embedder.linear_2.bias", ("timestep_embedder", "linear_2", "bias"), "vec"),
    ("norm_out.linear.weight", ("norm_out_linear", "kernel"), "linear"),
    ("norm_out.linear.bias", ("norm_out_linear", "bias"), "vec"),
    ("proj_out.weight", ("proj_out", "kernel"), "linear"),
    ("proj_out.bias", ("proj_out", "bias"), "vec"),
]

_BLOCK: List[Tuple[str, Tuple[str, ...], str]] = [
    ("attn.img_qkv.weight", ("attn", "img_qkv", "kernel"), "qkv"),
    ("attn.img_qkv.bias", ("attn", "img_qkv", "bias"), "qkv_bias"),
    ("attn.txt_qkv.weight", ("attn", "txt_qkv", "kernel"), "qkv"),
    ("attn.txt_qkv.bias", ("attn", "txt_qkv", "bias"), "qkv_bias"),
    ("attn.norm_q.weight", ("attn", "norm_q", "scale"), "vec"),
    ("attn.norm_k.weight", ("attn", "norm_k", "scale"), "vec"),
    ("attn.norm_added_q.weight", ("attn", "norm_added_q", "scale"), "vec"),
    ("attn.norm_added_k.weight", ("attn", "norm_added_k", "scale"), "vec"),
    ("attn.to_out.0.weight", ("attn", "to_out", "kernel"), "out"),
    ("attn.to_out.0.bias", ("attn", "to_out", "bias"), "vec"),
    ("attn.to_add_out.weight", ("attn", "to_add_out", "kernel"), "out"),
    ("attn.to_add_out.bias", ("attn", "to_add_out", "bias"), "vec"),
    ("img_mod.1.weight", ("img_mod", "kernel"), "linear"),
    ("img_mod.1.bias", ("img_mod", "bias"), "vec"),
    ("txt_mod.1.weight", ("txt_mod", "kernel"), "linear"),
    ("txt_mod.1.bias", ("txt_mod", "bias"), "vec"),
    ("img_norm1.weight", ("img_norm1", "scale"), "vec"),
    ("img_norm2.weight", ("img_norm2", "scale"), "vec"),
    ("txt_norm1.weight", ("txt_norm1", "scale"), "vec"),
    ("txt_norm2.weight", ("txt_norm2", "scale"), "vec"),
] + [(f"{s}_mlp.{w}.weight", (f"{s}_mlp", w, "kernel"), "linear")
     for s in ("img", "txt") for w in ("w1", "w2", "w3")]

BLOCK_PREFIX = "transformer_blocks"


def _official_shape(kind: str, flax_shape: Tuple[int, ...]) -> Tuple[int, ...]:
    if kind == "linear":
        return (flax_shape[1], flax_shape[0])
    if kind == "qkv":                      # [D, 3, H, Dh] -> [3*H*Dh, D]
        return (int(np.prod(flax_shape[1:])), flax_shape[0])
    if kind == "qkv_bias":
        return (int(np.prod(flax_shape)),)
    if kind == "out":                      # [H, Dh, D] -> [D, H*Dh]
        return (flax_shape[2], flax_shape[0] * flax_shape[1])
    return flax_shape


def _flax_shapes(c: MMDiTConfig) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
    """Unstacked Flax shapes of every converted tensor (block shapes without the layers axis)."""
    d, h, dh, f, e = c.hidden, c.num_heads, c.head_dim, c.mlp_dim, c.text_dim
    top = {
        ("img_in", "kernel"): (c.in_channels, d), ("img_in", "bias"): (d,),
        ("txt_in", "kernel"): (c.num_text_layers * e, d), ("txt_in", "bias"): (d,),
        ("timestep_embedder", "linear_1", "kernel"): (c.timestep_dim, d),
        ("timestep_embedder", "linear_1", "bias"): (d,),
        ("timestep_embedder", "linear_2", "kernel"): (d, d), ("timestep_embedder", "linear_2", "bias"): (d,),
        ("norm_out_linear", "kernel"): (d, 2 * d), ("norm_out_linear", "bias"): (2 * d,),
        ("proj_out", "kernel"): (d, c.out_channels), ("proj_out", "bias"): (c.out_channels,),
    }
    top.update({(f"txt_norm_{i}", "scale"): (e,) for i in range(c.num_text_layers)})
    block = {
        ("attn", "img_qkv", "kernel"): (d, 3, h, dh), ("attn", "img_qkv", "bias"): (3, h, dh),
        ("attn", "txt_qkv", "kernel"): (d, 3, h, dh), ("attn", "txt_qkv", "bias"): (3, h, dh),
        ("attn", "to_out", "kernel"): (h, dh, d), ("attn", "to_out", "bias"): (d,),
        ("attn", "to_add_out", "kernel"): (h, dh, d), ("attn", "to_add_out", "bias"): (d,),
        ("img_mod", "kernel"): (d, 6 * d), ("img_mod", "bias"): (6 * d,),
        ("txt_mod", "kernel"): (d, 6 * d), ("txt_mod", "bias"): (6 * d,),
    }
    for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
        block[("attn", n, "scale")] = (dh,)
    for n in ("img_norm1", "img_norm2", "txt_norm1", "txt_norm2"):
        block[(n, "scale")] = (d,)
    for s in ("img", "txt"):
        block[(f"{s}_mlp", "w1", "kernel")] = (d, f)
        block[(f"{s}_mlp", "w3", "kernel")] = (d, f)
        block[(f"{s}_mlp", "w2", "kernel")] = (f, d)
    return {("top",) + k: v for k, v in top.items()} | {("block",) + k: v for k, v in block.items()}


def _entries(c: MMDiTConfig) -> Iterator[Tuple[str, Optional[int], Tuple[str, ...], str, Tuple[int, ...]]]:
    """(official name, layer index or None, flax path, kind, flax shape) for every tensor."""
    shapes = _flax_shapes(c)
    for name, path, kind in _TOP:
        yield name, None, path, kind, shapes[("top",) + path]
    for i in range(c.num_text_layers):
        yield f"txt_norm.{i}.weight", None, (f"txt_norm_{i}", "scale"), "vec", (c.text_dim,)
    for layer in range(c.num_layers):
        for suffix, path, kind in _BLOCK:
            yield f"{BLOCK_PREFIX}.{layer}.{suffix}", layer, path, kind, shapes[("block",) + path]


def official_shapes(config: MMDiTConfig) -> Dict[str, Tuple[int, ...]]:
    """Official state-dict name -> PyTorch shape for this configuration."""
    return {name: _official_shape(kind, shape) for name, _, _, kind, shape in _entries(config)}


def _to_flax(kind: str, w: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
    if kind in ("linear", "qkv", "out"):
        return w.T.reshape(shape)
    return w.reshape(shape)


def _to_official(kind: str, w: np.ndarray, shape: Tuple[int, ...]) -> np.ndarray:
    if kind == "linear":
        return w.T
    if kind == "qkv":                      # [D, 3, H, Dh] -> [3*H*Dh, D]
        return w.reshape(w.shape[0], -1).T
    if kind == "out":                      # [H, Dh, D] -> [D, H*Dh]
        return w.reshape(-1, w.shape[-1]).T
    return w.reshape(shape)


def convert_lens_dit(reader: Mapping[str, np.ndarray], config: MMDiTConfig,
                     dtype: Optional[np.dtype] = None, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Official Lens transformer state dict -> nested lens_jax params (scan layout, NumPy arrays).

    Args:
      reader: name -> array mapping (a SafetensorsReader, or a dict of NumPy arrays); `.shape(name)`
        is used when present so keys are validated before any tensor is read.
      config: the architecture the checkpoint must match exactly.
      dtype: output dtype (default: the checkpoint's own dtype, e.g. bfloat16 or float32).
      progress: optional callback called with each tensor name as it is converted.
    Raises:
      CheckpointKeyError listing missing, unexpected and mis-shaped tensors.
    """
    found = reader.shapes() if hasattr(reader, "shapes") else {k: tuple(np.shape(v)) for k, v in reader.items()}
    check_state_dict(official_shapes(config), found, "Lens transformer")
    params: dict = {}
    stacked: Dict[Tuple[str, ...], np.ndarray] = {}
    for name, layer, path, kind, shape in _entries(config):
        w = np.asarray(reader[name])
        out_dtype = dtype or w.dtype
        w = _to_flax(kind, w, shape).astype(out_dtype, copy=False)
        if layer is None:
            set_path(params, path, np.ascontiguousarray(w))
        else:
            if path not in stacked:
                stacked[path] = np.empty((config.num_layers, *shape), out_dtype)
                set_path(params, (BLOCK_PREFIX,) + path, stacked[path])
            stacked[path][layer] = w
        if progress:
            progress(name)
    return params


def export_official(params: Mapping, config: MMDiTConfig) -> Dict[str, np.ndarray]:
    """lens_jax params (scan layout) -> official state dict (NumPy, PyTorch [out, in] layout)."""
    def get(path):
        node = params
        for p in path:
            node = node[p]
        return np.asarray(node)

    out = {}
    for name, layer, path, kind, shape in _entries(config):
        w = get(path) if layer is None else get((BLOCK_PREFIX,) + path)[layer]
        out[name] = np.ascontiguousarray(_to_official(kind, w, _official_shape(kind, shape)))
    return out
