"""Pretrain the generic scene encoder once, across many procedural rooms (ACE's
shared-encoder / per-room-head scheme), on a CPU.

Why: a map is made by training only a small head on features the frozen encoder computes
once per frame (``vizloc-map``). That only works if the encoder's features already tell
places apart, in rooms it never saw. So the encoder is trained on ``--rooms`` procedural
rooms (seeds from :data:`vizloc_ros.sim.rooms.SEED_USES` ``pretrain``, never the demo
room, never an evaluation seed), each room with its own head, all heads sharing the one
encoder: what the heads cannot share (where a room's points are) stays in the heads, what
they share (how to describe an image patch so that a small MLP can place it) goes into
the encoder. Targets are exact scene coordinates from the renderer (one ray per output
cell), so the loss is the distance between predicted and true points, in metres.

Robustness is trained in, not hoped for: each frame is rendered under a random lighting
(:func:`vizloc_ros.sim.lighting.lighting_variant`) and each room through a random field
of view (50-80 deg), and crops are random (aligned to the 8-pixel cells).

The run is resumable: every ``--save-every`` minutes the encoder, the heads and the
optimiser state are written (safetensors + JSON, atomically) to ``OUT.state.*``;
``--resume`` continues from there with the same data (rendering is seeded). The result,
``OUT.safetensors`` (fp16) + ``OUT.json`` (how it was made), is what ``weights/`` ships::

    nice -n 19 python -m vizloc_ros.mapping.pretrain --out weights/scene_encoder \\
        --rooms 48 --frames 120 --steps 12000
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vizloc_ros.files import staged_files
from vizloc_ros.geometry import quat_to_matrix
from vizloc_ros.localize.models.ace import CoordinateHead, SceneEncoder
from vizloc_ros.localize.preprocess import IMAGENET_MEAN, IMAGENET_STD
from vizloc_ros.sim.lighting import lighting_variant
from vizloc_ros.sim.render import PinholeCamera, Renderer
from vizloc_ros.sim.rooms import SEED_USES
from vizloc_ros.sim.catalog import get_scene
from vizloc_ros.sim.trajectories import camera_poses, random_walk

LOG = logging.getLogger("vizloc_ros.pretrain")

#: the head regresses (X - room centre) / COORD_SCALE
COORD_SCALE = 3.0


@dataclass
class PretrainConfig:
    rooms: int = 48
    frames: int = 120  # per room, over several walks
    walks: int = 4
    steps: int = 12000
    batch: int = 8
    crop: tuple[int, int] = (192, 256)  # H, W of the random crops (multiples of 8)
    lr: float = 1.5e-3
    weight_decay: float = 1e-4
    default_lighting_share: float = 0.3
    seed: int = 0
    threads: int = 2


def cell_camera(camera: PinholeCamera, stride: int = 8) -> PinholeCamera:
    """A camera whose pixel (i, j) is the ray through the centre of output cell (i, j) of
    ``camera``'s image: rendering it gives the exact depth the targets need."""
    return PinholeCamera(width=math.ceil(camera.width / stride), height=math.ceil(camera.height / stride),
                         fx=camera.fx / stride, fy=camera.fy / stride,
                         cx=(camera.cx - (stride - 1) / 2.0) / stride, cy=(camera.cy - (stride - 1) / 2.0) / stride)


def cell_coordinates(depth: np.ndarray, camera: PinholeCamera, t_wc, R_wc) -> np.ndarray:
    """(h, w) depths of a cell camera -> (h, w, 3) world points (NaN where no depth)."""
    h, w = depth.shape
    u, v = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    d = depth.astype(np.float64)
    pc = np.stack([(u - camera.cx) / camera.fx * d, (v - camera.cy) / camera.fy * d, d], axis=-1)
    pw = pc @ np.asarray(R_wc).T + np.asarray(t_wc)
    pw[~(np.isfinite(d) & (d > 0))] = np.nan
    return pw.astype(np.float32)


def render_room(seed: int, frames: int, walks: int, rng: np.random.Generator, default_share: float):
    """Images (F, H, W, 3) uint8, cell targets (F, h, w, 3) float32 and the room centre."""
    scene = get_scene(f"room:{seed}")
    hfov = float(rng.uniform(50.0, 80.0))
    camera = PinholeCamera.from_fov(320, 240, hfov)
    cells = cell_camera(camera)
    per_walk = int(math.ceil(frames / walks))
    images, targets = [], []
    for walk in range(walks):
        trajectory = random_walk(scene, duration=per_walk * 0.6 + 2.0, seed=int(rng.integers(2 ** 31)))
        times = np.sort(rng.uniform(0.5, per_walk * 0.6 + 1.5, per_walk))
        t, q = camera_poses(trajectory, times)
        for k in range(per_walk):
            if len(images) >= frames:
                break
            lighting = None if rng.random() < default_share else lighting_variant(int(rng.integers(2 ** 31)), scene)
            rgb = Renderer(scene, camera, lighting=lighting).render(t[k], q[k]).rgb
            depth = Renderer(scene, cells, shading=False).render(t[k], q[k]).depth
            images.append(rgb)
            targets.append(cell_coordinates(depth, cells, t[k], quat_to_matrix(q[k])))
    centre = (scene.room_lo + scene.room_hi) / 2.0
    return np.stack(images), np.stack(targets), centre.astype(np.float32), hfov


class RoomData:
    """All rooms' frames in memory (uint8 images, float32 cell targets)."""

    def __init__(self, seeds, config: PretrainConfig, progress: bool = True):
        rng = np.random.default_rng([config.seed, 7])
        self.seeds = list(seeds)
        self.images, self.targets, self.centres, self.hfovs = [], [], [], []
        started = time.monotonic()
        for index, seed in enumerate(self.seeds):
            room_rng = np.random.default_rng([config.seed, int(seed)])
            images, targets, centre, hfov = render_room(seed, config.frames, config.walks, room_rng,
                                                        config.default_lighting_share)
            self.images.append(images)
            self.targets.append(targets)
            self.centres.append(centre)
            self.hfovs.append(hfov)
            if progress:
                LOG.info("rendered room:%d (%d/%d, %d frames, %.0f s)", seed, index + 1, len(self.seeds),
                         len(images), time.monotonic() - started)
        del rng

    def batch(self, rng: np.random.Generator, size: int, crop: tuple[int, int]):
        """(images (B, 3, h, w) float normalised, targets (B, 3, h/8, w/8), room indices (B,))."""
        ch, cw = crop
        rooms = rng.integers(len(self.seeds), size=size)
        xs, ys = [], []
        for room in rooms:
            frame = int(rng.integers(len(self.images[room])))
            image, target = self.images[room][frame], self.targets[room][frame]
            top = 8 * int(rng.integers((image.shape[0] - ch) // 8 + 1))
            left = 8 * int(rng.integers((image.shape[1] - cw) // 8 + 1))
            xs.append(image[top:top + ch, left:left + cw])
            ys.append(target[top // 8:(top + ch) // 8, left // 8:(left + cw) // 8])
        x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 255.0
        x = _colour_jitter(x, rng)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        y = torch.from_numpy(np.stack(ys)).permute(0, 3, 1, 2)
        return (x - mean) / std, y, torch.from_numpy(rooms)


def _colour_jitter(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Brightness, contrast and per-channel gain jitter (on top of the rendered lighting)."""
    b = x.shape[0]
    brightness = torch.from_numpy(rng.uniform(0.8, 1.2, (b, 1, 1, 1))).float()
    gain = torch.from_numpy(rng.uniform(0.92, 1.08, (b, 3, 1, 1))).float()
    contrast = torch.from_numpy(rng.uniform(0.8, 1.2, (b, 1, 1, 1))).float()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * contrast + mean).mul(brightness * gain).clamp(0.0, 1.0)


class Pretrainer(nn.Module):
    """The shared encoder and one head per room."""

    def __init__(self, rooms: int):
        super().__init__()
        self.encoder = SceneEncoder()
        self.heads = nn.ModuleList(CoordinateHead() for _ in range(rooms))

    def loss(self, x, y, rooms, centres: torch.Tensor):
        features = self.encoder(x)
        losses = []
        for i in range(len(rooms)):
            room = int(rooms[i])
            pred = self.heads[room](features[i:i + 1])[0] * COORD_SCALE + centres[room].view(3, 1, 1)
            target = y[i]
            valid = torch.isfinite(target).all(dim=0)
            distance = torch.linalg.vector_norm(pred - torch.nan_to_num(target), dim=0)
            losses.append(distance[valid])
        distances = torch.cat(losses)
        return distances.mean(), distances.detach()


def _lr(step: int, total: int, base: float, warmup: int = 300) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return base * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


# --------------------------------------------------------------------------- state files

def _state_paths(out: Path) -> tuple[Path, Path]:
    return out.with_name(out.name + ".state.safetensors"), out.with_name(out.name + ".state.json")


def save_state(out: Path, model: Pretrainer, optimizer: torch.optim.Optimizer, step: int, rng_state: dict,
               history: list, config: PretrainConfig, runs: list | None = None) -> None:
    from safetensors.torch import save

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for pid, state in opt["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"opt.{pid}.{key}"] = value.detach().contiguous().reshape(value.shape)
    doc = {"step": step, "rng": rng_state, "history": history, "config": asdict(config), "runs": runs or []}
    st, js = _state_paths(out)
    with staged_files([st, js], what="pretraining state") as (st_tmp, js_tmp):
        st_tmp.write_bytes(save(tensors))
        js_tmp.write_text(json.dumps(doc, indent=1))


def load_state(out: Path, model: Pretrainer, optimizer: torch.optim.Optimizer):
    from safetensors.torch import load_file

    st, js = _state_paths(out)
    doc = json.loads(js.read_text())
    tensors = load_file(str(st))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt = optimizer.state_dict()
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            opt["state"].setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict(opt)
    return doc


def encoder_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_encoder(out: Path, encoder: SceneEncoder, summary: dict) -> Path:
    """``OUT.safetensors`` (fp16 tensors, fp32 BN statistics) + ``OUT.json``, atomically."""
    from safetensors.torch import save

    tensors = {}
    for name, value in encoder.state_dict().items():
        value = value.detach().cpu()
        if value.is_floating_point() and "running" not in name:
            value = value.half()
        tensors[name] = value.contiguous()
    blob = save(tensors, metadata={"format": "vizloc_ros/scene-encoder-v1"})
    summary = dict(summary, format="vizloc_ros/scene-encoder-v1", feature_dim=encoder.feature_dim,
                   stride=encoder.stride, sha256=hashlib.sha256(blob).hexdigest())
    st, js = out.with_suffix(".safetensors"), out.with_suffix(".json")
    with staged_files([st, js], what="encoder") as (st_tmp, js_tmp):
        st_tmp.write_bytes(blob)
        js_tmp.write_text(json.dumps(summary, indent=2) + "\n")
    return st


# --------------------------------------------------------------------------- main

def pretrain(out: Path, config: PretrainConfig, resume: bool = False, save_every_min: float = 5.0,
             max_minutes: float | None = None, seeds=None, init_encoder: Path | None = None,
             command: str | None = None) -> dict:
    torch.manual_seed(config.seed)
    torch.set_num_threads(max(1, config.threads))
    seeds = list(seeds if seeds is not None else list(SEED_USES["pretrain"])[:config.rooms])
    bad = [s for s in seeds if s not in SEED_USES["pretrain"]]
    if bad:
        raise ValueError(f"pretraining seeds must be pretrain seeds ({SEED_USES['pretrain']}), got {bad}")
    data = RoomData(seeds, config)
    centres = torch.from_numpy(np.stack(data.centres))
    model = Pretrainer(len(seeds))
    if init_encoder is not None:  # continue from a shipped encoder with fresh heads (the state did not travel)
        from safetensors.torch import load_file

        model.encoder.load_state_dict({k: v.float() for k, v in load_file(str(init_encoder)).items()})
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    rng = np.random.default_rng([config.seed, 11])
    step, history, runs = 0, [], []
    if resume and _state_paths(out)[1].exists():
        doc = load_state(out, model, optimizer)
        step, history = int(doc["step"]), list(doc["history"])
        runs = list(doc.get("runs", []))
        rng.bit_generator.state = doc["rng"]
        LOG.info("resumed at step %d", step)
    # every command that worked on this encoder, with the step it started from (a resumed
    # run recomputes the schedule from its own --steps: the summary must say so)
    runs.append({"command": command or "pretrain() from Python", "from_step": step})
    model.train()
    first_step = step
    started = last_save = time.monotonic()
    window: list[float] = []
    while step < config.steps:
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, config.steps, config.lr)
        x, y, rooms = data.batch(rng, config.batch, config.crop)
        loss, distances = model.loss(x, y, rooms, centres)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        step += 1
        window.append(float(distances.median()))
        if step % 100 == 0 or step == config.steps:
            elapsed = time.monotonic() - started
            history.append({"step": step, "median_m": float(np.median(window)), "elapsed_s": round(elapsed, 1)})
            LOG.info("step %d/%d  median point error %.3f m  %.2f s/step", step, config.steps,
                     np.median(window), elapsed / max(step - first_step, 1))
            window = []
        now = time.monotonic()
        if now - last_save > save_every_min * 60 or step == config.steps:
            save_state(out, model, optimizer, step, rng.bit_generator.state, history, config, runs)
            last_save = now
        if max_minutes is not None and now - started > max_minutes * 60:
            save_state(out, model, optimizer, step, rng.bit_generator.state, history, config, runs)
            LOG.info("stopped after %.0f min at step %d (resume with --resume)", max_minutes, step)
            return {"finished": False, "step": step}
    summary = {
        "made_by": runs[-1]["command"], "runs": runs,
        "config": asdict(config), "room_seeds": seeds, "room_fovs_deg": [round(h, 1) for h in data.hfovs],
        "history": history, "final_median_point_error_m": history[-1]["median_m"] if history else None,
        "never_trained_on": "the demo room and every validation / evaluation seed (vizloc_ros.sim.rooms.SEED_USES)",
    }
    write_encoder(out, model.encoder.eval(), summary)
    return {"finished": True, "step": step, **summary}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vizloc_ros.mapping.pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="OUT(.safetensors/.json); state in OUT.state.*")
    d = PretrainConfig()
    for name in ("rooms", "frames", "walks", "steps", "batch", "seed", "threads"):
        parser.add_argument(f"--{name}", type=int, default=getattr(d, name))
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--resume", action="store_true", help="continue from OUT.state.*")
    parser.add_argument("--init-encoder", type=Path, default=None,
                        help="start from this encoder (e.g. the shipped one) with fresh heads")
    parser.add_argument("--save-every", type=float, default=5.0, help="minutes between state saves")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (resumably) after this long")
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = args.out.with_suffix("") if args.out.suffix in (".safetensors", ".json") else args.out
    if out.with_suffix(".safetensors").exists() and not args.resume:
        print(f"vizloc pretrain: {out.with_suffix('.safetensors')} exists", file=sys.stderr)
        return 2
    available = len(SEED_USES["pretrain"])
    problems = [f"--{name} must be >= 1" for name in ("rooms", "frames", "walks", "steps", "batch", "threads")
                if getattr(args, name) < 1]
    if args.rooms > available:
        problems.append(f"--rooms {args.rooms}: only {available} pretraining rooms are reserved "
                        f"({SEED_USES['pretrain'].start}-{SEED_USES['pretrain'].stop - 1})")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        problems.append(f"--lr must be a positive number, got {args.lr}")
    if args.init_encoder is not None and not args.init_encoder.is_file():
        problems.append(f"--init-encoder {args.init_encoder}: no such file")
    if args.resume and not _state_paths(out)[1].exists():
        problems.append(f"--resume: no state at {_state_paths(out)[1]}")
    if problems:
        print(f"vizloc pretrain: {problems[0]}", file=sys.stderr)
        return 2
    config = PretrainConfig(rooms=args.rooms, frames=args.frames, walks=args.walks, steps=args.steps,
                            batch=args.batch, lr=args.lr, seed=args.seed, threads=args.threads)
    try:
        result = pretrain(out, config, resume=args.resume, save_every_min=args.save_every,
                          max_minutes=args.max_minutes, init_encoder=args.init_encoder,
                          command="python -m vizloc_ros.mapping.pretrain " + " ".join(argv))
    except KeyboardInterrupt:  # the state saved last stays whole (written atomically): --resume goes on
        print(f"vizloc pretrain: interrupted; --resume continues from {_state_paths(out)[1]}", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as exc:  # a state or encoder file that does not fit
        print(f"vizloc pretrain: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: result[k] for k in ("finished", "step")}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())
