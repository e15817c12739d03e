"""Parameter names a user gets wrong in a params file: each is refused with one line naming
it and the closest known name, as the nodes refuse it at startup (one FATAL line, the
launch stops and exits non-zero) instead of silently running the default.

The cases go through :mod:`vizloc_ros.nodes.params` (``regressor_settings`` /
``fusion_settings``), whose :func:`~vizloc_ros.nodes.params.unknown_parameters` the nodes
call on their parameter overrides.
"""
from __future__ import annotations

import fault_cases as F

#: name: (node section, ros__parameters text, words the error line must hold)
MISSPELT_PARAMETERS = {
    "misspelt fusion parameter names the closest one": (
        "vizloc_fusion", "windw_size: 10", "windw_size (did you mean window_size?)"),
    "misspelt regressor parameter names the closest one": (
        "vizloc_regressor", "devise: cpu", "devise (did you mean device?)"),
    "parameter name in the wrong case": (
        "vizloc_fusion", "Window_Size: 10", "Window_Size (did you mean window_size?)"),
    "a trailing s": (
        "vizloc_regressor", "camera_extrinsics: [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]",
        "camera_extrinsics (did you mean camera_extrinsic?)"),
    "two misspelt names are named in one line": (
        "vizloc_fusion", "windw_size: 10\n    gate_probabilty: 0.99",
        "gate_probabilty (did you mean gate_probability?), windw_size (did you mean window_size?)"),
    "a misspelt name beside a bad value": (
        "vizloc_fusion", "windw_size: 10\n    window_size: 1", "windw_size (did you mean window_size?)"),
    "a regressor parameter in the fusion's section": (
        "vizloc_fusion", "weights: my.safetensors", "unknown parameter(s): weights"),
    "a name far from every parameter": (
        "vizloc_regressor", "frobnicate: true", "unknown parameter(s): frobnicate"),
    "a nested mapping (dotted name)": (
        "vizloc_fusion", "window:\n      size: 10", "window.size (did you mean window_size?)"),
}


def cases() -> list[F.Case]:
    return [F._param_case(name, *spec) for name, spec in MISSPELT_PARAMETERS.items()]
