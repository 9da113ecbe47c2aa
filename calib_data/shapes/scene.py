"""Procedural scenes of coloured shapes and digit glyphs, and visual questions about them.

A scene is a 96x96 RGB image: a 6x6 grid of 16-pixel cells on a dark background, aligned with
the 8-pixel patches of the shipped model (each cell is 2x2 patches, 144 patches in all). Some
cells hold a saturated shape, one cell holds a 5x7 bitmap digit drawn at 2x scale (a detail four
patches wide that random token pruning destroys).

Everything is a pure function of an integer seed: `make_scene(seed)` and `make_question(scene,
task, rng)` use only `random.Random(seed)`, so the same seed gives the same bytes on any machine.

    cell (r, c) -> pixels [16r, 16r+16) x [16c, 16c+16) -> patches (2r..2r+1, 2c..2c+1)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

IMAGE_SIZE = 96
CELL = 16
GRID = IMAGE_SIZE // CELL  # 6 x 6 cells
PATCH = 8

COLORS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 40),
    "purple": (170, 60, 220),
    "cyan": (40, 220, 220),
}
SHAPES = ("circle", "square", "triangle", "cross")
DIGITS = tuple(str(d) for d in range(10))
TASKS = ("exist", "attribute", "count", "spatial", "choice", "digit")
LETTERS = ("A", "B", "C", "D")
BACKGROUND = (18, 18, 24)
GRID_LINE = (34, 34, 44)

# 5x7 bitmap font, one string of 7 rows per digit ("#" = ink).
_FONT = {
    "0": (" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "),
    "1": ("  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "),
    "2": (" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"),
    "3": ("#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "),
    "4": ("   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "),
    "5": ("#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "),
    "6": ("  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "),
    "7": ("#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "),
    "8": (" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "),
    "9": (" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "),
}


@dataclass(frozen=True)
class Obj:
    kind: str  # a shape name or "digit"
    color: str
    row: int
    col: int
    digit: str | None = None


@dataclass
class Scene:
    seed: int
    objects: list[Obj] = field(default_factory=list)

    @property
    def shapes(self) -> list[Obj]:
        return [o for o in self.objects if o.kind != "digit"]

    @property
    def digit(self) -> Obj:
        return next(o for o in self.objects if o.kind == "digit")


def make_scene(seed: int) -> Scene:
    """3-7 shapes and one digit in distinct cells."""
    rng = random.Random(seed)
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], 8)
    n_shapes = rng.randint(3, 7)
    objs = []
    for r, c in cells[:n_shapes]:
        objs.append(Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), r, c))
    r, c = cells[n_shapes]
    objs.append(Obj("digit", rng.choice(list(COLORS)), r, c, digit=rng.choice(DIGITS)))
    return Scene(seed, objs)


def render(scene: Scene, blank: bool = False) -> np.ndarray:
    """uint8 HxWx3 image. `blank=True` draws the grid only (the no-image control)."""
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    img[:] = BACKGROUND
    img[::CELL, :] = GRID_LINE
    img[:, ::CELL] = GRID_LINE
    if blank:
        return img
    yy, xx = np.mgrid[0:CELL, 0:CELL].astype(np.float32) + 0.5
    cy = cx = CELL / 2
    for o in scene.objects:
        y0, x0 = o.row * CELL, o.col * CELL
        if o.kind == "circle":
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= 6.2**2
        elif o.kind == "square":
            mask = (np.abs(yy - cy) <= 5.5) & (np.abs(xx - cx) <= 5.5)
        elif o.kind == "triangle":
            # apex up, base at the bottom
            h = (yy - 2.0) / 12.0
            mask = (yy >= 2.0) & (yy <= 14.0) & (np.abs(xx - cx) <= 6.5 * h)
        elif o.kind == "cross":
            mask = ((np.abs(yy - cy) <= 2.0) & (np.abs(xx - cx) <= 6.5)) | (
                (np.abs(xx - cx) <= 2.0) & (np.abs(yy - cy) <= 6.5)
            )
        else:  # digit: 5x7 at 2x -> 10x14, centred in the cell
            glyph = np.array([[ch == "#" for ch in row] for row in _FONT[o.digit]], bool)
            mask = np.zeros((CELL, CELL), bool)
            mask[1:15, 3:13] = np.kron(glyph, np.ones((2, 2), bool))
        cell = img[y0 : y0 + CELL, x0 : x0 + CELL]
        cell[mask] = COLORS[o.color]
    return img


def _name(o: Obj) -> str:
    return f"{o.color} {o.kind}"


def _unique(objs: list[Obj], key) -> list[Obj]:
    """Objects whose `key` value occurs exactly once among `objs`."""
    vals = [key(o) for o in objs]
    return [o for o, v in zip(objs, vals) if vals.count(v) == 1]


def make_question(scene: Scene, task: str, rng: random.Random) -> dict | None:
    """One question of `task` about `scene`, or None if the scene cannot support it."""
    shapes = scene.shapes
    if task == "exist":
        if rng.random() < 0.5:
            o = rng.choice(shapes)
            color, kind, answer = o.color, o.kind, "yes"
        else:
            # POPE-style absent probe: a colour and a shape that are both in the scene, but
            # never together (falls back to a random absent pair).
            present = {(o.color, o.kind) for o in shapes}
            pairs = [
                (c, s)
                for c in sorted({o.color for o in shapes})
                for s in sorted({o.kind for o in shapes})
                if (c, s) not in present
            ]
            if not pairs:
                pairs = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
            color, kind = rng.choice(pairs)
            answer = "no"
        return {"question": f"is there a {color} {kind} ?", "answer": answer}
    if task == "attribute":
        if rng.random() < 0.5:
            cands = _unique(shapes, lambda o: o.kind)
            if not cands:
                return None
            o = rng.choice(cands)
            return {"question": f"what color is the {o.kind} ?", "answer": o.color}
        cands = _unique(shapes, lambda o: o.color)
        if not cands:
            return None
        o = rng.choice(cands)
        return {"question": f"what shape is the {o.color} object ?", "answer": o.kind}
    if task == "count":
        if rng.random() < 0.5:
            kind = rng.choice(SHAPES)
            n = sum(o.kind == kind for o in shapes)
            return {"question": f"how many {kind} shapes are there ?", "answer": str(n)}
        color = rng.choice(list(COLORS))
        n = sum(o.color == color for o in shapes)
        return {"question": f"how many {color} shapes are there ?", "answer": str(n)}
    if task == "spatial":
        named = _unique(shapes, _name)
        pairs = [
            (a, b)
            for a in named
            for b in named
            if a is not b and (a.row == b.row or a.col == b.col)
        ]
        if not pairs:
            return None
        a, b = rng.choice(pairs)
        if a.row == b.row:
            rel = "left" if a.col < b.col else "right"
        else:
            rel = "above" if a.row < b.row else "below"
        return {
            "question": f"where is the {_name(a)} relative to the {_name(b)} ?",
            "answer": rel,
        }
    if task == "choice":
        if rng.random() < 0.5:
            cands = _unique(shapes, lambda o: o.kind)
            if not cands:
                return None
            o = rng.choice(cands)
            truth, pool, q = o.color, list(COLORS), f"which color is the {o.kind} ?"
        else:
            cands = _unique(shapes, lambda o: o.color)
            if not cands:
                return None
            o = rng.choice(cands)
            truth, pool, q = o.kind, list(SHAPES), f"which shape is the {o.color} object ?"
        options = rng.sample([p for p in pool if p != truth], 3) + [truth]
        rng.shuffle(options)
        letter = LETTERS[options.index(truth)]
        opts = " ".join(f"{L} . {v}" for L, v in zip(LETTERS, options))
        return {"question": f"{q} {opts}", "answer": letter, "options": options}
    if task == "digit":
        return {"question": "what digit is written ?", "answer": scene.digit.digit}
    raise ValueError(f"unknown task {task!r}")


def caption(scene: Scene) -> str:
    """Dense description in raster order: every object's colour, kind and place."""
    parts = []
    for o in sorted(scene.objects, key=lambda o: (o.row, o.col)):
        what = f"digit {o.digit}" if o.kind == "digit" else o.kind
        parts.append(f"{o.color} {what} row {o.row} col {o.col}")
    return " , ".join(parts) + " ."


def make_sample(seed: int, task: str | None = None) -> tuple[Scene, dict]:
    """A scene and a question for it; `task=None` picks one round-robin by seed."""
    rng = random.Random(seed * 7919 + 17)
    for attempt in range(100):
        scene = make_scene(seed * 101 + attempt)
        t = task or TASKS[seed % len(TASKS)]
        q = make_question(scene, t, rng)
        if q is not None:
            return scene, {"task": t, **q}
    raise RuntimeError(f"no {task} question after 100 scenes (seed {seed})")


def vocabulary() -> list[str]:
    """Every word a question, answer, caption or prompt can contain (sorted, stable)."""
    words = set(
        "is there a what color shape is the object how many shapes are where relative to "
        "which digit written ? . , yes no left right above below row col USER ASSISTANT : "
        "describe image".split()
    )
    words |= set(COLORS) | set(SHAPES) | set(DIGITS) | set(LETTERS)
    return sorted(words)
