"""Where the shipped weights are (one lookup for the node parameters and the replay),
and what a checkpoint tells the fusion about its errors.

Why several places: colcon installs ``weights/`` into the package's share folder, pip
(``data_files``) into ``<prefix>/share/vizloc_ros/weights``, and a source checkout keeps
it beside the package. The first folder that holds the file wins.

Read without torch: the fusion node reads a checkpoint's noise figures
(:func:`network_noise`) and never loads a network.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

PACKAGE = "vizloc_ros"
DEMO_WEIGHTS = "ace_demo.safetensors"


def weight_folders() -> list[Path]:
    """The folders searched for shipped weights, in order."""
    folders = []
    try:  # only importable where ROS 2 (ament) is installed
        from ament_index_python.packages import get_package_share_directory

        folders.append(Path(get_package_share_directory(PACKAGE)) / "weights")
    except Exception:  # noqa: BLE001 - no ROS, or not installed with colcon
        pass
    folders.append(Path(__file__).resolve().parents[2] / "weights")
    folders.append(Path(sys.prefix) / "share" / PACKAGE / "weights")
    return folders


def shipped_weights(name: str = DEMO_WEIGHTS) -> Path:
    """Path of a shipped weights file; ``FileNotFoundError`` naming where it looked."""
    folders = weight_folders()
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"the shipped weights {name} were not found "
                            f"(looked in {', '.join(map(str, folders))})")


#: the fusion parameters a checkpoint may carry (``validation_errors.fusion_noise`` of its
#: JSON, measured by ``vizloc-map`` on its validation frames), with their allowed range
NETWORK_NOISE_FIELDS = {"abs_correlation_time": (0.0, 60.0), "abs_bias_share": (0.0, 1.0)}


def sidecar_json(weights) -> Path:
    """The JSON beside a checkpoint or an exported model: ``X.json`` for ``X``,
    ``X.safetensors``, ``X.onnx``, ``X.engine`` or ``X.json``."""
    path = Path(weights).expanduser()
    if path.suffix in (".safetensors", ".onnx", ".engine", ".json"):
        return path.with_suffix(".json")
    return path.with_name(path.name + ".json")


def network_noise(weights) -> dict:
    """The fusion parameters that ``weights``' JSON measured for its own errors
    (:data:`NETWORK_NOISE_FIELDS`), ``{}`` when it carries none (every checkpoint but a
    map's) or has no JSON. ``ValueError`` (one line naming the file) for a JSON that
    cannot be read or a value out of range: a broken file must not silently leave the
    fusion on the wrong figures."""
    path = sidecar_json(weights)
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read the checkpoint's JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: the checkpoint's JSON is not a mapping")
    errors = meta.get("validation_errors") or {}
    if not isinstance(errors, dict):
        raise ValueError(f"{path}: validation_errors is not a mapping")
    block = errors.get("fusion_noise")
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise ValueError(f"{path}: validation_errors.fusion_noise is not a mapping")
    noise = {}
    for name, (low, high) in NETWORK_NOISE_FIELDS.items():
        if name not in block:
            continue
        value = block[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not low <= value <= high:
            raise ValueError(f"{path}: validation_errors.fusion_noise.{name} must be a number in "
                             f"[{low:g}, {high:g}], got {value!r}")
        noise[name] = float(value)
    return noise
