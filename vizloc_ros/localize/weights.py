"""Where the shipped weights are: one lookup for the node parameters and the replay.

Why several places: colcon installs ``weights/`` into the package's share folder, pip
(``data_files``) into ``<prefix>/share/vizloc_ros/weights``, and a source checkout keeps
it beside the package. The first folder that holds the file wins.
"""
from __future__ import annotations

import sys
from pathlib import Path

PACKAGE = "vizloc_ros"
DEMO_WEIGHTS = "mapnet_demo.safetensors"


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
