"""Scenes by name: ``demo`` (the hand-made demo room) or ``room:SEED`` (a procedural room,
:mod:`vizloc_ros.sim.rooms`), built once per process.

Why a module of its own: the scene builder (:mod:`vizloc_ros.sim.scene`) and the room
generator (which produces the builder's specifications) must not import each other; the
catalogue is the one place that knows both.
"""
from __future__ import annotations

from functools import lru_cache

from vizloc_ros.sim.rooms import parse_room_name, room_spec
from vizloc_ros.sim.scene import SCENES, Scene, SceneSpec, build_scene


def scene_names_help() -> str:
    return f"{', '.join(sorted(SCENES))} or room:SEED (a procedural room)"


def scene_spec(name: str) -> SceneSpec:
    """The specification of a named scene: ``demo`` or ``room:SEED``."""
    seed = parse_room_name(name)
    if seed is not None:
        return room_spec(seed)
    if name not in SCENES:
        raise KeyError(f"unknown scene {name!r}; known scenes: {scene_names_help()}")
    return SCENES[name]


@lru_cache(maxsize=4)
def get_scene(name: str = "demo", texel: float | None = None) -> Scene:
    """A named scene (textures take a fraction of a second to paint)."""
    spec = scene_spec(name)
    if texel is not None:
        spec = SceneSpec(**{**spec.__dict__, "texel": float(texel)})
    return build_scene(spec)


__all__ = ["get_scene", "scene_names_help", "scene_spec"]
