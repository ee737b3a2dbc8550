"""A synthetic 2D composed-retrieval world in the spirit of CSS (Vo et al., CVPR 2019).

Scenes hold 1-5 objects on a 3x3 grid (one object per cell); an object has a shape, a colour
and a size. A scene is identified by its canonical *signature*, e.g.
``"0:red-circle-L|4:blue-square-S"`` (objects sorted by cell). A triplet is (reference scene,
caption, target scene) where the target is the reference with one modification (add, remove,
colour, size, shape, move) or two (combo) applied; the caption fully determines the target, so
exactly one gallery image (the one with the target's signature) is correct.

Everything is deterministic given the seed: scene/caption sampling uses ``random.Random`` seeded
with strings, and each image is rendered with a numpy generator seeded by (seed, kind, index), so
the output does not depend on the number of worker processes.

See docs/data.md for the design and the split/gallery rules.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Container, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from retrieval.data.triplets import GalleryItem, Triplet, write_jsonl

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "shapes-1"

GRID = 3
N_CELLS = GRID * GRID
MAX_OBJECTS = 5
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# Chosen to stay distinguishable from each other and from the light background after noise.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 50),
    "blue": (35, 75, 220),
    "yellow": (240, 210, 30),
    "purple": (145, 50, 190),
    "orange": (245, 135, 20),
    "cyan": (30, 200, 215),
    "black": (25, 25, 25),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
SIZES: tuple[str, ...] = ("S", "L")
SIZE_FRAC = {"S": 0.45, "L": 0.78}  # object extent as a fraction of the cell
MOD_TYPES: tuple[str, ...] = ("add", "remove", "color", "size", "shape", "move", "combo")
BASE_TYPES: tuple[str, ...] = MOD_TYPES[:-1]

# ----------------------------------------------------------------------------- vocabulary
# First word is the canonical one and is picked most often; the rest are synonyms.
SIZE_WORDS = {"S": ("small", "little", "tiny"), "L": ("big", "large")}
COLOR_WORDS = {c: (c,) for c in COLOR_NAMES} | {
    "purple": ("purple", "violet"),
    "cyan": ("cyan", "turquoise"),
}
SHAPE_WORDS = {
    "circle": ("circle", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "cross": ("cross", "plus"),
}
GENERIC_NOUNS = ("object", "shape", "one")
CELL_WORDS = {
    0: ("top left", "upper left", "top left corner"),
    1: ("top centre", "top middle", "top center"),
    2: ("top right", "upper right", "top right corner"),
    3: ("middle left", "centre left", "left middle"),
    4: ("centre", "middle", "center"),
    5: ("middle right", "centre right", "right middle"),
    6: ("bottom left", "lower left", "bottom left corner"),
    7: ("bottom centre", "bottom middle", "bottom center"),
    8: ("bottom right", "lower right", "bottom right corner"),
}
TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": (
        "add {obj} {loc}",
        "put {obj} {loc}",
        "place {obj} {loc}",
        "insert {obj} {loc}",
        "draw {obj} {loc}",
        "there should also be {obj} {loc}",
        "{loc}, add {obj}",
    ),
    "remove": (
        "remove {ref}",
        "delete {ref}",
        "take away {ref}",
        "get rid of {ref}",
        "take out {ref}",
        "erase {ref}",
        "{ref} should be removed",
    ),
    "color": (
        "make {ref} {color}",
        "turn {ref} {color}",
        "change {ref} to {color}",
        "paint {ref} {color}",
        "colour {ref} {color}",
        "change the colour of {ref} to {color}",
        "{ref} should be {color}",
    ),
    "bigger": (
        "make {ref} bigger",
        "make {ref} larger",
        "enlarge {ref}",
        "increase the size of {ref}",
        "{ref} should be bigger",
        "scale up {ref}",
    ),
    "smaller": (
        "make {ref} smaller",
        "shrink {ref}",
        "reduce the size of {ref}",
        "{ref} should be smaller",
        "scale down {ref}",
        "make {ref} a bit smaller",
    ),
    "shape": (
        "turn {ref} into a {shape}",
        "change {ref} into a {shape}",
        "make {ref} a {shape}",
        "reshape {ref} into a {shape}",
        "{ref} should be a {shape}",
        "replace {ref} with a {shape} of the same colour and size",
    ),
    "move": (
        "move {ref} to the {cell}",
        "shift {ref} to the {cell}",
        "put {ref} in the {cell}",
        "slide {ref} over to the {cell}",
        "place {ref} at the {cell}",
        "relocate {ref} to the {cell}",
        "{ref} should go to the {cell}",
    ),
    "combo": ("{a} and {b}", "{a}, then {b}", "{a}, and {b}", "{a} and also {b}", "{a}; {b}"),
}


# ----------------------------------------------------------------------------- scenes


@dataclass(frozen=True, order=True)
class Obj:
    """One object of a scene (one object per cell)."""

    cell: int  # 0..8, row-major: 0 top left, 4 centre, 8 bottom right
    color: str  # one of COLOR_NAMES
    shape: str  # one of SHAPES
    size: str  # "S" or "L"

    @property
    def token(self) -> str:
        return f"{self.cell}:{self.color}-{self.shape}-{self.size}"

    @property
    def combo(self) -> tuple[str, str]:
        """(shape, colour) pair; held-out pairs define the test_unseen split."""
        return (self.shape, self.color)


Scene = tuple[Obj, ...]  # always sorted by cell, cells unique


def make_scene(objs: Iterable[Obj]) -> Scene:
    """Canonical scene: objects sorted by cell; raises ValueError on a shared cell."""
    scene = tuple(sorted(objs))
    cells = [o.cell for o in scene]
    if len(set(cells)) != len(cells):
        raise ValueError(f"two objects in one cell: {cells}")
    return scene


def signature(scene: Scene) -> str:
    """Canonical, order-independent id of a scene, e.g. ``0:red-circle-L|4:blue-square-S``."""
    return "|".join(o.token for o in sorted(scene))


def parse_signature(sig: str) -> Scene:
    """Inverse of :func:`signature`."""
    objs = []
    for tok in sig.split("|") if sig else []:
        cell, rest = tok.split(":", 1)
        color, shape, size = rest.split("-")
        if color not in COLORS or shape not in SHAPES or size not in SIZES:
            raise ValueError(f"bad object token {tok!r}")
        objs.append(Obj(int(cell), color, shape, size))
    return make_scene(objs)


def _replace(obj: Obj, **changes: Any) -> Obj:
    return Obj(**(asdict(obj) | changes))


def apply_op(scene: Scene, op: dict[str, Any]) -> Scene:
    """Apply one modification (a dict as stored in ``extra["ops"]``) and return the new scene."""
    kind = op["op"]
    by_cell = {o.cell: o for o in scene}
    cell = int(op["cell"])
    if kind == "add":
        if cell in by_cell:
            raise ValueError(f"add: cell {cell} occupied")
        by_cell[cell] = Obj(cell, op["color"], op["shape"], op["size"])
    else:
        if cell not in by_cell:
            raise ValueError(f"{kind}: no object in cell {cell}")
        obj = by_cell.pop(cell)
        if kind == "remove":
            pass
        elif kind == "color":
            by_cell[cell] = _replace(obj, color=op["color"])
        elif kind == "size":
            by_cell[cell] = _replace(obj, size=op["size"])
        elif kind == "shape":
            by_cell[cell] = _replace(obj, shape=op["shape"])
        elif kind == "move":
            to = int(op["to"])
            if to in by_cell:
                raise ValueError(f"move: cell {to} occupied")
            by_cell[to] = _replace(obj, cell=to)
        else:
            raise ValueError(f"unknown op {kind!r}")
    return make_scene(by_cell.values())


def apply_ops(scene: Scene, ops: Sequence[dict[str, Any]]) -> Scene:
    for op in ops:
        scene = apply_op(scene, op)
    return scene


def matching(scene: Scene, attrs: dict[str, Any]) -> list[Obj]:
    """Objects of ``scene`` that a referring expression with these attributes denotes."""
    return [o for o in scene if all(getattr(o, k) == v for k, v in attrs.items())]


# ----------------------------------------------------------------------------- captions


def _word(rng: random.Random, words: Sequence[str]) -> str:
    # Canonical word 70% of the time so the vocabulary stays learnable.
    if len(words) == 1 or rng.random() < 0.7:
        return words[0]
    return rng.choice(words[1:])


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _loc(rng: random.Random, cell: int) -> str:
    name = _word(rng, CELL_WORDS[cell])
    prep = "in" if cell == 4 or rng.random() < 0.6 else "at"
    return f"{prep} the {name}"


# Attribute subsets a referring expression may use, roughly in order of naturalness.
_REF_SUBSETS: tuple[tuple[str, ...], ...] = (
    ("shape",),
    ("color", "shape"),
    ("size", "shape"),
    ("size", "color", "shape"),
    ("color",),
    ("shape", "cell"),
    ("cell",),
)
_REF_WEIGHTS = (6.0, 6.0, 3.0, 2.0, 1.0, 2.0, 0.5)


def refer(rng: random.Random, scene: Scene, obj: Obj) -> dict[str, Any] | None:
    """A referring expression that denotes exactly ``obj`` in ``scene``.

    Returns ``{"text", "attrs", "matches"}`` or None if no candidate is unique (cannot happen
    while positions are available, since one object occupies a cell).
    """
    options = []
    weights = []
    for subset, w in zip(_REF_SUBSETS, _REF_WEIGHTS, strict=True):
        attrs = {k: getattr(obj, k) for k in subset}
        n = len(matching(scene, attrs))
        if n == 1:
            options.append(attrs)
            weights.append(w)
    if not options:
        return None
    attrs = rng.choices(options, weights=weights, k=1)[0]
    words = []
    if "size" in attrs:
        words.append(_word(rng, SIZE_WORDS[attrs["size"]]))
    if "color" in attrs:
        words.append(_word(rng, COLOR_WORDS[attrs["color"]]))
    if "shape" in attrs:
        words.append(_word(rng, SHAPE_WORDS[attrs["shape"]]))
    else:
        words.append(rng.choice(GENERIC_NOUNS))
    text = "the " + " ".join(words)
    if "cell" in attrs:
        text += " " + _loc(rng, attrs["cell"])
    return {"text": text, "attrs": attrs, "matches": len(matching(scene, attrs))}


def _clause(rng: random.Random, op: dict[str, Any]) -> str:
    kind = op["op"]
    if kind == "add":
        size = _word(rng, SIZE_WORDS[op["size"]])
        obj = f"{_article(size)} {size} {_word(rng, COLOR_WORDS[op['color']])} "
        obj += _word(rng, SHAPE_WORDS[op["shape"]])
        return rng.choice(TEMPLATES["add"]).format(obj=obj, loc=_loc(rng, op["cell"]))
    ref = op["ref"]["text"]
    if kind == "remove":
        return rng.choice(TEMPLATES["remove"]).format(ref=ref)
    if kind == "color":
        color = _word(rng, COLOR_WORDS[op["color"]])
        return rng.choice(TEMPLATES["color"]).format(ref=ref, color=color)
    if kind == "size":
        key = "bigger" if op["size"] == "L" else "smaller"
        return rng.choice(TEMPLATES[key]).format(ref=ref)
    if kind == "shape":
        shape = _word(rng, SHAPE_WORDS[op["shape"]])
        return rng.choice(TEMPLATES["shape"]).format(ref=ref, shape=shape)
    if kind == "move":
        templates = TEMPLATES["move"]
        if "cell" in op["ref"]["attrs"]:
            # "put the box in the top left in the centre" reads badly: use a "to" template.
            templates = tuple(t for t in templates if " to the " in t)
        return rng.choice(templates).format(ref=ref, cell=_word(rng, CELL_WORDS[op["to"]]))
    raise ValueError(kind)


# ----------------------------------------------------------------------------- sampling


@dataclass
class _Pool:
    """Which (shape, colour) pairs a split may use, and how strongly to favour held-out ones."""

    heldout: frozenset[tuple[str, str]]
    unseen: bool  # True: test_unseen (held-out pairs allowed and favoured); False: forbidden

    def ok(self, shape: str, color: str) -> bool:
        return self.unseen or (shape, color) not in self.heldout

    def pick_pair(self, rng: random.Random) -> tuple[str, str]:
        if self.unseen and rng.random() < 0.35:
            return rng.choice(sorted(self.heldout))
        while True:
            pair = (rng.choice(SHAPES), rng.choice(COLOR_NAMES))
            if self.ok(*pair):
                return pair

    def pick_color(self, rng: random.Random, shape: str, current: str) -> str | None:
        held = [c for s, c in self.heldout if s == shape and c != current]
        if self.unseen and held and rng.random() < 0.5:
            return held[0]
        options = [c for c in COLOR_NAMES if c != current and self.ok(shape, c)]
        return rng.choice(options) if options else None

    def pick_shape(self, rng: random.Random, color: str, current: str) -> str | None:
        held = [s for s, c in self.heldout if c == color and s != current]
        if self.unseen and held and rng.random() < 0.5:
            return held[0]
        options = [s for s in SHAPES if s != current and self.ok(s, color)]
        return rng.choice(options) if options else None

    def scene_ok(self, scene: Scene) -> bool:
        return all(self.ok(o.shape, o.color) for o in scene)


def sample_scene(
    rng: random.Random, pool: _Pool, n_min: int = 1, n_max: int = MAX_OBJECTS
) -> Scene:
    n = rng.randint(n_min, n_max)
    cells = rng.sample(range(N_CELLS), n)
    objs = []
    for cell in cells:
        shape, color = pool.pick_pair(rng)
        objs.append(Obj(cell, color, shape, rng.choice(SIZES)))
    return make_scene(objs)


def _base_op(rng: random.Random, scene: Scene, kind: str, pool: _Pool) -> dict[str, Any] | None:
    """Sample one modification of ``kind`` applicable to ``scene`` (no caption yet)."""
    empty = [c for c in range(N_CELLS) if c not in {o.cell for o in scene}]
    if kind == "add":
        if len(scene) >= MAX_OBJECTS or not empty:
            return None
        shape, color = pool.pick_pair(rng)
        return {
            "op": "add",
            "cell": rng.choice(empty),
            "color": color,
            "shape": shape,
            "size": rng.choice(SIZES),
        }
    if not scene:
        return None
    obj = rng.choice(scene)
    op: dict[str, Any]
    if kind == "remove":
        if len(scene) < 2:
            return None
        op = {"op": "remove", "cell": obj.cell}
    elif kind == "color":
        new_color = pool.pick_color(rng, obj.shape, obj.color)
        if new_color is None:
            return None
        op = {"op": "color", "cell": obj.cell, "color": new_color}
    elif kind == "size":
        op = {"op": "size", "cell": obj.cell, "size": "L" if obj.size == "S" else "S"}
    elif kind == "shape":
        new_shape = pool.pick_shape(rng, obj.color, obj.shape)
        if new_shape is None:
            return None
        op = {"op": "shape", "cell": obj.cell, "shape": new_shape}
    elif kind == "move":
        if not empty:
            return None
        op = {"op": "move", "cell": obj.cell, "to": rng.choice(empty)}
    else:
        raise ValueError(kind)
    ref = refer(rng, scene, obj)
    if ref is None or ref["matches"] != 1:
        return None  # never emit an ambiguous reference
    op["ref"] = ref
    return op


def _touched_cells(op: dict[str, Any]) -> set[int]:
    cells = {int(op["cell"])}
    if op["op"] == "move":
        cells.add(int(op["to"]))
    return cells


def make_modification(
    rng: random.Random, scene: Scene, kind: str, pool: _Pool
) -> tuple[list[dict[str, Any]], str, Scene] | None:
    """Sample a modification of type ``kind``; returns (ops, caption, target) or None."""
    if kind != "combo":
        op = _base_op(rng, scene, kind, pool)
        if op is None:
            return None
        target = apply_op(scene, op)
        return [op], _clause(rng, op), target
    k1, k2 = rng.sample(BASE_TYPES, 2)
    op1 = _base_op(rng, scene, k1, pool)
    if op1 is None:
        return None
    op2 = _base_op(rng, scene, k2, pool)
    if op2 is None or _touched_cells(op1) & _touched_cells(op2):
        return None  # the two steps must concern different objects and cells
    mid = apply_op(scene, op1)
    if op2["op"] != "add":
        # The second reference must denote the same object whether it is read against the
        # reference scene or against the scene after the first step.
        found = matching(mid, op2["ref"]["attrs"])
        if len(found) != 1 or found[0].cell != op2["cell"]:
            return None
    if op1["op"] == "add" and len(scene) + 1 > MAX_OBJECTS:
        return None
    try:
        target = apply_op(mid, op2)
    except ValueError:
        return None
    if len(target) > MAX_OBJECTS or not target:
        return None
    caption = rng.choice(TEMPLATES["combo"]).format(a=_clause(rng, op1), b=_clause(rng, op2))
    return [op1, op2], caption, target


def _edited_combos(scene: Scene, ops: Sequence[dict[str, Any]]) -> set[tuple[str, str]]:
    """(shape, colour) pairs of the objects a modification touches, before and after."""
    combos: set[tuple[str, str]] = set()
    cur = scene
    for op in ops:
        nxt = apply_op(cur, op)
        before = {o.cell: o for o in cur}
        after = {o.cell: o for o in nxt}
        if op["cell"] in before:
            combos.add(before[op["cell"]].combo)
        dest = op["to"] if op["op"] == "move" else op["cell"]
        if dest in after:
            combos.add(after[dest].combo)
        cur = nxt
    return combos


# ----------------------------------------------------------------------------- config


@dataclass
class ShapesConfig:
    """Sizes and options of a generated world."""

    seed: int = 0  # everything is derived from it
    train: int = 40_000  # train triplets
    val: int = 1_000  # val triplets
    test: int = 1_000  # test triplets
    test_unseen: int = 1_000  # test_unseen triplets (targets use held-out shape/colour pairs)
    gallery: int = 5_000  # minimum gallery size (hard distractors are added to reach it)
    image_size: int = 64  # rendered image side, pixels
    max_triplets_per_reference: int = 3  # each reference scene gets 1..this many triplets
    distractors_per_target: int = 1  # at least this many hard distractors per eval target
    n_heldout: int = 4  # held-out (shape, colour) pairs, distinct shapes and colours
    workers: int = 2  # rendering processes (output does not depend on it)


@dataclass
class _Row:
    reference: Scene
    caption: str
    target: Scene
    type: str
    ops: list[dict[str, Any]]
    extra: dict[str, Any] = field(default_factory=dict)


def choose_heldout(seed: int, n: int = 4) -> list[tuple[str, str]]:
    """Held-out (shape, colour) pairs: distinct shapes and distinct colours, chosen by seed."""
    if n > min(len(SHAPES), len(COLOR_NAMES)):
        raise ValueError(f"at most {min(len(SHAPES), len(COLOR_NAMES))} held-out pairs")
    rng = random.Random(f"heldout:{seed}")
    shapes = rng.sample(SHAPES, n)
    colors = rng.sample(COLOR_NAMES, n)
    return sorted(zip(shapes, colors, strict=True))


def _gen_split(
    name: str,
    n: int,
    rng: random.Random,
    pool: _Pool,
    forbidden: set[str],
    max_per_ref: int,
) -> list[_Row]:
    """Generate ``n`` triplets whose scenes avoid ``forbidden`` signatures; types cycle so
    counts per type differ by at most one."""
    rows: list[_Row] = []
    pairs: set[tuple[str, str]] = set()
    ref_used: set[str] = set()
    type_i = 0
    attempts = 0
    limit = 400 * n + 10_000
    while len(rows) < n:
        attempts += 1
        if attempts > limit:
            raise RuntimeError(f"{name}: could not generate {n} triplets (made {len(rows)})")
        ref = sample_scene(rng, pool)
        ref_sig = signature(ref)
        if ref_sig in forbidden or ref_sig in ref_used:
            continue
        if not pool.unseen and not pool.scene_ok(ref):
            continue
        want = rng.randint(1, max_per_ref)
        made = 0
        for _ in range(6 * want):
            if made >= want or len(rows) >= n:
                break
            kind = MOD_TYPES[type_i % len(MOD_TYPES)]
            res = make_modification(rng, ref, kind, pool)
            if res is None:
                continue
            ops, caption, target = res
            tgt_sig = signature(target)
            if tgt_sig == ref_sig or tgt_sig in forbidden or (ref_sig, tgt_sig) in pairs:
                continue
            extra: dict[str, Any] = {}
            if pool.unseen:
                touched = _edited_combos(ref, ops) & pool.heldout
                in_target = {o.combo for o in target} & pool.heldout
                if not touched or not in_target:
                    continue
                extra["unseen_combos"] = sorted(f"{s}-{c}" for s, c in touched | in_target)
            elif not pool.scene_ok(target):
                continue
            pairs.add((ref_sig, tgt_sig))
            rows.append(_Row(ref, caption, target, kind, ops, extra))
            type_i += 1
            made += 1
        if made:
            ref_used.add(ref_sig)
    logger.info("%s: %d triplets from %d reference scenes", name, len(rows), len(ref_used))
    return rows


#: What a one-attribute distractor may change.
DISTRACTOR_KINDS = ("color", "size", "shape", "cell")


def _distractor(
    rng: random.Random, scene: Scene, kinds: Sequence[str] = DISTRACTOR_KINDS
) -> Scene | None:
    """The scene with exactly one attribute of one object changed (colour/size/shape/position),
    the attribute drawn from ``kinds``."""
    if not scene:
        return None
    obj = rng.choice(scene)
    what = rng.choice(tuple(kinds))
    if what == "color":
        new = _replace(obj, color=rng.choice([c for c in COLOR_NAMES if c != obj.color]))
    elif what == "size":
        new = _replace(obj, size="L" if obj.size == "S" else "S")
    elif what == "shape":
        new = _replace(obj, shape=rng.choice([s for s in SHAPES if s != obj.shape]))
    else:
        empty = [c for c in range(N_CELLS) if c not in {o.cell for o in scene}]
        if not empty:
            return None
        new = _replace(obj, cell=rng.choice(empty))
    return make_scene([o for o in scene if o is not obj] + [new])


def hard_negative(
    rng: random.Random,
    scene: Scene,
    heldout: Iterable[tuple[str, str]] = (),
    exclude: Container[str] = frozenset(),
    tries: int = 16,
    kinds: Sequence[str] = DISTRACTOR_KINDS,
) -> Scene | None:
    """A one-attribute distractor of ``scene`` for training (the kind of near miss the gallery
    holds for every eval target): never a held-out (shape, colour) pair, never a signature in
    ``exclude`` (e.g. the gallery's), never ``scene`` itself. ``kinds``: which attributes may
    change (e.g. ``("cell",)``: the object moves). None when no such scene is found (e.g. an
    empty scene)."""
    bad = [k for k in kinds if k not in DISTRACTOR_KINDS]
    if bad or not kinds:
        raise ValueError(f"distractor kinds must be among {DISTRACTOR_KINDS}, got {list(kinds)}")
    held = set(heldout)
    own = signature(scene) if scene else ""
    for _ in range(tries):
        d = _distractor(rng, scene, kinds)
        if d is None:
            return None
        sig = signature(d)
        if sig == own or sig in exclude or any(o.combo in held for o in d):
            continue
        return d
    return None


def describe_scene(scene: Scene) -> str:
    """A canonical caption of a whole scene, objects in cell order, e.g. ``"big red circle
    top left, small blue square centre"`` (the image-text pairs of BLIP-2's stage-1 ITC)."""
    if not scene:
        return "an empty picture"
    return ", ".join(
        f"{SIZE_WORDS[o.size][0]} {COLOR_WORDS[o.color][0]} {SHAPE_WORDS[o.shape][0]} "
        f"{CELL_WORDS[o.cell][0]}"
        for o in scene
    )


# ----------------------------------------------------------------------------- rendering


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "square":
        a = r * 0.88
        pts = [(-a, -a), (a, -a), (a, a), (-a, a)]
    elif kind == "triangle":
        # Equilateral, pointing up; circumradius slightly larger so its area is comparable.
        R = r * 1.12
        pts = [
            (R * math.cos(t), R * math.sin(t) + 0.12 * r)
            for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)
        ]
    elif kind == "cross":
        w = r * 0.36
        pts = [
            (-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w),
            (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w),
        ]  # fmt: skip
    else:
        raise ValueError(kind)
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in pts]


def render_scene(scene: Scene, image_size: int, key: Sequence[int]) -> Any:
    """Render ``scene`` as a PIL RGB image; nuisance (jitter, rotation, background, noise)
    comes from a numpy generator seeded with ``key`` (e.g. (seed, kind, index))."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(list(key))
    ss = 3  # supersampling for anti-aliased edges
    side = image_size * ss
    base = rng.uniform(200.0, 245.0)
    bg = tuple(int(v) for v in np.clip(base + rng.uniform(-10.0, 10.0, 3), 0, 255))
    img = Image.new("RGB", (side, side), bg)
    draw = ImageDraw.Draw(img)
    cell = side / GRID
    for obj in scene:
        row, col = divmod(obj.cell, GRID)
        r = SIZE_FRAC[obj.size] * cell / 2 * rng.uniform(0.94, 1.06)
        # Jitter stays inside the cell (large objects have little room).
        room = max(0.5 * cell - r * 1.08, 0.03 * cell)
        jit = min(0.1 * cell, room)
        cx = (col + 0.5) * cell + rng.uniform(-jit, jit)
        cy = (row + 0.5) * cell + rng.uniform(-jit, jit)
        angle = math.radians(rng.uniform(-10.0, 10.0))
        rgb = np.clip(np.array(COLORS[obj.color], dtype=float) + rng.normal(0.0, 7.0, 3), 0, 255)
        fill = tuple(int(v) for v in rgb)
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_polygon(obj.shape, cx, cy, r, angle), fill=fill)
    img = img.resize((image_size, image_size), Image.Resampling.BOX)
    arr = np.asarray(img, dtype=np.float32)
    sigma = rng.uniform(3.0, 7.0)
    arr = arr + rng.normal(0.0, sigma, arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")


def _render_job(job: tuple[str, str, int, tuple[int, ...]]) -> None:
    path, sig, image_size, key = job
    img = render_scene(parse_signature(sig), image_size, key)
    img.save(path, format="PNG", compress_level=6)


def _render_all(jobs: list[tuple[str, str, int, tuple[int, ...]]], workers: int) -> None:
    for d in sorted({os.path.dirname(j[0]) for j in jobs}):
        os.makedirs(d, exist_ok=True)
    if workers <= 1 or len(jobs) < 200:
        for job in jobs:
            _render_job(job)
        return
    import multiprocessing as mp

    with mp.get_context("fork").Pool(workers) as p:
        for _ in p.imap_unordered(_render_job, jobs, chunksize=256):
            pass


def _image_path(kind: str, prefix: str, idx: int) -> str:
    return f"images/{kind}/{idx // 1000:03d}/{prefix}{idx:06d}.png"


# ----------------------------------------------------------------------------- the world

_KIND_GALLERY = 1
_KIND_TRAIN = 2


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse to mix two worlds in one directory; with ``overwrite`` remove the old one."""
    ours = [out / "images", out / "meta.json", out / "gallery.jsonl"]
    ours += [out / f"{s}.jsonl" for s in ("train", "val", "test", "test_unseen")]
    existing = [p for p in ours if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds a dataset ({existing[0].name}); pass overwrite (--overwrite)"
        )
    for p in existing:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _eval_splits(cfg: ShapesConfig, seen_pool: _Pool, unseen_pool: _Pool) -> dict[str, list[_Row]]:
    """test_unseen, test, val triplets (pairwise disjoint scenes: each avoids the others')."""
    used: set[str] = set()
    eval_rows: dict[str, list[_Row]] = {}
    for split, n, pool in (
        ("test_unseen", cfg.test_unseen, unseen_pool),
        ("test", cfg.test, seen_pool),
        ("val", cfg.val, seen_pool),
    ):
        rng = random.Random(f"{cfg.seed}:{split}")
        rows = _gen_split(split, n, rng, pool, used, cfg.max_triplets_per_reference)
        for row in rows:
            used.add(signature(row.reference))
            used.add(signature(row.target))
        eval_rows[split] = rows
    return eval_rows


def _gallery(
    cfg: ShapesConfig, eval_rows: dict[str, list[_Row]], unseen_pool: _Pool
) -> tuple[list[str], dict[str, str]]:
    """Gallery signatures (shuffled: ids carry no information about roles) and the source of
    each: every eval scene once, then hard distractors of the targets, then filler."""
    gallery_sigs: list[str] = []
    source: dict[str, str] = {}
    for split in ("val", "test", "test_unseen"):
        for row in eval_rows[split]:
            for sig in (signature(row.reference), signature(row.target)):
                if sig not in source:
                    source[sig] = "eval"
                    gallery_sigs.append(sig)
    targets = [row.target for split in ("val", "test", "test_unseen") for row in eval_rows[split]]
    drng = random.Random(f"{cfg.seed}:distractors")
    order = list(range(len(targets)))
    drng.shuffle(order)
    per_target = Counter[int]()
    passes = 0
    while targets and (
        len(gallery_sigs) < cfg.gallery
        or min(per_target[i] for i in order) < cfg.distractors_per_target
    ):
        passes += 1
        added = 0
        for i in order:
            if per_target[i] >= cfg.distractors_per_target and len(gallery_sigs) >= cfg.gallery:
                continue
            for _ in range(10):
                d = _distractor(drng, targets[i])
                if d is None:
                    continue
                sig = signature(d)
                if sig not in source:
                    source[sig] = "distractor"
                    gallery_sigs.append(sig)
                    per_target[i] += 1
                    added += 1
                    break
            else:
                per_target[i] = max(per_target[i], cfg.distractors_per_target)  # saturated
        if added == 0 or passes > 50:
            break
    frng = random.Random(f"{cfg.seed}:filler")
    while len(gallery_sigs) < cfg.gallery:  # only when there are too few eval triplets
        sig = signature(sample_scene(frng, unseen_pool))
        if sig not in source:
            source[sig] = "filler"
            gallery_sigs.append(sig)
    random.Random(f"{cfg.seed}:gallery").shuffle(gallery_sigs)
    return gallery_sigs, source


def _write_splits(
    out: Path,
    train_rows: list[_Row],
    train_sigs: dict[str, str],
    eval_rows: dict[str, list[_Row]],
    gallery_sigs: list[str],
    source: dict[str, str],
) -> tuple[dict[str, str], dict[str, str]]:
    """train/val/test/test_unseen/gallery .jsonl; returns the gallery's (ids, paths) by
    signature."""
    gid = {sig: f"g{i:06d}" for i, sig in enumerate(gallery_sigs)}
    gpath = {sig: _image_path("gallery", "g", i) for i, sig in enumerate(gallery_sigs)}

    def triplet(row: _Row, paths: dict[str, str], in_gallery: bool) -> Triplet:
        rs, ts = signature(row.reference), signature(row.target)
        extra = {"reference_signature": rs, "target_signature": ts, "ops": row.ops} | row.extra
        return Triplet(
            reference=paths[rs],
            caption=row.caption,
            target=paths[ts],
            type=row.type,
            reference_id=gid[rs] if in_gallery else "",
            target_id=gid[ts] if in_gallery else None,
            extra=extra,
        )

    write_jsonl(out / "train.jsonl", (triplet(r, train_sigs, False) for r in train_rows))
    for split in ("val", "test", "test_unseen"):
        write_jsonl(out / f"{split}.jsonl", (triplet(r, gpath, True) for r in eval_rows[split]))
    write_jsonl(
        out / "gallery.jsonl",
        (
            GalleryItem(
                id=gid[sig],
                path=gpath[sig],
                metadata={"signature": sig, "n_objects": sig.count("|") + 1, "source": source[sig]},
            )
            for sig in gallery_sigs
        ),
    )
    return gid, gpath


def generate(cfg: ShapesConfig, out_dir: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Generate the world into ``out_dir``; returns the meta dict (also written to meta.json).

    Order: held-out pairs; test_unseen, test, val triplets (pairwise disjoint scenes); the
    gallery (their references and targets, one image per signature, plus hard distractors);
    train triplets whose scenes avoid every gallery signature and every held-out pair.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    if cfg.image_size < 16:
        raise ValueError("image_size must be at least 16")
    if cfg.max_triplets_per_reference < 1:
        raise ValueError("max_triplets_per_reference must be >= 1")
    if min(cfg.train, cfg.val, cfg.test, cfg.test_unseen) < 0 or cfg.gallery < 0:
        raise ValueError("sizes must be non-negative")
    _prepare_out(out, overwrite)
    heldout = frozenset(choose_heldout(cfg.seed, cfg.n_heldout))
    seen_pool = _Pool(heldout, unseen=False)
    unseen_pool = _Pool(heldout, unseen=True)

    eval_rows = _eval_splits(cfg, seen_pool, unseen_pool)
    gallery_sigs, source = _gallery(cfg, eval_rows, unseen_pool)

    # Train: scenes disjoint from every gallery scene, no held-out pair anywhere.
    train_rows = _gen_split(
        "train",
        cfg.train,
        random.Random(f"{cfg.seed}:train"),
        seen_pool,
        set(gallery_sigs),
        cfg.max_triplets_per_reference,
    )
    train_sigs: dict[str, str] = {}
    for row in train_rows:
        for sc in (row.reference, row.target):
            sig = signature(sc)
            if sig not in train_sigs:
                train_sigs[sig] = _image_path("train", "t", len(train_sigs))

    _, gpath = _write_splits(out, train_rows, train_sigs, eval_rows, gallery_sigs, source)
    t_index = time.perf_counter() - t0

    jobs: list[tuple[str, str, int, tuple[int, ...]]] = [
        (str(out / gpath[s]), s, cfg.image_size, (cfg.seed, _KIND_GALLERY, i))
        for i, s in enumerate(gallery_sigs)
    ]
    jobs += [
        (str(out / p), s, cfg.image_size, (cfg.seed, _KIND_TRAIN, i))
        for i, (s, p) in enumerate(train_sigs.items())
    ]
    _render_all(jobs, cfg.workers)

    counts = {
        split: dict(sorted(Counter(r.type for r in rows).items()))
        for split, rows in (("train", train_rows), *eval_rows.items())
    }
    meta = {
        "generator": GENERATOR_VERSION,
        "seed": cfg.seed,
        "config": asdict(cfg) | {"workers": None},
        "image_size": cfg.image_size,
        "shapes": list(SHAPES),
        "colors": list(COLOR_NAMES),
        "sizes": {"S": SIZE_FRAC["S"], "L": SIZE_FRAC["L"]},
        "heldout_combos": [f"{s}-{c}" for s, c in sorted(heldout)],
        "sizes_per_split": {
            "train": len(train_rows),
            "val": len(eval_rows["val"]),
            "test": len(eval_rows["test"]),
            "test_unseen": len(eval_rows["test_unseen"]),
            "gallery": len(gallery_sigs),
            "train_images": len(train_sigs),
        },
        "gallery_sources": dict(sorted(Counter(source.values()).items())),
        "counts_per_type": counts,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    logger.info(
        "shapes world in %s: index %.1fs, total %.1fs", out, t_index, time.perf_counter() - t0
    )
    return meta


__all__ = [
    "COLORS",
    "COLOR_NAMES",
    "GENERATOR_VERSION",
    "MOD_TYPES",
    "SHAPES",
    "SIZES",
    "Obj",
    "Scene",
    "ShapesConfig",
    "apply_op",
    "apply_ops",
    "choose_heldout",
    "hard_negative",
    "generate",
    "make_modification",
    "make_scene",
    "matching",
    "parse_signature",
    "refer",
    "render_scene",
    "sample_scene",
    "signature",
]
