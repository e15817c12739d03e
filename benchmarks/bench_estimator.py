"""Latency and throughput of PoseEstimator against the way research code runs a regressor.

Baseline ("research"): PIL resize + centre crop + ToTensor-style normalisation on the CPU,
fp32, eager, model default memory format, one forward per call.
Optimised: :class:`vizloc_ros.localize.estimator.PoseEstimator` (preprocessing on the device,
channels_last, inference_mode; on CUDA also pinned upload, fp16 and CUDA graphs).

Input: a 640x480 uint8 RGB host image (batch 1) or 32 of them, pose out on the host.
Network: MapNet ResNet-34 at 224x224 (resize 256, centre crop 224), untrained weights
(speed does not depend on the values). Prints a table and writes JSON.

    python benchmarks/bench_estimator.py [--device cpu|cuda|all] [--iters N] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vizloc_ros.localize.estimator import PoseEstimator
from vizloc_ros.localize.models import build_model, load_checkpoint, save_checkpoint
from vizloc_ros.localize.preprocess import IMAGENET_MEAN, IMAGENET_STD


def make_checkpoint(folder: Path, backbone: str = "resnet34") -> Path:
    torch.manual_seed(0)
    model = build_model("mapnet", backbone=backbone)
    path = folder / f"mapnet_{backbone}"
    save_checkpoint(path, model.eval(), {"input": {"resize": 256, "crop": [224, 224]}})
    return path


class ResearchBaseline:
    """What geomapnet / PoseNet ports do: PIL transforms per image, fp32 eager forward."""

    def __init__(self, weights: Path, device: torch.device):
        self.model, _ = load_checkpoint(weights, device=device)
        self.device = device
        self.mean = np.array(IMAGENET_MEAN, dtype=np.float32)
        self.std = np.array(IMAGENET_STD, dtype=np.float32)

    def _prep(self, image: np.ndarray) -> torch.Tensor:
        pil = Image.fromarray(image)
        w, h = pil.size
        scale = 256 / min(w, h)
        pil = pil.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
        w, h = pil.size
        left, top = (w - 224) // 2, (h - 224) // 2
        pil = pil.crop((left, top, left + 224, top + 224))
        x = (np.asarray(pil, dtype=np.float32) / 255.0 - self.mean) / self.std
        return torch.from_numpy(x.transpose(2, 0, 1).copy())

    @torch.no_grad()
    def estimate_batch(self, images):
        x = torch.stack([self._prep(img) for img in images]).to(self.device)
        t, q = self.model.decode(self.model(x))
        return t.cpu().numpy(), q.cpu().numpy()


def _time(fn, iters: int, warmup: int, sync) -> list[float]:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def _row(name, device, batch, times):
    times = np.array(times)
    per_frame = times / batch
    return {"path": name, "device": device, "batch": batch,
            "median_ms": float(np.median(times) * 1e3), "p95_ms": float(np.percentile(times, 95) * 1e3),
            "median_ms_per_frame": float(np.median(per_frame) * 1e3),
            "frames_per_s": float(batch / np.median(times))}


def run(devices, iters: int, weights: Path, mc_samples: int, cpu_threads: int | None = None) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for device in devices:
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        dev = torch.device(device)
        baseline = ResearchBaseline(weights, dev)
        variants = [("optimised fp32", PoseEstimator(weights, device=device, precision="fp32",
                                                     cpu_threads=cpu_threads))]
        if device == "cuda":
            variants.append(("optimised fp16", PoseEstimator(weights, device=device, precision="fp16")))
        for batch in (1, 32):
            n = iters if batch == 1 else max(3, iters // 8)
            images = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(batch)]
            rows.append(_row("baseline fp32 eager, CPU preprocessing", device, batch,
                             _time(lambda: baseline.estimate_batch(images), n, 2, sync)))
            for name, est in variants:
                rows.append(_row(name, device, batch,
                                 _time(lambda: est.estimate_batch(images), n, 2, sync)))
        if mc_samples > 1:
            precision = "fp16" if device == "cuda" else "fp32"
            est = PoseEstimator(weights, device=device, precision=precision, mc_dropout_samples=mc_samples,
                                cpu_threads=cpu_threads)
            image = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)]
            rows.append(_row(f"optimised {precision}, MC dropout x{mc_samples}", device, 1,
                             _time(lambda: est.estimate_batch(image), max(5, iters // 2), 2, sync)))
    return rows


def format_rows(rows) -> str:
    header = f"{'path':48s} {'dev':5s} {'batch':>5s} {'median ms':>10s} {'p95 ms':>9s} {'ms/frame':>9s} {'frames/s':>9s}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['path']:48s} {r['device']:5s} {r['batch']:5d} {r['median_ms']:10.2f} "
                     f"{r['p95_ms']:9.2f} {r['median_ms_per_frame']:9.2f} {r['frames_per_s']:9.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="all", choices=("cpu", "cuda", "all"))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--mc-samples", type=int, default=10)
    parser.add_argument("--backbone", default="resnet34")
    parser.add_argument("--cpu-threads", type=int, default=None,
                        help="torch CPU threads (default: the estimator's, cores - 1)")
    parser.add_argument("--out", default="benchmarks/results/bench_estimator.json",
                        help="JSON output (default benchmarks/results/bench_estimator.json)")
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        print("CUDA not available: CPU only")
        devices = [d for d in devices if d != "cuda"]
    with tempfile.TemporaryDirectory() as tmp:
        weights = make_checkpoint(Path(tmp), args.backbone)
        rows = run(devices, args.iters, weights, args.mc_samples, args.cpu_threads)
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    print(f"MapNet {args.backbone} at 224x224, 640x480 uint8 input; {machine}")
    print(format_rows(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
