"""Per-walk lighting variation: the same room under another lamp, exposure and colour.

Why: a map recorded in the morning is queried in the evening. ``lighting_variant(seed,
scene)`` draws, from one integer seed, a light position inside the room's upper half, the
light's strength and the ambient level, the camera's exposure and a colour temperature
(2700-7500 K, as white-balance gains relative to 6500 K). ``vizloc-synth --lighting SEED``
renders a whole output with it; the values go into ``scene.json``.
"""
from __future__ import annotations

import math

import numpy as np

from vizloc_ros.sim.render import Lighting
from vizloc_ros.sim.scene import Scene

LIGHTING_SALT = 0x4C495445  # "LITE": lighting seeds never share a stream with room or walk seeds


def kelvin_to_gain(kelvin: float) -> tuple[float, float, float]:
    """RGB gains of a black body at ``kelvin`` relative to 6500 K (Tanner Helland's fit of
    the Planckian locus, good to a few per cent between 1000 and 40000 K)."""
    def rgb(k: float) -> np.ndarray:
        t = k / 100.0
        r = 255.0 if t <= 66 else 329.698727446 * (t - 60) ** -0.1332047592
        g = 99.4708025861 * math.log(t) - 161.1195681661 if t <= 66 else 288.1221695283 * (t - 60) ** -0.0755148492
        b = 255.0 if t >= 66 else (0.0 if t <= 19 else 138.5177312231 * math.log(t - 10) - 305.0447927307)
        return np.clip([r, g, b], 1.0, 255.0)

    gain = rgb(float(kelvin)) / rgb(6500.0)
    return tuple(float(v) for v in gain / gain.max() * 1.0)


def lighting_variant(seed: int, scene: Scene) -> Lighting:
    """A seeded lighting of ``scene`` (light position, strength, ambient, exposure, colour)."""
    rng = np.random.default_rng([LIGHTING_SALT, int(seed)])
    lo, hi = scene.room_lo, scene.room_hi
    position = (float(rng.uniform(lo[0] + 0.5, hi[0] - 0.5)), float(rng.uniform(lo[1] + 0.5, hi[1] - 0.5)),
                float(rng.uniform(lo[2] + 0.6 * (hi[2] - lo[2]), hi[2] - 0.1)))
    kelvin = float(rng.uniform(2700.0, 7500.0))
    return Lighting(position=position, ambient=float(rng.uniform(0.3, 0.65)),
                    diffuse=float(rng.uniform(0.45, 1.1)), falloff=0.04,
                    exposure=float(rng.uniform(0.75, 1.3)), white_balance=kelvin_to_gain(kelvin))


__all__ = ["kelvin_to_gain", "lighting_variant"]
