"""Per-walk lighting variation: the same room under another lamp, exposure and colour.

Why: a map recorded in the morning is queried in the evening. ``lighting_variant(seed,
scene)`` draws, from one integer seed, a light position (at least 0.5 m from the walls,
in the upper 40 % of the room less 0.1 m under the ceiling), the light's strength
(:data:`DIFFUSE_RANGE`) and the ambient level (:data:`AMBIENT_RANGE`), the camera's
exposure (:data:`EXPOSURE_RANGE`) and a colour temperature (:data:`KELVIN_RANGE`, as
white-balance gains relative to 6500 K). ``vizloc-synth --lighting SEED`` renders a whole
output with it; :func:`lighting_metadata` is what goes into ``scene.json``.

The draws (their ranges and order) are fixed: the generic encoder was pretrained on
rooms lit by these variants, and a seed must give the same light forever.
"""
from __future__ import annotations

import math

import numpy as np

from vizloc_ros.sim.render import Lighting, Renderer
from vizloc_ros.sim.scene import Scene

LIGHTING_SALT = 0x4C495445  # "LITE": lighting seeds never share a stream with room or walk seeds

#: ranges of the seeded draws (uniform)
KELVIN_RANGE = (2700.0, 7500.0)
AMBIENT_RANGE = (0.3, 0.65)
DIFFUSE_RANGE = (0.45, 1.1)
EXPOSURE_RANGE = (0.75, 1.3)
#: distance falloff of every variant (the renderer's default)
FALLOFF = 0.04
#: the colour temperature the gains are relative to (neutral white balance)
NEUTRAL_KELVIN = 6500.0


def kelvin_to_gain(kelvin: float) -> tuple[float, float, float]:
    """RGB gains of a black body at ``kelvin`` relative to 6500 K (Tanner Helland's fit of
    the Planckian locus, good to a few per cent between 1000 and 40000 K)."""
    def rgb(k: float) -> np.ndarray:
        t = k / 100.0
        r = 255.0 if t <= 66 else 329.698727446 * (t - 60) ** -0.1332047592
        g = 99.4708025861 * math.log(t) - 161.1195681661 if t <= 66 else 288.1221695283 * (t - 60) ** -0.0755148492
        b = 255.0 if t >= 66 else (0.0 if t <= 19 else 138.5177312231 * math.log(t - 10) - 305.0447927307)
        return np.clip([r, g, b], 1.0, 255.0)

    gain = rgb(float(kelvin)) / rgb(NEUTRAL_KELVIN)
    return tuple(float(v) for v in gain / gain.max() * 1.0)


def _draw(seed: int, scene: Scene) -> tuple[Lighting, float]:
    """The seeded lighting and the colour temperature (K) its white balance comes from."""
    rng = np.random.default_rng([LIGHTING_SALT, int(seed)])
    lo, hi = scene.room_lo, scene.room_hi
    position = (float(rng.uniform(lo[0] + 0.5, hi[0] - 0.5)), float(rng.uniform(lo[1] + 0.5, hi[1] - 0.5)),
                float(rng.uniform(lo[2] + 0.6 * (hi[2] - lo[2]), hi[2] - 0.1)))
    kelvin = float(rng.uniform(*KELVIN_RANGE))
    return Lighting(position=position, ambient=float(rng.uniform(*AMBIENT_RANGE)),
                    diffuse=float(rng.uniform(*DIFFUSE_RANGE)), falloff=FALLOFF,
                    exposure=float(rng.uniform(*EXPOSURE_RANGE)), white_balance=kelvin_to_gain(kelvin)), kelvin


def lighting_variant(seed: int, scene: Scene) -> Lighting:
    """A seeded lighting of ``scene`` (light position, strength, ambient, exposure, colour)."""
    return _draw(seed, scene)[0]


def check_lighting_seed(seed) -> int:
    """``seed`` as a lighting seed (a non-negative integer), or ValueError saying why not."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or int(seed) < 0:
        raise ValueError(f"a lighting seed is a non-negative integer, not {seed!r}")
    return int(seed)


def lighting_metadata(seed: int | None, scene: Scene) -> dict:
    """How an output was lit, for ``scene.json``: the seed (None: the scene's own light and
    the renderer's fixed levels) and every value the renderer used."""
    if seed is None:
        lighting = Lighting(position=tuple(float(v) for v in scene.light), ambient=Renderer.AMBIENT,
                            diffuse=Renderer.DIFFUSE, falloff=Renderer.FALLOFF)
        kelvin = NEUTRAL_KELVIN
    else:
        lighting, kelvin = _draw(check_lighting_seed(seed), scene)
    return {"seed": seed, "source": "scene" if seed is None else "lighting_variant",
            "position": list(lighting.position), "ambient": lighting.ambient, "diffuse": lighting.diffuse,
            "falloff": lighting.falloff, "exposure": lighting.exposure, "kelvin": kelvin,
            "white_balance": list(lighting.white_balance)}


__all__ = ["AMBIENT_RANGE", "DIFFUSE_RANGE", "EXPOSURE_RANGE", "KELVIN_RANGE", "check_lighting_seed",
           "kelvin_to_gain", "lighting_metadata", "lighting_variant"]
