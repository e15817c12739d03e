"""Coarse priors (image retrieval) in the fusion: they initialise the window and recover
a kidnapped robot, and never move a running estimate that they agree with."""
import numpy as np

from test_fusion import base_seq, feed_until, make_fusion  # noqa: F401  (fixture)

COARSE = np.diag([0.3 ** 2] * 3 + [np.radians(10.0) ** 2] * 3)


def _abs_events(events):
    return [e[3] for e in events if e[2] == "abs"]


def test_coarse_priors_initialise_the_window(base_seq):
    fusion = make_fusion(use_odom=False)
    results = [fusion.add_coarse_prior(s, t, q, COARSE) for s, t, q, _, _ in _abs_events(base_seq.events)[:6]]
    assert results[0].status == "initialising"
    assert any(r.status == "accepted" for r in results) and fusion.initialised
    assert fusion.counters["coarse_priors"] == 6


def test_a_coarse_prior_that_agrees_is_not_fused(base_seq):
    fusion = make_fusion(use_odom=True)
    rest = feed_until(fusion, base_seq, base_seq.truth.t0 + 6.0)
    before = fusion.estimate()
    # the next network pose that is not an outlier: an outlier would not agree (it is gated)
    s, t, q, _, _ = next(e for e in _abs_events(rest) if not base_seq.abs_outlier[e[4]])
    result = fusion.add_coarse_prior(s, t, q, COARSE)
    assert result.status == "dropped" and "not fused" in result.reason
    after = fusion.estimate()
    np.testing.assert_array_equal(before.t, after.t)
    assert fusion.counters["coarse_ignored"] == 1


def test_consistent_coarse_priors_elsewhere_restart_a_kidnapped_robot(base_seq):
    fusion = make_fusion(use_odom=False)
    rest = feed_until(fusion, base_seq, base_seq.truth.t0 + 6.0)
    shift = np.array([3.0, -2.0, 0.0])
    statuses = []
    for s, t, q, _, _ in _abs_events(rest)[:12]:
        statuses.append(fusion.add_coarse_prior(s, t + shift, q, COARSE).status)
        if statuses[-1] == "accepted":
            break
    assert statuses[0] == "rejected" and statuses[-1] == "accepted"
    assert fusion.counters["reinitialisations"] == 1
    # restarted where the priors are (within their own uncertainty)
    assert np.linalg.norm(fusion.estimate().t_cam - (t + shift)) < 0.6
