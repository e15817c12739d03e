"""Rendering speed of the synthetic world (target: >= 20 frames/s at 320x240 on 2 cores).

Renders the frames of a walk (RGB + depth, shading on) in the demo room or a procedural
room (``--scene room:SEED``; benchmarks use evaluation seeds, 3000-3099, docs/SYNTHETIC.md),
optionally under a seeded lighting (``--lighting SEED``), and prints frames/s; the scene
build and the first frame are timed separately, since they happen once.

    python benchmarks/bench_render.py [--size 320x240] [--frames 200] [--scene demo|room:SEED] [--lighting SEED]
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="320x240", help="WIDTHxHEIGHT (default 320x240)")
    parser.add_argument("--frames", type=int, default=200, help="frames to render (default 200)")
    parser.add_argument("--scene", default="demo", help="demo (default) or room:SEED")
    parser.add_argument("--lighting", type=int, default=None, metavar="SEED",
                        help="render under lighting_variant(SEED) (default: the scene's own light)")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))

    from vizloc_ros.sim.catalog import canonical_scene_name, get_scene
    from vizloc_ros.sim.lighting import check_lighting_seed, lighting_variant
    from vizloc_ros.sim.render import PinholeCamera, Renderer
    from vizloc_ros.sim.trajectories import camera_poses, random_walk

    try:
        name = canonical_scene_name(args.scene)
        if args.lighting is not None:
            check_lighting_seed(args.lighting)
    except ValueError as exc:
        parser.error(str(exc))
    start = time.perf_counter()
    scene = get_scene(name)
    build_s = time.perf_counter() - start
    lighting = None if args.lighting is None else lighting_variant(args.lighting, scene)
    renderer = Renderer(scene, PinholeCamera.from_fov(width, height), lighting=lighting)
    trajectory = random_walk(scene, args.frames / 15.0 + 1.0, seed=101)
    times = trajectory.sample_times(15.0)[: args.frames]
    t_cam, q_cam = camera_poses(trajectory, times)
    start = time.perf_counter()
    renderer.render(t_cam[0], q_cam[0])
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(len(times)):
        renderer.render(t_cam[i], q_cam[i])
    elapsed = time.perf_counter() - start
    fps = len(times) / elapsed
    print(f"scene {name}: build {build_s * 1000:.0f} ms ({scene.atlas.shape[0]} texels), "
          f"first frame: {first_s * 1000:.1f} ms")
    print(f"rendered {len(times)} frames at {width}x{height} (RGB + depth) in {elapsed:.2f} s: "
          f"{fps:.1f} frames/s, {1000 / fps:.1f} ms/frame  [cpus: {os.cpu_count()}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
