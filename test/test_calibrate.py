"""vizloc-calibrate: noise figures from a bag with ground truth, as a parameter file the
nodes and vizloc-replay --params-file accept; bad input is one line, nothing written."""
import numpy as np
import pytest
import yaml

from conftest import _render_bag
from vizloc_ros.replay import calibrate
from vizloc_ros.replay.params_file import read_params_file


@pytest.fixture(scope="module")
def walk_bag(tmp_path_factory):
    """45 frames (3 s) of the synthetic world at 80x60, the tiny network's input size."""
    return _render_bag(tmp_path_factory.mktemp("walk"), 45, 80, 60, seed=5)


def _run(capsys, *args):
    rc = calibrate.main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_existing_output_without_overwrite_is_one_line_and_untouched(tmp_path, capsys):
    out = tmp_path / "params.yaml"
    out.write_text("keep me\n")
    rc, _, err = _run(capsys, tmp_path / "no_bag", "--out", out)
    assert rc == 2 and err.count("\n") == 1 and "--overwrite" in err
    assert out.read_text() == "keep me\n"


def test_a_bag_without_ground_truth_is_one_line(walk_bag, tiny_weights, tmp_path, capsys):
    out = tmp_path / "params.yaml"
    rc, _, err = _run(capsys, walk_bag, "--out", out, "--weights", tiny_weights,
                      "--ground-truth", "/no/such/topic")
    assert rc == 2 and err.count("\n") == 1 and "/no/such/topic" in err, err
    assert not out.exists()


def test_too_few_frames_is_one_line(small_bag, tiny_weights, tmp_path, capsys):
    out = tmp_path / "params.yaml"
    rc, _, err = _run(capsys, small_bag, "--out", out, "--weights", tiny_weights, "--device", "cpu")
    assert rc == 2 and err.count("\n") == 1 and f"at least {calibrate.MIN_FRAMES}" in err, err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_calibration_writes_a_parameter_file_the_nodes_accept(walk_bag, tiny_weights, tmp_path, capsys):
    base = tmp_path / "robot.yaml"
    base.write_text("vizloc_fusion:\n  ros__parameters:\n    window_size: 30\n    publish_tf: false\n")
    out = tmp_path / "calibrated.yaml"
    report = tmp_path / "replay"
    rc, stdout, err = _run(capsys, walk_bag, "--out", out, "--weights", tiny_weights, "--device", "cpu",
                           "--params-file", base, "--imu-topic", "/imu/data", "--keep-report", report)
    assert rc == 0, err
    written = yaml.safe_load(out.read_text())["vizloc_fusion"]["ros__parameters"]
    # the robot's own values are kept, the measured ones added
    assert written["window_size"] == 30 and written["publish_tf"] is False
    for name in ("abs_cov_scale", "abs_correlation_time", "abs_bias_share", "odom_floor_trans_per_m",
                 "odom_floor_rot_per_rad",
                 "gyro_noise_density", "accel_noise_density"):
        assert np.isfinite(written[name]) and written[name] >= 0.0, name
    # an untrained network is far worse than its covariance says: a large scale
    assert written["abs_cov_scale"] > 10.0
    # measured on the robot's walk: they win over the figures a map carries
    assert written["noise_from_weights"] is False
    options = read_params_file(out).options   # the nodes' own checks, as vizloc-replay --params-file
    assert options["fusion_params"]["abs_cov_scale"] == written["abs_cov_scale"]
    assert "before" in stdout and "after" in stdout and "NEES/dof" in stdout
    # again: refused without --overwrite; with it, from the kept report, the same figures
    rc, _, err = _run(capsys, walk_bag, "--out", out, "--weights", tiny_weights)
    assert rc == 2 and "--overwrite" in err
    rc, _, err = _run(capsys, walk_bag, "--out", out, "--overwrite", "--params-file", base,
                      "--imu-topic", "/imu/data", "--from-report", report)
    assert rc == 0, err
    assert yaml.safe_load(out.read_text())["vizloc_fusion"]["ros__parameters"] == written
    # a report of another bag is refused in one line
    rc, _, err = _run(capsys, tmp_path / "other_bag", "--out", tmp_path / "x.yaml", "--from-report", report)
    assert rc == 2 and err.count("\n") == 1 and "not of" in err, err
    # and one made with other weights (the fusion reads the weights' noise figures)
    other = tmp_path / "other.safetensors"
    rc, _, err = _run(capsys, walk_bag, "--out", tmp_path / "x.yaml", "--weights", other, "--from-report", report)
    assert rc == 2 and err.count("\n") == 1 and "was made with the weights" in err, err


def test_correlation_time_of_an_exponentially_correlated_error_is_its_time_constant():
    rng = np.random.default_rng(1)
    period, tau, n = 0.05, 0.8, 20000
    keep = np.exp(-period / tau)
    e = np.zeros((n, 6))
    for i in range(1, n):
        e[i] = keep * e[i - 1] + np.sqrt(1 - keep ** 2) * rng.normal(size=6)
    stamps = np.arange(n) * period
    cov = np.broadcast_to(np.eye(6), (n, 6, 6))
    assert calibrate.correlation_time(stamps, e, cov) == pytest.approx(tau, rel=0.25)
    white = rng.normal(size=(n, 6))
    assert calibrate.correlation_time(stamps, white, cov) < 0.1


def test_the_bias_share_is_raised_until_the_fused_pose_is_honest():
    """Where the measured figures leave the fused pose over-confident (MapNet on the demo
    walk: NEES per dof 1.7 with its measured 0.10), abs_bias_share is raised until the
    fused NEES per dof is 1; never lowered below what was measured."""
    calls = []

    def fused_nees(share):
        calls.append(share)
        return 3.0 / (1.0 + 20.0 * share)   # 1 at share 0.1, falling as the share grows

    fitted = calibrate.fit_bias_share(fused_nees, 0.02)
    assert fitted == pytest.approx(0.1, abs=0.01) and len(calls) <= calibrate.BIAS_FIT_ITERATIONS + 4
    assert fitted >= 0.02
    assert calibrate.fit_bias_share(lambda share: 0.8, 0.3) == 0.3     # honest already: kept
    # far beyond the first guess: the upper end grows until the NEES falls below 1
    assert calibrate.fit_bias_share(lambda share: 10.0 / (1.0 + 10.0 * share), 0.01) == pytest.approx(0.9, abs=0.05)
