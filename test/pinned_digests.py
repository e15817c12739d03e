"""Values rounded before they are hashed, so a pinned digest of generated scenes or
lighting changes when the generator changes, not with the last bits of float printing."""
from __future__ import annotations

import numpy as np


def rounded(value):
    """Floats to 9 decimals, recursively through tuples and lists."""
    if isinstance(value, (float, np.floating)):
        return round(float(value), 9)
    if isinstance(value, (tuple, list)):
        return [rounded(v) for v in value]
    return value
