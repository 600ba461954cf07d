"""Low-rank adapters (LoRA) on the DiT's linear layers: the spec, the train policy, merge and switch-off.

    spec = LoraSpec(rank=64, alpha=128)                 # LENS_SPEC §8.5: scale alpha / rank = 2
    model = MMDiT(cfg, lora=spec)                       # Dense layers matching spec.targets own lora_a / lora_b
    policy = lora_policy()                              # train the adapters, freeze the base (a frozen subtree)
    ref = disable(params)                               # the frozen reference: the base with adapters off
    merged = merge(params, spec)                        # a plain-DiT weight tree (sample / eval / export)

An adapted layer computes y = x W + b + (alpha / r) (x A) B with A [*in, r] and B [r, *out] (layers.Dense);
B starts at zero, so an adapted model at init computes exactly what its base computes. Adapters carry the
logical axis names of their kernel's input (A) and output (B) axes, so they shard like their kernels; the
rank axis is unsharded. With scanned blocks every adapter has the leading 'layers' axis of its kernel.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Tuple

import jax
import jax.numpy as jnp

from lens_jax.train.optim import path_str

#: Both streams' fused QKV and attention outputs and both SwiGLU MLPs of every double-stream block
#: (module paths of scanned 'transformer_blocks/...' and unrolled 'transformer_blocks_<i>/...' layouts).
DEFAULT_TARGETS = (r"transformer_blocks(_\d+)?/(attn/(img_qkv|txt_qkv|to_out|to_add_out)"
                   r"|(img_mlp|txt_mlp)/w[123])")
LORA_LEAVES = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """rank r > 0, alpha (scale alpha / r) and the regex of module paths that get adapters."""
    rank: int = 64
    alpha: float = 128.0
    targets: str = DEFAULT_TARGETS

    def __post_init__(self):
        if int(self.rank) <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ValueError(f"LoRA targets {self.targets!r} is not a regex: {e}") from None

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.rank)

    def applies_to(self, module_path: str) -> bool:
        return re.fullmatch(self.targets, module_path) is not None


def is_lora_path(path: str) -> bool:
    return path.rsplit("/", 1)[-1] in LORA_LEAVES


def lora_policy() -> Tuple[Tuple[str, Any], ...]:
    """The optimiser policy (lens_jax/train/optim.py) that trains only the adapters."""
    return ((r"(.*/)?lora_[ab]", 1.0), (r".*", None))


def _map_with_path(fn, tree):
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), tree)


def has_lora(params) -> bool:
    return any(is_lora_path(path_str(p)) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0])


def disable(params) -> Any:
    """The same tree with every lora_b zero: the adapted model then computes its base exactly."""
    return _map_with_path(lambda p, x: jnp.zeros_like(x) if p.endswith("lora_b") else x, params)


def split(params) -> Tuple[Any, Any]:
    """(base tree without adapter leaves, {module path: {'lora_a', 'lora_b'}}) of a nested dict tree."""
    base, adapters = {}, {}

    def walk(node, out, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                if "lora_a" in v or "lora_b" in v:
                    adapters[prefix + k] = {n: v[n] for n in LORA_LEAVES if n in v}
                out[k] = {}
                walk({n: x for n, x in v.items() if n not in LORA_LEAVES}, out[k], prefix + k + "/")
            else:
                out[k] = v
    walk(dict(params), base, "")
    return base, adapters


def with_base(base, params) -> Any:
    """`params` (an adapted tree) with every non-adapter leaf taken from `base` (a plain tree)."""
    def walk(node, b):
        return {k: (walk(v, b[k]) if isinstance(v, dict) else (v if k in LORA_LEAVES else b[k]))
                for k, v in node.items()}
    return walk(dict(params), dict(base))


def merge(params, spec: LoraSpec) -> Any:
    """A plain weight tree: kernel + (alpha / r) A B for every adapted layer, adapter leaves removed.

    Computed in float32 and cast back to the kernel's dtype. Works for scanned ('layers'-stacked) and
    unrolled layouts."""
    base, adapters = split(params)

    def merged_kernel(kernel, a, b):
        stacked = a.ndim + b.ndim - 2 > kernel.ndim          # a leading 'layers' axis on all three
        af, bf = a.astype(jnp.float32), b.astype(jnp.float32)
        if stacked:
            delta = jax.vmap(lambda x, y: jnp.tensordot(x, y, axes=1))(af, bf)
        else:
            delta = jnp.tensordot(af, bf, axes=1)
        if delta.shape != kernel.shape:
            raise ValueError(f"adapter product {delta.shape} does not match its kernel {kernel.shape}")
        return (kernel.astype(jnp.float32) + spec.scale * delta).astype(kernel.dtype)

    out = jax.tree.map(lambda x: x, base)
    for path, ad in adapters.items():
        node = out
        for k in path.split("/"):
            node = node[k]
        if "kernel" not in node or set(ad) != set(LORA_LEAVES):
            raise ValueError(f"layer {path} has adapters {sorted(ad)} but needs a kernel, lora_a and lora_b")
        node["kernel"] = merged_kernel(node["kernel"], ad["lora_a"], ad["lora_b"])
    return out


def count(params) -> int:
    """Number of adapter parameters."""
    return int(sum(x.size for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
                   if is_lora_path(path_str(p))))


def graft(base, adapters) -> Any:
    """Inverse of `split`: the plain tree `base` with the {module path: {'lora_a', 'lora_b'}} adapters added."""
    out = jax.tree.map(lambda x: x, dict(base))
    for path, ad in adapters.items():
        node = out
        for k in path.split("/"):
            node = node[k]
        node.update(ad)
    return out
