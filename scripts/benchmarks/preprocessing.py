"""Memory and time of resampling a large CT to a preset's spacing: MONAI's Spacingd vs sam3d's SeparableSpacingd.

Each runs in a fresh process (peak resident memory is per process) on the same synthetic, already reoriented
volume; the figure is the peak memory added by the resampling step, next to the size of its result.

    .venv/bin/python scripts/benchmark.py preprocessing --shape 512 512 300 --spacing 0.8 0.8 2.5
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import List, Optional

SCRIPTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLEMENTATIONS = ("monai", "sam3d")


def resample_once(implementation: str, shape, spacing, pixdim) -> dict:
    """In this process: build the volume, then resample it; returns the peak memory the resampling added."""
    import numpy as np
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientationd, Spacingd

    from lib.transforms.presets import MODEL_AXCODES
    from lib.transforms.resample import SeparableSpacingd

    volume = np.random.default_rng(0).integers(-1000, 1000, shape, dtype=np.int16)
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    image = MetaTensor(torch.from_numpy(volume).float()[None], affine=affine)
    data = Orientationd("image", axcodes=MODEL_AXCODES, labels=(("L", "R"), ("P", "A"), ("I", "S")))({"image": image})
    del volume, image
    step = Spacingd("image", pixdim=pixdim) if implementation == "monai" else SeparableSpacingd("image", pixdim)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    out = step(data)["image"]
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"implementation": implementation, "seconds": seconds, "added_gib": (peak - before) / 2**30,
            "result_gib": out.numel() * 4 / 2**30, "result_shape": list(out.shape[1:])}


def measure(implementation: str, shape, spacing, pixdim=(1.0, 1.0, 1.0)) -> dict:
    """``resample_once`` in a fresh Python process."""
    args = ["--child", implementation, "--shape", *map(str, shape), "--spacing", *map(str, spacing),
            "--pixdim", *map(str, pixdim)]
    done = subprocess.run([sys.executable, os.path.join(SCRIPTS, "benchmark.py"), "preprocessing", *args],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300], help="voxels (i, j, k)")
    parser.add_argument("--spacing", type=float, nargs=3, default=[0.8, 0.8, 2.5], help="mm (i, j, k)")
    parser.add_argument("--pixdim", type=float, nargs=3, default=[1.0, 1.0, 1.0], help="target spacing, mm")
    parser.add_argument("--child", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(resample_once(args.child, args.shape, args.spacing, args.pixdim)))
        return
    rows = [measure(name, args.shape, args.spacing, args.pixdim) for name in IMPLEMENTATIONS]
    print(f"{args.shape} voxels at {args.spacing} mm -> {rows[0]['result_shape']} at {args.pixdim} mm "
          f"({rows[0]['result_gib']:.2f} GiB float32)")
    print("| implementation | memory added | time |")
    print("|---|---|---|")
    for row in rows:
        print(f"| {row['implementation']} | {row['added_gib']:.2f} GiB | {row['seconds']:.1f} s |")
    monai, ours = rows
    print(f"sam3d / MONAI: memory {ours['added_gib'] / monai['added_gib']:.2f}x, time {ours['seconds'] / monai['seconds']:.2f}x")


if __name__ == "__main__":
    main()
