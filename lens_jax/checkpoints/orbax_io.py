"""The one place lens_jax calls Orbax for weights-only checkpoints (converted models, exports).

A weights checkpoint is a directory holding an Orbax `StandardCheckpointer` tree under `tree/` and a
`lens_jax.json` sidecar with what it is (model kind, preset, config fields, source, dtype), so a
loader can check it is restoring into the architecture it expects.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

META_FILE = "lens_jax.json"
TREE_DIR = "tree"


def save_weights(directory: str, tree: Any, meta: Optional[Mapping[str, Any]] = None, overwrite: bool = False) -> str:
    """Saves a pytree of arrays (NumPy or jax) and a JSON sidecar; returns the directory."""
    directory = os.path.abspath(directory)
    if os.path.exists(os.path.join(directory, TREE_DIR)) and not overwrite:
        raise FileExistsError(f"{directory} already holds a checkpoint; pass overwrite=True (--overwrite) to replace it")
    os.makedirs(directory, exist_ok=True)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(directory, TREE_DIR), tree, force=overwrite)
        ckptr.wait_until_finished()
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(dict(meta or {}), f, indent=2, default=_json_default)
    return directory


def load_meta(directory: str) -> dict:
    path = os.path.join(directory, META_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} is not a lens_jax weights checkpoint (no {META_FILE})")
    with open(path) as f:
        return json.load(f)


def restore_weights(directory: str, target: Any = None) -> Any:
    """Restores the tree; with `target` (arrays or jax.ShapeDtypeStruct, possibly sharded) the result
    takes its structure, dtypes and shardings, and a structure mismatch raises."""
    path = os.path.join(os.path.abspath(directory), TREE_DIR)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no weights checkpoint at {path}")
    with ocp.StandardCheckpointer() as ckptr:
        if target is None:
            return ckptr.restore(path)
        return ckptr.restore(path, jax.tree.map(_abstract, target))


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))


def _json_default(o):
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    return str(o)
