"""Key and shape validation shared by every checkpoint converter, plus nested-tree helpers."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Sequence, Tuple

import numpy as np

Shape = Tuple[int, ...]


class CheckpointKeyError(KeyError):
    """A source checkpoint has missing, unexpected or mis-shaped tensors. The message lists them."""

    def __str__(self) -> str:  # KeyError would repr() the message and escape its newlines.
        return str(self.args[0]) if self.args else ""


def _listing(title: str, items: Sequence[str], limit: int = 40) -> str:
    lines = [f"  {title} ({len(items)}):"]
    lines += [f"    {s}" for s in items[:limit]]
    if len(items) > limit:
        lines.append(f"    ... and {len(items) - limit} more")
    return "\n".join(lines)


def check_state_dict(expected: Mapping[str, Shape], found: Mapping[str, Shape], what: str,
                     ignore_unexpected: Iterable[str] = ()) -> None:
    """Raises CheckpointKeyError unless `found` has exactly the `expected` names and shapes.

    Args:
      expected: tensor name -> shape the converter needs (source layout, e.g. PyTorch [out, in]).
      found: tensor name -> shape present in the checkpoint.
      what: a human-readable name of the checkpoint for the message.
      ignore_unexpected: name prefixes that may be present and are deliberately not used.
    """
    ignore = tuple(ignore_unexpected)
    missing = sorted(k for k in expected if k not in found)
    unexpected = sorted(k for k in found if k not in expected and not (ignore and k.startswith(ignore)))
    misshaped = sorted(f"{k}: checkpoint {tuple(found[k])}, expected {tuple(expected[k])}"
                       for k in expected if k in found and tuple(found[k]) != tuple(expected[k]))
    if missing or unexpected or misshaped:
        parts = [f"{what}: the checkpoint does not match the model configuration."]
        if missing:
            parts.append(_listing("missing keys", missing))
        if unexpected:
            parts.append(_listing("unexpected keys", unexpected))
        if misshaped:
            parts.append(_listing("mis-shaped keys", misshaped))
        raise CheckpointKeyError("\n".join(parts))


def set_path(tree: Dict[str, Any], path: Sequence[str], value: Any) -> None:
    """tree[p0][p1]...[pn] = value, creating dicts on the way; refuses to overwrite."""
    node = tree
    for p in path[:-1]:
        node = node.setdefault(p, {})
    if path[-1] in node:
        raise ValueError(f"duplicate destination {'/'.join(path)}")
    node[path[-1]] = value


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{'a': {'b': x}} -> {'a/b': x}."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, name))
        else:
            out[name] = v
    return out


def check_tree_shapes(expected: Mapping[str, Any], got: Mapping[str, Any], what: str) -> None:
    """Checks that a converted tree has exactly the structure and shapes of a target tree.

    `expected` may hold arrays or `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape(model.init, ...)`).
    """
    e = {k: tuple(np.shape(v)) if not hasattr(v, "shape") else tuple(v.shape) for k, v in flatten(expected).items()}
    g = {k: tuple(np.shape(v)) for k, v in flatten(got).items()}
    check_state_dict(e, g, what)
