"""GTSAM's ``IncrementalFixedLagSmoother`` behind the few calls the fusion makes, whether
GTSAM 4.3 (everything in ``gtsam``) or 4.2 (the smoothers in ``gtsam_unstable``).
"""
from __future__ import annotations

import gtsam
import numpy as np

try:  # GTSAM >= 4.3 ships the fixed-lag smoothers in the main module
    from gtsam import IncrementalFixedLagSmoother
except ImportError:  # pragma: no cover - GTSAM 4.2 keeps them in gtsam_unstable
    from gtsam_unstable import IncrementalFixedLagSmoother

try:
    from gtsam import FixedLagSmootherKeyTimestampMap
except ImportError:  # pragma: no cover - GTSAM 4.2
    try:
        from gtsam_unstable import FixedLagSmootherKeyTimestampMap
    except ImportError:
        FixedLagSmootherKeyTimestampMap = None


class Smoother:
    """The handful of IncrementalFixedLagSmoother calls used here, across GTSAM wrappers.

    GTSAM 4.3 has everything on the smoother (setSmootherLag, marginalCovariance,
    typed calculateEstimate*, getISAM2Result, dict timestamps). The 4.2 wrapper
    (gtsam_unstable) lacks some of them; the fallbacks below go through the ISAM2 object
    or the factor count instead. Only the 4.3 path is exercised by the tests here.
    """

    def __init__(self, lag: float, params):
        self.s = IncrementalFixedLagSmoother(lag, params)
        self.lag = lag
        self.can_set_lag = hasattr(self.s, "setSmootherLag")
        self._has_result = hasattr(self.s, "getISAM2Result")
        self._dict_stamps = FixedLagSmootherKeyTimestampMap is None

    def set_lag(self, lag: float) -> None:
        if self.can_set_lag and lag != self.lag:
            self.s.setSmootherLag(lag)
            self.lag = lag

    def update(self, graph, values, stamps: dict, remove: list) -> list[int]:
        """Run one update; returns the slots the new factors got (needed to remove them)."""
        n_before = None if self._has_result else self.s.getFactors().size()
        if self._dict_stamps:
            self.s.update(graph, values, stamps, remove)
        else:
            try:
                self.s.update(graph, values, stamps, remove)
                self._dict_stamps = True
            except TypeError:  # pragma: no cover - GTSAM 4.2 wants its own map type
                m = FixedLagSmootherKeyTimestampMap()
                for k, v in stamps.items():
                    m.insert((k, v))
                self.s.update(graph, values, m, remove)
        if self._has_result:
            return list(self.s.getISAM2Result().getNewFactorsIndices())
        return list(range(n_before, n_before + graph.size()))  # pragma: no cover - 4.2

    def pose(self, key) -> gtsam.Pose3:
        try:
            return self.s.calculateEstimatePose3(key)
        except AttributeError:  # pragma: no cover - 4.2
            return self.s.calculateEstimate().atPose3(key)

    def vector(self, key) -> np.ndarray:
        try:
            return np.asarray(self.s.calculateEstimateVector(key), dtype=float)
        except AttributeError:  # pragma: no cover - 4.2
            return np.asarray(self.s.calculateEstimate().atVector(key), dtype=float)

    def bias(self, key):
        try:
            return self.s.calculateEstimateConstantBias(key)
        except AttributeError:  # pragma: no cover - 4.2
            return self.s.calculateEstimate().atConstantBias(key)

    def marginal(self, key) -> np.ndarray:
        try:
            cov = self.s.marginalCovariance(key)
        except AttributeError:  # pragma: no cover - 4.2
            cov = self.s.getISAM2().marginalCovariance(key)
        return np.asarray(cov, dtype=float)
