"""vizloc-replay --params-file: the nodes' parameter file, checked as the nodes check it,
sets what the replay runs; command-line flags win over it; a file the nodes would refuse
is one line and exit 2, with nothing written."""
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from vizloc_ros.replay import cli as replay
from vizloc_ros.replay import fusion_side
from vizloc_ros.replay.params_file import read_params_file
from vizloc_ros.ros_io.bag_io import read_messages
from vizloc_ros.ros_io.tum import read_tum

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "vizloc.yaml"


def _main(bag, weights, out, *args):
    return replay.main([str(bag), "--weights", str(weights), "--out", str(out), "--device", "cpu",
                        "--no-progress", *map(str, args)])


def _file(folder, text) -> Path:
    path = folder / "robot.yaml"
    path.write_text(text)
    return path


def _fusion_file(folder, body) -> Path:
    return _file(folder, "vizloc_fusion:\n  ros__parameters:\n" + "".join(f"    {line}\n" for line in body))


def test_the_shipped_file_replays_exactly_as_no_file(small_bag, tiny_weights, tmp_path, fast_cpu, caplog):
    """config/vizloc.yaml holds the defaults: same poses, same numbers, no warning."""
    assert _main(small_bag, tiny_weights, tmp_path / "plain") == 0
    with caplog.at_level(logging.WARNING, logger="vizloc-replay"):
        assert _main(small_bag, tiny_weights, tmp_path / "file", "--params-file", SHIPPED) == 0
    assert not [r for r in caplog.records if "params-file" in r.getMessage()]
    for name in ("absolute.tum", "fused.tum", "odometry.tum"):
        assert (tmp_path / "file" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name
    plain, file = (json.loads((tmp_path / run / "metrics.json").read_text()) for run in ("plain", "file"))
    assert file["sources"] == plain["sources"] and file["counts"] == plain["counts"]


def test_the_file_reaches_the_fusion_the_replay_runs(small_bag, tiny_weights, tmp_path, fast_cpu, monkeypatch):
    built = []

    class RecordingCore(fusion_side.FusionCore):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(fusion_side, "FusionCore", RecordingCore)
    path = _fusion_file(tmp_path, ["window_size: 7", "gate_probability: 0.95", "robust_kernel: cauchy",
                                   "publish_tf: false", "path_min_spacing: 0.05", "use_odom: false"])
    assert _main(small_bag, tiny_weights, tmp_path / "o", "--params-file", path, "--single-process") == 0
    (core,) = built
    assert (core.config.window_size, core.config.gate_probability, core.config.robust_kernel) == (7, 0.95, "cauchy")
    assert not core.settings.publish_tf and core.settings.path_min_spacing == 0.05
    assert not core.settings.use_odom and not core.config.use_odom  # use_odom: false fuses no odometry
    assert list(read_messages(tmp_path / "o" / "bag", ["/tf"])) == []  # publish_tf: false


def test_flags_given_on_the_command_line_win_over_the_file(tmp_path):
    path = _file(tmp_path, """
vizloc_regressor:
  ros__parameters:
    image_topic: /front/image
    compressed: true
    device: cuda
    mc_dropout_samples: 8
    max_rate: 5.0
    base_frame: chassis
vizloc_fusion:
  ros__parameters:
    odom_topic: /wheel/odom
    base_frame: chassis
    use_imu: true
    imu_topic: /imu
    window_size: 9
""")
    parser = replay.build_parser()
    from_file = replay._file_then_flags(parser.parse_args(["b", "--params-file", str(path)]))
    assert from_file["image_topic"] == "/front/image/compressed"  # what the node subscribes to
    assert (from_file["device"], from_file["mc_dropout_samples"], from_file["max_rate"]) == ("cuda", 8, 5.0)
    assert (from_file["odom_topic"], from_file["imu_topic"], from_file["base_frame"]) == ("/wheel/odom", "/imu",
                                                                                         "chassis")
    assert from_file["fusion_params"]["window_size"] == 9 and read_params_file(path).not_honoured == []
    flags = replay._file_then_flags(parser.parse_args(
        ["b", "--params-file", str(path), "--image-topic", "/cam", "--device", "cpu", "--mc-dropout-samples", "0",
         "--odom-topic", "none", "--imu-topic", "none", "--base-frame", "base_link"]))
    assert (flags["image_topic"], flags["device"], flags["mc_dropout_samples"]) == ("/cam", "cpu", 0)
    assert (flags["odom_topic"], flags["imu_topic"], flags["base_frame"]) == (None, None, "base_link")
    assert flags["max_rate"] == 5.0 and flags["fusion_params"]["window_size"] == 9  # no flag: the file's
    without = replay._file_then_flags(parser.parse_args(["b"]))
    assert without == {}  # no file, no flags: ReplayOptions' defaults
    assert "win over the file" in " ".join(parser.format_help().split())


def test_a_file_with_one_node_is_enough_and_max_rate_is_honoured(small_bag, tiny_weights, tmp_path, fast_cpu):
    path = _file(tmp_path, "vizloc_regressor:\n  ros__parameters:\n    max_rate: 4.0\n")
    assert _main(small_bag, tiny_weights, tmp_path / "o", "--params-file", path, "--no-fusion") == 0
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    stamps, _, _ = read_tum(tmp_path / "o" / "absolute.tum")
    assert metrics["counts"]["images_skipped_rate"] > 0
    assert len(stamps) == metrics["frames"]["estimated"] < metrics["frames"]["images"]
    assert np.min(np.diff(stamps)) >= 1 / 4.0 - 1e-6


def test_camera_extrinsic_is_the_fallback_while_the_bag_has_no_mount(small_bag, tiny_weights, tmp_path, fast_cpu):
    """As on the robot: the parameter counts only where TF has no base <- camera."""
    mount = "camera_extrinsic: [0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 1.0]"

    def absolute(name, base_frame, with_mount):
        body = f"base_frame: {base_frame}\n    " + (mount if with_mount else "")
        path = _file(tmp_path, f"vizloc_regressor:\n  ros__parameters:\n    {body}\n")
        assert _main(small_bag, tiny_weights, tmp_path / name, "--params-file", path, "--no-fusion") == 0
        return read_tum(tmp_path / name / "absolute.tum")[1]

    # no TF path from 'chassis': the fallback lifts every pose by 0.5 m along the base's z
    lifted = absolute("chassis_mount", "chassis", True) - absolute("chassis", "chassis", False)
    np.testing.assert_allclose(np.linalg.norm(lifted, axis=1), 0.5, atol=1e-6)
    # base_link: the bag's /tf_static gives the mount, the fallback is not used
    np.testing.assert_allclose(absolute("base_mount", "base_link", True), absolute("base", "base_link", False))


def test_what_cannot_be_reproduced_offline_is_named_once(tmp_path, caplog):
    path = _file(tmp_path, """
/**:
  ros__parameters:
    use_sim_time: true
amcl:
  ros__parameters:
    max_particles: 2000
vizloc_regressor:
  ros__parameters:
    map_frame: world
    visual_odometry: true
    publish_odom_tf: false
vizloc_fusion:
  ros__parameters:
    map_frame: map
""")
    read = read_params_file(path)
    assert read.options["map_frame"] == "map" and "visual_odometry" not in read.options
    named = " | ".join(read.not_honoured)
    assert "section 'amcl'" in named and "vizloc_regressor.map_frame ('world'" in named
    assert "vizloc_regressor.visual_odometry " in named  # the fusion reads /odom, not its visual odometry
    assert "use_sim_time" not in named
    with caplog.at_level(logging.WARNING, logger="vizloc-replay"):
        replay._file_then_flags(replay.build_parser().parse_args(["b", "--params-file", str(path)]))
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith(f"--params-file {path}: not reproduced offline: ")


def test_visual_odometry_wired_to_the_fusion_is_replayed_as_visual_odom(tmp_path):
    path = _file(tmp_path, """
vizloc_regressor:
  ros__parameters:
    visual_odometry: true
vizloc_fusion:
  ros__parameters:
    odom_topic: /vizloc/visual_odometry
""")
    read = read_params_file(path)
    assert read.options["visual_odometry"] is True and read.not_honoured == []


BAD_FILES = {
    # name: (file text or None for a missing file, words the one error line must hold)
    "unknown parameter": ("vizloc_fusion:\n  ros__parameters:\n    windw_size: 10\n", "vizloc_fusion: unknown parameter(s): windw_size"),
    "wrong type": ("vizloc_fusion:\n  ros__parameters:\n    window_size: '20'\n", "vizloc_fusion: parameter 'window_size'"),
    "out of bounds": ("vizloc_fusion:\n  ros__parameters:\n    gate_probability: 1.5\n", "gate_probability"),
    "bad regressor value": ("vizloc_regressor:\n  ros__parameters:\n    max_rate: -1.0\n", "vizloc_regressor: parameter 'max_rate'"),
    "malformed YAML": ("vizloc_fusion:\n  ros__parameters:\n    window_size: [20\n", "is not valid YAML (line"),
    "no vizloc section": ("amcl:\n  ros__parameters:\n    max_particles: 5\n", "has no vizloc_regressor or vizloc_fusion"),
    "empty file": ("", "has no vizloc_regressor or vizloc_fusion section (sections: none)"),
    "not a mapping": ("- vizloc_fusion\n", "found list data at the top"),
    "ros__parameters not a mapping": ("vizloc_fusion:\n  ros__parameters: 5\n", "must map names to values"),
    "missing file": (None, "cannot read it"),
    "a folder": (..., "cannot read it"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_a_file_the_nodes_would_refuse_is_one_line_and_exit_2(name, small_bag, tiny_weights, tmp_path, capsys):
    text, words = BAD_FILES[name]
    path = tmp_path / "nowhere.yaml" if text is None else tmp_path if text is ... else _file(tmp_path, text)
    assert _main(small_bag, tiny_weights, tmp_path / "o", "--params-file", path) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"vizloc-replay: error: --params-file {path}") and "\n" not in err, err
    assert words in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial*"))
