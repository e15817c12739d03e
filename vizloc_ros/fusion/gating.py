"""Whether an absolute measurement may touch the graph: the Mahalanobis gate against the
prediction, and the search for mutually consistent measurements that (re)start the
window, at start-up and after a kidnapping.

Why apart: the gate is what keeps a wrong network pose from ever moving the estimate,
and the consistency test is what decides that the estimate, not the network, is wrong.
Both are statistics over measurements and relative motion; neither needs the graph.
"""
from __future__ import annotations

import math

import gtsam
import numpy as np

from vizloc_ros.fusion.config import FusionConfig
from vizloc_ros.fusion.conventions import chi2_quantile, transport
from vizloc_ros.fusion.measurements import DUPLICATE_S, Measurement
from vizloc_ros.fusion.motion import MotionModel


class Gate:
    """Chi-square gate (6 dof) and the candidate sets for (re)initialisation: ``init_buf``
    while uninitialised, ``streak`` of rejected measurements while running, and
    ``too_old_streak``, the run of measurements older than the window (a clock jump)."""

    def __init__(self, config: FusionConfig, motion: MotionModel):
        self.config = config
        self.motion = motion
        self.threshold = chi2_quantile(config.gate_probability, 6)
        #: a rejected pose this far off is a kidnap candidate; one between the two
        #: thresholds is only rejected (a correlated network error, not a moved robot)
        self.kidnap_threshold = max(self.threshold, chi2_quantile(config.kidnap_probability, 6))
        self.too_old_streak = 0
        self.clear()

    def clear(self) -> None:
        """Forget the candidates (the window they were gathered against is gone)."""
        self.init_buf: list[Measurement] = []
        self.streak: list[Measurement] = []
        #: stamp of the first pose rejected since the last accepted one (None: none since)
        self.rejected_since: float | None = None

    def offer_initial(self, meas: Measurement, horizon: float) -> list[Measurement] | None:
        """Add a measurement while uninitialised; the ``init_consistent`` (or more) mutually
        consistent ones to start from, else None."""
        n = self.config.init_consistent
        self.init_buf = self._candidates(self.init_buf, meas, horizon, n)
        return self.consistent_subset(self.init_buf, meas, n)

    def offer_rejected(self, meas: Measurement, horizon: float) -> list[Measurement] | None:
        """Add a measurement the gate rejected; ``kidnap_consecutive`` (or more) mutually
        consistent ones mean the robot was kidnapped: restart from them. Else None."""
        n = self.config.kidnap_consecutive
        self.streak = self._candidates(self.streak, meas, horizon, n)
        return self.consistent_subset(self.streak, meas, n)

    @staticmethod
    def _candidates(buf: list[Measurement], meas: Measurement, horizon: float, n: int):
        """``buf`` without entries before ``horizon`` or at ``meas``'s stamp, plus ``meas``,
        in stamp order, at most the newest ``3 * n``."""
        buf = [m for m in buf if m.stamp >= horizon and abs(m.stamp - meas.stamp) >= DUPLICATE_S]
        buf.append(meas)
        buf.sort(key=lambda m: m.stamp)
        return buf[-3 * n:]

    def mahalanobis2(self, pred: gtsam.Pose3, cov_pred: np.ndarray, meas: Measurement) -> float:
        e = gtsam.Pose3.Logmap(pred.between(meas.pose))
        S = cov_pred + meas.cov
        try:
            d2 = float(e @ np.linalg.solve(S, e))
        except np.linalg.LinAlgError:
            return math.inf
        return d2 if math.isfinite(d2) else math.inf

    def consistent_subset(self, cands: list[Measurement], newest: Measurement, n: int):
        """Largest greedy set containing ``newest`` whose members pass the gate pairwise and
        jointly (chi-square of all residuals about their fused mean), or None if < n."""
        if n <= 1:
            return [newest]
        if len(cands) < n:
            return None
        members = [newest]
        for m in sorted(cands, key=lambda m: -m.stamp):
            if m is newest:
                continue
            if all(self._pair_d2(m, o) <= self.threshold for o in members):
                members.append(m)
        if len(members) < n:
            return None
        members.sort(key=lambda m: m.stamp)
        while len(members) >= n:
            worst, worst_d2, total = None, -1.0, 0.0
            ref = members[-1]
            # Fuse all members at the newest one's stamp, then sum their squared residuals.
            moved = []
            info = np.zeros((6, 6))
            vec = np.zeros(6)
            for m in members:
                delta, q = self.motion.relative(m.stamp, ref.stamp)
                p = m.pose.compose(delta)
                cov = transport(m.cov, delta) + q
                W = np.linalg.inv(cov)
                x = gtsam.Pose3.Logmap(ref.pose.between(p))
                moved.append((m, x, W))
                info += W
                vec += W @ x
            mean = np.linalg.solve(info, vec)
            for m, x, W in moved:
                r = x - mean
                d2 = float(r @ W @ r)
                total += d2
                if d2 > worst_d2:
                    worst, worst_d2 = m, d2
            if total <= chi2_quantile(self.config.gate_probability, 6 * (len(members) - 1)):
                return members
            if worst is newest:
                return None
            members.remove(worst)
        return None

    def _pair_d2(self, a: Measurement, b: Measurement) -> float:
        if a.stamp > b.stamp:
            a, b = b, a
        delta, q = self.motion.relative(a.stamp, b.stamp)
        pred = a.pose.compose(delta)
        return self.mahalanobis2(pred, transport(a.cov, delta) + q, b)
