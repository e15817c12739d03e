"""Scenes by name: ``demo`` (the hand-made demo room) or ``room:SEED`` (a procedural room,
:mod:`vizloc_ros.sim.rooms`), built once per process.

Why a module of its own: the scene builder (:mod:`vizloc_ros.sim.scene`) and the room
generator (which produces the builder's specifications) must not import each other; the
catalogue is the one place that knows both, so it also checks names and describes a
scene for ``scene.json``.
"""
from __future__ import annotations

from functools import lru_cache

from vizloc_ros.sim.rooms import parse_room_name, room_extent, room_spec, seed_use
from vizloc_ros.sim.scene import SCENES, Scene, SceneSpec, build_scene


def scene_names_help() -> str:
    return f"{', '.join(sorted(SCENES))} or room:SEED (a procedural room)"


def canonical_scene_name(name: str) -> str:
    """``name`` as the catalogue spells it (``room:007`` -> ``room:7``), or ValueError with a
    one-line reason: an unknown name, or a room whose seed is not a non-negative integer."""
    text = str(name)
    seed = parse_room_name(text)
    if seed is not None:
        return f"room:{seed}"
    if text in SCENES:
        return text
    if text.startswith("room:"):
        raise ValueError(f"scene {text!r}: a room's SEED is a non-negative integer of at most 9 digits "
                         "(e.g. room:3000)")
    raise ValueError(f"unknown scene {text!r}; known scenes: {scene_names_help()}")


def scene_spec(name: str) -> SceneSpec:
    """The specification of a named scene: ``demo`` or ``room:SEED`` (KeyError otherwise)."""
    try:
        name = canonical_scene_name(name)
    except ValueError as exc:
        raise KeyError(str(exc)) from None
    seed = parse_room_name(name)
    return room_spec(seed) if seed is not None else SCENES[name]


@lru_cache(maxsize=4)
def get_scene(name: str = "demo", texel: float | None = None) -> Scene:
    """A named scene (textures take a fraction of a second to paint)."""
    spec = scene_spec(name)
    if texel is not None:
        spec = SceneSpec(**{**spec.__dict__, "texel": float(texel)})
    return build_scene(spec)


def describe_scene(scene: Scene) -> dict:
    """What ``scene.json`` says about the scene: its name, the room seed and what that seed
    is reserved for (:data:`vizloc_ros.sim.rooms.SEED_USES`; both None for ``demo``), the
    room's extent, the furniture, the walls' doors, windows and colours, and its own light."""
    spec = scene.spec
    seed = parse_room_name(spec.name)
    return {
        "name": spec.name,
        "seed": seed,
        "seed_use": None if seed is None else seed_use(seed),
        "room": {"lo": list(spec.room_lo), "hi": list(spec.room_hi),
                 "extent_m": [float(h - l) for l, h in zip(spec.room_lo, spec.room_hi)],
                 "largest_side_m": room_extent(spec)},
        "boxes": [{"name": b.name, "lo": list(b.lo), "hi": list(b.hi), "hue": b.hue} for b in spec.boxes],
        "doors": list(scene.doors),
        "windows": list(scene.windows),
        "wall_hues": scene.wall_hues,
        "light": list(spec.light),
        "texture_seed": spec.texture_seed,
        "texel_m": spec.texel,
    }


__all__ = ["canonical_scene_name", "describe_scene", "get_scene", "scene_names_help", "scene_spec"]
