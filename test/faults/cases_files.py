"""Fault classes of the outputs the command lines write (issue #19, items 2, 3, 5, 7, 8).

Each class holds the defect that was found and its neighbours:

``concurrent writers``    a second run writing the same output while the first does, a
                          folder appearing at the output during a run, the temporaries a
                          killed run left (swept by the next one);
``pre-existing outputs``  an output that exists: refused unless the flag says so, and then
                          only an output of the command's own kind is replaced;
``symbolic links``        an output path that is a link: refused before any work;
``disk full``             ENOSPC while a file is written: one line, the previous output
                          intact, no temporary left;
``empty values``          configuration values left empty or malformed (``--set out=``,
                          ``threads:``, ``--set loss=``, ``optim.lr=.inf``, ...): one line
                          naming the key;
``umask``                 files are created with the user's umask, like any other file.

The liveness of a writer is its lock on its temporary (``vizloc_ros.files``): a live
writer is simulated by holding that lock from this process.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path

import fault_cases as F

from vizloc_ros import files


@contextlib.contextmanager
def _live_writer(path: Path, pid: int = 1, folder: bool = True):
    """A temporary of ``path`` held (locked) by a writer that is still running."""
    partial = files.partial_path(path, pid)
    if folder:
        partial.mkdir()
    else:
        partial.write_bytes(b"half")
    fd = os.open(partial, os.O_RDONLY)
    import fcntl  # POSIX only, like the lock it imitates

    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        yield partial
    finally:
        os.close(fd)
        if partial.is_dir():
            shutil.rmtree(partial)
        else:
            partial.unlink()


def _without_the_other_writer(obs: F.Observation, partial: Path) -> F.Observation:
    """The other writer's temporary is its own, not this run's leftover."""
    obs.half_written = [h for h in obs.half_written if partial.name not in h]
    if obs.behaviour == "error" and "another process" not in obs.detail:
        obs.behaviour = "error without naming the other writer"
    return obs


def _dead_writer(path: Path, folder: bool = True) -> Path:
    """A temporary left by a writer killed with -9: unlocked, named after a dead PID."""
    partial = files.partial_path(path, 2 ** 22 + 7)  # above the default pid_max: nobody's
    if folder:
        partial.mkdir()
        (partial / "metrics.json").write_text("{")
    else:
        partial.write_bytes(b"\0" * 1024)
    return partial


# --------------------------------------------------------------------------- the commands

def _train_main():
    from vizloc_ros.training import train

    return train.main


def _synth_main():
    from vizloc_ros.sim import synthetic

    return synthetic.main


def _train_argv(res, out: Path, *extra) -> list:
    return ["--data", res.bag, "--data-kind", "bag", "--model", "posenet_resnet18", "--epochs", "1",
            "--batch-size", "8", "--out", out, "--device", "cpu", "--no-progress",
            "--set", "input.resize=48", "--set", "input.crop=[48,64]", "--set", "model.args.feat_dim=32",
            "--set", "loss.relative=false", "--set", "augment.random_crop=false", "--set", "threads=1", *extra]


def _train_case(extra=(), prepare=None, words: str = ""):
    """``vizloc-train`` on the catalogue's bag into ``m``; an error must name ``words``."""
    def run(res, folder: Path) -> F.Observation:
        out = folder / "m"
        extra_args = list(extra)
        if prepare is not None:
            extra_args += prepare(res, folder) or []
        obs = F.cli_observation(_train_main(), _train_argv(res, out, *extra_args), folder,
                                out.with_suffix(".safetensors"))
        if obs.behaviour == "error" and words and words not in obs.detail:
            obs.behaviour = f"error without {words!r}"
        return obs
    return run


def _earlier_checkpoint(res, folder: Path) -> list:
    for suffix in (".safetensors", ".json"):
        shutil.copyfile(res.weights.with_suffix(suffix), folder / f"m{suffix}")
    return []


def _synth_argv(out: Path, *extra) -> list:
    return ["--out", out, "--split", "test", "--frames", "4", "--size", "32x24", "--format", "bag", "--quiet",
            *extra]


# --------------------------------------------------------------------------- concurrent writers

def _replay_while_another_writes(res, folder):
    out = folder / "report"
    with _live_writer(out) as partial:
        obs = F.replay_case()(res, folder)
    return _without_the_other_writer(obs, partial)


def _train_while_another_writes(res, folder):
    out = folder / "m"
    with _live_writer(out.with_suffix(".safetensors"), folder=False) as partial:
        obs = _train_case()(res, folder)
    return _without_the_other_writer(obs, partial)


def _synth_while_another_writes(res, folder):
    out = folder / "world"
    with _live_writer(out) as partial:
        obs = F.cli_observation(_synth_main(), _synth_argv(out), folder, out)
    return _without_the_other_writer(obs, partial)


def _eval_while_another_writes(res, folder):
    target = folder / "m.json"
    with _live_writer(target, folder=False) as partial:
        obs = F.eval_case(args=("--json", target))(res, folder)
    return _without_the_other_writer(obs, partial)


def _appears_during_the_run(content: str | None, overwrite: bool):
    """A folder made at --out while the replay runs (another tool, another run): kept as
    it is, the run's report discarded with a line saying so."""
    def run(res, folder):
        from vizloc_ros.replay import cli as replay_cli

        out = folder / "report"
        original = replay_cli.write_report

        def write_then_someone_else_takes_out(staging, metrics):
            original(staging, metrics)
            out.mkdir()
            if content:
                (out / content).write_text("keep me\n")

        replay_cli.write_report = write_then_someone_else_takes_out
        try:
            obs = F.cli_observation(F._replay_main(),
                                    [res.bag, "--weights", res.weights, "--out", out, "--device", "cpu",
                                     "--no-progress", *(["--overwrite"] if overwrite else [])], folder)
        finally:
            replay_cli.write_report = original
        kept = sorted(p.name for p in out.iterdir()) if out.is_dir() else None
        if kept != ([content] if content else []):
            obs.half_written.append(f"{out.name} changed: {kept}")
        return obs
    return run


def _replay_after_a_killed_run(res, folder):
    stale = _dead_writer(folder / "report")
    obs = F.replay_case()(res, folder)
    if stale.exists():
        obs.half_written.append(stale.name)
    return obs


def _train_after_a_killed_run(res, folder):
    """An earlier checkpoint and the killed run's half-written temporary beside it:
    --overwrite trains, sweeps the temporary and replaces the checkpoint."""
    stale = _dead_writer(folder / "m.safetensors", folder=False)
    obs = _train_case(extra=("--overwrite",), prepare=_earlier_checkpoint)(res, folder)
    if stale.exists():
        obs.half_written.append(stale.name)
    return obs


def _synth_over_a_foreign_folder(res, folder):
    mine = folder / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x\n")
    return F.cli_observation(_synth_main(), _synth_argv(mine, "--overwrite"), folder, mine)


# --------------------------------------------------------------------------- links

def _link_to_an_earlier_report(res, folder):
    report = folder / "earlier"
    report.mkdir()
    (report / "metrics.json").write_text("{}\n")
    (report / "report.md").write_text("# earlier\n")
    link = folder / "report"
    link.symlink_to(report)
    return {"out": link}


def _train_into_a_link(res, folder):
    target = folder / "elsewhere.safetensors"
    target.write_bytes(b"keep me")
    (folder / "m.safetensors").symlink_to(target)
    obs = _train_case(extra=("--overwrite",), words="symbolic link")(res, folder)
    if target.read_bytes() != b"keep me" or not (folder / "m.safetensors").is_symlink():
        obs.half_written.append("the link or its target changed")
    return obs


def _synth_into_a_link(res, folder):
    target = folder / "data"
    target.mkdir()
    (folder / "world").symlink_to(target)
    obs = F.cli_observation(_synth_main(), _synth_argv(folder / "world", "--overwrite"), folder)
    if obs.behaviour == "error" and "symbolic link" not in obs.detail:
        obs.behaviour = "error without 'symbolic link'"
    if any(target.iterdir()):
        obs.half_written.append("the link's target changed")
    return obs


def _eval_json_link(res, folder):
    target = folder / "elsewhere.json"
    target.write_text("{}\n")
    (folder / "m.json").symlink_to(target)
    return F.eval_case(args=("--json", folder / "m.json"))(res, folder)


# --------------------------------------------------------------------------- disk full

class _DiskFull:
    """``vizloc_ros.files._fsync`` raising ENOSPC: the file system filled while the
    output was written (write() itself may succeed and the error come at the flush)."""

    def __enter__(self):
        self.original = files._fsync

        def full(path):
            raise OSError(28, "No space left on device", str(path))
        files._fsync = full

    def __exit__(self, *exc):
        files._fsync = self.original
        return False


def _train_disk_full(res, folder):
    with _DiskFull():
        return _train_case(extra=("--overwrite",), prepare=_earlier_checkpoint,
                           words="No space left on device")(res, folder)


def _synth_disk_full(res, folder):
    from vizloc_ros.sim import synthetic

    original = synthetic._scene_metadata

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", "scene.json")
    synthetic._scene_metadata = full
    try:
        return F.cli_observation(_synth_main(), _synth_argv(folder / "world"), folder, folder / "world")
    finally:
        synthetic._scene_metadata = original


def _export_disk_full(res, folder):
    with _DiskFull():
        return F.cli_observation(F._export_main(), [res.weights, "--out", folder / "net", "--tensorrt", "no"],
                                 folder, folder / "net.onnx")


def _eval_disk_full(res, folder):
    with _DiskFull():
        return F.eval_case(args=("--json", folder / "m.json"))(res, folder)


# --------------------------------------------------------------------------- empty values

def _train_yaml(text: str, words: str):
    """``vizloc-train --config`` with ``text`` (the --set overrides of the other cases
    would win over it, so none of its keys is set on the command line)."""
    def run(res, folder):
        config = folder / "train.yaml"
        config.write_text(text)
        argv = _train_argv(res, folder / "m", "--config", config)
        for key in ("threads", "optim.lr"):
            if f"{key}=1" in argv:
                del argv[argv.index(f"{key}=1") - 1: argv.index(f"{key}=1") + 1]
        obs = F.cli_observation(_train_main(), argv, folder, folder / "m.safetensors")
        if obs.behaviour == "error" and words not in obs.detail:
            obs.behaviour = f"error without {words!r}"
        return obs
    return run


def _resume_another_architecture(res, folder):
    """A training state of a PoseNet, resumed as a MapNet: one line, not torch's list of
    every tensor."""
    import torch

    from vizloc_ros.localize.models import build_model
    from vizloc_ros.training import train
    from vizloc_ros.training.losses import build_loss

    model = build_model("posenet_resnet18", feat_dim=32)
    loss = build_loss({"relative": False})
    optimizer = torch.optim.Adam(list(model.parameters()) + list(loss.parameters()), lr=1e-4)
    train.save_train_state(folder / "m.state.safetensors", model, optimizer, loss, 1, 1.0)
    argv = [a if a != "posenet_resnet18" else "mapnet" for a in _train_argv(res, folder / "m", "--resume")]
    obs = F.cli_observation(_train_main(), argv, folder, folder / "m.state.safetensors")
    if obs.behaviour == "error" and "posenet_resnet18" not in obs.detail:
        obs.behaviour = "error without naming the saved architecture"
    return obs


# --------------------------------------------------------------------------- umask

def _modes_follow_the_umask(res, folder):
    """A checkpoint (tensors and JSON), a metrics JSON and a report-like folder get the
    modes the umask gives any new file (safetensors' own writer gave 0600)."""
    from vizloc_ros.localize.models import load_checkpoint, save_checkpoint

    model, meta = load_checkpoint(res.weights)
    previous = os.umask(0o027)
    try:
        st_path = save_checkpoint(folder / "m", model, {k: meta[k] for k in ("input", "validation_errors")})
        text = files.write_text(folder / "metrics.json", "{}\n")
        with files.staged(folder / "report", folder=True):
            pass
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode)
             for p in (st_path, st_path.with_suffix(".json"), text, folder / "report")}
    wanted = {name: (0o750 if name == "report" else 0o640) for name in modes}
    if modes != wanted:
        return F.Observation(f"modes {({k: oct(v) for k, v in modes.items()})}",
                             detail=f"expected {({k: oct(v) for k, v in wanted.items()})}")
    return F.Observation("ok", half_written=F.leftovers(folder))


# --------------------------------------------------------------------------- the list

def cases() -> list[F.Case]:
    c = []

    def add(group, name, expected, run, why="exit 2, one line, nothing written"):
        c.append(F.in_workdir(group, name, expected, run, why))

    group = "concurrent writers"
    add(group, "vizloc-replay: another run writes the same --out now", "error", _replay_while_another_writes,
        "exit 2 at once naming the other process; its folder untouched")
    add(group, "vizloc-replay: a folder appears at --out during the run", "error",
        _appears_during_the_run("notes.txt", overwrite=False), "exit 2; the folder is kept as it is")
    add(group, "vizloc-replay --overwrite: a folder that is not a report appears at --out during the run",
        "error", _appears_during_the_run("thesis.tex", overwrite=True), "exit 2; the folder is kept as it is")
    add(group, "vizloc-replay: the temporary folder of a killed run", "ok", _replay_after_a_killed_run,
        "report written, the dead run's folder removed")
    add(group, "vizloc-train: another training writes the same checkpoint now", "error",
        _train_while_another_writes, "exit 2 before loading data, naming the other process")
    add(group, "vizloc-train --overwrite: the half-written temporary of a killed training", "ok",
        _train_after_a_killed_run, "trained and replaced; the dead run's temporary removed")
    add(group, "vizloc-synth: another run writes the same --out now", "error", _synth_while_another_writes,
        "exit 2 before rendering, naming the other process")
    add(group, "vizloc-eval: another run writes the same --json now", "error", _eval_while_another_writes,
        "exit 2 before evaluating, naming the other process")

    group = "pre-existing outputs"
    add(group, "vizloc-train: out holds a checkpoint, no --overwrite or --resume", "error",
        _train_case(prepare=_earlier_checkpoint, words="--overwrite"), "exit 2 naming --overwrite; checkpoint kept")
    add(group, "vizloc-synth --overwrite: --out is a folder that is not a vizloc-synth output", "error",
        _synth_over_a_foreign_folder, "exit 2; the folder is kept")

    group = "symbolic links"
    add(group, "vizloc-replay --overwrite: --out is a link to an earlier report", "error",
        F.replay_case(args=("--overwrite",), prepare=_link_to_an_earlier_report),
        "exit 2 before the run; the link and the report kept")
    add(group, "vizloc-train --overwrite: the checkpoint path is a link", "error", _train_into_a_link,
        "exit 2 before training; the link and its target kept")
    add(group, "vizloc-synth --overwrite: --out is a link", "error", _synth_into_a_link,
        "exit 2 before rendering; the link's target untouched")
    add(group, "vizloc-eval: --json is a link", "error", _eval_json_link, "exit 2 before evaluating")

    group = "disk full"
    add(group, "vizloc-train: disk full while the checkpoint is written", "error", _train_disk_full,
        "exit 2, one line; the previous checkpoint intact, no temporary")
    add(group, "vizloc-synth: disk full while writing", "error", _synth_disk_full,
        "exit 2, one line, nothing written")
    add(group, "vizloc-export: disk full while writing the ONNX", "error", _export_disk_full,
        "exit 2, one line, no .onnx")
    add(group, "vizloc-eval: disk full while writing --json", "error", _eval_disk_full,
        "exit 2, one line, no JSON")

    group = "empty values"
    for override, words in (("out=", "out must be"), ("loss=", "loss must be a mapping"),
                            ("optim.lr=.inf", "optim.lr must be a finite number"),
                            ("optim.lr=.nan", "optim.lr must be a finite number"),
                            ("input.resize=abc", "input.resize must be an integer"),
                            ("seed=abc", "seed must be an integer"),
                            ("threads=-2", "threads must be an integer >= 0"),
                            ("tuple.skip=", "tuple.skip must be")):
        add(group, f"vizloc-train --set {override}", "error", _train_case(extra=("--set", override), words=words),
            "exit 2, one line naming the key")
    add(group, "vizloc-train: threads: left empty in the YAML", "error",
        _train_yaml("threads:\n", "threads must be"), "exit 2, one line naming the key")
    add(group, "vizloc-train: optim: lr: left empty in the YAML", "error",
        _train_yaml("optim:\n  lr:\n", "optim.lr must be"), "exit 2, one line naming the key")
    add(group, "vizloc-train --resume: a training state of another architecture", "error",
        _resume_another_architecture, "exit 2, one line naming both architectures")

    group = "umask"
    add(group, "checkpoint, metrics JSON and output folders under umask 027", "ok", _modes_follow_the_umask,
        "0640 files, a 0750 folder, as any new file")
    return c
