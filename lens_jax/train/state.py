"""The train state of named sub-networks, created abstract-first and sharded by each network's rules.

    spec = TrainSpec([Net("dit", init=..., rules=..., optimizer=tx, schedule=lr, ema_decay=0.995),
                      Net("vae", init=..., rules=VAE_RULES)], seed=0)        # a frozen net: no optimizer
    abstract, shardings = spec.abstract(mesh)                             # nothing allocated
    state = spec.create(mesh)                                             # every array born sharded

The state is a plain pytree

    {"step": int32 [], "rng": uint32 key data,
     "nets": {name: {"params": tree,                 # every net: its weight tree (what its apply takes)
                     "opt_state": tree,              # trainable nets only (Optax, over the trained leaves)
                     "ema": tree}}}                  # nets with an EMA only (the trained leaves)

A frozen net carries no optimiser state and no EMA, so a frozen 4.1B base holds no Adam moments. A trainable
net may freeze part of itself with an optimiser policy (`Net.policy`, see lens_jax/train/optim.py): the frozen
leaves get no gradient, no optimiser state and no EMA (`optax.MaskedNode` stands in for them in the
`opt_state` and `ema` trees; `partition` / `combine` convert).

Creation follows JAX_STYLE rule 5: `jax.eval_shape` of the init gives shapes and logical names, each net's
rules give its NamedShardings (optimiser moments and EMA mirror their parameters' boxes), and one jitted init
with those `out_shardings` materialises every array where it lives. Nets whose weights come from elsewhere
(`loaded`: a converted checkpoint, another run) are not initialised at all; their optimiser state and EMA are
built from the loaded weights. Initialisation keys: net 0 uses key(seed), net k > 0 fold_in(fold_in(key(seed),
2), k); the state's RNG is fold_in(key(seed), 1).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lens_jax.train import sharding as sharding_lib
from lens_jax.train.optim import Policy, path_str, policy_multiplier

RESERVED_NAMES = ("train", "data_iter", "config", "state")
EMA_SUFFIX = ".ema"


def _is_box(x) -> bool:
    return isinstance(x, (nn.meta.AxisMetadata, optax.MaskedNode))


@dataclasses.dataclass(frozen=True)
class Net:
    """One named sub-network of the train state.

    init: key -> its weight tree (leaves boxed with logical axis names, e.g. `model.init(...)["params"]`).
    rules: the logical-axis rules that shard it (lens_jax/train/sharding.py).
    optimizer: an Optax transformation for a trainable net; None = frozen. schedule: its learning rate (the
      `lr/<name>` metric). policy: (regex, lr multiplier or None) pairs; None freezes matching leaves.
    ema_decay: > 0 (or a function of the step) keeps an EMA of the trained leaves, updated after every step in
      which this net was updated.
    dtype: cast the floating leaves (e.g. bf16 frozen encoders). checkpoint: saved with the train state; a net
      with `checkpoint=False` is rebuilt from `load` (or init) at every start.
    load: abstract sharded weight tree -> weights, for a fresh start from a converted checkpoint or another run.
    """
    name: str
    init: Callable[[jax.Array], Any]
    rules: Sequence[Tuple[str, Any]] = ()
    optimizer: Optional[optax.GradientTransformation] = None
    schedule: Optional[Callable[[Any], Any]] = None
    policy: Policy = ()
    ema_decay: Union[float, Callable[[Any], Any]] = 0.0
    dtype: Any = None
    checkpoint: bool = True
    load: Optional[Callable[[Any], Any]] = None

    def __post_init__(self):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name or "") or self.name in RESERVED_NAMES:
            raise ValueError(f"net name {self.name!r} must be an identifier other than {RESERVED_NAMES}")
        if self.optimizer is None and (callable(self.ema_decay) or self.ema_decay):
            raise ValueError(f"net {self.name!r} is frozen (no optimizer) but has an EMA")
        if not callable(self.ema_decay) and not 0.0 <= float(self.ema_decay) < 1.0:
            raise ValueError(f"net {self.name!r}: ema_decay={self.ema_decay} must be in [0, 1)")
        if self.optimizer is not None and not self.checkpoint:
            raise ValueError(f"net {self.name!r} is trained, so it must be checkpointed (checkpoint=True)")

    @property
    def trainable(self) -> bool:
        return self.optimizer is not None

    @property
    def has_ema(self) -> bool:
        return self.trainable and (callable(self.ema_decay) or float(self.ema_decay) > 0)


def partition(net: Net, params) -> Tuple[Any, Any]:
    """(trained leaves, frozen leaves) of a net's weight tree.

    Without a policy the split is whole: (params, None) for a trainable net, (None, params) for a frozen one.
    With a policy both parts keep the tree's structure with optax.MaskedNode() in place of the other part's
    leaves (boxed leaves with logical names count as one leaf each)."""
    if not net.policy:
        return (params, None) if net.trainable else (None, params)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)
    mask = [policy_multiplier(net.policy, path_str(p)) is not None for p, _ in flat]
    trained = [x if m else optax.MaskedNode() for (_, x), m in zip(flat, mask)]
    frozen = [optax.MaskedNode() if m else x for (_, x), m in zip(flat, mask)]
    return jax.tree.unflatten(treedef, trained), jax.tree.unflatten(treedef, frozen)


def combine(trained, frozen) -> Any:
    """Inverse of `partition`: one tree taking each leaf from whichever part holds it."""
    if frozen is None:
        return trained
    return jax.tree.map(lambda a, b: b if isinstance(a, optax.MaskedNode) else a, trained, frozen,
                        is_leaf=lambda x: isinstance(x, optax.MaskedNode))


class TrainSpec:
    """The nets of one phase's train state, in declaration order (see the module docstring)."""

    def __init__(self, nets: Sequence[Net], seed: int = 0):
        names = [n.name for n in nets]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"a train state needs distinct net names; got {names}")
        self.nets: Dict[str, Net] = {n.name: n for n in nets}
        self.seed = int(seed)

    def __getitem__(self, name: str) -> Net:
        try:
            return self.nets[name]
        except KeyError:
            raise KeyError(f"no net {name!r} in this train state (nets: {list(self.nets)})") from None

    @property
    def names(self) -> Tuple[str, ...]:
        return tuple(self.nets)

    @property
    def trainable(self) -> Tuple[str, ...]:
        return tuple(n for n, net in self.nets.items() if net.trainable)

    def _key(self, rng, name: str):
        i = list(self.nets).index(name)
        return rng if i == 0 else jax.random.fold_in(jax.random.fold_in(rng, 2), i)

    def _init_weights(self, rng, name: str):
        net = self.nets[name]
        params = net.init(self._key(rng, name))
        if net.dtype is not None:
            params = jax.tree.map(lambda x: x.astype(net.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                  params)
        return params

    def _init_fn(self, loaded_names: Sequence[str] = ()) -> Callable:
        def init(rng, loaded):
            nets = {}
            for name, net in self.nets.items():
                params = loaded[name] if name in loaded_names else self._init_weights(rng, name)
                entry = {"params": params}
                if net.trainable:
                    trained, _ = partition(net, params)
                    entry["opt_state"] = net.optimizer.init(trained)
                    if net.has_ema:   # own buffers: a loaded input forwarded twice could not be donated
                        entry["ema"] = jax.tree.map(jnp.copy, trained)
                nets[name] = entry
            return dict(nets=nets, step=jnp.zeros((), jnp.int32),
                        rng=jax.random.key_data(jax.random.fold_in(rng, 1)))
        return init

    def abstract(self, mesh) -> Tuple[Any, Any]:
        """(abstract unboxed state with shardings on every leaf, the NamedShardings tree); allocates nothing."""
        boxed = jax.eval_shape(self._init_fn(), jax.random.key(0), {})
        shardings = dict(step=sharding_lib.replicated(mesh), rng=sharding_lib.replicated(mesh), nets={})
        for name, net in self.nets.items():
            sh = sharding_lib.logical_shardings(boxed["nets"][name], mesh, net.rules)
            sharding_lib.check_divisible(nn.meta.unbox(boxed["nets"][name]), sh)
            shardings["nets"][name] = sh
        unboxed = nn.meta.unbox(boxed)
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), unboxed, shardings)
        return abstract, shardings

    def create(self, mesh, loaded: Optional[Mapping[str, Any]] = None) -> Any:
        """A fresh sharded state; `loaded` = {net: weights already placed as the abstract params say}."""
        loaded = dict(loaded or {})
        unknown = set(loaded) - set(self.nets)
        if unknown:
            raise KeyError(f"loaded weights for unknown nets {sorted(unknown)} (nets: {list(self.nets)})")
        _, shardings = self.abstract(mesh)
        init = self._init_fn(tuple(loaded))
        loaded_sh = {n: shardings["nets"][n]["params"] for n in loaded}
        with jax.set_mesh(mesh):
            fn = jax.jit(lambda r, ld: nn.meta.unbox(init(r, ld)), in_shardings=(None, loaded_sh),
                         out_shardings=shardings)
            return fn(jax.random.key(self.seed), loaded)

    def init_weights(self, mesh, name: str) -> Any:
        """Net `name`'s initial weights alone (as `create` makes them), sharded."""
        _, shardings = self.abstract(mesh)
        with jax.set_mesh(mesh):
            fn = jax.jit(lambda r: nn.meta.unbox(self._init_weights(r, name)),
                         out_shardings=shardings["nets"][name]["params"])
            return fn(jax.random.key(self.seed))

    # ------------------------------------------------------------------ views of a state

    def eval_params(self, state, name: str) -> Any:
        """The weights of `name` ('dit') or of its EMA ('dit.ema', the frozen leaves filled in)."""
        base, ema = (name[:-len(EMA_SUFFIX)], True) if name.endswith(EMA_SUFFIX) else (name, False)
        entry = state["nets"][self[base].name]
        if not ema:
            return entry["params"]
        if "ema" not in entry:
            raise KeyError(f"net {base!r} keeps no EMA (ema_decay is 0); use {base!r}")
        return combine(entry["ema"], partition(self[base], entry["params"])[1])


def bytes_per_device(abstract_state) -> Dict[str, Dict[str, int]]:
    """{net: {'params', 'opt_state', 'ema'}: bytes one device holds} under the abstract state's shardings."""
    out = {}
    for name, entry in abstract_state["nets"].items():
        out[name] = {}
        for key in ("params", "opt_state", "ema"):
            leaves = jax.tree.leaves(entry.get(key, {}))
            out[name][key] = sharding_lib.shard_bytes(leaves, [x.sharding for x in leaves]) if leaves else 0
    return out


def param_count(state, name: Optional[str] = None) -> int:
    """Parameters of one net, or of every net."""
    nets = state["nets"] if name is None else {name: state["nets"][name]}
    return int(sum(x.size for e in nets.values() for x in jax.tree.leaves(e["params"])))


def abstract_frozen_variables(model, init_args: Sequence[Any], mesh, rules, dtype=None,
                              collections: Optional[Sequence[str]] = None) -> Tuple[Any, Any]:
    """(abstract unboxed variables, NamedShardings) of a frozen model outside a train state (e.g. the
    restore target of an encoder checkpoint). dtype casts floating variables; collections keeps only these."""
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


def place_variables(variables, abstract) -> Any:
    """Host (or device) arrays -> arrays with `abstract`'s dtypes and shardings, through host memory (nothing
    is first gathered whole on one device)."""
    variables = nn.meta.unbox(variables)
    return jax.tree.map(lambda x, a: jax.device_put(np.asarray(x).astype(a.dtype), a.sharding), variables, abstract)
