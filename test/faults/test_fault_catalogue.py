"""Every case of the fault catalogue (fault_cases.py) with its expected behaviour.

Each case injects one fault (an image, a message, a weights file, a bag, a parameter
file, a command-line mistake) where a user or a broken sensor would put it, and must show
its stated behaviour: a clear error with its exit code, a counted drop, a clean reset, or
normal processing. No case may crash, publish or write a NaN, or leave a half-written file.
``benchmarks/fault_suite.py`` runs the same cases and counts them.
"""
import pytest

import fault_cases as F


#: "group: name" of the cases that show a defect not fixed yet (strict xfail: a fix must
#: remove its names here)
KNOWN_DEFECTS: set[str] = set()


def _cases():
    for case in F.CASES:
        name = f"{case.group}: {case.name}"
        marks = [pytest.mark.xfail(strict=True, reason="known defect")] if name in KNOWN_DEFECTS else []
        yield pytest.param(case, id=name, marks=marks)


@pytest.fixture(scope="module")
def res(tmp_path_factory, fast_cpu):
    return F.Resources(tmp_path_factory.mktemp("faults"))


@pytest.mark.parametrize("case", list(_cases()))
def test_fault_case(case, res):
    obs = F.run_case(case, res)
    assert not obs.crashed, obs.detail
    assert obs.behaviour in case.expected, f"{obs.behaviour}: {obs.detail} (expected {case.why})"
    if obs.behaviour == "error":
        assert obs.detail and "\n" not in obs.detail, obs.detail
    assert obs.nan_outputs == 0
    assert obs.half_written == []
    assert obs.recovered, f"the next good input was not handled normally ({obs.detail})"


def test_the_catalogue_covers_every_listed_fault():
    """Issue #10's list, by the words of its cases."""
    names = " | ".join(f"{c.group}: {c.name}" for c in F.CASES).lower()
    for words in ("empty image", "truncated data", "unknown encoding", "wrong step", "16-bit", "float image",
                  "corrupt jpeg", "resolution change", "black frame", "saturated frame",
                  "nan position", "inf covariance", "not positive definite", "zero quaternion",
                  "frame 'odom', not 'map'", "zero stamp", "bag loop", "duplicate stamp", "gap of 120 s",
                  "odometry reset", "truncated safetensors", "another architecture",
                  "pickle disguised as safetensors", "missing keys", "truncated mid-chunk",
                  "without the image topic", "unsupported type", "string for an integer"):
        assert words in names, words
    assert len({(c.group, c.name) for c in F.CASES}) == len(F.CASES)
