"""Named architecture presets with field overrides, shared by the model config dataclasses."""
from __future__ import annotations

import dataclasses
from typing import Mapping, TypeVar

T = TypeVar("T")


def from_preset(label: str, presets: Mapping[str, T], name: str, overrides: Mapping) -> T:
    """`presets[name]` with dataclass field `overrides`; lists become tuples.

    Raises ValueError naming the known presets or the valid fields.
    """
    if name not in presets:
        raise ValueError(f"unknown {label} preset {name!r}; known presets: {sorted(presets)}")
    base = presets[name]
    fields = {f.name for f in dataclasses.fields(base)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"unknown {type(base).__name__} field(s) {bad}; valid fields: {sorted(fields)}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return dataclasses.replace(base, **overrides)
