"""First-click latency for a lesion larger than the crop: one click, the lesion followed (zoom out, then refine).

    .venv/bin/python scripts/benchmark.py large-lesion --bfloat16                      # paper configuration
    .venv/bin/python scripts/benchmark.py large-lesion --checkpoint tiny.pt --extent 2  # a trained tiny model

A generated study with one lesion ``--extent`` times the crop across (``large_studies``) is pre-processed with the
kits preset; one click at its deepest voxel is served as the server serves it (``Segmenter``, the default follow
bounds unless given), from cold caches, warm-up run excluded. Prints the seconds, crops at the model's spacing,
zoomed-out crops, encoder runs, whether the bounds stopped the growth, the recall and Dice of the mask, and the
process's peak resident memory. Without a checkpoint the weights are random: what the mask covers, and so how
many crops follow it, is then the random model's.
"""

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from typing import List, Optional

import numpy as np
import torch

from lib.engine.cache import BoundedCache, tensor_bytes
from lib.engine.segment import FollowBounds, Segmenter
from lib.model import CONFIGS, Clicks, CropEncoding, Sam3DPredictor, build_sam3d
from lib.phantoms import large_studies, write_studies
from lib.training.simulated_user import protocol_click
from lib.training.data import load_labelled
from lib.transforms.crops import plan_crops


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="ours or the authors'; default: random weights")
    parser.add_argument("--backbone", default=None, choices=sorted(CONFIGS), help="default: the checkpoint's, else vit_b")
    parser.add_argument("--extent", type=float, default=2.0, help="the lesion's largest diameter, in crops")
    parser.add_argument("--seed", type=int, default=6000)
    parser.add_argument("--follow-max-extent", type=float, default=FollowBounds().max_extent)
    parser.add_argument("--follow-max-crops", type=int, default=FollowBounds().max_crops)
    parser.add_argument("--bfloat16", action="store_true", help="bfloat16 autocast (precision auto on bf16 CPUs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = build_sam3d(checkpoint=args.checkpoint, backbone=args.backbone, bfloat16=args.bfloat16).to(args.device).eval()
    size = model.crop_size
    with tempfile.TemporaryDirectory() as folder:
        study = large_studies(1, seed=args.seed, crop_mm=float(size), extent=(args.extent, args.extent))[0]
        write_studies(folder, studies=[study])
        image, label = load_labelled(os.path.join(folder, f"{study.name}.nii.gz"),
                                     os.path.join(folder, "labels", "final", f"{study.name}.nii.gz"), "kits")
    volume, lesion = image[0], label[0].numpy()
    click, _ = protocol_click(np.zeros_like(lesion), lesion)
    clicks = Clicks(click[None], np.zeros((0, 3)), "model")
    crops = plan_crops(clicks, volume.shape, size)
    bounds = FollowBounds(args.follow_max_extent, args.follow_max_crops)

    def segmenter() -> Segmenter:  # cold caches: a first click
        return Segmenter(model, "benchmark", BoundedCache(2**34, CropEncoding.nbytes.fget),
                         BoundedCache(2**32, tensor_bytes), bounds)

    with torch.no_grad():  # warm-up: one crop, one-off costs (allocator, kernels) out of the figure
        Sam3DPredictor(model).foreground_probability(model.encode(torch.zeros(1, 1, size, size, size, device=args.device)),
                                     Clicks([[size // 2] * 3], np.zeros((0, 3)), "crop"))
    start = time.perf_counter()
    result = segmenter().segment(volume, crops, clicks, "kits")
    seconds = time.perf_counter() - start
    mask = result.prob.numpy() > 0.5
    print(json.dumps({
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.device}",
        "weights": model.weights_info.get("state"),
        "crop": size, "volume": list(volume.shape), "lesion_voxels": int(lesion.sum()),
        "seconds": round(seconds, 2),
        "crops": len(result.crops), "zoom_levels": [c["zoom"] for c in result.zoomed_crops],
        "encoder_runs": result.encoder_runs, "growth_bounded": result.growth_bounded,
        "recall": round(float((mask & lesion).sum() / lesion.sum()), 3),
        "dice": round(float(2 * (mask & lesion).sum() / (mask.sum() + lesion.sum())), 3),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }, indent=1))


if __name__ == "__main__":
    main()
