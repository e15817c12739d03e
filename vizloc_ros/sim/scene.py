"""The synthetic room: walls, floor, ceiling and a few boxes, with procedural textures.

Why it looks the way it does: a pose regressor can only learn a pose that the image
determines, so every surface must be told apart from every other one. Each wall has its
own colour family, all surfaces carry large non-periodic shapes (posters, a door, a
window, discs, planks, a rug) over multi-scale value noise, and nothing repeats with a
period that would make two places look alike.

Geometry is axis-aligned in the world frame ``map`` (REP-103: x, y horizontal, z up,
metres). Faces are numbered: the room's faces are ``axis * 2 + side`` (side 0 = the wall
at the low coordinate, side 1 = the high one) and box ``b``'s faces are
``6 + 6 * b + axis * 2 + side`` (side 0 = its low face). Each face is textured in its
plane with (u, v) = (y, z) for x-faces, (x, z) for y-faces and (x, y) for z-faces,
row 0 of the texture at the low v.

Everything is a deterministic function of the scene specification (including the
texture seed), so two processes render the same pixels.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass, field

import numpy as np

#: metres per texel of the precomputed textures (a 320x240, 60 degree camera sees about
#: 1 cm per pixel at 3 m, so finer texels would not show).
DEFAULT_TEXEL = 0.015

_UV_AXES = {0: (1, 2), 1: (0, 2), 2: (0, 1)}


@dataclass(frozen=True)
class Box:
    """An axis-aligned solid box (furniture), ``lo`` < ``hi`` corners in metres."""

    name: str
    lo: tuple[float, float, float]
    hi: tuple[float, float, float]
    hue: float  # colour family of its faces, in [0, 1)


@dataclass(frozen=True)
class SceneSpec:
    """What defines a scene: room extent, boxes, texture seed and texel size."""

    name: str
    room_lo: tuple[float, float, float]
    room_hi: tuple[float, float, float]
    boxes: tuple[Box, ...]
    texture_seed: int
    texel: float = DEFAULT_TEXEL
    light: tuple[float, float, float] = (0.4, -0.2, 2.7)
    #: hue family of wall_-x, wall_+x, wall_-y, wall_+y (None: the demo room's)
    wall_hues: tuple[float, float, float, float] | None = None
    #: walls with a door / a window, by face name (None: the demo room's)
    doors: tuple[str, ...] | None = None
    windows: tuple[str, ...] | None = None


#: The demo room: 6 x 5 x 3 m with a cabinet, table, crate, pillar, shelf and sofa.
DEMO_SPEC = SceneSpec(
    name="demo",
    room_lo=(-3.0, -2.5, 0.0),
    room_hi=(3.0, 2.5, 3.0),
    boxes=(
        Box("cabinet", (-3.0, 0.9, 0.0), (-2.45, 2.1, 1.9), hue=0.78),
        Box("table", (0.7, -1.5, 0.0), (1.7, -0.8, 0.75), hue=0.08),
        Box("crate", (-1.6, -1.7, 0.0), (-1.0, -1.1, 0.55), hue=0.5),
        Box("pillar", (0.3, 0.8, 0.0), (0.6, 1.1, 3.0), hue=0.0),
        Box("shelf", (-0.6, 2.05, 0.0), (1.2, 2.5, 1.3), hue=0.92),
        Box("sofa", (2.3, -2.5, 0.0), (3.0, -0.6, 0.8), hue=0.58),
    ),
    texture_seed=20240611,
)

SCENES = {"demo": DEMO_SPEC}


@dataclass
class Face:
    """One textured rectangle of the scene."""

    name: str
    axis: int
    side: int
    normal: np.ndarray  # unit normal pointing into the free space
    uv_axes: tuple[int, int]
    uv_origin: tuple[float, float]
    texture: np.ndarray  # (rows, cols, 3) uint8, row 0 at the low v


@dataclass
class Scene:
    """A built scene: geometry plus textures flattened into one atlas for the renderer."""

    spec: SceneSpec
    faces: list[Face]
    room_lo: np.ndarray = field(init=False)
    room_hi: np.ndarray = field(init=False)
    box_lo: np.ndarray = field(init=False)  # (B, 3)
    box_hi: np.ndarray = field(init=False)
    atlas: np.ndarray = field(init=False)  # (texels, 3) uint8
    face_offset: np.ndarray = field(init=False)
    face_cols: np.ndarray = field(init=False)
    face_rows: np.ndarray = field(init=False)
    face_u_axis: np.ndarray = field(init=False)
    face_v_axis: np.ndarray = field(init=False)
    face_u0: np.ndarray = field(init=False)
    face_v0: np.ndarray = field(init=False)
    face_normal: np.ndarray = field(init=False)  # (F, 3)
    face_axis: np.ndarray = field(init=False)  # (F,) int8: the axis the face is normal to
    face_sign: np.ndarray = field(init=False)  # (F,) float32: its normal's sign on that axis
    atlas_packed: np.ndarray = field(init=False)  # (texels,) uint32 RGBA: one 4-byte gather per pixel

    def __post_init__(self):
        spec = self.spec
        self.room_lo = np.asarray(spec.room_lo, dtype=float)
        self.room_hi = np.asarray(spec.room_hi, dtype=float)
        self.box_lo = np.array([b.lo for b in spec.boxes], dtype=float).reshape(-1, 3)
        self.box_hi = np.array([b.hi for b in spec.boxes], dtype=float).reshape(-1, 3)
        sizes = [f.texture.shape[0] * f.texture.shape[1] for f in self.faces]
        self.face_offset = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.atlas = np.concatenate([f.texture.reshape(-1, 3) for f in self.faces])
        self.face_rows = np.array([f.texture.shape[0] for f in self.faces], dtype=np.int64)
        self.face_cols = np.array([f.texture.shape[1] for f in self.faces], dtype=np.int64)
        self.face_u_axis = np.array([f.uv_axes[0] for f in self.faces], dtype=np.int64)
        self.face_v_axis = np.array([f.uv_axes[1] for f in self.faces], dtype=np.int64)
        self.face_u0 = np.array([f.uv_origin[0] for f in self.faces], dtype=np.float32)
        self.face_v0 = np.array([f.uv_origin[1] for f in self.faces], dtype=np.float32)
        self.face_normal = np.array([f.normal for f in self.faces], dtype=np.float32)
        self.face_axis = np.array([f.axis for f in self.faces], dtype=np.int8)
        self.face_sign = np.array([f.normal[f.axis] for f in self.faces], dtype=np.float32)
        rgba = np.concatenate([self.atlas, np.full((len(self.atlas), 1), 255, np.uint8)], axis=1)
        self.atlas_packed = np.ascontiguousarray(rgba).view(np.uint32).reshape(-1)

    @property
    def texel(self) -> float:
        return self.spec.texel

    @property
    def light(self) -> np.ndarray:
        return np.asarray(self.spec.light, dtype=float)

    @property
    def wall_hues(self) -> dict[str, float]:
        """Hue family of each wall by face name, as painted (the demo room's unless the spec says)."""
        return wall_hues_of(self.spec)

    @property
    def doors(self) -> tuple[str, ...]:
        """Walls with a door, by face name, as painted."""
        return doors_of(self.spec)

    @property
    def windows(self) -> tuple[str, ...]:
        """Walls with a window, by face name, as painted."""
        return windows_of(self.spec)

    def face_index(self, name: str) -> int:
        """Index of a face by name, e.g. ``"wall_+x"``, ``"floor"``, ``"table_+z"``."""
        for index, face in enumerate(self.faces):
            if face.name == name:
                return index
        raise KeyError(f"no face {name!r}; faces: {[f.name for f in self.faces]}")

    def albedo_at(self, face_indices, points) -> np.ndarray:
        """Unshaded texture colour (N, 3) uint8 of world ``points`` (N, 3) on given faces.

        Uses exactly the lookup of the renderer, so tests can compare pixels with it.
        """
        faces = np.asarray(face_indices, dtype=np.int64).reshape(-1)
        points = np.asarray(points, dtype=np.float32).reshape(-1, 3)
        return self.atlas[self.texel_index(faces, points.T)]

    def texel_index(self, faces: np.ndarray, points_3xn: np.ndarray) -> np.ndarray:
        """Atlas index of points (3, N) lying on ``faces`` (N,) (nearest texel, clamped)."""
        n = faces.shape[0]
        columns = np.arange(n)
        u = points_3xn[self.face_u_axis[faces], columns] - self.face_u0[faces]
        v = points_3xn[self.face_v_axis[faces], columns] - self.face_v0[faces]
        inv = np.float32(1.0 / self.texel)
        cols = self.face_cols[faces]
        iu = np.clip((u * inv).astype(np.int64), 0, cols - 1)
        iv = np.clip((v * inv).astype(np.int64), 0, self.face_rows[faces] - 1)
        return self.face_offset[faces] + iv * cols + iu

    def free_space_mask(self, xy, wall_margin: float, box_margin: float) -> np.ndarray:
        """True where a point (..., 2) is at least ``wall_margin`` from every wall and
        ``box_margin`` from every box footprint (boxes treated as floor-to-ceiling)."""
        xy = np.asarray(xy, dtype=float)
        ok = np.all((xy >= self.room_lo[:2] + wall_margin) & (xy <= self.room_hi[:2] - wall_margin), axis=-1)
        for lo, hi in zip(self.box_lo, self.box_hi):
            inside = np.all((xy > lo[:2] - box_margin) & (xy < hi[:2] + box_margin), axis=-1)
            ok &= ~inside
        return ok

    def clearance(self, xy) -> np.ndarray:
        """Horizontal distance (...,) from points (..., 2) to the nearest wall or box footprint."""
        xy = np.asarray(xy, dtype=float)
        d = np.min(np.concatenate([xy - self.room_lo[:2], self.room_hi[:2] - xy], axis=-1), axis=-1)
        for lo, hi in zip(self.box_lo, self.box_hi):
            gap = np.maximum(np.maximum(lo[:2] - xy, xy - hi[:2]), 0.0)
            dist = np.linalg.norm(gap, axis=-1)
            inside = np.all((xy >= lo[:2]) & (xy <= hi[:2]), axis=-1)
            d = np.minimum(d, np.where(inside, -1.0, dist))
        return d


# --------------------------------------------------------------------------- textures

def _rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, np.clip(s, 0, 1), np.clip(v, 0, 1)), dtype=np.float32)


def _value_noise(rows: int, cols: int, cell: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth random field in [0, 1]: random values on a grid of ``cell`` texels, bilinear."""
    cell = max(cell, 1.0)
    gy, gx = int(rows / cell) + 2, int(cols / cell) + 2
    grid = rng.random((gy, gx)).astype(np.float32)
    y = np.arange(rows, dtype=np.float32) / cell
    x = np.arange(cols, dtype=np.float32) / cell
    y0, x0 = y.astype(np.int64), x.astype(np.int64)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    fy, fx = fy * fy * (3 - 2 * fy), fx * fx * (3 - 2 * fx)  # smoothstep: no visible grid
    a = grid[y0][:, x0]
    b = grid[y0][:, x0 + 1]
    c = grid[y0 + 1][:, x0]
    d = grid[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def _fbm(rows: int, cols: int, rng: np.random.Generator, cells=(90.0, 30.0, 8.0, 3.0)) -> np.ndarray:
    """Multi-octave noise in [0, 1]: non-periodic detail at several scales."""
    total = np.zeros((rows, cols), dtype=np.float32)
    weight_sum = 0.0
    for octave, cell in enumerate(cells):
        weight = 0.55 ** octave
        total += weight * _value_noise(rows, cols, cell, rng)
        weight_sum += weight
    return total / weight_sum


class _Canvas:
    """A texture being painted, with shape helpers in metres (u right, v up)."""

    def __init__(self, width_m: float, height_m: float, texel: float, base_rgb, rng, noise=0.35):
        self.texel = texel
        self.rows = max(2, int(np.ceil(height_m / texel)))
        self.cols = max(2, int(np.ceil(width_m / texel)))
        self.rng = rng
        shade = 1.0 - noise / 2 + noise * _fbm(self.rows, self.cols, rng)
        self.image = np.asarray(base_rgb, dtype=np.float32)[None, None, :] * shade[:, :, None]
        self.v = (np.arange(self.rows, dtype=np.float32) + 0.5) * texel
        self.u = (np.arange(self.cols, dtype=np.float32) + 0.5) * texel

    def _window(self, u0, v0, u1, v1):
        c0, c1 = np.searchsorted(self.u, [u0, u1])
        r0, r1 = np.searchsorted(self.v, [v0, v1])
        return slice(r0, r1), slice(c0, c1)

    def rect(self, u0, v0, u1, v1, rgb, noise=0.15):
        rs, cs = self._window(u0, v0, u1, v1)
        h, w = rs.stop - rs.start, cs.stop - cs.start
        if h <= 0 or w <= 0:
            return
        shade = 1.0 - noise / 2 + noise * _fbm(h, w, self.rng, cells=(40.0, 10.0, 3.0))
        self.image[rs, cs] = np.asarray(rgb, np.float32)[None, None] * shade[:, :, None]

    def disc(self, uc, vc, radius, rgb):
        rs, cs = self._window(uc - radius, vc - radius, uc + radius, vc + radius)
        du = self.u[cs][None, :] - uc
        dv = self.v[rs][:, None] - vc
        mask = du * du + dv * dv <= radius * radius
        self.image[rs, cs][mask] = np.asarray(rgb, np.float32)  # basic slice: a view

    def stripes(self, u0, v0, u1, v1, colours, vertical: bool):
        """Bands of random widths (never a fixed period) filling a rectangle."""
        start, stop = (u0, u1) if vertical else (v0, v1)
        pos = start
        index = 0
        while pos < stop:
            width = float(self.rng.uniform(0.03, 0.18))
            end = min(pos + width, stop)
            if vertical:
                self.rect(pos, v0, end, v1, colours[index % len(colours)], noise=0.08)
            else:
                self.rect(u0, pos, u1, end, colours[index % len(colours)], noise=0.08)
            pos = end
            index += int(self.rng.integers(1, len(colours))) if len(colours) > 1 else 1

    def checker(self, u0, v0, u1, v1, colours):
        """Irregular checkerboard: random cell boundaries along each direction."""
        us = np.concatenate([[u0], np.sort(self.rng.uniform(u0, u1, int(self.rng.integers(3, 7)))), [u1]])
        vs = np.concatenate([[v0], np.sort(self.rng.uniform(v0, v1, int(self.rng.integers(3, 7)))), [v1]])
        for i in range(len(us) - 1):
            for j in range(len(vs) - 1):
                self.rect(us[i], vs[j], us[i + 1], vs[j + 1], colours[(i + j) % len(colours)], noise=0.1)

    def to_uint8(self) -> np.ndarray:
        return np.clip(self.image * 255.0, 0, 255).astype(np.uint8)


def _random_palette(rng, n: int) -> list[np.ndarray]:
    return [_rgb(rng.random(), rng.uniform(0.45, 0.95), rng.uniform(0.35, 0.95)) for _ in range(n)]


def _poster(canvas: _Canvas, u0, v0, u1, v1, rng):
    """A framed picture with one of several internal patterns."""
    frame = 0.03
    canvas.rect(u0, v0, u1, v1, _rgb(0.0, 0.0, rng.uniform(0.05, 0.25)), noise=0.05)
    u0, v0, u1, v1 = u0 + frame, v0 + frame, u1 - frame, v1 - frame
    colours = _random_palette(rng, 4)
    kind = int(rng.integers(0, 4))
    if kind == 0:
        canvas.stripes(u0, v0, u1, v1, colours, vertical=bool(rng.integers(0, 2)))
    elif kind == 1:
        canvas.checker(u0, v0, u1, v1, colours)
    elif kind == 2:
        canvas.rect(u0, v0, u1, v1, colours[0], noise=0.3)
        for _ in range(int(rng.integers(3, 8))):
            r = rng.uniform(0.04, 0.25) * min(u1 - u0, v1 - v0) * 2
            canvas.disc(rng.uniform(u0 + r, max(u0 + r, u1 - r)), rng.uniform(v0 + r, max(v0 + r, v1 - r)),
                        r, colours[int(rng.integers(1, 4))])
    else:
        canvas.rect(u0, v0, u1, v1, colours[0], noise=0.2)
        for k in range(int(rng.integers(2, 5))):  # nested offset rectangles
            shrink = (k + 1) * 0.12
            du, dv = (u1 - u0) * shrink, (v1 - v0) * shrink
            off = rng.uniform(-0.3, 0.3) * du
            canvas.rect(u0 + du + off, v0 + dv, u1 - du + off, v1 - dv, colours[(k + 1) % 4], noise=0.15)


def _wall_texture(width, height, texel, hue, rng, door: bool, window: bool) -> np.ndarray:
    canvas = _Canvas(width, height, texel, _rgb(hue, rng.uniform(0.35, 0.55), rng.uniform(0.7, 0.85)), rng)
    canvas.rect(0.0, 0.0, width, 0.12, _rgb(hue, 0.5, 0.35), noise=0.1)  # skirting board
    # a band at a random height in a darker shade of the wall's family
    band = rng.uniform(0.9, 1.2)
    canvas.rect(0.0, band, width, band + rng.uniform(0.04, 0.1), _rgb(hue + 0.04, 0.7, 0.5), noise=0.1)
    occupied: list[tuple[float, float]] = []

    def free_slot(w):
        for _ in range(40):
            u = rng.uniform(0.15, width - w - 0.15)
            if all(u + w < a - 0.1 or u > b + 0.1 for a, b in occupied):
                occupied.append((u, u + w))
                return u
        return None

    if door:
        u = free_slot(0.9)
        if u is not None:
            canvas.rect(u, 0.0, u + 0.9, 2.1, _rgb(0.07, 0.6, 0.4), noise=0.25)
            canvas.rect(u + 0.08, 0.15, u + 0.82, 1.0, _rgb(0.07, 0.55, 0.33), noise=0.2)
            canvas.rect(u + 0.08, 1.1, u + 0.82, 2.0, _rgb(0.07, 0.55, 0.33), noise=0.2)
            canvas.disc(u + 0.78, 1.05, 0.035, _rgb(0.12, 0.3, 0.9))
    if window:
        w = rng.uniform(1.0, 1.6)
        u = free_slot(w)
        if u is not None:
            canvas.rect(u, 1.0, u + w, 2.3, _rgb(0.0, 0.0, 0.95), noise=0.02)
            canvas.rect(u + 0.05, 1.05, u + w - 0.05, 2.25, _rgb(0.58, 0.35, 0.95), noise=0.25)
            canvas.rect(u + w / 2 - 0.025, 1.05, u + w / 2 + 0.025, 2.25, _rgb(0.0, 0.0, 0.95), noise=0.02)
            canvas.rect(u + 0.05, 1.62, u + w - 0.05, 1.67, _rgb(0.0, 0.0, 0.95), noise=0.02)
    for _ in range(int(rng.integers(2, 4))):
        w = rng.uniform(0.45, 1.2)
        u = free_slot(w)
        if u is None:
            continue
        h = rng.uniform(0.4, 1.0)
        v = rng.uniform(0.8, max(0.81, height - h - 0.3))
        _poster(canvas, u, v, u + w, v + h, rng)
    for _ in range(int(rng.integers(4, 9))):  # scattered discs (stickers, clocks, lamps)
        r = rng.uniform(0.05, 0.18)
        canvas.disc(rng.uniform(r, width - r), rng.uniform(0.3, height - 0.2), r,
                    _rgb(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.4, 1.0)))
    return canvas.to_uint8()


def _floor_texture(width, depth, texel, rng) -> np.ndarray:
    canvas = _Canvas(width, depth, texel, _rgb(0.08, 0.55, 0.45), rng, noise=0.2)
    v = 0.0
    while v < depth:  # planks along u, rows of fixed width but random lengths and tones
        plank = 0.18
        u = -rng.uniform(0.0, 1.2)
        while u < width:
            length = rng.uniform(0.6, 1.6)
            tone = _rgb(rng.uniform(0.06, 0.1), rng.uniform(0.45, 0.7), rng.uniform(0.35, 0.6))
            canvas.rect(max(u, 0.0), v + 0.005, min(u + length, width) - 0.008, v + plank - 0.005, tone, noise=0.35)
            u += length
        v += plank
    # a rug with concentric coloured bands, placed off-centre
    ru0, rv0 = rng.uniform(0.8, width / 2 - 0.8), rng.uniform(0.8, depth / 2 - 0.6)
    rw, rh = rng.uniform(1.4, 2.0), rng.uniform(0.9, 1.3)
    palette = _random_palette(rng, 3)
    for k in range(4):
        inset = 0.1 * k
        canvas.rect(ru0 + inset, rv0 + inset, ru0 + rw - inset, rv0 + rh - inset, palette[k % 3], noise=0.25)
    return canvas.to_uint8()


def _ceiling_texture(width, depth, texel, rng) -> np.ndarray:
    canvas = _Canvas(width, depth, texel, _rgb(0.1, 0.05, 0.88), rng, noise=0.12)
    u_lines = np.cumsum(rng.uniform(0.5, 0.7, 20))
    v_lines = np.cumsum(rng.uniform(0.5, 0.7, 20))
    for u in u_lines[u_lines < width]:
        canvas.rect(u - 0.01, 0.0, u + 0.01, depth, _rgb(0.0, 0.0, 0.55), noise=0.0)
    for v in v_lines[v_lines < depth]:
        canvas.rect(0.0, v - 0.01, width, v + 0.01, _rgb(0.0, 0.0, 0.55), noise=0.0)
    for _ in range(3):  # light panels and a smoke detector
        u, v = rng.uniform(0.5, width - 1.7), rng.uniform(0.5, depth - 0.9)
        canvas.rect(u, v, u + 1.2, v + 0.3, _rgb(0.15, 0.1, 1.0), noise=0.02)
    canvas.disc(rng.uniform(1, width - 1), rng.uniform(1, depth - 1), 0.08, _rgb(0.0, 0.9, 0.8))
    return canvas.to_uint8()


def _box_texture(width, height, texel, hue, rng, top: bool) -> np.ndarray:
    base = _rgb(hue + rng.uniform(-0.03, 0.03), rng.uniform(0.45, 0.75), rng.uniform(0.45, 0.8) * (1.1 if top else 1.0))
    canvas = _Canvas(width, height, texel, base, rng, noise=0.3)
    kind = int(rng.integers(0, 3))
    if kind == 0 and width > 0.2 and height > 0.2:  # a label
        w, h = width * rng.uniform(0.3, 0.6), height * rng.uniform(0.2, 0.4)
        u, v = rng.uniform(0.05, width - w - 0.05 + 1e-3), rng.uniform(0.05, height - h - 0.05 + 1e-3)
        canvas.rect(u, v, u + w, v + h, _rgb(hue + 0.5, 0.2, 0.95), noise=0.05)
        canvas.stripes(u + 0.02, v + 0.02, u + w - 0.02, v + h / 2, _random_palette(rng, 2), vertical=True)
    elif kind == 1:  # slats / drawers
        canvas.stripes(0.0, 0.0, width, height, [base * 0.7, base, base * 1.2], vertical=bool(rng.integers(0, 2)))
    else:
        for _ in range(int(rng.integers(2, 6))):
            r = rng.uniform(0.03, 0.12)
            canvas.disc(rng.uniform(0, width), rng.uniform(0, height), r, _rgb(rng.random(), 0.8, 0.9))
    return canvas.to_uint8()


# --------------------------------------------------------------------------- building

_ROOM_FACE_NAMES = {(0, 0): "wall_-x", (0, 1): "wall_+x", (1, 0): "wall_-y", (1, 1): "wall_+y",
                    (2, 0): "floor", (2, 1): "ceiling"}
_WALL_HUES = {"wall_+x": 0.02, "wall_-x": 0.6, "wall_+y": 0.33, "wall_-y": 0.13}
_DEMO_DOORS = ("wall_-x", "wall_+y")
_DEMO_WINDOWS = ("wall_+x", "wall_-y")


def wall_hues_of(spec: SceneSpec) -> dict[str, float]:
    """The hue family of each wall: the spec's, or the demo room's when it leaves them out."""
    if spec.wall_hues is None:
        return dict(_WALL_HUES)
    return dict(zip(("wall_-x", "wall_+x", "wall_-y", "wall_+y"), spec.wall_hues))


def doors_of(spec: SceneSpec) -> tuple[str, ...]:
    """The walls with a door: the spec's, or the demo room's when it leaves them out."""
    return _DEMO_DOORS if spec.doors is None else tuple(spec.doors)


def windows_of(spec: SceneSpec) -> tuple[str, ...]:
    """The walls with a window: the spec's, or the demo room's when it leaves them out."""
    return _DEMO_WINDOWS if spec.windows is None else tuple(spec.windows)


def build_scene(spec: SceneSpec) -> Scene:
    """Build the geometry and paint every texture from ``spec.texture_seed``."""
    lo, hi = np.asarray(spec.room_lo, float), np.asarray(spec.room_hi, float)
    hues, doors, windows = wall_hues_of(spec), doors_of(spec), windows_of(spec)
    faces: list[Face] = []
    for axis in range(3):
        for side in range(2):
            name = _ROOM_FACE_NAMES[(axis, side)]
            ua, va = _UV_AXES[axis]
            width, height = hi[ua] - lo[ua], hi[va] - lo[va]
            face_rng = np.random.default_rng([spec.texture_seed, axis, side])
            if axis == 2:
                texture = (_floor_texture if side == 0 else _ceiling_texture)(width, height, spec.texel, face_rng)
            else:
                texture = _wall_texture(width, height, spec.texel, hues[name], face_rng,
                                        door=name in doors, window=name in windows)
            normal = np.zeros(3)
            normal[axis] = 1.0 if side == 0 else -1.0  # room faces look inwards
            faces.append(Face(name, axis, side, normal, (ua, va), (lo[ua], lo[va]), texture))
    for index, box in enumerate(spec.boxes):
        blo, bhi = np.asarray(box.lo, float), np.asarray(box.hi, float)
        for axis in range(3):
            for side in range(2):
                ua, va = _UV_AXES[axis]
                face_rng = np.random.default_rng([spec.texture_seed, 100 + index, axis, side])
                texture = _box_texture(bhi[ua] - blo[ua], bhi[va] - blo[va], spec.texel, box.hue, face_rng,
                                       top=(axis == 2 and side == 1))
                normal = np.zeros(3)
                normal[axis] = -1.0 if side == 0 else 1.0  # box faces look outwards
                sign = "-" if side == 0 else "+"
                faces.append(Face(f"{box.name}_{sign}{'xyz'[axis]}", axis, side, normal, (ua, va),
                                  (blo[ua], blo[va]), texture))
    return Scene(spec=spec, faces=faces)
