"""Converts a diffusers `AutoencoderKLFlux2` state dict (PyTorch layout) to the `FluxVAE` variables.

    reader = open_checkpoint("flux2-vae/diffusion_pytorch_model.safetensors")
    variables = convert_vae(reader, vae_config("flux2"))   # {'params': ..., 'latent_stats': {mean, var}}

Name mapping is mechanical (`lens_jax.models.vae` mirrors diffusers' module names):
  `a.b.N.c.weight` -> `a/b_N/c/{kernel|scale}`, `.bias` -> `bias`;
  conv weight [O, I, kH, kW] -> kernel [kH, kW, I, O]; linear weight [O, I] -> kernel [I, O];
  norm weight [C] -> scale [C];
  `bn.running_mean` / `bn.running_var` -> `latent_stats/mean` / `latent_stats/var`.
`bn.num_batches_tracked` (a training counter) is accepted when present and ignored.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from lens_jax.checkpoints.keys import check_state_dict, check_tree_shapes, set_path
from lens_jax.models.vae import VAEConfig

Shape = Tuple[int, ...]

WHAT = "FLUX.2 VAE"
# Present in a diffusers state dict but not needed: accepted if present, never required.
OPTIONAL_KEYS = ("bn.num_batches_tracked",)


# ----------------------------------------------------------------------------------------------------
# Expected source layout


def _conv(d: Dict[str, Shape], name: str, cin: int, cout: int, k: int) -> None:
    d[f"{name}.weight"] = (cout, cin, k, k)
    d[f"{name}.bias"] = (cout,)


def _norm(d: Dict[str, Shape], name: str, c: int) -> None:
    d[f"{name}.weight"] = (c,)
    d[f"{name}.bias"] = (c,)


def _linear(d: Dict[str, Shape], name: str, cin: int, cout: int) -> None:
    d[f"{name}.weight"] = (cout, cin)
    d[f"{name}.bias"] = (cout,)


def _resnet(d: Dict[str, Shape], name: str, cin: int, cout: int) -> None:
    _norm(d, f"{name}.norm1", cin)
    _conv(d, f"{name}.conv1", cin, cout, 3)
    _norm(d, f"{name}.norm2", cout)
    _conv(d, f"{name}.conv2", cout, cout, 3)
    if cin != cout:
        _conv(d, f"{name}.conv_shortcut", cin, cout, 1)


def _mid(d: Dict[str, Shape], name: str, c: int, attention: bool) -> None:
    _resnet(d, f"{name}.resnets.0", c, c)
    if attention:
        a = f"{name}.attentions.0"
        _norm(d, f"{a}.group_norm", c)
        for p in ("to_q", "to_k", "to_v", "to_out.0"):
            _linear(d, f"{a}.{p}", c, c)
    _resnet(d, f"{name}.resnets.1", c, c)


def expected_diffusers_shapes(config: VAEConfig) -> Dict[str, Shape]:
    """Every tensor of the diffusers `AutoencoderKLFlux2(config).state_dict()`, name -> PyTorch shape.

    Includes the latent BatchNorm buffers `bn.running_mean`, `bn.running_var` [4*latent_channels] and the
    scalar `bn.num_batches_tracked` (see OPTIONAL_KEYS: accepted but not required by `convert_vae`).
    """
    d: Dict[str, Shape] = {}
    lat = config.latent_channels
    enc = config.block_out_channels
    _conv(d, "encoder.conv_in", config.in_channels, enc[0], 3)
    cin = enc[0]
    for i, c in enumerate(enc):
        for j in range(config.layers_per_block):
            _resnet(d, f"encoder.down_blocks.{i}.resnets.{j}", cin if j == 0 else c, c)
        if i < len(enc) - 1:
            _conv(d, f"encoder.down_blocks.{i}.downsamplers.0.conv", c, c, 3)
        cin = c
    _mid(d, "encoder.mid_block", enc[-1], config.mid_block_add_attention)
    _norm(d, "encoder.conv_norm_out", enc[-1])
    _conv(d, "encoder.conv_out", enc[-1], 2 * lat, 3)

    dec = tuple(reversed(config.decoder_channels))
    _conv(d, "decoder.conv_in", lat, dec[0], 3)
    _mid(d, "decoder.mid_block", dec[0], config.mid_block_add_attention)
    cin = dec[0]
    for i, c in enumerate(dec):
        for j in range(config.layers_per_block + 1):
            _resnet(d, f"decoder.up_blocks.{i}.resnets.{j}", cin if j == 0 else c, c)
        if i < len(dec) - 1:
            _conv(d, f"decoder.up_blocks.{i}.upsamplers.0.conv", c, c, 3)
        cin = c
    _norm(d, "decoder.conv_norm_out", dec[-1])
    _conv(d, "decoder.conv_out", dec[-1], config.out_channels, 3)

    if config.use_quant_conv:
        _conv(d, "quant_conv", 2 * lat, 2 * lat, 1)
    if config.use_post_quant_conv:
        _conv(d, "post_quant_conv", lat, lat, 1)
    d["bn.running_mean"] = (config.packed_channels,)
    d["bn.running_var"] = (config.packed_channels,)
    d["bn.num_batches_tracked"] = ()
    return d


def config_from_diffusers(cfg: Mapping[str, Any]) -> VAEConfig:
    """Builds a VAEConfig from a diffusers `vae/config.json` dict; refuses block types lens_jax lacks."""
    for key, ok in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        bad = [t for t in cfg.get(key, ()) if t != ok]
        if bad:
            raise ValueError(f"{key} {bad} not supported (only {ok})")
    fields = ("in_channels", "out_channels", "block_out_channels", "decoder_block_out_channels",
              "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "use_quant_conv",
              "use_post_quant_conv", "mid_block_add_attention", "batch_norm_eps", "batch_norm_momentum",
              "patch_size")
    kw = {f: cfg[f] for f in fields if f in cfg and cfg[f] is not None}
    out = VAEConfig(**kw)
    n = len(out.block_out_channels)
    for key in ("down_block_types", "up_block_types"):
        if key in cfg and len(cfg[key]) != n:
            raise ValueError(f"{key} has {len(cfg[key])} entries but block_out_channels has {n}")
    return out


# ----------------------------------------------------------------------------------------------------
# Conversion


def _shape_of(reader: Mapping[str, Any], name: str) -> Shape:
    if callable(getattr(reader, "shape", None)):  # SafetensorsReader: header only, no load
        return tuple(reader.shape(name))
    v = reader[name]
    return tuple(v.shape) if hasattr(v, "shape") else tuple(np.shape(v))


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor in a plain dict
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _dest(name: str, ndim: int) -> Tuple[Tuple[str, ...], str]:
    """Diffusers tensor name -> (Flax path, kind) with kind in {'conv', 'linear', 'scale', 'bias'}."""
    parts = name.split(".")
    leaf = parts.pop()
    path = []
    for p in parts:
        if p.isdigit():
            path[-1] = f"{path[-1]}_{p}"
        else:
            path.append(p)
    if leaf == "bias":
        return (*path, "bias"), "bias"
    if leaf != "weight":
        raise ValueError(f"unexpected tensor {name!r}")
    kind = {4: "conv", 2: "linear", 1: "scale"}[ndim]
    return (*path, "scale" if kind == "scale" else "kernel"), kind


def convert_vae(reader: Mapping[str, Any], config: VAEConfig, dtype: Optional[Any] = np.float32,
                verify: bool = True) -> Dict[str, Any]:
    """Converts a diffusers FLUX.2 VAE state dict to `{'params': ..., 'latent_stats': {'mean', 'var'}}`.

    Args:
      reader: Mapping name -> array (a `SafetensorsReader`, or a dict of NumPy arrays / CPU torch tensors).
        `reader.shape(name)` is used when available so keys and shapes are validated before any tensor is
        loaded.
      config: the architecture the checkpoint must match.
      dtype: output dtype of every array (float32 by default); None keeps each tensor's source dtype.
      verify: also check the tree against `jax.eval_shape(FluxVAE(config).init, ...)` (abstract, cheap).

    Raises:
      CheckpointKeyError: listing missing, unexpected and mis-shaped tensors.
    """
    expected = expected_diffusers_shapes(config)
    required = {k: v for k, v in expected.items() if k not in OPTIONAL_KEYS}
    found = {k: _shape_of(reader, k) for k in reader}
    check_state_dict(required, found, WHAT, ignore_unexpected=OPTIONAL_KEYS)

    def cast(a: np.ndarray) -> np.ndarray:
        return a if dtype is None else a.astype(dtype, copy=False)

    params: Dict[str, Any] = {}
    for name, shape in required.items():
        if name.startswith("bn."):
            continue
        path, kind = _dest(name, len(shape))
        a = _numpy(reader[name])
        if kind == "conv":
            a = a.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        elif kind == "linear":
            a = a.T  # [out, in] -> [in, out]
        set_path(params, path, cast(np.ascontiguousarray(a)))
    out = {
        "params": params,
        "latent_stats": {"mean": cast(_numpy(reader["bn.running_mean"])),
                         "var": cast(_numpy(reader["bn.running_var"]))},
    }
    if verify:
        check_tree_shapes(abstract_variables(config), out, f"{WHAT} (converted tree vs FluxVAE)")
    return out


def abstract_variables(config: VAEConfig) -> Dict[str, Any]:
    """Unboxed `jax.eval_shape` of `FluxVAE(config).init` (ShapeDtypeStructs; allocates nothing)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from lens_jax.models.vae import FluxVAE

    f = config.downsample_factor
    x = jax.ShapeDtypeStruct((1, f, f, config.in_channels), jnp.float32)
    return nn.meta.unbox(jax.eval_shape(FluxVAE(config).init, jax.random.key(0), x))
