"""Device mesh from config and logical-axis rules -> mesh shardings (JAX_STYLE rules 3-5).

Mesh axes are ('data', 'fsdp', 'tensor'); sizes come from `config.mesh` with at most one -1, which is
filled with the remaining device count. Logical names used by the models (see lens_jax/models/layers.py)
map to mesh axes through `config.sharding.rules`, a sequence of (logical_name, mesh_axis_or_None).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
Rule = Tuple[str, Union[None, str, Tuple[str, ...]]]

# Parameters: FSDP over the model width, tensor parallelism over heads / MLP hidden / modulation.
# Activations: batch over (data, fsdp); heads and MLP hidden over tensor.
DEFAULT_RULES: Tuple[Rule, ...] = (
    ("layers", None), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"),
    ("head_dim", None), ("qkv", None), ("mod", "tensor"), ("text_embed", None), ("time_freq", None),
    ("time_embed", "tensor"), ("in_channels", None), ("out_channels", None), ("norm", None),
    ("text_norm", None), ("vocab", None), ("expert", None), ("conv_h", None), ("conv_w", None),
    ("conv_in", None), ("conv_out", None),
    ("act_batch", ("data", "fsdp")), ("act_seq", None), ("act_embed", None), ("act_heads", "tensor"),
    ("act_kv", None), ("act_mlp", "tensor"),
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> Tuple[int, ...]:
    shape = [int(s) for s in shape]
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {shape}: sizes must be positive with at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh shape {shape} does not divide {num_devices} devices")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh shape {shape} uses {math.prod(shape)} devices but {num_devices} are available")
    return tuple(shape)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Optional[Sequence[Any]] = None) -> jax.sharding.Mesh:
    devices = list(devices if devices is not None else jax.devices())
    dims = resolve_mesh_shape(shape, len(devices))
    return jax.make_mesh(dims, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def validate_rules(rules: Sequence[Rule]) -> Tuple[Rule, ...]:
    """Rules must name each logical axis once and only known mesh axes."""
    seen: Dict[str, Any] = {}
    out = []
    for name, target in rules:
        if name in seen:
            raise ValueError(f"logical axis {name!r} has two sharding rules: {seen[name]!r} and {target!r}")
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ValueError(f"rule for {name!r} names unknown mesh axes {bad}; mesh axes are {MESH_AXES}")
        seen[name] = target
        out.append((name, None if target is None else (target if isinstance(target, str) else tuple(target))))
    return tuple(out)


def logical_shardings(abstract_boxed_tree, mesh, rules: Sequence[Rule]):
    """NamedShardings for a tree whose leaves carry logical names (nn.LogicallyPartitioned).

    Raises if a leaf uses a logical name that has no rule (so nothing is silently replicated).
    """
    specs = nn.get_partition_spec(abstract_boxed_tree)
    known = {n for n, _ in rules}
    for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)):
        for name in spec:
            for n in ((name,) if isinstance(name, str) or name is None else name):
                if n is not None and n not in known:
                    raise ValueError(f"logical axis {n!r} has no sharding rule; add it to config.sharding.rules")
    return nn.logical_to_mesh_sharding(specs, mesh, list(rules))


def check_divisible(abstract_tree, shardings) -> None:
    """Raises a ValueError naming every array whose sharded axes do not divide its shape."""
    bad = []
    flat = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
    for (path, x), s in zip(flat, jax.tree.leaves(shardings)):
        for dim, axes in zip(x.shape, s.spec):
            names = () if axes is None else ((axes,) if isinstance(axes, str) else axes)
            parts = int(np.prod([s.mesh.shape[a] for a in names])) if names else 1
            if dim % parts:
                bad.append(f"{jax.tree_util.keystr(path)} {tuple(x.shape)} spec {s.spec}: {dim} % {parts} != 0")
    if bad:
        raise ValueError("mesh does not divide these arrays (change config.mesh.shape or config.sharding.rules):\n  "
                         + "\n  ".join(bad[:20]))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over ('data', 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def data_parallel_size(mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
