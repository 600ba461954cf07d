"""The train state, a plain pytree {params, opt_state, ema_params, step, rng}, created sharded.

`create_train_state` follows the abstract-first recipe (JAX_STYLE rule 5): `jax.eval_shape` of the
init function gives shapes and logical names, the rules give mesh shardings, and one jitted init with
those `out_shardings` materialises every array directly where it lives.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def param_count(state) -> int:
    return int(sum(x.size for x in jax.tree.leaves(state["params"])))
