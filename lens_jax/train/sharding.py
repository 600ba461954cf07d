"""Device mesh from config and logical-axis rules -> mesh shardings (JAX_STYLE rules 3-5).

Mesh axes are ('data', 'fsdp', 'tensor'), all of type `AxisType.Auto` (the logical rules and the XLA
partitioner place the arrays; the step code never names mesh axes itself).

Mesh shape (`config.mesh`):
  shape      per-slice (ICI) sizes, at most one -1, filled from the devices of one slice;
  dcn_shape  sizes across slices / hosts (DCN), default (1, 1, 1). The global mesh is the elementwise product
             shape * dcn_shape, laid out with `mesh_utils.create_hybrid_device_mesh` (slices on TPU, processes
             elsewhere) so that each DCN step crosses slices and everything inside a slice stays on ICI.

Logical rules (`config.sharding.rules`, `.vae_rules`, `.text_encoder_rules`): a sequence of
(logical_name, mesh_axis | tuple of mesh axes | None). `validate_rules` rejects a name listed twice, an
unknown mesh axis and a logical name that no lens_jax model uses (a typo would otherwise silently replicate);
`logical_shardings` rejects a model name without a rule and an array whose rules put two of its dimensions on
the same mesh axis (Flax would silently leave the second one unsharded), naming the array's path.

The three rule sets: the trained DiT uses `rules` (FSDP over the model width, tensor parallelism over heads /
MLP hidden / modulation); the frozen encoders used by online encoding (`config.data.features='online'`) have
their own sets because they are never updated: the VAE (~84 M parameters of convolutions) is replicated, the
GPT-OSS encoder is sharded like the DiT (FSDP over the width, heads and expert MLP over 'tensor').
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# The axes a batch (and every activation's batch dim) is split over, fsdp-major. Not ('data', 'fsdp'): with
# that order, fsdp-sharded weights and tensor > 1 (e.g. mesh (2, 2, 2)), XLA (jax 0.10.2, both Shardy and
# GSPMD) re-orders the batch to fsdp-major around some matmuls and computes wrong values (forward error
# ~5e-2, gradient norm off by 60% on the tiny DiT); fsdp-major batches match one device (tests/test_mesh_training.py).
BATCH_AXES = ("fsdp", "data")
Rule = Tuple[str, Union[None, str, Tuple[str, ...]]]

# Every logical axis name used by a lens_jax model (lens_jax/models/layers.py lists them). A rule for any
# other name is a typo and raises.
PARAM_NAMES = ("layers", "embed", "mlp", "heads", "kv_heads", "head_dim", "qkv", "mod", "text_embed",
               "time_freq", "time_embed", "in_channels", "out_channels", "norm", "text_norm", "vocab", "expert",
               "conv_h", "conv_w", "conv_in", "conv_out")
ACTIVATION_NAMES = ("act_batch", "act_seq", "act_embed", "act_heads", "act_kv", "act_mlp")
KNOWN_LOGICAL_NAMES = frozenset(PARAM_NAMES + ACTIVATION_NAMES)

# Parameters: FSDP over the model width, tensor parallelism over heads / MLP hidden / modulation.
# Activations: batch over (fsdp, data) (see BATCH_AXES); heads and MLP hidden over tensor.
DEFAULT_RULES: Tuple[Rule, ...] = (
    ("layers", None), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"),
    ("head_dim", None), ("qkv", None), ("mod", "tensor"), ("text_embed", None), ("time_freq", None),
    ("time_embed", "tensor"), ("in_channels", None), ("out_channels", None), ("norm", None),
    ("text_norm", None), ("vocab", None), ("expert", None), ("conv_h", None), ("conv_w", None),
    ("conv_in", None), ("conv_out", None),
    ("act_batch", BATCH_AXES), ("act_seq", None), ("act_embed", None), ("act_heads", "tensor"),
    ("act_kv", None), ("act_mlp", "tensor"),
)

_ACT_RULES: Tuple[Rule, ...] = (("act_batch", BATCH_AXES), ("act_seq", None), ("act_embed", None),
                                ("act_heads", "tensor"), ("act_kv", None), ("act_mlp", "tensor"))

# The frozen FLUX.2 VAE: replicated weights (84 M), batch-parallel activations.
VAE_RULES: Tuple[Rule, ...] = (("conv_h", None), ("conv_w", None), ("conv_in", None), ("conv_out", None),
                               ("norm", None)) + _ACT_RULES

# The frozen GPT-OSS encoder (~20 B parameters in bf16 at full scale): FSDP over the width, attention heads
# and the expert MLP over 'tensor', experts and vocabulary unsharded (32 experts would not divide fsdp = 64).
TEXT_ENCODER_RULES: Tuple[Rule, ...] = (("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"),
                                        ("head_dim", None), ("mlp", "tensor"), ("expert", None), ("vocab", None),
                                        ("norm", None)) + _ACT_RULES


# ----------------------------------------------------------------------------- mesh

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


def _dcn(dcn_shape: Optional[Sequence[int]]) -> Tuple[int, ...]:
    dcn = tuple(int(s) for s in (dcn_shape if dcn_shape is not None else (1,) * len(MESH_AXES)))
    if len(dcn) != len(MESH_AXES) or any(s < 1 for s in dcn):
        raise ValueError(f"mesh dcn_shape {dcn} must be {len(MESH_AXES)} positive sizes {MESH_AXES} (no -1)")
    return dcn


def hybrid_device_array(ici_shape: Sequence[int], dcn_shape: Sequence[int], devices: Sequence[Any],
                        simulate_granules: bool = False) -> np.ndarray:
    """Devices laid out as an (ici * dcn) array: slices (TPU) or processes (GPU/CPU) along the DCN factors.

    simulate_granules: treat consecutive blocks of len(devices)/prod(dcn) devices as the slices (fake CPU
    devices for tests and compile_only, which all live in one process).
    """
    from jax.experimental import mesh_utils
    n_gran = math.prod(dcn_shape)
    if simulate_granules:
        per = len(devices) // n_gran
        granules = [list(devices[i * per:(i + 1) * per]) for i in range(n_gran)]
        blocks = np.empty(tuple(dcn_shape), dtype=object)
        for idx, g in zip(np.ndindex(*dcn_shape), granules):
            blocks[idx] = np.asarray(g, dtype=object).reshape(tuple(ici_shape))
        return np.block(blocks.tolist())
    by_slice = hasattr(devices[0], "slice_index")
    key = "slice_index" if by_slice else "process_index"
    found = len({getattr(d, key) for d in devices})
    if found != n_gran:
        raise ValueError(f"config.mesh.dcn_shape={tuple(dcn_shape)} needs {n_gran} "
                         f"{'slices' if by_slice else 'processes'} but the {len(devices)} devices belong to "
                         f"{found}; set dcn_shape so its product is {found} (or (1, 1, 1) on one host)")
    return mesh_utils.create_hybrid_device_mesh(tuple(ici_shape), tuple(dcn_shape), devices,
                                                process_is_granule=not by_slice)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Optional[Sequence[Any]] = None,
              dcn_shape: Optional[Sequence[int]] = None, simulate_granules: bool = False) -> jax.sharding.Mesh:
    """The ('data', 'fsdp', 'tensor') mesh; `shape` is per slice (ICI), `dcn_shape` across slices/hosts.

    The global mesh shape is shape * dcn_shape elementwise. Axis types are explicit: all `AxisType.Auto`.
    """
    devices = list(devices if devices is not None else jax.devices())
    dcn = _dcn(dcn_shape)
    n_gran = math.prod(dcn)
    if len(devices) % n_gran:
        raise ValueError(f"config.mesh.dcn_shape={dcn} ({n_gran} slices) does not divide {len(devices)} devices")
    ici = resolve_mesh_shape(shape, len(devices) // n_gran)
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if n_gran == 1:
        return jax.make_mesh(ici, MESH_AXES, axis_types=axis_types, devices=devices)
    arr = hybrid_device_array(ici, dcn, devices, simulate_granules)
    return jax.sharding.Mesh(arr, MESH_AXES, axis_types=axis_types)


def mesh_from_config(config, devices: Optional[Sequence[Any]] = None, simulate_granules: bool = False):
    """`make_mesh(config.mesh.shape, dcn_shape=config.mesh.get('dcn_shape'))`."""
    m = config.mesh
    return make_mesh(m.shape, devices, dcn_shape=m.get("dcn_shape", None), simulate_granules=simulate_granules)


def global_mesh_shape(config, num_devices: int) -> Tuple[int, ...]:
    """The resolved (data, fsdp, tensor) sizes for `num_devices` devices (no devices needed)."""
    dcn = _dcn(config.mesh.get("dcn_shape", None))
    if num_devices % math.prod(dcn):
        raise ValueError(f"config.mesh.dcn_shape={dcn} does not divide {num_devices} devices")
    ici = resolve_mesh_shape(config.mesh.shape, num_devices // math.prod(dcn))
    return tuple(a * b for a, b in zip(ici, dcn))


# ----------------------------------------------------------------------------- rules

def _axes(target) -> Tuple[str, ...]:
    return () if target is None else ((target,) if isinstance(target, str) else tuple(target))


def validate_rules(rules: Sequence[Rule], known_names: Optional[Iterable[str]] = None) -> Tuple[Rule, ...]:
    """Rules must name each logical axis once, only known mesh axes and only logical names a model uses.

    known_names: the logical names allowed (default: every name used by a lens_jax model).
    """
    known = KNOWN_LOGICAL_NAMES if known_names is None else frozenset(known_names)
    seen: Dict[str, Any] = {}
    out = []
    for rule in rules:
        if len(rule) != 2:
            raise ValueError(f"sharding rule {rule!r} must be a (logical_name, mesh_axes) pair")
        name, target = rule
        if name in seen:
            raise ValueError(f"logical axis {name!r} has two sharding rules: {seen[name]!r} and {target!r}")
        if name not in known:
            raise ValueError(f"sharding rule for unknown logical axis {name!r}; no lens_jax model uses it "
                             f"(known names: {sorted(known)})")
        axes = _axes(target)
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ValueError(f"rule for {name!r} names unknown mesh axes {bad}; mesh axes are {MESH_AXES}")
        if len(set(axes)) != len(axes):
            raise ValueError(f"rule for {name!r} names a mesh axis twice: {target!r}")
        seen[name] = target
        out.append((name, None if target is None else (target if isinstance(target, str) else tuple(target))))
    return tuple(out)


def check_rule_conflicts(logical_specs, rules: Sequence[Rule]) -> None:
    """Raises if one array's rules put two of its dimensions on the same mesh axis (names the array)."""
    table = {n: _axes(t) for n, t in rules}
    bad = []
    flat = jax.tree_util.tree_flatten_with_path(logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
    for path, spec in flat:
        if not isinstance(spec, PartitionSpec):
            continue
        used: Dict[str, str] = {}
        for name in spec:
            for n in ((name,) if isinstance(name, str) or name is None else name):
                if n is None:
                    continue
                for ax in table.get(n, ()):
                    if ax in used:
                        bad.append(f"{jax.tree_util.keystr(path)} {tuple(spec)}: logical axes {used[ax]!r} and "
                                   f"{n!r} both map to mesh axis {ax!r}")
                    used[ax] = n
    if bad:
        raise ValueError("conflicting sharding rules (change config.sharding.*rules):\n  " + "\n  ".join(bad[:20]))


def logical_shardings(abstract_boxed_tree, mesh, rules: Sequence[Rule]):
    """NamedShardings for a tree whose leaves carry logical names (nn.LogicallyPartitioned).

    Raises if a leaf uses a logical name that has no rule (so nothing is silently replicated) and if two
    dimensions of one array map to the same mesh axis.
    """
    specs = nn.get_partition_spec(abstract_boxed_tree)
    known = {n for n, _ in rules}
    for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)):
        for name in spec:
            for n in ((name,) if isinstance(name, str) or name is None else name):
                if n is not None and n not in known:
                    raise ValueError(f"logical axis {n!r} has no sharding rule; add it to config.sharding.rules")
    check_rule_conflicts(specs, rules)
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


# ----------------------------------------------------------------------------- batches

def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over BATCH_AXES = ('fsdp', 'data'), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shardings(mesh, batches):
    """Shardings mirroring a batch dict, or a tuple/list of micro-batch dicts (arrays or ShapeDtypeStructs)."""
    if isinstance(batches, dict):
        return {k: batch_sharding(mesh, len(np.shape(v))) for k, v in batches.items()}
    return tuple(batch_shardings(mesh, b) for b in batches)


def data_parallel_size(mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def check_batch_divisible(batches, mesh) -> None:
    """Every micro-batch's leading size must divide over the data-parallel axes."""
    dp = data_parallel_size(mesh)
    for i, b in enumerate([batches] if isinstance(batches, dict) else list(batches)):
        for k, v in b.items():
            if v.shape[0] % dp:
                raise ValueError(f"micro-batch {i} field {k!r} has batch {v.shape[0]}, not divisible by the "
                                 f"data-parallel size {dp} (mesh {dict(mesh.shape)})")


def shard_bytes(abstract_tree, shardings) -> int:
    """Bytes one device holds of a (ShapeDtypeStruct) tree under `shardings` (largest shard per array)."""
    total = 0
    for x, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
        shape = s.shard_shape(x.shape)
        total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
    return total


# ----------------------------------------------------------------------------- config checks

FEATURE_MODES = ("cached", "online")


def validate_parallel_config(config) -> None:
    """Checks config.mesh, config.sharding.*rules, config.grad_accum_steps and config.data.features
    without devices; raises ValueError naming the option."""
    m = config.mesh
    try:
        resolve_mesh_shape(m.shape, max(1, math.prod(int(s) for s in m.shape if int(s) > 0)))
        _dcn(m.get("dcn_shape", None))
    except ValueError as e:
        raise ValueError(f"config.mesh: {e}") from None
    sh = config.sharding
    for key in ("rules", "vae_rules", "text_encoder_rules"):
        if key in sh:
            try:
                validate_rules(sh[key])
            except ValueError as e:
                raise ValueError(f"config.sharding.{key}: {e}") from None
    k = int(config.get("grad_accum_steps", 1))
    if k < 1:
        raise ValueError(f"config.grad_accum_steps={k} must be >= 1")
    feats = config.data.get("features", "cached")
    if feats not in FEATURE_MODES:
        raise ValueError(f"config.data.features={feats!r}; choose one of {FEATURE_MODES}")
