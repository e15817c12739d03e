"""The pose graph of the window: smoother, keys at measurement stamps, the relative-motion
edges between consecutive keys, and the cached newest pose.

Why apart: which factors sit in which smoother slots, which edges still wait for their
sensors, and what has been marginalised is bookkeeping that gating and prediction never
need to see; they ask for the window's extent, insert a measurement, or read a key's state.
"""
from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import gtsam
import numpy as np

from vizloc_ros.fusion.config import FusionConfig
from vizloc_ros.fusion.conventions import gtsam_cov_to_ros
from vizloc_ros.fusion.measurements import DUPLICATE_S, Measurement, correlation_inflation
from vizloc_ros.fusion.motion import MotionModel
from vizloc_ros.fusion.smoother import Smoother

#: network poses whose covariances set the level of the walk-long bias (abs_bias_share):
#: a few seconds at camera rates, so the level follows a change of scene but not one frame
BIAS_LEVEL_POSES = 50


def X(i):
    return gtsam.symbol("x", i)


def V(i):
    return gtsam.symbol("v", i)


def B(i):
    return gtsam.symbol("b", i)


@dataclass(eq=False, slots=True)
class GraphKey:
    """A robot pose in the graph (``X(idx)``, and ``V(idx)`` / ``B(idx)`` with nav states)."""

    idx: int
    stamp: float
    odom: tuple | None = None      # (odom_T_base Pose3, cov ROS/odom axes) at this stamp, lazily


@dataclass(eq=False, slots=True)
class GraphEdge:
    """Relative factors from key ``a`` to the next key ``b`` and the smoother slots holding
    them. An edge built before its sensors covered it (``complete`` false) is ``pending``
    until it is rebuilt once they have."""

    a: GraphKey
    b: GraphKey
    factors: list
    complete: bool
    pending: bool = field(init=False)

    def __post_init__(self):
        self.pending = not self.complete


@dataclass(eq=False, slots=True)
class NewestPose:
    """The newest graph pose with its marginal covariance (GTSAM order, body axes) and, with
    nav states, its velocity and IMU bias: what predictions and the output start from."""

    stamp: float
    key: GraphKey
    pose: gtsam.Pose3
    cov: np.ndarray
    vel: np.ndarray | None = None
    bias: gtsam.imuBias.ConstantBias | None = None


class GraphFailure(RuntimeError):
    """GTSAM failed; the window has already been rebuilt from the last good estimate."""


class WindowGraph:
    """Keys, edges and the fixed-lag smoother. ``on_failure`` rebuilds the window after a
    GTSAM failure (the owner's job: the gate's candidates go with the graph)."""

    def __init__(self, config: FusionConfig, motion: MotionModel, counters: dict,
                 on_failure: Callable[[], None]):
        c = self.config = config
        self.motion = motion
        self.counters = counters
        self.on_failure = on_failure
        if c.robust_kernel == "huber":
            self.kernel = gtsam.noiseModel.mEstimator.Huber.Create(c.robust_param)
        elif c.robust_kernel == "cauchy":
            self.kernel = gtsam.noiseModel.mEstimator.Cauchy.Create(c.robust_param)
        else:
            self.kernel = None
        self.isam_params = gtsam.ISAM2Params()
        self.isam_params.setRelinearizeThreshold(c.relinearize_threshold)
        self.isam_params.relinearizeSkip = 1
        # QR instead of Cholesky: with stiff IMU factors next to decimetre-level absolute
        # poses, Cholesky of the squared system reported "indeterminant" on well-posed
        # graphs; QR costs about nothing here and about 20 % with IMU.
        self.isam_params.setFactorization("QR")
        # Bumped whenever ``latest`` changes and never reset, so that an output cached for
        # one graph is never taken for a later one.
        self.version = 0
        self.clear()

    def clear(self) -> None:
        """Forget the graph (not the sensors)."""
        self.smoother: Smoother | None = None
        self.keys: list[GraphKey] = []
        self.key_stamps: list[float] = []
        self.edges: dict[int, GraphEdge] = {}     # earlier key idx -> edge to the next key
        self.next_idx = 0
        self.latest: NewestPose | None = None     # cache for the newest key, see refresh
        # abs_bias_share of the newest network covariance, ROS order and map axes: the
        # network's common bias, added to what is handed out (FusionConfig.abs_bias_share)
        self.bias_cov_ros: np.ndarray | None = None
        # information matrices of the recent network poses, the level of the bias (_bias_cov)
        self._recent_information: deque = deque(maxlen=BIAS_LEVEL_POSES)

    # ------------------------------------------------------------------ window extent

    def window_lag(self) -> float:
        c = self.config
        if c.window_seconds is not None:
            return c.window_seconds
        if len(self.keys) > c.window_size:
            newest = self.key_stamps[-1]
            return max(newest - self.key_stamps[-c.window_size], 0.0) + 1e-9
        return 1e12

    def window_start(self) -> float:
        """Oldest stamp a new pose may have and still stay in the window."""
        if not self.keys:
            return -math.inf
        c = self.config
        if c.window_seconds is not None:
            return self.key_stamps[-1] - c.window_seconds
        if len(self.keys) >= c.window_size:
            return self.key_stamps[-c.window_size]
        return -math.inf

    def has_key_at(self, s: float) -> bool:
        """A key closer than ``DUPLICATE_S`` to ``s`` (a second pose there would make a
        singular edge)."""
        pos = bisect.bisect_left(self.key_stamps, s)
        for j in (pos - 1, pos):
            if 0 <= j < len(self.keys) and abs(self.key_stamps[j] - s) < DUPLICATE_S:
                return True
        return False

    def window_span_estimate(self) -> float:
        c = self.config
        if c.window_seconds is not None:
            return c.window_seconds
        if len(self.keys) >= 2:
            return self.key_stamps[-1] - self.key_stamps[0]
        return 5.0

    # ------------------------------------------------------------------ building

    def _new_smoother(self):
        c = self.config
        if c.window_seconds is not None:
            lag = c.window_seconds
        else:
            # The pose-count window sets the lag before every update; a wrapper without
            # setSmootherLag (GTSAM 4.2) gets a time window of window_size camera periods.
            lag = 1e12
            probe = Smoother(lag, self.isam_params)
            if not probe.can_set_lag:  # pragma: no cover - 4.2
                lag = c.window_size * self._key_period()
            else:
                self.smoother = probe
                return
        self.smoother = Smoother(lag, self.isam_params)

    def _key_period(self) -> float:  # pragma: no cover - 4.2 only
        if len(self.key_stamps) >= 2:
            return max(float(np.median(np.diff(self.key_stamps))), 1e-3)
        return 0.1

    def start(self, meas: Measurement, robust: bool, bias=None):
        """First pose of a graph, held by the measurement (or /initialpose) as a prior."""
        c = self.config
        self._new_smoother()
        key = GraphKey(self.next_idx, meas.stamp)
        self.next_idx += 1
        graph = gtsam.NonlinearFactorGraph()
        values = gtsam.Values()
        graph.add(gtsam.PriorFactorPose3(X(key.idx), meas.pose, self.abs_noise(meas.cov, robust)))
        values.insert(X(key.idx), meas.pose)
        stamps = {X(key.idx): meas.stamp}
        if self.motion.nav:
            v_sigma = gtsam.noiseModel.Isotropic.Sigma(3, c.init_velocity_sigma)
            graph.add(gtsam.PriorFactorVector(V(key.idx), np.zeros(3), v_sigma))
            values.insert(V(key.idx), np.zeros(3))
            b0 = bias if bias is not None else gtsam.imuBias.ConstantBias()
            b_sigma = gtsam.noiseModel.Diagonal.Sigmas(self.motion.bias_prior_sigmas)
            graph.add(gtsam.PriorFactorConstantBias(B(key.idx), b0, b_sigma))
            values.insert(B(key.idx), b0)
            stamps[V(key.idx)] = meas.stamp
            stamps[B(key.idx)] = meas.stamp
        self.keys = [key]
        self.key_stamps = [meas.stamp]
        self._recent_information.clear()   # a new start: the level of the poses from here on
        self.bias_cov_ros = self._bias_cov(meas) if robust else None   # not for /initialpose
        self._update(graph, values, stamps, [])
        self._refresh()

    def _bias_cov(self, meas: Measurement) -> np.ndarray | None:
        """``abs_bias_share`` of the network's typical covariance: the information-weighted
        mean (the inverse of the mean inverse) of the last :data:`BIAS_LEVEL_POSES`
        network poses, map axes, ROS order.

        Why not the newest pose's: a localizer whose covariance changes from frame to frame
        (a scene-coordinate map's grows tenfold when few cells agree) would make the
        walk-long bias, a property of the network, jump with every frame; one uncertain
        frame that passed the gate made the fused covariance several times too large."""
        share = self.config.abs_bias_share
        if share <= 0.0:
            return None
        cov = gtsam_cov_to_ros(meas.cov, rotation=meas.pose.rotation().matrix())
        try:
            self._recent_information.append(np.linalg.inv(0.5 * (cov + cov.T)))
        except np.linalg.LinAlgError:  # a singular covariance: the level stays what it was
            if not self._recent_information:
                return share * cov
        mean_information = np.mean(self._recent_information, axis=0)
        return share * np.linalg.inv(0.5 * (mean_information + mean_information.T))

    def abs_noise(self, cov: np.ndarray, robust: bool = True):
        noise = gtsam.noiseModel.Gaussian.Covariance(cov)
        if robust and self.kernel is not None:
            return gtsam.noiseModel.Robust.Create(self.kernel, noise)
        return noise

    def insert(self, meas: Measurement, pred: gtsam.Pose3):
        """Add a pose at ``meas.stamp`` with its absolute factor, splicing it into the chain
        (out-of-order stamps replace the edge they fall into by two edges)."""
        key = GraphKey(self.next_idx, meas.stamp)
        self.next_idx += 1
        pos = bisect.bisect_left(self.key_stamps, meas.stamp)
        prev = self.keys[pos - 1] if pos > 0 else None
        nxt = self.keys[pos] if pos < len(self.keys) else None
        graph = gtsam.NonlinearFactorGraph()
        values = gtsam.Values()
        stamps = {X(key.idx): meas.stamp}
        values.insert(X(key.idx), pred)
        gap = min(meas.stamp - prev.stamp if prev is not None else math.inf,
                  nxt.stamp - meas.stamp if nxt is not None else math.inf)
        inflation = correlation_inflation(gap, self.config.abs_correlation_time)
        graph.add(gtsam.PriorFactorPose3(X(key.idx), meas.pose, self.abs_noise(meas.cov * inflation)))
        new_bias = None
        if self.motion.nav:
            ref = prev if prev is not None else nxt
            new_bias = self.bias_of(ref)
            values.insert(V(key.idx), self.velocity_of(ref))
            values.insert(B(key.idx), new_bias)
            stamps[V(key.idx)] = meas.stamp
            stamps[B(key.idx)] = meas.stamp
        remove = []
        if prev is not None and nxt is not None:
            old = self.edges.pop(prev.idx, None)
            if old is not None:
                remove.extend(old.factors)
        new_edges = []
        if prev is not None:
            new_edges.append(self._edge(prev, key, graph))
        if nxt is not None:
            new_edges.append(self._edge(key, nxt, graph, bias_a=new_bias))
        self.keys.insert(pos, key)
        self.key_stamps.insert(pos, meas.stamp)
        self.bias_cov_ros = self._bias_cov(meas)
        indices = self._update(graph, values, stamps, remove)
        self._assign_indices(new_edges, indices, first=1)
        self._prune_marginalised()
        self._refresh()

    def _assign_indices(self, edges, indices, first):
        """Record which graph slots hold each edge's factors (needed to replace it)."""
        i = first
        for e in edges:
            n = len(e.factors)
            e.factors = list(indices[i:i + n])
            i += n
            self.edges[e.a.idx] = e

    def _edge(self, a: GraphKey, b: GraphKey, graph, bias_a=None) -> GraphEdge:
        """Relative factors between consecutive poses; ``factors`` first holds the count."""
        factors, complete = self._relative_factors(a, b, bias_a)
        for f in factors:
            graph.add(f)
        if not complete:
            self.counters["fallback_edges"] += 1
        e = GraphEdge(a, b, [None] * len(factors), complete)
        return e

    def _relative_factors(self, a: GraphKey, b: GraphKey, bias_a=None):
        """Factors for the motion a -> b and whether every configured sensor covered it."""
        c = self.config
        motion = self.motion
        dt = max(b.stamp - a.stamp, 1e-6)
        out = []
        have_odom = False
        have_imu = False
        if c.use_odom:
            oa, ob = motion.key_odom(a), motion.key_odom(b)
            if oa is not None and ob is not None:
                delta, q = motion.odom_between(oa, ob)
                out.append(gtsam.BetweenFactorPose3(X(a.idx), X(b.idx), delta,
                                                    gtsam.noiseModel.Gaussian.Covariance(q)))
                have_odom = True
        if motion.nav:
            pim, have_imu = motion.pim(a.stamp, b.stamp,
                                       bias_a if bias_a is not None else self.bias_of(a))
            out.append(gtsam.CombinedImuFactor(X(a.idx), V(a.idx), X(b.idx), V(b.idx),
                                               B(a.idx), B(b.idx), pim))
            have_motion = True
        else:
            have_motion = have_odom
        if not have_motion:
            out.append(gtsam.BetweenFactorPose3(X(a.idx), X(b.idx), gtsam.Pose3(),
                                                motion.random_walk_noise(dt)))
        complete = (have_odom or not c.use_odom) and (have_imu or not c.use_imu)
        return out, complete

    # ------------------------------------------------------------------ pending edges

    def has_pending(self) -> bool:
        return any(e.pending for e in self.edges.values())

    def upgrade_pending(self):
        """Rebuild fallback edges once the odometry / IMU that covers them has arrived."""
        if self.smoother is None or not self.edges:
            return
        pending = [e for e in self.edges.values() if e.pending]
        if not pending:
            return
        c = self.config
        sensors = self.motion.sensors
        odom_new = sensors.odom_t[-1] if sensors.odom_t else -math.inf
        imu_new = sensors.imu_t[-1] if sensors.imu_t else -math.inf
        sensors_newest = min(odom_new if c.use_odom else math.inf,
                             imu_new if c.use_imu else math.inf)
        todo = []
        for e in pending:
            if sensors_newest < e.b.stamp:
                continue      # not yet covered; wait
            factors, complete = self._relative_factors(e.a, e.b)
            if complete:
                todo.append((e, factors))
            e.pending = False  # covered by time now: upgrade once, or give up (a sensor gap)
        if not todo:
            return
        graph = gtsam.NonlinearFactorGraph()
        remove = []
        new_edges = []
        for e, factors in todo:
            remove.extend(e.factors)
            for f in factors:
                graph.add(f)
            ne = GraphEdge(e.a, e.b, [None] * len(factors), True)
            new_edges.append(ne)
        try:
            indices = self._update(graph, gtsam.Values(), {}, remove)
        except GraphFailure:
            return
        self._assign_indices(new_edges, indices, first=0)
        self.counters["edges_upgraded"] += len(new_edges)
        self._prune_marginalised()
        self._refresh()

    # ------------------------------------------------------------------ smoother

    def _update(self, graph, values, stamps, remove):
        """One smoother update; on any GTSAM failure rebuild cleanly and raise GraphFailure."""
        try:
            self.smoother.set_lag(self.window_lag())
            return self.smoother.update(graph, values, stamps, remove)
        except Exception as exc:  # noqa: BLE001 - IndeterminantLinearSystem and friends
            self.counters["graph_failures"] += 1
            self.on_failure()
            raise GraphFailure(f"{type(exc).__name__}: {exc}") from exc

    def _prune_marginalised(self):
        """Forget keys the smoother has marginalised (stamps before newest - lag)."""
        if not self.keys:
            return
        cutoff = self.key_stamps[-1] - self.smoother.lag
        n = bisect.bisect_left(self.key_stamps, cutoff)
        if n <= 0:
            return
        for k in self.keys[:n]:
            self.edges.pop(k.idx, None)
        del self.keys[:n]
        del self.key_stamps[:n]

    def _refresh(self):
        """Cache the newest pose, its marginal covariance (and velocity / bias)."""
        try:
            self._refresh_inner()
        except Exception as exc:  # noqa: BLE001 - e.g. IndeterminantLinearSystem
            self.counters["graph_failures"] += 1
            self.on_failure()
            raise GraphFailure(f"{type(exc).__name__}: {exc}") from exc

    def _refresh_inner(self):
        key = self.keys[-1]
        pose = self.smoother.pose(X(key.idx))
        cov = self.smoother.marginal(X(key.idx))
        if not (np.all(np.isfinite(cov)) and np.all(np.isfinite(pose.matrix()))):
            raise GraphFailure("non-finite estimate")
        latest = NewestPose(key.stamp, key, pose, 0.5 * (cov + cov.T))
        if self.motion.nav:
            latest.vel = self.smoother.vector(V(key.idx))
            latest.bias = self.smoother.bias(B(key.idx))
        self.latest = latest
        self.version += 1

    # ------------------------------------------------------------------ key states

    def velocity_of(self, key: GraphKey):
        if self.latest is not None and self.latest.key is key:
            return self.latest.vel
        return self.smoother.vector(V(key.idx))

    def bias_of(self, key: GraphKey):
        if self.latest is not None and self.latest.key is key:
            return self.latest.bias
        return self.smoother.bias(B(key.idx))

    def key_state(self, key: GraphKey):
        if self.latest is not None and self.latest.key is key:
            return self.latest.pose, self.latest.cov
        return self.smoother.pose(X(key.idx)), self.smoother.marginal(X(key.idx))
