"""Evaluate a checkpoint as a user would use it: 1, 3 and 5 simulated clicks per lesion, Dice and NSD.

    .venv/bin/python scripts/evaluate.py DATA --checkpoint CKPT --preset kits --out results/kits
    .venv/bin/python scripts/evaluate.py studies/demo --backbone tiny --checkpoint apps/sam3d/model/sam3d.pt

DATA is an MSD-layout folder (imagesTr/ and labelsTr/, e.g. Task07_Pancreas) or a MONAI Label studies folder
(images beside labels/final/). Each lesion (connected component of the tumour label) gets a first click at its
centre and each next one on the largest error, as lib/trainers/evaluate.py simulates. Writes per-lesion rows
(results.csv), a per-case and mean table (results.md, also printed) and a plot of Dice and NSD against clicks
(results.png) to --out.
"""

import argparse
import csv
import glob
import logging
import os
import sys
from typing import Dict, List, Tuple

import numpy as np
import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "apps", "sam3d"))

from lib.model import CONFIGS, build_sam3d  # noqa: E402
from lib.trainers.data import load_labelled  # noqa: E402
from lib.trainers.evaluate import NSD_TOLERANCE_MM, lesion_scores  # noqa: E402
from lib.transforms.presets import PAPER_PRESETS, PRESETS  # noqa: E402

logger = logging.getLogger("evaluate")

# The tumour's value in each paper dataset's labels (the authors' target classes).
TUMOUR_LABEL = {"kits": 2, "lits": 2, "pancreas": 2, "colon": 1}
EXTENSIONS = (".nii.gz", ".nii", ".nrrd")


def strip_extension(name: str) -> str:
    return next((name[: -len(e)] for e in EXTENSIONS if name.endswith(e)), name)


def find_cases(data: str) -> List[Tuple[str, str, str]]:
    """(case id, image path, label path) in an MSD folder or a MONAI Label studies folder."""
    if os.path.isdir(os.path.join(data, "imagesTr")):
        images, labels = os.path.join(data, "imagesTr"), os.path.join(data, "labelsTr")
    else:
        images, labels = data, os.path.join(data, "labels", "final")
    cases = []
    for path in sorted(glob.glob(os.path.join(images, "*"))):
        name = os.path.basename(path)
        if name.startswith(".") or not name.endswith(EXTENSIONS):
            continue  # MSD archives carry macOS ._ files
        label = next((os.path.join(labels, strip_extension(name) + e) for e in EXTENSIONS
                      if os.path.exists(os.path.join(labels, strip_extension(name) + e))), None)
        if label:
            cases.append((strip_extension(name), path, label))
    if not cases:
        raise SystemExit(f"no image with a label in {data} (expected imagesTr/labelsTr or labels/final/)")
    return cases


def markdown_table(rows: List[Dict], clicks: List[int]) -> str:
    header = ["case", "lesions"] + [f"Dice@{n}" for n in clicks] + [f"NSD@{n}" for n in clicks]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    cases = sorted({r["case"] for r in rows})
    for case in cases + ["mean (per lesion)"]:
        chosen = [r for r in rows if r["case"] == case] if case in cases else rows
        cells = [case, str(len(chosen))]
        cells += [f"{np.mean([r[f'dice_{n}'] for r in chosen]):.3f}" for n in clicks]
        cells += [f"{np.mean([r[f'nsd_{n}'] for r in chosen]):.3f}" for n in clicks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: List[Dict], clicks: List[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for metric, name in (("dice", "Dice"), ("nsd", "NSD")):
        means = [np.mean([r[f"{metric}_{n}"] for r in rows]) for n in clicks]
        ax.plot(clicks, means, marker="o", label=name)
    ax.set(xlabel="clicks", ylabel="mean per lesion", xticks=clicks, ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="MSD-layout folder (imagesTr/labelsTr) or MONAI Label studies folder")
    parser.add_argument("--checkpoint", help="ours (sam3d.pt) or the authors' (.pth.tar); none: untrained adapters")
    parser.add_argument("--backbone", choices=sorted(CONFIGS), help="default: the checkpoint's, else vit_b")
    parser.add_argument("--sam-checkpoint", help="SAM weights for the frozen backbone (with an authors' checkpoint)")
    parser.add_argument("--preset", default="ct", choices=sorted(PRESETS), help=f"paper presets: {sorted(PAPER_PRESETS)}")
    parser.add_argument("--label-value", type=int, help="the tumour's label value (default: the preset's, else any > 0)")
    parser.add_argument("--clicks", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--tolerance", type=float, default=NSD_TOLERANCE_MM, help="NSD tolerance in mm (paper: 5)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--limit", type=int, help="evaluate the first N cases only")
    parser.add_argument("--out", default="results", help="folder for results.csv, results.md, results.png")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    cases = find_cases(args.data)[: args.limit]
    torch.manual_seed(0)  # what the checkpoint leaves at initialisation is the same in every run
    model = build_sam3d(checkpoint=args.checkpoint, backbone=args.backbone, sam_checkpoint=args.sam_checkpoint)
    model.to(args.device).eval()
    label_value = args.label_value or TUMOUR_LABEL.get(args.preset)
    spacing = PRESETS[args.preset].spacing
    clicks = sorted(set(args.clicks))

    rows = []
    for case, image_path, label_path in tqdm(cases, desc="cases"):
        image, label = load_labelled(image_path, label_path, args.preset, label_value)
        for lesion, scores in enumerate(lesion_scores(model, image[0], label[0].numpy(), clicks, spacing, args.tolerance)):
            row = {"case": case, "lesion": lesion + 1}
            for n in clicks:
                row[f"dice_{n}"], row[f"nsd_{n}"] = scores[n]
            rows.append(row)
    if not rows:
        raise SystemExit("no lesion in any label: check --label-value")

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown_table(rows, clicks)
    weights = ", ".join(f"{k}: {v}" for k, v in model.weights_info.items())
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"{args.data}, preset {args.preset}, NSD tolerance {args.tolerance} mm\n\nweights: {weights}\n\n{table}\n")
    plot(rows, clicks, os.path.join(args.out, "results.png"))
    print(table)
    logger.info(f"wrote {args.out}/results.csv, results.md and results.png")


if __name__ == "__main__":
    main()
