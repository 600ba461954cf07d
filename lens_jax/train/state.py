"""The train state, a plain pytree {params, opt_state, ema_params, step, rng}, created sharded.

`create_train_state` follows the abstract-first recipe (JAX_STYLE rule 5): `jax.eval_shape` of the
init function gives shapes and logical names, the rules give mesh shardings, and one jitted init with
those `out_shardings` materialises every array directly where it lives (parameters, both Adam moments
and the EMA copy are never whole on one device).

Frozen models (the VAE and text encoder of online encoding) get the same treatment without optimiser
state: `abstract_frozen_variables` gives their sharded abstract tree (an Orbax restore target for
`lens_jax.checkpoints.orbax_io.restore_weights`) and `place_frozen_variables` puts host arrays there.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lens_jax.train import sharding as sharding_lib


def _init_fn(model, optimizer, dummy_inputs: Dict[str, Any], use_ema: bool) -> Callable:
    def init(rng):
        params = model.init(rng, **dummy_inputs)["params"]          # boxed with logical names
        opt_state = optimizer.init(params)                          # mirrors the boxes
        return dict(params=params, opt_state=opt_state, ema_params=params if use_ema else None,
                    step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(jax.random.fold_in(rng, 1)))
    return init


def abstract_train_state(model, optimizer, dummy_inputs, mesh, rules, use_ema: bool) -> Tuple[Any, Any]:
    """(abstract unboxed state, its NamedShardings) without allocating anything."""
    init = _init_fn(model, optimizer, dummy_inputs, use_ema)
    boxed = jax.eval_shape(init, jax.random.key(0))
    shardings = sharding_lib.logical_shardings(boxed, mesh, rules)
    sharding_lib.check_divisible(nn.meta.unbox(boxed), shardings)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nn.meta.unbox(boxed), shardings)
    return abstract, shardings


def create_train_state(model, optimizer, dummy_inputs, mesh, rules, seed: int, use_ema: bool):
    """Returns (state, shardings); parameters are created already sharded."""
    init = _init_fn(model, optimizer, dummy_inputs, use_ema)
    _, shardings = abstract_train_state(model, optimizer, dummy_inputs, mesh, rules, use_ema)
    with jax.set_mesh(mesh):
        state = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(jax.random.key(seed))
    return state, shardings


def state_bytes_per_device(abstract_state) -> Dict[str, int]:
    """Bytes per device of each state entry (params, opt_state, ema_params, ...) under its shardings."""
    out = {}
    for k, v in abstract_state.items():
        leaves = [x for x in jax.tree.leaves(v)]
        out[k] = sharding_lib.shard_bytes(leaves, [x.sharding for x in leaves]) if leaves else 0
    return out


def param_count(state) -> int:
    return int(sum(x.size for x in jax.tree.leaves(state["params"])))


# ----------------------------------------------------------------------------- frozen models

def abstract_frozen_variables(model, init_args: Sequence[Any], mesh, rules, dtype=None,
                              collections: Optional[Sequence[str]] = None) -> Tuple[Any, Any]:
    """(abstract unboxed variables, NamedShardings) of a frozen model from `jax.eval_shape(model.init)`.

    init_args: positional inputs of `model.init` (arrays or ShapeDtypeStructs). dtype: cast floating
    variables (e.g. bf16 weights for a frozen encoder). collections: keep only these (default: all).
    """
    boxed = jax.eval_shape(lambda r, *args: model.init(r, *args), jax.random.key(0), *init_args)
    if collections is not None:
        boxed = {k: v for k, v in boxed.items() if k in collections}
    shardings = sharding_lib.logical_shardings(boxed, mesh, rules)
    unboxed = nn.meta.unbox(boxed)
    sharding_lib.check_divisible(unboxed, shardings)

    def spec(x, s):
        dt = dtype if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
        return jax.ShapeDtypeStruct(x.shape, dt, sharding=s)
    return jax.tree.map(spec, unboxed, shardings), shardings


def place_frozen_variables(variables, abstract) -> Any:
    """Host (or device) variables -> arrays with `abstract`'s dtypes and shardings."""
    variables = nn.meta.unbox(variables)
    # Through host memory, so nothing is first gathered whole on device 0.
    return jax.tree.map(lambda x, a: jax.device_put(np.asarray(x).astype(a.dtype), a.sharding), variables, abstract)
