"""Model latency of a first click (encoder + prompt encoder + decoder) and of a cached click, and peak memory.

    .venv/bin/python scripts/benchmark.py                 # the paper's configuration (vit_b, 128^3 crop)
    .venv/bin/python scripts/benchmark.py --backbone tiny # seconds, for a smoke run

Prints medians over --repeats runs after one warm-up, with the machine, torch version and threads.
"""

import argparse
import os
import platform
import resource
import statistics
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "apps", "sam3d"))

from lib.model import build_sam3d  # noqa: E402


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_b")
    parser.add_argument("--checkpoint", default=None, help="the authors' checkpoint or ours (default: random weights)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = build_sam3d(checkpoint=args.checkpoint, backbone=None if args.checkpoint else args.backbone).to(args.device)
    size = model.crop_size
    crop = torch.randn(1, 1, size, size, size, device=args.device)
    clicks = torch.tensor([[size // 2, size // 2 + 3, size // 2 - 5]], device=args.device)

    encode, decode, cached = [], [], []
    for i in tqdm(range(args.repeats + 1), desc=f"{args.backbone} on {args.device}"):
        encoding, t_encode = timed(lambda: model.encode(crop))
        _, t_decode = timed(lambda: model.foreground_probability(encoding, clicks))
        _, t_cached = timed(lambda: model.foreground_probability(encoding, clicks + 1))
        if i:  # the first round warms up
            encode.append(t_encode)
            decode.append(t_decode)
            cached.append(t_cached)

    first = [e + d for e, d in zip(encode, decode)]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; "
          f"threads {torch.get_num_threads()}; device {args.device}")
    print(f"config: {args.backbone}, crop {size}^3, weights: {model.weights_info['adapters']}")
    print(f"first click:   {statistics.median(first):8.3f} s (encoder {statistics.median(encode):.3f} s, "
          f"prompt + decoder {statistics.median(decode):.3f} s)")
    print(f"cached click:  {statistics.median(cached):8.3f} s")
    if args.device.startswith("cuda"):
        print(f"peak memory:   {torch.cuda.max_memory_allocated() / 2**30:8.2f} GiB (torch.cuda.max_memory_allocated)")
    else:
        print(f"peak memory:   {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:8.2f} GiB (max RSS)")


if __name__ == "__main__":
    main()
