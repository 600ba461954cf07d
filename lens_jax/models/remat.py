"""Rematerialisation policies chosen by name from the config.

Blocks tag their main intermediates with `jax.ad_checkpoint.checkpoint_name`:
  'qkv'        the fused QKV projections after QK-norm and RoPE (both streams),
  'attn_out'   the joint attention output (before the out-projections),
  'mlp_hidden' the SwiGLU hidden activations.

Policies:
  'none'             no rematerialisation (save everything; fastest, most memory);
  'full'             save nothing inside a block, recompute the whole block in the backward pass;
  'dots'             save all matmul outputs;
  'dots_no_batch'    save matmul outputs without batch dimensions (i.e. weight-like products);
  'save_qkv_attn'    save only the tagged QKV and attention outputs;
  'offload_qkv_attn' like 'save_qkv_attn' but offload them to host memory (accelerators only).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax

CHECKPOINT_NAMES = ("qkv", "attn_out", "mlp_hidden")

_POLICIES = {
    "none": None,
    "full": lambda: jax.checkpoint_policies.nothing_saveable,
    "dots": lambda: jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_attn": lambda: jax.checkpoint_policies.save_only_these_names("qkv", "attn_out"),
    "offload_qkv_attn": lambda: jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["qkv", "attn_out"],
        offload_src="device", offload_dst="pinned_host"),
}


def available() -> list:
    return sorted(_POLICIES)


def uses_remat(name: str) -> bool:
    check(name)
    return name != "none"


def check(name: str) -> None:
    if name not in _POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; choose one of {sorted(_POLICIES)}")


def get_policy(name: str) -> Optional[Callable]:
    """The `jax.checkpoint` policy for `name` (None for 'none' and for 'full' means save nothing)."""
    check(name)
    make = _POLICIES[name]
    return None if make is None else make()
