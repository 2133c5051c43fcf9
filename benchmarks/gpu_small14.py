"""Training throughput of the paper's 14-layer model at 224x224 on synthetic data: images/s and MFU.

    python benchmarks/gpu_small14.py                      # CUDA, bf16 autocast, channels_last
    python benchmarks/gpu_small14.py --compile            # and torch.compile
    python benchmarks/gpu_small14.py --device cpu --batch-size 4 --steps 3 --warmup 1   # smoke test

Synthetic data isolates the model step from JPEG decoding (benchmarks/imagefolder_throughput.py
measures that). Model FLOPs count forward multiply-adds x 2 (FLOPs per MAC) x 3 (forward +
backward, whose two matmuls per layer cost twice the forward); MFU divides the achieved FLOP/s
by the peak the user gives (default: the H100/H200 dense bf16 tensor-core peak, 989 TFLOP/s).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from delving.init import init_model
from delving.models import build_model, count_macs
from delving.results import cpu_model
from delving.train import param_groups


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small14")
    p.add_argument("--activation", default="prelu-channel-wise")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--no-bf16", action="store_true")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak")
    args = p.parse_args()

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    model = build_model(args.model, activation=args.activation)
    init_model(model, "he-fan-out")
    macs = count_macs(model)
    memory_format = torch.preserve_format if args.no_channels_last else torch.channels_last
    model = model.to(device, memory_format=memory_format)
    optimizer = torch.optim.SGD(param_groups(model, 5e-4), lr=0.01, momentum=0.9)
    step_fn = torch.compile(model) if args.compile else model
    x = torch.randn(args.batch_size, 3, 224, 224, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.no_bf16):
            loss = F.cross_entropy(step_fn(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = time.perf_counter() - t0
    images_per_s = args.steps * args.batch_size / seconds
    tflops = images_per_s * macs * 2 * 3 / 1e12
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    result = {"model": args.model, "activation": args.activation, "hardware": hardware,
              "batch_size": args.batch_size, "bf16": not args.no_bf16, "channels_last": not args.no_channels_last,
              "compile": args.compile, "images_per_s": round(images_per_s, 1), "model_tflops": round(tflops, 2),
              "mfu": round(tflops / args.peak_tflops, 4), "forward_gmacs_per_image": round(macs / 1e9, 3),
              "torch": torch.__version__}
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
