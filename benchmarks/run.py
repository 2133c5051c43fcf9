"""Where the time goes: one command, one run, one table (`make bench`).

    .venv/bin/python benchmarks/run.py [--steps 60] [--json out.json]

Measured in the same run on this machine:
1. the machine's matmul peak, fp32 and bf16 (best of several 2048^3 products);
2. training images/s of `delving.train` (in-memory uint8 data, whole-batch augmentation,
   channels_last, fp32) for the 30- and 14-layer models at the CPU default (28x28, width 1/8);
3. the same models and data through the usual PyTorch recipe, as pytorch/examples' ImageNet
   script does it: a torchvision dataset, per-sample transforms, a DataLoader with worker
   processes, a plain fp32 NCHW loop; and the ratio of the two;
4. the GFLOP/s training achieves (forward multiply-adds x 2 x 3 for forward + backward) as a
   fraction of the measured peaks;
5. the ImageNet JPEG pipeline (decode + the paper's augmentation), images/s per worker count.
Timings exclude the first steps (warm-up) and evaluation; both paths run the same number of
steps of the same model, init, batch size and optimizer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from delving import results
from delving.data import fashion_mnist
from delving.init import init_model
from delving.models import build_model, count_macs
from delving.train import TrainConfig, param_groups, train

sys.path.insert(0, str(Path(__file__).parent))
import imagefolder_throughput  # noqa: E402  (the JPEG pipeline benchmark beside this file)

WIDTH, BATCH = 0.125, 64


def matmul_peak(dtype: torch.dtype, max_n: int = 2048, reps: int = 5) -> float:
    """Best GFLOP/s of an n x n x n matmul, n doubled from 256 up to max_n while one product
    takes under 0.25 s (a CPU without native bf16 runs bf16 matmuls hundreds of times slower)."""
    best_rate, n = 0.0, 256
    while n <= max_n:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        best_rate = max(best_rate, 2 * n**3 / best / 1e9)
        if best > 0.25:
            break
        n *= 2
    return best_rate


def ours(model: str, steps: int) -> float:
    """Training images/s of delving.train itself (its summary counts training time only)."""
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DELVING_RESULTS"] = tmp
        config = TrainConfig(experiment="bench", model=model, width=WIDTH, batch_size=BATCH, epochs=1,
                             max_steps=steps, augment=True, evals_per_epoch=1, eval_subset=100, test_subset=100,
                             grad_norm_every=0, grad_norm_first=0, checkpoint_every=0, device="cpu")
        record = train(config, progress=False)
    return float(record.summary["images_per_s"])


def usual_recipe(model_name: str, steps: int, workers: int, warmup: int = 5) -> float:
    """pytorch/examples style: torchvision dataset + per-sample transforms + DataLoader + fp32 loop."""
    from torchvision import datasets, transforms

    source, _ = fashion_mnist.locate()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for stem in fashion_mnist.FILES:  # torchvision reads the uncompressed IDX files
            (raw / stem).write_bytes(fashion_mnist._read(fashion_mnist._find(source, stem)))
        transform = transforms.Compose([transforms.RandomCrop(28, padding=2), transforms.RandomHorizontalFlip(),
                                        transforms.ToTensor(), transforms.Normalize((0.2860,), (0.3530,))])
        dataset = datasets.FashionMNIST(tmp, train=True, transform=transform)
        loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers,
                                             persistent_workers=workers > 0)
        model = build_model(model_name, num_classes=10, in_channels=1, input_size=28, width=WIDTH)
        init_model(model, "he-fan-out")
        optimizer = torch.optim.SGD(param_groups(model, 5e-4), lr=0.01, momentum=0.9)
        model.train()
        seen, t0 = 0, None
        for i, (x, y) in enumerate(loader):
            if i == warmup:
                t0, seen = time.perf_counter(), 0
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(y)
            if i == warmup + steps - 1:
                break
        return seen / (time.perf_counter() - t0)


def jpeg_pipeline(images: int, workers: list[int]) -> dict[int, float]:
    from delving.data import imagefolder as imf

    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        imagefolder_throughput.write_folder(Path(tmp), images)
        train_ds, _ = imf.imagefolder_datasets(tmp)
        for w in workers:
            loader = imf.train_loader(train_ds, batch_size=32, num_workers=w, seed=0)
            rates[w] = imagefolder_throughput.loader_rate(loader)[0]
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="timed training steps per measurement")
    parser.add_argument("--recipe-workers", type=int, nargs="+", default=[0, 2], help="DataLoader workers tried")
    parser.add_argument("--jpeg-images", type=int, default=192)
    parser.add_argument("--jpeg-workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path, help="also write the figures here (atomically)")
    args = parser.parse_args(argv)

    out: dict = {"machine": {"cpu": results.cpu_model(), "threads": torch.get_num_threads(),
                             "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}}
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    out["matmul_peak_gflops"] = peak
    print(f"matmul peak: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s", flush=True)

    rows = []
    for model in ("deep30", "small14"):
        macs = count_macs(build_model(model, num_classes=10, in_channels=1, input_size=28, width=WIDTH))
        ours_rate = ours(model, args.steps)
        recipe = {w: usual_recipe(model, args.steps, w) for w in args.recipe_workers}
        best_w = max(recipe, key=recipe.get)
        gflops = ours_rate * macs * 6 / 1e9
        row = {"model": model, "ours_images_per_s": ours_rate, "recipe_images_per_s": recipe,
               "recipe_best_workers": best_w, "speedup": ours_rate / recipe[best_w],
               "train_gflops": gflops, "fraction_fp32_peak": gflops / peak["fp32"],
               "fraction_bf16_peak": gflops / peak["bf16"], "forward_mmacs_per_image": macs / 1e6}
        rows.append(row)
        print(f"{model}: ours {ours_rate:.0f} img/s, usual recipe {recipe} img/s by workers, "
              f"x{row['speedup']:.2f}; {gflops:.1f} GFLOP/s = {row['fraction_fp32_peak']:.0%} of fp32 peak", flush=True)
    out["training"] = rows
    out["jpeg_images_per_s_by_workers"] = jpeg_pipeline(args.jpeg_images, args.jpeg_workers)

    print("\n| model | delving.train img/s | usual recipe img/s (workers) | speed-up | training GFLOP/s | "
          "of fp32 peak | of bf16 peak |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        recipe = r["recipe_images_per_s"][r["recipe_best_workers"]]
        print(f"| {r['model']} | {r['ours_images_per_s']:.0f} | {recipe:.0f} ({r['recipe_best_workers']}) | "
              f"{r['speedup']:.2f}x | {r['train_gflops']:.1f} | {r['fraction_fp32_peak']:.0%} | "
              f"{r['fraction_bf16_peak']:.0%} |")
    print(f"\nmatmul peak: fp32 {peak['fp32']:.0f}, bf16 {peak['bf16']:.0f} GFLOP/s")
    print("ImageNet JPEG pipeline (decode + jitter/crop/flip/PCA): " + ", ".join(
        f"{w} workers {r:.0f} img/s" for w, r in out["jpeg_images_per_s_by_workers"].items()))
    if args.json:
        results.atomic_write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
