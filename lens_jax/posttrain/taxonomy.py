"""The RL prompt taxonomy (spec §8.2): categories -> sub-categories -> concrete items, plus description dimensions.

File format (JSON):
    {"name": str,
     "dimensions": ["Attribute", "Spatial Relationship", "Count", "Interaction", "Color"],   # a subset, no repeats
     "categories": {category: {sub_category: [item, ...], ...}, ...}}
Other top-level keys (a "description", say) are allowed and ignored. Order is kept as written.

`load_taxonomy(path)` validates and raises TaxonomyError (a ValueError) naming the file and the offending key:
a missing key, an empty category / sub-category / item list, a non-string or empty item, an item repeated within
its sub-category (case-insensitive), an unknown or repeated dimension, a JSON key repeated within one object,
or a '/' in a name (item ids are "<category>/<sub_category>/<item>").
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Dict, Iterator, List, Tuple

DIMENSIONS = ("Attribute", "Spatial Relationship", "Count", "Interaction", "Color")
REQUIRED_KEYS = ("name", "dimensions", "categories")


class TaxonomyError(ValueError):
    """An invalid taxonomy file; the message names the file and the offending key."""


@dataclasses.dataclass(frozen=True)
class Taxonomy:
    """A validated taxonomy. categories: {category: {sub_category: (item, ...)}} in file order."""

    name: str
    dimensions: Tuple[str, ...]
    categories: Dict[str, Dict[str, Tuple[str, ...]]]
    path: str = ""

    def items(self) -> Iterator[Tuple[str, str, str]]:
        """(category, sub_category, item) in file order."""
        for cat, subs in self.categories.items():
            for sub, items in subs.items():
                for item in items:
                    yield cat, sub, item

    def counts(self) -> Dict[str, int]:
        """Number of items per category, in file order."""
        return {cat: sum(len(v) for v in subs.values()) for cat, subs in self.categories.items()}

    def __len__(self) -> int:
        return sum(self.counts().values())


def item_id(category: str, sub_category: str, item: str) -> str:
    """The stable id of a taxonomy item: "<category>/<sub_category>/<item>"."""
    return f"{category}/{sub_category}/{item}"


def _no_duplicate_keys(source: str):
    def hook(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise TaxonomyError(f"{source}: key {k!r} appears twice in one JSON object")
            out[k] = v
        return out
    return hook


def _check_name(source: str, where: str, name: Any, what: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise TaxonomyError(f"{source}: {where}: {what} must be a non-empty string, got {name!r}")
    if "/" in name:
        raise TaxonomyError(f"{source}: {where}: {what} {name!r} contains '/' (ids are category/sub_category/item)")
    if name != name.strip():
        raise TaxonomyError(f"{source}: {where}: {what} {name!r} has leading or trailing whitespace")
    return name


def validate_taxonomy(data: Any, source: str = "<taxonomy>") -> Taxonomy:
    """A Taxonomy from parsed JSON `data`; raises TaxonomyError naming `source` and the offending key."""
    if not isinstance(data, dict):
        raise TaxonomyError(f"{source}: the top level must be a JSON object, got {type(data).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise TaxonomyError(f"{source}: missing key(s) {', '.join(map(repr, missing))} "
                            f"(required: {', '.join(REQUIRED_KEYS)})")
    name = data["name"]
    if not isinstance(name, str) or not name.strip():
        raise TaxonomyError(f"{source}: 'name' must be a non-empty string, got {name!r}")

    dims = data["dimensions"]
    if not isinstance(dims, list) or not dims:
        raise TaxonomyError(f"{source}: 'dimensions' must be a non-empty list (a subset of {list(DIMENSIONS)})")
    for j, d in enumerate(dims):
        if d not in DIMENSIONS:
            raise TaxonomyError(f"{source}: dimensions[{j}]: unknown dimension {d!r} (known: {list(DIMENSIONS)})")
        if d in dims[:j]:
            raise TaxonomyError(f"{source}: dimensions[{j}]: dimension {d!r} is listed twice")

    cats = data["categories"]
    if not isinstance(cats, dict) or not cats:
        raise TaxonomyError(f"{source}: 'categories' must be a non-empty object "
                            f"{{category: {{sub_category: [items]}}}}")
    out: Dict[str, Dict[str, Tuple[str, ...]]] = {}
    for cat, subs in cats.items():
        _check_name(source, f"categories[{cat!r}]", cat, "category name")
        if not isinstance(subs, dict) or not subs:
            raise TaxonomyError(f"{source}: categories[{cat!r}]: must be a non-empty object of sub-categories, "
                                f"got {_describe(subs)}")
        out[cat] = {}
        for sub, items in subs.items():
            where = f"categories[{cat!r}][{sub!r}]"
            _check_name(source, where, sub, "sub-category name")
            if not isinstance(items, list) or not items:
                raise TaxonomyError(f"{source}: {where}: must be a non-empty list of items, got {_describe(items)}")
            seen: Dict[str, int] = {}
            for j, item in enumerate(items):
                if not isinstance(item, str):
                    raise TaxonomyError(f"{source}: {where}[{j}]: items must be strings, got "
                                        f"{type(item).__name__} {item!r}")
                _check_name(source, f"{where}[{j}]", item, "item")
                low = item.casefold()
                if low in seen:
                    raise TaxonomyError(f"{source}: {where}[{j}]: duplicate item {item!r} "
                                        f"(same as [{seen[low]}] {items[seen[low]]!r})")
                seen[low] = j
            out[cat][sub] = tuple(items)
    return Taxonomy(name=name, dimensions=tuple(dims), categories=out, path=source)


def _describe(v: Any) -> str:
    if isinstance(v, (list, dict)) and not v:
        return "an empty " + ("list" if isinstance(v, list) else "object")
    return f"{type(v).__name__} {str(v)[:60]!r}"


def load_taxonomy(path: str) -> Taxonomy:
    """Reads and validates a taxonomy JSON file (format in the module docstring)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise TaxonomyError(f"{path}: cannot read the taxonomy file ({e.strerror or e})") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys(path))
    except TaxonomyError:
        raise
    except ValueError as e:
        raise TaxonomyError(f"{path}: not valid JSON ({e})") from None
    return validate_taxonomy(data, path)
