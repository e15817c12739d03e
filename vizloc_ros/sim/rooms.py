"""Procedural rooms: a whole room (extent, furniture, doors, windows, wall colours, texture
seed, light) from one integer seed, so mapping and relocalization can be tried on places
that no network has seen.

Why procedural: a relocalizer that only ever met the demo room proves nothing about a
room it was not built for. ``room_spec(seed)`` is a pure function of the seed (numpy's
``default_rng([ROOM_SALT, seed])``), so ``vizloc-synth --scene room:17`` builds the same
room on every machine, and seeds can be split once and for all between pretraining,
validation and evaluation (:data:`SEED_USES`, documented in ``docs/SYNTHETIC.md``).

A room is 4-9 m on each horizontal side and 2.5-3.4 m high, centred on the ``map``
origin with the floor at z = 0. Furniture stands on the floor: pieces against the walls
(cabinets, shelves, sofas, beds, wardrobes) and free-standing ones (tables, crates,
pillars, desks) keep a walkable free space of at least half the floor, checked with the
same clearance test the walk generator uses, so a seeded random walk always fits.
"""
from __future__ import annotations

import re

import numpy as np

from vizloc_ros.sim.scene import Box, SceneSpec

#: mixes into every room seed so that room 3 and, e.g., walk seed 3 never share a stream
ROOM_SALT = 0x524F4F4D  # "ROOM"

#: which seeds serve which purpose. The generic encoder is pretrained on PRETRAIN only;
#: VALIDATION picks its checkpoint; EVALUATION rooms are the unseen rooms of the
#: benchmarks and the tests. Nothing ever trains on the demo room or an EVALUATION seed.
SEED_USES = {
    "pretrain": range(1000, 1064),
    "validation": range(2000, 2004),
    "evaluation": range(3000, 3100),
}

_PATTERN = re.compile(r"^room:(\d{1,9})$")

#: furniture kinds: (name, against a wall?, footprint ranges (long, short) in m, height range)
_WALL_PIECES = (
    ("cabinet", (0.8, 1.4), (0.45, 0.6), (1.5, 2.1)),
    ("shelf", (1.0, 2.0), (0.3, 0.45), (1.0, 2.0)),
    ("sofa", (1.6, 2.2), (0.7, 0.9), (0.7, 0.9)),
    ("bed", (1.9, 2.1), (1.2, 1.6), (0.45, 0.6)),
    ("wardrobe", (1.0, 1.8), (0.55, 0.65), (1.9, 2.3)),
    ("sideboard", (1.2, 1.8), (0.4, 0.5), (0.7, 0.9)),
)
_FREE_PIECES = (
    ("table", (0.9, 1.6), (0.6, 0.9), (0.7, 0.78)),
    ("crate", (0.4, 0.7), (0.4, 0.7), (0.35, 0.7)),
    ("pillar", (0.25, 0.4), (0.25, 0.4), None),  # floor to ceiling
    ("desk", (1.0, 1.4), (0.55, 0.7), (0.72, 0.76)),
    ("stool", (0.35, 0.45), (0.35, 0.45), (0.45, 0.65)),
)
_ROOM_FACES = ("wall_-x", "wall_+x", "wall_-y", "wall_+y")


def parse_room_name(name: str) -> int | None:
    """The seed of a ``room:SEED`` scene name, or None for any other name."""
    match = _PATTERN.match(str(name))
    return int(match.group(1)) if match else None


def seed_use(seed: int) -> str | None:
    """``pretrain`` / ``validation`` / ``evaluation`` for a reserved seed, else None."""
    for use, seeds in SEED_USES.items():
        if int(seed) in seeds:
            return use
    return None


def room_spec(seed: int) -> SceneSpec:
    """The procedural room of ``seed`` (any non-negative integer)."""
    seed = int(seed)
    if seed < 0:
        raise ValueError(f"room seeds are non-negative integers, got {seed}")
    rng = np.random.default_rng([ROOM_SALT, seed])
    for _ in range(100):
        spec = _draw_room(rng, seed)
        if spec is not None:
            return spec
    raise RuntimeError(f"room:{seed}: no furniture layout left enough free floor")  # pragma: no cover


def _draw_room(rng: np.random.Generator, seed: int) -> SceneSpec | None:
    size_x, size_y = rng.uniform(4.0, 9.0, 2)
    height = float(rng.uniform(2.5, 3.4))
    lo = np.array([-size_x / 2, -size_y / 2, 0.0])
    hi = np.array([size_x / 2, size_y / 2, height])
    boxes: list[Box] = []
    footprints: list[tuple[np.ndarray, np.ndarray]] = []

    def fits(blo, bhi) -> bool:
        if np.any(blo[:2] < lo[:2] - 1e-9) or np.any(bhi[:2] > hi[:2] + 1e-9):
            return False
        return all(np.any(blo[:2] > b[1][:2] + 0.5) or np.any(bhi[:2] < b[0][:2] - 0.5) for b in footprints)

    area = size_x * size_y
    wall_count = int(rng.integers(2, 5 if area < 30 else 7))
    free_count = int(rng.integers(1, 4 if area < 30 else 6))
    counts: dict[str, int] = {}

    def add(kind: str, blo, bhi):
        counts[kind] = counts.get(kind, 0) + 1
        name = kind if counts[kind] == 1 else f"{kind}{counts[kind]}"
        boxes.append(Box(name, tuple(float(v) for v in blo), tuple(float(v) for v in bhi), hue=float(rng.random())))
        footprints.append((np.asarray(blo), np.asarray(bhi)))

    for _ in range(wall_count):
        kind, long_range, short_range, height_range = _WALL_PIECES[int(rng.integers(len(_WALL_PIECES)))]
        for _attempt in range(20):
            long_side, short_side = rng.uniform(*long_range), rng.uniform(*short_range)
            tall = min(rng.uniform(*height_range), height - 0.3)
            wall = int(rng.integers(4))  # -x, +x, -y, +y
            axis, side = wall // 2, wall % 2
            along = 1 - axis
            blo, bhi = np.zeros(3), np.zeros(3)
            span = hi[along] - lo[along] - long_side
            if span <= 0.2:
                continue
            start = lo[along] + rng.uniform(0.1, span - 0.1)
            blo[along], bhi[along] = start, start + long_side
            if side == 0:
                blo[axis], bhi[axis] = lo[axis], lo[axis] + short_side
            else:
                blo[axis], bhi[axis] = hi[axis] - short_side, hi[axis]
            blo[2], bhi[2] = 0.0, tall
            if fits(blo, bhi):
                add(kind, blo, bhi)
                break
    for _ in range(free_count):
        kind, a_range, b_range, height_range = _FREE_PIECES[int(rng.integers(len(_FREE_PIECES)))]
        for _attempt in range(20):
            a, b = rng.uniform(*a_range), rng.uniform(*b_range)
            if rng.random() < 0.5:
                a, b = b, a
            centre = rng.uniform(lo[:2] + 1.0, hi[:2] - 1.0)
            tall = height if height_range is None else rng.uniform(*height_range)
            blo = np.array([centre[0] - a / 2, centre[1] - b / 2, 0.0])
            bhi = np.array([centre[0] + a / 2, centre[1] + b / 2, tall])
            if fits(blo, bhi):
                add(kind, blo, bhi)
                break

    light = (float(rng.uniform(lo[0] + 0.8, hi[0] - 0.8)), float(rng.uniform(lo[1] + 0.8, hi[1] - 0.8)),
             float(height - rng.uniform(0.15, 0.5)))
    hues = rng.permutation(4) / 4.0 + rng.uniform(0.0, 0.25)
    walls = list(_ROOM_FACES)
    doors = tuple(sorted(str(w) for w in rng.choice(walls, size=int(rng.integers(1, 3)), replace=False)))
    windows = tuple(sorted(str(w) for w in rng.choice(walls, size=int(rng.integers(0, 3)), replace=False)))
    spec = SceneSpec(name=f"room:{seed}", room_lo=tuple(float(v) for v in lo), room_hi=tuple(float(v) for v in hi),
                     boxes=tuple(boxes), texture_seed=int(rng.integers(2 ** 31)), light=light,
                     wall_hues=tuple(float(h % 1.0) for h in hues), doors=doors, windows=windows)
    return spec if _free_share(spec) >= 0.5 else None


def _free_share(spec: SceneSpec, margin: float = 0.6) -> float:
    """Share of the floor (less a wall margin) that is at least ``margin`` from furniture."""
    lo, hi = np.asarray(spec.room_lo[:2]) + margin, np.asarray(spec.room_hi[:2]) - margin
    xs, ys = np.meshgrid(np.linspace(lo[0], hi[0], 40), np.linspace(lo[1], hi[1], 40))
    free = np.ones(xs.shape, bool)
    for box in spec.boxes:
        inside = (xs > box.lo[0] - margin) & (xs < box.hi[0] + margin) & \
                 (ys > box.lo[1] - margin) & (ys < box.hi[1] + margin)
        free &= ~inside
    return float(free.mean())


def room_extent(spec: SceneSpec) -> float:
    """The larger horizontal side of a room, metres."""
    return float(max(spec.room_hi[0] - spec.room_lo[0], spec.room_hi[1] - spec.room_lo[1]))


__all__ = ["SEED_USES", "parse_room_name", "room_spec", "room_extent", "seed_use"]
