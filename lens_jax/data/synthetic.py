"""The shapes world: a deterministic, seedable synthetic text-to-image domain (LENS_SPEC §11.6).

Each example is a small RGB image (default 64x64) of 1-4 flat-coloured, non-overlapping objects
(circle / square / triangle, optionally diamond) on a plain background, together with

* a **dense** caption: a long Lens-style paragraph (count summary, every object's colour, shape,
  size and position, pairwise relations, the background), and
* a **brief** caption: a short GenEval-like phrase ("a red circle and two blue squares"),
* the ground-truth metadata (JSON).

Layout: objects sit on a 3x3 grid of cells, one object per cell (centre jittered slightly, always at
least ``2 * cell_margin`` of the image side away from its neighbours), so objects never overlap or
touch. Object sides are fractions of the image side (``ShapesWorldConfig.side_fractions``; by default
``SIZES``, the smallest 0.18, i.e. > 1/6 of the image).

Two layouts (``ShapesWorldConfig.layout``):

* ``random`` (default): a scene's objects take random distinct cells.
* ``canonical``: the cells follow from the scene's object count and the order in which its captions
  name the objects (``CANONICAL_CELLS``): one object in the centre; a pair side by side (left, right)
  or stacked (top, bottom); three in the middle row; four in the corners. Objects are ordered so that
  the colour-shape groups and the shape groups of the captions list them in cell order, and a
  relation caption names the pair in either order ("a circle left of a square" / "a square right of
  a circle"). What an image shows then follows from its caption up to sizes, background and any
  attribute the caption leaves out -- the world GenEval's prompts describe, without the layout
  lottery that a random-cell world adds (RESULTS.md, session 6: a tiny DiT learns the random-cell
  world's layout but not its words within the CPU budget).

The cell geometry is configurable: ``grid_span`` scales the distance between cell centres (1.0: cells
tile the image, centres at 1/6, 1/2 and 5/6 of the side; 1.2 on 80 px images puts the centres at 8, 40
and 72 px, the centres of the DiT's 16-px tokens 0, 2 and 4), and ``jitter`` scales the random offset
within a cell (0 = objects exactly at cell centres).

Rendering is hard-edged (no anti-aliasing) by default, so every pixel of a ground-truth render is
exactly a palette colour and the rule-based evaluator (``lens_jax.eval.shapes_eval``) classifies
it exactly. ``ShapesWorldConfig.antialias > 1`` renders with box-filter supersampling instead.

Training scenes never contain a held-out colour-shape combination
(``ShapesWorldConfig.heldout_combos``); those combinations appear only in evaluation prompts,
where they are reported separately as ``unseen``.

Everything is a pure function of ``(cfg.seed, index)``: ``example(index, cfg)`` is random access,
which is what a Grain ``MapDataset`` source needs (``ShapesWorldSource``, ``make_grain_dataset``).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------

#: Object palette: saturated, well separated colours, RGB uint8 values (0-255).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 135, 0),
    "yellow": (245, 225, 20),
    "green": (30, 170, 50),
    "cyan": (0, 190, 210),
    "blue": (30, 50, 220),
    "purple": (140, 40, 190),
    "pink": (255, 90, 190),
}

#: Background palette (plain, light or dark, far from every object colour), RGB uint8.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "light gray": (205, 205, 205),
    "dark gray": (60, 60, 60),
    "black": (0, 0, 0),
}

#: All shape classes the renderer and evaluator know. The default world uses the first three.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")

#: Object side length (bounding-box side, or circle diameter) as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.18, "medium": 0.23, "large": 0.27}

#: Size words used in captions.
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "small"),
    "medium": ("medium-sized", "mid-sized", "medium"),
    "large": ("large", "big", "large"),
}

GRID = 3  # the image is a GRID x GRID lattice of cells, one object per cell at most

#: Scene layouts (``ShapesWorldConfig.layout``).
LAYOUTS = ("random", "canonical")

#: The canonical layout's (row, col) cells by object count, in caption order; two objects are
#: either side by side or stacked (chosen at random).
CANONICAL_CELLS: dict[int, tuple[tuple[tuple[int, int], ...], ...]] = {
    1: (((1, 1),),),
    2: (((1, 0), (1, 2)), ((0, 1), (2, 1))),
    3: (((1, 0), (1, 1), (1, 2)),),
    4: (((0, 0), (0, 2), (2, 0), (2, 2)),),
}

#: Position phrase for each (row, col) grid cell.
CELL_PHRASES: dict[tuple[int, int], tuple[str, ...]] = {
    (0, 0): ("in the upper left", "in the top left corner", "at the upper left"),
    (0, 1): ("at the top", "in the top center", "at the top middle"),
    (0, 2): ("in the upper right", "in the top right corner", "at the upper right"),
    (1, 0): ("on the left", "at the middle left", "on the left side"),
    (1, 1): ("in the center", "in the middle", "at the center"),
    (1, 2): ("on the right", "at the middle right", "on the right side"),
    (2, 0): ("in the lower left", "in the bottom left corner", "at the lower left"),
    (2, 1): ("at the bottom", "in the bottom center", "at the bottom middle"),
    (2, 2): ("in the lower right", "in the bottom right corner", "at the lower right"),
}

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}

#: GenEval's position shrink factor and decision threshold (LENS_SPEC §11.1).
POSITION_SHRINK = 0.1
POSITION_THRESHOLD = 0.5


# --------------------------------------------------------------------------------------------
# Config and scene types
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShapesWorldConfig:
    """Configuration of the shapes world.

    Attributes:
      image_size: image side in pixels (square images; 64-128 recommended).
      min_objects / max_objects: object count range per training scene (at most GRID**2 = 9).
      shapes: shape classes used (subset of ``SHAPES``).
      colors: object colour names used (subset of ``COLORS``).
      backgrounds: background colour names used in training (subset of ``BACKGROUNDS``).
      eval_background: fixed background for ground-truth evaluation renders.
      sizes: size names used (subset of ``SIZES``).
      heldout_combos: (colour, shape) pairs never rendered in training scenes.
      exclude_heldout: when True (training), ``sample_scene`` never emits a held-out combination.
      homogeneous_prob: probability that all objects of a multi-object scene share one shape
        (helps the counting task).
      cell_margin: minimum distance of an object from its cell border, fraction of image side.
      layout: ``random`` (objects in random distinct cells) or ``canonical`` (cells follow from the
        object count and caption order, ``CANONICAL_CELLS``; 1-4 objects).
      grid_span: distance between neighbouring cell centres as a multiple of image_size / GRID.
      jitter: random offset of an object within its cell as a fraction of the largest offset that
        keeps it ``cell_margin`` inside the cell and inside the image (0 = at the cell centre).
      side_fractions: object sides (circle diameters) of the (small, medium, large) sizes as
        fractions of the image side.
      relation_prob: probability that the brief caption of a two-object scene is a relation phrase ("a red
        circle left of a blue square"); see ``brief_caption``.
      count_weights: relative frequencies of the object counts min_objects..max_objects in
        training scenes (() = uniform).
      antialias: supersampling factor for rendering (1 = hard edges, exact palette colours).
      seed: base seed; ``example(index, cfg)`` is a pure function of (seed, index).
    """

    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    colors: tuple[str, ...] = tuple(COLORS)
    backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)
    eval_background: str = "white"
    sizes: tuple[str, ...] = tuple(SIZES)
    heldout_combos: tuple[tuple[str, str], ...] = (
        ("red", "triangle"), ("blue", "circle"), ("yellow", "square"), ("green", "diamond"))
    exclude_heldout: bool = True
    homogeneous_prob: float = 0.25
    cell_margin: float = 0.02
    antialias: int = 1
    seed: int = 0
    layout: str = "random"
    grid_span: float = 1.0
    jitter: float = 1.0
    side_fractions: tuple[float, float, float] = tuple(SIZES.values())
    count_weights: tuple[float, ...] = ()
    relation_prob: float = 0.25

    def __post_init__(self):
        for s in self.shapes:
            if s not in SHAPES:
                raise ValueError(f"unknown shape {s!r}; known: {SHAPES}")
        for c in self.colors:
            if c not in COLORS:
                raise ValueError(f"unknown colour {c!r}; known: {tuple(COLORS)}")
        for name in ("shapes", "colors", "backgrounds", "sizes"):
            if not getattr(self, name):
                raise ValueError(f"{name} needs at least one name; got {getattr(self, name)!r}")
        for b in tuple(self.backgrounds) + (self.eval_background,):
            if b not in BACKGROUNDS:
                raise ValueError(f"unknown background {b!r}; known: {tuple(BACKGROUNDS)}")
        if not 1 <= self.min_objects <= self.max_objects <= GRID * GRID:
            raise ValueError("need 1 <= min_objects <= max_objects <= 9")
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; known: {LAYOUTS}")
        if self.layout == "canonical" and self.max_objects > max(CANONICAL_CELLS):
            raise ValueError(f"the canonical layout holds at most {max(CANONICAL_CELLS)} objects; "
                             f"got max_objects={self.max_objects}")
        if len(self.side_fractions) != len(SIZES) or not all(0 < f < 1 for f in self.side_fractions):
            raise ValueError(f"side_fractions needs {len(SIZES)} fractions in (0, 1) for {tuple(SIZES)}; "
                             f"got {self.side_fractions!r}")
        n_counts = self.max_objects - self.min_objects + 1
        if self.count_weights and (len(self.count_weights) != n_counts or min(self.count_weights) < 0
                                   or not sum(self.count_weights) > 0):
            raise ValueError(f"count_weights needs {n_counts} non-negative weights (not all 0) for the counts "
                             f"{self.min_objects}..{self.max_objects}; got {self.count_weights!r}")
        if not 0 <= self.relation_prob <= 1:
            raise ValueError(f"relation_prob must be in [0, 1]; got {self.relation_prob!r}")
        if not self.grid_span > 0 or not 0 <= self.jitter <= 1:
            raise ValueError(f"need grid_span > 0 and 0 <= jitter <= 1; got {self.grid_span}, {self.jitter}")
        pitch = self.grid_span / GRID
        for s in self.sizes:
            if s not in SIZES:
                raise ValueError(f"unknown size {s!r}; known: {tuple(SIZES)}")
            side = self.side_fraction(s)
            if side + 2 * self.cell_margin > pitch:
                raise ValueError(f"size {s!r} ({side:.3f} of the image) does not fit a grid cell of "
                                 f"{pitch:.3f} with margin {self.cell_margin}")
            if 0.5 - (GRID - 1) / 2 * pitch - side / 2 < -1e-9:
                raise ValueError(f"size {s!r} ({side:.3f} of the image) in an outer cell crosses the image "
                                 f"border with grid_span {self.grid_span}")

    def side_fraction(self, size: str) -> float:
        """Side (circle diameter) of an object of ``size`` as a fraction of the image side."""
        return float(self.side_fractions[tuple(SIZES).index(size)])

    @property
    def active_heldout(self) -> tuple[tuple[str, str], ...]:
        """Held-out (colour, shape) pairs restricted to this config's colours and shapes."""
        return tuple((c, s) for c, s in self.heldout_combos if c in self.colors and s in self.shapes)

    def allowed_colors(self, shape: str, training: bool = True) -> tuple[str, ...]:
        """Colours a ``shape`` may take; in training held-out combinations are removed."""
        if not (training and self.exclude_heldout):
            return tuple(self.colors)
        held = set(self.active_heldout)
        out = tuple(c for c in self.colors if (c, shape) not in held)
        if not out:
            raise ValueError(f"every colour of {shape!r} is held out")
        return out


#: ShapesWorldConfig fields an experiment sets in its ``config.data.world`` block.
WORLD_FIELDS = ("layout", "grid_span", "jitter", "side_fractions", "count_weights", "backgrounds", "sizes",
                "relation_prob")


def world_config(world=None, **fields) -> ShapesWorldConfig:
    """A ``ShapesWorldConfig`` from an experiment's ``config.data.world`` block plus explicit ``fields``.

    ``world``: a mapping (e.g. an ml_collections ConfigDict) with keys from ``WORLD_FIELDS``, or None for
    the defaults. ``fields``: the other ShapesWorldConfig fields (image_size, seed, ...). Unknown keys and
    invalid values raise ``ValueError`` naming them.
    """
    world = dict(world or {})
    unknown = sorted(set(world) - set(WORLD_FIELDS))
    if unknown:
        raise ValueError(f"unknown shapes-world option(s) {unknown}; known: {WORLD_FIELDS}")
    for key in ("side_fractions", "count_weights"):
        if key in world:
            world[key] = tuple(float(f) for f in world[key])
    for key in ("backgrounds", "sizes"):
        if key in world:
            if isinstance(world[key], str):
                raise ValueError(f"shapes-world option {key} needs a list of names; got {world[key]!r}")
            world[key] = tuple(str(n) for n in world[key])
    return ShapesWorldConfig(**fields, **world)


@dataclass
class SceneObject:
    """One flat-coloured object.

    Attributes:
      shape: shape class name (``SHAPES``).
      color: colour name (``COLORS``).
      size: size name (``SIZES``).
      cx, cy: bounding-box centre in pixels (x right, y down; pixel i covers [i, i+1)).
      side: bounding-box side (circle diameter) in pixels.
      row, col: grid cell (0..2, top-to-bottom / left-to-right).
    """

    shape: str
    color: str
    size: str
    cx: float
    cy: float
    side: float
    row: int = 1
    col: int = 1

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in pixels (continuous coordinates)."""
        h = self.side / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["bbox"] = [round(v, 3) for v in self.bbox]
        d["cx"], d["cy"], d["side"] = round(self.cx, 3), round(self.cy, 3), round(self.side, 3)
        return d


@dataclass
class Scene:
    """A scene: objects on a plain background. ``image_size`` in pixels."""

    objects: list[SceneObject] = field(default_factory=list)
    background: str = "white"
    image_size: int = 64

    def to_json(self) -> str:
        return json.dumps({"image_size": self.image_size, "background": self.background,
                           "objects": [o.to_dict() for o in self.objects]})

    @staticmethod
    def from_json(s: str) -> "Scene":
        d = json.loads(s)
        objs = [SceneObject(shape=o["shape"], color=o["color"], size=o["size"], cx=o["cx"],
                            cy=o["cy"], side=o["side"], row=o["row"], col=o["col"])
                for o in d["objects"]]
        return Scene(objects=objs, background=d["background"], image_size=d["image_size"])


# --------------------------------------------------------------------------------------------
# Sampling and rendering
# --------------------------------------------------------------------------------------------

def place_object(shape: str, color: str, size: str, row: int, col: int,
                 rng: np.random.Generator, cfg: ShapesWorldConfig) -> SceneObject:
    """Create an object of the given attributes in grid cell (row, col) with a random jitter
    (``cfg.jitter`` of the largest) that keeps it at least ``cfg.cell_margin * image_size`` pixels
    inside its cell and inside the image."""
    S = cfg.image_size
    pitch = S * cfg.grid_span / GRID
    side = cfg.side_fraction(size) * S
    edge_gap = (S - GRID * pitch) / 2 + pitch / 2 - side / 2      # outer object edge to the image border
    max_jit = max(0.0, min((pitch - side) / 2 - cfg.cell_margin * S, edge_gap)) * cfg.jitter
    jx, jy = rng.uniform(-max_jit, max_jit, size=2) if max_jit > 0 else (0.0, 0.0)
    border = (S - GRID * pitch) / 2                                  # 0 when the cells tile the image
    cx = border + (col + 0.5) * pitch + jx
    cy = border + (row + 0.5) * pitch + jy
    return SceneObject(shape=shape, color=color, size=size, cx=float(cx), cy=float(cy), side=float(side),
                       row=row, col=col)


def sample_scene(rng: np.random.Generator, cfg: ShapesWorldConfig, training: bool = True) -> Scene:
    """Sample a random training scene: 1..max_objects objects in distinct grid cells.

    With ``training=True`` (and ``cfg.exclude_heldout``) held-out colour-shape combinations are
    never produced. ``cfg.layout`` chooses the cells (module docstring); objects are returned in
    reading order (row, then column).
    """
    if cfg.count_weights:
        w = np.asarray(cfg.count_weights, np.float64)
        n = cfg.min_objects + int(rng.choice(len(w), p=w / w.sum()))
    else:
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    cells = rng.choice(GRID * GRID, size=n, replace=False) if cfg.layout == "random" else None
    homogeneous = n > 1 and rng.random() < cfg.homogeneous_prob
    common_shape = str(rng.choice(cfg.shapes))

    def attributes():
        shape = common_shape if homogeneous else str(rng.choice(cfg.shapes))
        return shape, str(rng.choice(cfg.allowed_colors(shape, training))), str(rng.choice(cfg.sizes))

    if cells is not None:
        objs = [place_object(*attributes(), int(c) // GRID, int(c) % GRID, rng, cfg) for c in cells]
    else:
        attrs = [attributes() for _ in range(n)]
        # Caption order = cell order: group by shape (first appearance), then by colour-shape.
        shape_rank: dict[str, int] = {}
        pair_rank: dict[tuple[str, str], int] = {}
        for shape, color, _ in attrs:
            shape_rank.setdefault(shape, len(shape_rank))
            pair_rank.setdefault((shape, color), len(pair_rank))
        attrs.sort(key=lambda a: (shape_rank[a[0]], pair_rank[(a[0], a[1])]))
        options = CANONICAL_CELLS[n]
        layout = options[int(rng.integers(len(options)))]
        objs = [place_object(*a, row, col, rng, cfg) for a, (row, col) in zip(attrs, layout)]
    objs.sort(key=lambda o: (o.row, o.col))
    return Scene(objects=objs, background=str(rng.choice(cfg.backgrounds)), image_size=cfg.image_size)


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, side: float) -> np.ndarray:
    """Boolean inside-test of ``shape`` with bounding-box side ``side`` centred at the origin.

    ``dx``, ``dy``: offsets of sample points from the centre (same units as ``side``; y down).
    Triangles point up (apex at the top, flat base at the bottom) and fill their bounding box
    (width = height = side); diamonds are squares rotated by 45 degrees.
    """
    h = side / 2
    if shape == "circle":
        return dx * dx + dy * dy <= h * h
    if shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":
        t = (dy + h) / side  # 0 at the apex row, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * h)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= h
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, antialias: int = 1) -> np.ndarray:
    """Render a scene to ``np.uint8 [H, W, 3]`` (H = W = scene.image_size, RGB 0-255).

    With ``antialias == 1`` (default) edges are hard and every pixel is exactly the background or
    an object palette colour (pixel centres are tested). ``antialias = k > 1`` supersamples k x k
    points per pixel and box-averages them (soft edges, mixed colours).
    """
    k = max(1, int(antialias))
    S = scene.image_size
    n = S * k
    coords = (np.arange(n, dtype=np.float64) + 0.5) / k  # sample positions in pixel units
    img = np.empty((n, n, 3), np.uint8)
    img[:] = BACKGROUNDS[scene.background]
    for o in scene.objects:
        x0, y0, x1, y1 = o.bbox
        ys = slice(max(0, int(np.floor(y0 * k)) - 1), min(n, int(np.ceil(y1 * k)) + 1))
        xs = slice(max(0, int(np.floor(x0 * k)) - 1), min(n, int(np.ceil(x1 * k)) + 1))
        dy = coords[ys, None] - o.cy
        dx = coords[None, xs] - o.cx
        m = shape_mask(o.shape, dx, dy, o.side)
        img[ys, xs][m] = COLORS[o.color]
    if k > 1:
        img = np.round(img.reshape(S, k, S, k, 3).astype(np.float64).mean(axis=(1, 3))).astype(np.uint8)
    return img


# --------------------------------------------------------------------------------------------
# Relations (GenEval's rule, LENS_SPEC §11.1)
# --------------------------------------------------------------------------------------------

def relative_position(box_a: Sequence[float], box_b: Sequence[float],
                      threshold: float = POSITION_THRESHOLD, shrink: float = POSITION_SHRINK) -> set[str]:
    """GenEval's relation of A relative to B from (x0, y0, x1, y1) boxes (pixels, y down).

    offset = centre_A - centre_B; each component is shrunk toward 0 by ``shrink`` (0.1) *
    (dim_A + dim_B) on its axis, divided by ||offset||; "left of" if dx < -threshold (0.5),
    "right of" if dx > threshold, "above" if dy < -threshold, "below" if dy > threshold.
    Returns a (possibly empty) set of those strings.
    """
    a = np.asarray(box_a, np.float64).reshape(2, 2)
    b = np.asarray(box_b, np.float64).reshape(2, 2)
    offset = a.mean(0) - b.mean(0)
    dims = np.abs(a[1] - a[0]) + np.abs(b[1] - b[0])
    revised = np.maximum(np.abs(offset) - shrink * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rel = set()
    if dx < -threshold:
        rel.add("left of")
    if dx > threshold:
        rel.add("right of")
    if dy < -threshold:
        rel.add("above")
    if dy > threshold:
        rel.add("below")
    return rel


def _relation_phrase(rel: set[str]) -> str | None:
    """Caption phrase for a relation set, e.g. {"above", "left of"} -> "above and to the left of"."""
    vert = "above" if "above" in rel else ("below" if "below" in rel else None)
    horiz = "to the left of" if "left of" in rel else ("to the right of" if "right of" in rel else None)
    if vert and horiz:
        return f"{vert} and {horiz}"
    return vert or horiz


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------

def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(shape: str) -> str:
    return shape + "s"


def _count_phrase(n: int, noun: str, article: bool = True) -> str:
    """'a red circle' / 'two red circles' (noun is singular, possibly with adjectives)."""
    if n == 1:
        return f"{_article(noun)} {noun}" if article else f"one {noun}"
    words = noun.split(" ")
    words[-1] = _plural(words[-1])
    return f"{NUMBER_WORDS.get(n, str(n))} {' '.join(words)}"


def _join(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _group(objs: Sequence[SceneObject], key) -> list[tuple[Any, int]]:
    """Group objects by ``key`` in order of first appearance -> [(key, count)]."""
    order: dict[Any, int] = {}
    for o in objs:
        k = key(o)
        order[k] = order.get(k, 0) + 1
    return list(order.items())


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def dense_caption(scene: Scene, rng: np.random.Generator) -> str:
    """Long Lens-style paragraph describing every object (colour, shape, size, position), the
    counts, all pairwise relations and the background. Template wording varies with ``rng``."""
    objs = scene.objects
    n = len(objs)
    bg = scene.background
    sents: list[str] = []

    # 1. Opening and count summary.
    medium = _choice(rng, ("image", "picture", "illustration", "digital rendering", "graphic"))
    kind = "flat-colored shape"
    if n == 1:
        sents.append(_choice(rng, (
            f"The {medium} shows a single {kind} on a plain {bg} background.",
            f"This {medium} contains exactly one {kind} placed on a plain {bg} background.",
            f"A minimalist {medium} with one {kind} set against a plain {bg} background.",
        )))
    else:
        nw = NUMBER_WORDS[n]
        sents.append(_choice(rng, (
            f"The {medium} shows {nw} flat-colored shapes on a plain {bg} background.",
            f"This {medium} contains {nw} separate {kind}s arranged on a plain {bg} background.",
            f"A minimalist {medium} with {nw} {kind}s set against a plain {bg} background.",
        )))
    by_shape = _group(objs, lambda o: o.shape)
    shape_summary = _join([_count_phrase(c, s, article=False) for s, c in by_shape])
    sents.append(_choice(rng, (
        f"In total there {'is' if n == 1 else 'are'} {shape_summary}.",
        f"Counting the objects gives {shape_summary}.",
        f"The scene contains {shape_summary} in total.",
    )))
    if n > 1:
        by_color = _group(objs, lambda o: o.color)
        color_summary = _join([_count_phrase(c, f"{col} object", article=False) for col, c in by_color])
        sents.append(_choice(rng, (
            f"By color, there {'is' if by_color[0][1] == 1 else 'are'} {color_summary}.",
            f"Grouped by color, the picture has {color_summary}.",
        )))

    # 2. One sentence per object.
    said_triangle = False
    for o in objs:
        size_w = _choice(rng, SIZE_WORDS[o.size])
        pos = _choice(rng, CELL_PHRASES[(o.row, o.col)])
        frac = o.side / scene.image_size
        desc = f"{size_w} {o.color} {o.shape}"
        extent = _choice(rng, (
            f", roughly {int(round(frac * 100))} percent of the image width across",
            f", about {int(round(o.side))} pixels wide",
            "",
        ))
        sents.append(_choice(rng, (
            f"{pos[0].upper() + pos[1:]} of the image there is {_article(desc)} {desc}{extent}.",
            f"{_article(desc).capitalize()} {desc} sits {pos}{extent}.",
            f"{_article(desc).capitalize()} {desc} is located {pos} of the frame{extent}.",
        )))
        if o.shape == "triangle" and not said_triangle and rng.random() < 0.5:
            said_triangle = True
            sents.append(_choice(rng, ("The triangle points upward, with a flat base at the bottom.",
                                       "Its apex points up and its base is flat.")))
    if n == 1:
        sents.append(_choice(rng, ("It is the only object in the image.",
                                   "No other objects are present.")))

    # 3. Pairwise relations (GenEval rule on the ground-truth boxes).
    names = _unique_names(objs)
    for i in range(n):
        for j in range(i + 1, n):
            phrase = _relation_phrase(relative_position(objs[i].bbox, objs[j].bbox))
            if phrase is None:
                continue
            a, b = names[i], names[j]
            sents.append(_choice(rng, (
                f"The {a} is {phrase} the {b}.",
                f"The {a} appears {phrase} the {b}.",
            )))

    # 4. Background and style.
    sents.append(_choice(rng, (
        f"The background is a uniform {bg} with no texture, shadows or other details.",
        f"Behind the shapes, the background is a flat, solid {bg} color.",
        f"The whole background is plain {bg}, without any gradient or pattern.",
    )))
    sents.append(_choice(rng, (
        "All shapes are drawn in solid, saturated colors with crisp edges, and none of them overlap.",
        "Every shape has a single flat fill color and sharp edges; the shapes do not touch each other.",
        f"The composition is simple and clean, with {'the shape' if n == 1 else 'the shapes'} "
        "rendered as flat vector-like fills.",
    )))
    return " ".join(sents)


def _unique_names(objs: Sequence[SceneObject]) -> list[str]:
    """Referring expressions: 'red circle', or 'red circle in the upper left' if ambiguous."""
    names = []
    for o in objs:
        base = f"{o.color} {o.shape}"
        dup = sum(1 for p in objs if p.color == o.color and p.shape == o.shape) > 1
        names.append(f"{base} {CELL_PHRASES[(o.row, o.col)][0]}" if dup else base)
    return names


BRIEF_PREFIXES = ("", "", "a photo of ", "an image of ", "a picture of ")

#: "A <rel> B" <=> "B <INVERSE_RELATION[rel]> A".
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def brief_caption(scene: Scene, rng: np.random.Generator, relation_prob: float = 0.25) -> str:
    """Short GenEval-like caption, e.g. "a red circle and two blue squares".

    Variants (chosen by ``rng``): colour+shape groups (3/4) or shape-only groups (1/4); for a two-object
    scene, with probability ``relation_prob`` a relation phrase naming the pair in either order ("a red
    circle left of a blue square" / "a blue square right of a red circle"), otherwise colour+shape (2/3)
    or shape-only (1/3) groups; an optional prefix ("a photo of") and an optional background suffix.
    """
    objs = scene.objects
    mode = rng.random()
    two = len(objs) == 2
    colour_cut = relation_prob + (1 - relation_prob) * 2 / 3 if two else 0.75   # 0.75 for both at the default
    if two and mode < relation_prob:
        a, b = objs
        rel = sorted(relative_position(a.bbox, b.bbox))
        if rel:
            r = _choice(rng, rel)
            if rng.random() < 0.5:
                a, b, r = b, a, INVERSE_RELATION[r]
            na, nb = f"{a.color} {a.shape}", f"{b.color} {b.shape}"
            if rng.random() < 0.3:
                na, nb = a.shape, b.shape
            body = f"{_article(na)} {na} {r} {_article(nb)} {nb}"
        else:
            body = _join([_count_phrase(c, f"{col} {s}") for (col, s), c in
                          _group(objs, lambda o: (o.color, o.shape))])
    elif mode < colour_cut:
        body = _join([_count_phrase(c, f"{col} {s}") for (col, s), c in
                      _group(objs, lambda o: (o.color, o.shape))])
    else:
        body = _join([_count_phrase(c, s) for s, c in _group(objs, lambda o: o.shape)])
    text = _choice(rng, BRIEF_PREFIXES) + body
    if rng.random() < 0.25:
        text += f" on a {scene.background} background"
    return text


# --------------------------------------------------------------------------------------------
# Random-access examples and the Grain pipeline
# --------------------------------------------------------------------------------------------

def example(index: int, cfg: ShapesWorldConfig) -> dict:
    """The ``index``-th training example, a pure function of ``(cfg.seed, index)``.

    Returns dict:
      image: np.uint8 [S, S, 3] (RGB 0-255), dense: str, brief: str,
      metadata: JSON str of the scene (``Scene.to_json``), index: int.
    """
    ss = np.random.SeedSequence([int(cfg.seed), int(index), 0x5A9E])
    r_scene, r_dense, r_brief = (np.random.default_rng(s) for s in ss.spawn(3))
    scene = sample_scene(r_scene, cfg, training=True)
    return {
        "image": render(scene, cfg.antialias),
        "dense": dense_caption(scene, r_dense),
        "brief": brief_caption(scene, r_brief, cfg.relation_prob),
        "metadata": scene.to_json(),
        "index": int(index),
    }


class ShapesWorldSource:
    """Grain ``RandomAccessDataSource``: ``len(src) == size``; ``src[i] == example(i, cfg)``."""

    def __init__(self, cfg: ShapesWorldConfig, size: int):
        self.cfg = cfg
        self.size = int(size)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.size:
            raise IndexError(index)
        return example(index, self.cfg)

    def __repr__(self) -> str:
        return f"ShapesWorldSource(size={self.size}, cfg={self.cfg})"


def make_grain_dataset(cfg: ShapesWorldConfig, size: int, batch_size: int, seed: int = 0,
                       caption: str = "dense", shuffle: bool = True, num_epochs: int | None = None,
                       image_format: str = "float32", drop_remainder: bool = True,
                       dense_prob: float = 0.5):
    """A Grain ``MapDataset`` of batches over ``size`` shapes-world examples.

    Pipeline: ``source -> seed -> [shuffle] -> repeat(num_epochs) -> map/random_map -> batch``
    (``num_epochs=None`` repeats forever; each epoch is reshuffled).

    Each batch is a dict of numpy arrays:
      image: float32 [B, S, S, 3] in [-1, 1] (``image_format="float32"``) or uint8 [B, S, S, 3]
        in 0..255 (``image_format="uint8"``);
      caption: str array [B] (numpy unicode) - the dense caption, the brief one, or for
        ``caption="mixed"`` dense with probability ``dense_prob`` else brief (seeded per element);
      metadata: str array [B] of scene JSON; index: int64 [B] example indices.
    """
    import grain

    if caption not in ("dense", "brief", "mixed"):
        raise ValueError(f"caption must be 'dense', 'brief' or 'mixed', got {caption!r}")
    if image_format not in ("float32", "uint8"):
        raise ValueError(f"image_format must be 'float32' or 'uint8', got {image_format!r}")

    def to_image(img: np.ndarray) -> np.ndarray:
        if image_format == "uint8":
            return img
        return img.astype(np.float32) / 127.5 - 1.0

    def finish(ex: dict, text: str) -> dict:
        return {"image": to_image(ex["image"]), "caption": text, "metadata": ex["metadata"],
                "index": np.int64(ex["index"])}

    ds = grain.MapDataset.source(ShapesWorldSource(cfg, size)).seed(seed)
    if shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(num_epochs)
    if caption == "mixed":
        ds = ds.random_map(lambda ex, rng: finish(ex, ex["dense"] if rng.random() < dense_prob
                                                  else ex["brief"]))
    else:
        ds = ds.map(lambda ex: finish(ex, ex[caption]))
    return ds.batch(batch_size, drop_remainder=drop_remainder)
