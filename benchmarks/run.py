"""Where the time goes: one command, one run, one table (`make bench`).

    .venv/bin/python benchmarks/run.py [--steps 60] [--json out.json]

What is measured, and how, is said in src/delving/benchmark.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from delving import results
from delving.benchmark import run_benchmarks, training_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="timed training steps per measurement")
    parser.add_argument("--recipe-workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers tried")
    parser.add_argument("--jpeg-images", type=int, default=192)
    parser.add_argument("--jpeg-workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="measurements per figure, in turn (median kept)")
    parser.add_argument("--json", type=Path, help="also write the figures here (atomically)")
    args = parser.parse_args(argv)
    out = run_benchmarks(args.steps, tuple(args.recipe_workers), args.jpeg_images, tuple(args.jpeg_workers),
                         log=lambda m: print(m, flush=True), repeats=args.repeats)
    print()
    print(training_table(out).to_string(index=False))
    peak = out["matmul_peak_gflops"]
    print(f"\nmatmul peak: fp32 {peak['fp32']:.0f}, bf16 {peak['bf16']:.1f} GFLOP/s")
    print("ImageNet JPEG pipeline (decode + jitter/crop/flip/PCA): " + ", ".join(
        f"{w} workers {r:.0f} img/s" for w, r in out["jpeg_images_per_s_by_workers"].items()))
    if args.json:
        results.atomic_write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
