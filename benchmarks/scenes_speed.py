"""How fast the synthetic scenes generator is, on one core.

Prints images/s (median of 3 runs of 500 images) for multi-object and single-object scenes at 128 px, for the full
COCO records (``sample``: masks, RLE, boxes, captions, semantic map) and for the bare drawing (``render``), plus the
classification helper at 32 and 64 px. Wall-clock and CPU-time rates are both shown: on a shared machine the CPU-time
rate is the one that says what the code costs.

    python benchmarks/scenes_speed.py [--images 500] [--runs 3] [--size 128]
"""
from __future__ import annotations

import argparse
import statistics
import time

import cv2

from detseg.data.scenes import ScenesSource, render_single_object_images


def rate(work, images: int, runs: int) -> tuple[float, float]:
    """Median images/s over ``runs`` calls of ``work()``, by wall clock and by this process's CPU time."""
    wall, cpu = [], []
    for _ in range(runs):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        work()
        wall.append(images / (time.perf_counter() - wall0))
        cpu.append(images / max(time.process_time() - cpu0, 1e-9))
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    cv2.setNumThreads(1)                      # one core, as the goal states
    n, size = args.images, args.size
    cases = []
    for label, single in (("multi-object", False), ("single-object", True)):
        source = ScenesSource(n, size=size, seed=0, single_object=single)
        cases.append((f"{label} {size}px  sample() (records + RLE)", lambda s=source: [s.sample(i) for i in range(n)]))
        cases.append((f"{label} {size}px  render() (no records/RLE)", lambda s=source: [s.render(i) for i in range(n)]))
    for px in (32, 64):
        cases.append((f"classification {px}px render_single_object_images",
                      lambda px=px: render_single_object_images(n, px, seed=0)))
    print(f"{'case':58s} {'img/s wall':>11s} {'img/s cpu':>10s}")
    for label, work in cases:
        wall, cpu = rate(work, n, args.runs)
        print(f"{label:58s} {wall:11.0f} {cpu:10.0f}")


if __name__ == "__main__":
    main()
