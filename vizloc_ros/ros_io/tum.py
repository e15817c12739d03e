"""TUM trajectory files (``t tx ty tz qx qy qz qw``), the format evo and most SLAM tools read.

The quaternion is stored in (x, y, z, w) order in the file, like ROS messages; arrays
returned here use the package's (w, x, y, z) order (DESIGN.md).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vizloc_ros.geometry import quat_hemisphere, ros_to_wxyz, wxyz_to_ros


def read_tum(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read a TUM file -> (stamps (N,), t (N,3), q_wxyz (N,4)).

    Comment lines (#) and blank lines are skipped. Raises ``ValueError`` naming the file
    and line on a wrong column count or a non-finite value.
    """
    rows = []
    with open(path, "r", encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.replace(",", " ").split()
            if len(parts) != 8:
                raise ValueError(f"{path}:{number}: expected 8 columns "
                                 f"(t tx ty tz qx qy qz qw), found {len(parts)}")
            try:
                values = [float(p) for p in parts]
            except ValueError as exc:
                raise ValueError(f"{path}:{number}: {exc}") from None
            if not np.all(np.isfinite(values)):
                raise ValueError(f"{path}:{number}: non-finite value")
            rows.append(values)
    if not rows:
        raise ValueError(f"{path}: no poses in file")
    data = np.asarray(rows)
    q = ros_to_wxyz(data[:, 4:8])
    norms = np.linalg.norm(q, axis=1, keepdims=True)
    if np.any(norms < 1e-9):
        raise ValueError(f"{path}: zero quaternion")
    return data[:, 0], data[:, 1:4], quat_hemisphere(q / norms)


def write_tum(path, stamps, t, q_wxyz) -> None:
    """Write a TUM file atomically (temporary name, then rename)."""
    stamps = np.asarray(stamps, dtype=float).reshape(-1)
    t = np.asarray(t, dtype=float).reshape(-1, 3)
    q = wxyz_to_ros(np.asarray(q_wxyz, dtype=float).reshape(-1, 4))
    if not (len(stamps) == len(t) == len(q)):
        raise ValueError("stamps, translations and quaternions differ in length")
    data = np.column_stack([stamps, t, q])
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write("# timestamp tx ty tz qx qy qz qw\n")
        np.savetxt(handle, data, fmt="%.9f")
    os.replace(tmp, path)
