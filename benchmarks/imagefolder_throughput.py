"""Decode + augmentation throughput of the image-folder path (delving.data.imagefolder).

    .venv/bin/python benchmarks/imagefolder_throughput.py [--images 384] [--workers 0 1 2]

Writes synthetic 500x375 JPEGs (ImageNet's typical size; smooth multi-scale colour noise plus a
gradient, quality 90, so they compress and decode like photos rather than white noise) to a
temporary folder, times each stage of one training sample in this process, then measures
images/s of the whole training pipeline (scale jitter [256, 512], 224 crop, flip, PCA jitter,
mean) and of the 10-view (float32 and float16 samples) and centre-crop test pipelines through `train_loader`/`eval_loader`
for each worker count. The first batch (worker start-up) is not counted.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from delving.benchmark import loader_rate, write_folder
from delving.data import imagefolder as imf


def per_stage(path: str, reps: int = 60) -> dict[str, float]:
    """Milliseconds per image of each training stage, in this process."""
    t = imf.TrainTransform()
    ten = imf.EvalTransform(views="ten")
    img = imf.load_rgb(path)
    stages = {
        "decode (PIL JPEG -> RGB)": lambda: imf.load_rgb(path),
        "scale jitter + 224 crop (box resize)": lambda: t._scale_crop(img),
        "  same, resize whole image then crop": lambda: _resize_then_crop(img),
        "flip + to float tensor": lambda: imf.to_float_tensor(t._flip(img.crop((0, 0, 224, 224)))),
        "PCA jitter + mean": lambda: t._normalize(t._lighting(torch.zeros(3, 224, 224))),
        "whole training transform (after decode)": lambda: t(img),
        "10-view transform (after decode)": lambda: ten(img),
    }
    out = {}
    for name, f in stages.items():
        f()
        start = time.perf_counter()
        for _ in range(reps):
            f()
        out[name] = 1000 * (time.perf_counter() - start) / reps
    return out


def _resize_then_crop(img):
    s = int(torch.randint(256, 513, ()))
    r = TF.resize(img, s, TF.InterpolationMode.BILINEAR)
    return TF.crop(r, 0, 0, 224, 224)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=384)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # as in a worker process; the work here is per-sample PIL + small tensors
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"torch {torch.__version__}, PIL {Image.__version__}, {cpus} CPU(s) usable, {args.images} JPEGs 500x375 q90")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        write_folder(root, args.images)
        print(f"wrote {len(list(root.rglob('*.JPEG')))} JPEGs in {time.perf_counter() - t0:.1f} s "
              f"(mean {np.mean([f.stat().st_size for f in root.rglob('*.JPEG')]) / 1024:.0f} KiB)\n")
        train, val = imf.imagefolder_datasets(root)
        _, val16 = imf.imagefolder_datasets(root, dtype=torch.float16)
        print("per image, one process:")
        for name, ms in per_stage(train.samples[0][0]).items():
            print(f"  {name:42s} {ms:6.2f} ms")
        print()
        print(f"{'pipeline':32s} {'workers':>7s} {'images/s':>9s} {'first batch s':>13s}")
        for label, make in (
            ("train (jitter, crop, flip, PCA)", lambda w: imf.train_loader(train, batch_size=args.batch_size,
                                                                            num_workers=w, seed=0)),
            ("val 10-view", lambda w: imf.eval_loader(val, batch_size=args.batch_size, num_workers=w)),
            ("val centre crop", lambda w: imf.eval_loader(val.with_views("center"), batch_size=args.batch_size,
                                                          num_workers=w)),
            ("val 10-view, float16", lambda w: imf.eval_loader(val16, batch_size=args.batch_size, num_workers=w)),
        ):
            for w in args.workers:
                rate, first = loader_rate(make(w))
                print(f"{label:32s} {w:7d} {rate:9.1f} {first:13.2f}")
                sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
