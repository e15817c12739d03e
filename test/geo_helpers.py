"""Shared fixtures of the geometric / retrieval model tests: a tiny synthetic world
rendered as a 7-Scenes folder (colour, depth, poses, scene.json) and as bags."""
from pathlib import Path

import torch
from torch_determinism import deterministic_torch

from vizloc_ros.sim.synthetic import SequenceSpec, SynthConfig, generate
from vizloc_ros.training import train

#: the network input of the tiny tests: 80x60 frames resized to 64x48, no crop
TINY_INPUT = {"resize": 48, "crop": [48, 64]}


def make_geo_scene(root: Path, train_frames: int = 16, test_frames: int = 8, size=(80, 60),
                   train_walks: int = 1) -> Path:
    """Training walk(s) seq-01.. and test walk seq-05, formats 7scenes + bag."""
    sequences = [SequenceSpec(n, "train", n, train_frames) for n in range(1, train_walks + 1)]
    sequences.append(SequenceSpec(5, "test", 101, test_frames))
    return generate(root, sequences, SynthConfig(width=size[0], height=size[1]), fmt="both",
                    progress=False)


def train_args(scene: Path, model: str, out: Path, *extra: str) -> list[str]:
    """vizloc-train arguments for a few CPU steps on the tiny scene."""
    return ["--data", str(scene), "--model", model, "--epochs", "1", "--batch-size", "4",
            "--out", str(out), "--device", "cpu", "--no-progress",
            "--set", f"input.resize={TINY_INPUT['resize']}", "--set", "input.crop=[48,64]",
            "--set", "augment.random_crop=false", "--set", "augment.color_jitter=0",
            "--set", "threads=1", *extra]


def train_tiny(scene: Path, model: str, out: Path, settings: dict) -> Path:
    """``vizloc-train`` a few CPU steps of ``model`` on the tiny scene into ``out``, with
    ``--set key=value`` for each of ``settings``; the checkpoint's path."""
    extra = [a for key, value in settings.items() for a in ("--set", f"{key}={value}")]
    assert train.main(train_args(scene, model, out, *extra)) == 0
    return out


def adam_losses(model, loss_of, steps: int, lr: float = 3e-3) -> list[float]:
    """``steps`` Adam steps on ``loss_of()`` (model in train mode); the loss before each.
    Deterministic (:func:`deterministic_torch`): the same losses under any load."""
    with deterministic_torch():
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        losses = []
        for _ in range(steps):
            loss = loss_of()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return losses
