"""Online scale of the network's covariance, from the innovations of the gate.

Why: a network's covariance comes from its validation errors, on images like those it was
trained on. On a walk it has not seen (another path through the room, other lighting) its
errors grow while its covariance does not: the shipped MapNet's NEES per dof is 0.94 on
the demo's held-out walk and 2-5 on walks driven by other recordings. A fusion that
believes such a covariance is over-confident, rejects the larger errors at its gate
and then restarts from them as if the robot had been kidnapped. The gate already computes
what is needed to notice it: each innovation ``e`` (prediction to measurement) with its
predicted covariance ``P + s C`` (``P`` the fused prediction's, ``C`` the network's,
``s`` the scale). When ``s`` is right, ``e^T (P + s C)^-1 e`` is chi-square with 6 dof;
:class:`NoiseScale` keeps the ``s`` at which the median of the recent ones is the median of
that distribution. The median, not the mean: a kidnapping or a run of outliers moves it
only once they are half of the recent innovations, and then the kidnap check has long
restarted the window. The scale never goes below 1: the fusion trusts the network at
most as much as the network says.
"""
from __future__ import annotations

from collections import deque

import numpy as np

from vizloc_ros.fusion.conventions import chi2_quantile

#: median of chi-square with 1 dof
_CHI2_1_MEDIAN = chi2_quantile(0.5, 1)
#: largest scale: a network 30x (in sigma) worse than it says is not worth fusing anyway
MAX_SCALE = 900.0
#: innovations between two solves of the scales
SOLVE_EVERY = 10


class NoiseScale:
    """Per-axis scales (GTSAM order: rot, trans; body axes) on the network covariance such
    that the recent innovations are as large as predicted.

    Per axis, because a network is often honest about one part of the pose and not about
    the other (on one of the demo room's unseen walks the MapNet's translation errors were
    1.5x its sigma and its rotation errors 2-3x). For axis ``j`` the scale ``s_j`` is the one
    at which the median of ``e_j^2 / (P_jj + s_j C_jj)`` over the recent innovations is the
    median of chi-square with 1 dof; the covariance used is ``D C D`` with
    ``D = diag(sqrt(s))``, which keeps its correlations. ``window`` innovations are kept;
    0 turns the scale off (always 1)."""

    def __init__(self, window: int):
        self.window = int(window)
        self.clear()

    def clear(self) -> None:
        self.scales = np.ones(6)
        self._since_solve = 0
        self._e2: deque = deque(maxlen=max(self.window, 1))
        self._p: deque = deque(maxlen=max(self.window, 1))
        self._c: deque = deque(maxlen=max(self.window, 1))

    @property
    def value(self) -> float:
        """The largest of the per-axis scales (for logs and diagnostics)."""
        return float(np.max(self.scales))

    def apply(self, cov: np.ndarray) -> np.ndarray:
        """``cov`` (GTSAM order) with the current scales applied."""
        d = np.sqrt(self.scales)
        return cov * np.outer(d, d)

    def observe(self, innovation: np.ndarray, cov_pred: np.ndarray, cov_meas: np.ndarray) -> None:
        """Record one innovation (GTSAM order) with the prediction's covariance and the
        network's covariance before this scale; update :attr:`scales`."""
        if self.window <= 0:
            return
        e2 = np.square(innovation)
        p = np.diagonal(cov_pred).copy()
        c = np.diagonal(cov_meas).copy()
        if not (np.all(np.isfinite(e2)) and np.all(np.isfinite(p)) and np.all(c > 0)):
            return
        self._e2.append(e2)
        self._p.append(p)
        self._c.append(c)
        self._since_solve += 1
        # re-solved every SOLVE_EVERY innovations: the median of 50 moves slowly, and the
        # bisection would otherwise double the cost of an update
        if len(self._e2) >= min(self.window, SOLVE_EVERY) and self._since_solve >= SOLVE_EVERY:
            self.scales = self._solve()
            self._since_solve = 0

    def _solve(self) -> np.ndarray:
        """Per axis, the scale in [1, MAX_SCALE] at which the median normalised squared
        innovation is the chi-square (1 dof) median: bisection on log s, all axes at once
        (the median falls as s grows)."""
        e2, p, c = np.asarray(self._e2), np.asarray(self._p), np.asarray(self._c)

        def above(log_s):
            return np.median(e2 / (p + np.exp(log_s) * c), axis=0) > _CHI2_1_MEDIAN

        lo = np.zeros(6)
        hi = np.full(6, np.log(MAX_SCALE))
        for _ in range(16):
            mid = 0.5 * (lo + hi)
            up = above(mid)
            lo = np.where(up, mid, lo)
            hi = np.where(up, hi, mid)
        scales = np.exp(hi)
        scales[~above(np.zeros(6))] = 1.0
        return scales
