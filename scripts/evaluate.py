"""Evaluate a checkpoint as a user would use it: N simulated clicks per lesion, Dice and NSD after each.

    .venv/bin/python scripts/evaluate.py DATA --checkpoint CKPT --preset kits --out results/kits
    .venv/bin/python scripts/evaluate.py studies/hard --checkpoint tiny.pt --preset kits --label-value 1 --clicks 5

DATA is an MSD-layout folder (imagesTr/ and labelsTr/, e.g. Task07_Pancreas) or a MONAI Label studies folder
(images beside labels/final/). Each lesion (connected component of the tumour label) is clicked by the CVPR 2025
interactive 3D segmentation challenge's protocol (lib/training/simulated_user.py protocol_click): the first click at its
deepest voxel, each next one at the deepest voxel of the largest error, foreground on a miss, background on a
leak. Each request is served as the server serves it: crops planned on the clicks so far, and a lesion whose mask
reaches a crop's face followed beyond it (zoomed out, then refined) within --follow-max-extent and
--follow-max-crops (the server's defaults; --follow-max-extent 1: one crop per click group, as before following).
Clicks are placed and masks scored on the model's grid (the preset's spacing), or with --grid image on the image's
stored grid, as the server returns masks and the challenge scores them (a thick-slice label is not resampled).
With --first box each lesion starts with the challenge's box instead (its tight 2D box on the lesion's middle axial
slice and the slices it spans), scored as step "box", then N clicks with the box kept.
Per lesion: Dice, NSD and recall (the fraction of the lesion inside the mask) after the box and clicks 1..N, the area
under the Dice curve (AUC: the mean of Dice@1..N), the challenge's DSC_AUC and NSD_AUC (trapezoids over the N click
steps, in [0, N - 1]) and the worst drop (the largest fall of Dice after one click); which kind each click was (click_n: foreground,
background, or none when the mask was already right), and per group the mean change of Dice that a background
click caused (what a click on a leak does to the mask), also apart on masks under Dice 0.8 and the others (a
click on a nearly right mask has little left to remove); and the share of the wrong voxels on the lesion's
boundary (boundary_n: near 1, what is left is a band one voxel wide). Where DATA holds lesion_kinds.json (written with the
hard phantoms by scripts/make_demo_studies.py --hard) each lesion carries its study's kind. Writes per-lesion
rows (results.csv), a table per kind (else per case) and overall (results.md, also printed) and a plot of Dice
and NSD against clicks (results.png) to --out.
"""

import argparse
import csv
import logging
import os
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "apps", "sam3d"))

from lib.cases import find_cases  # noqa: E402
from lib.engine.segment import FollowBounds  # noqa: E402
from lib.model import CONFIGS, Clicks, build_sam3d  # noqa: E402
from lib.phantoms import read_lesion_kinds  # noqa: E402
from lib.training.data import load_labelled, load_on_image_grid  # noqa: E402
from lib.training.evaluate import NSD_TOLERANCE_MM, Score, challenge_auc, dice_auc, lesion_scores, worst_drop  # noqa: E402
from lib.transforms.planning import AUTO, resolve_preset  # noqa: E402
from lib.transforms.presets import PAPER_PRESETS, PRESETS, READER  # noqa: E402

logger = logging.getLogger("evaluate")

def lesion_row(case: str, lesion: int, kind: str, scores: Dict[int, Score], clicks: int) -> Dict:
    """One csv row: Dice, NSD and recall after the box (n = 0, box-first only) and each click, the AUC and worst
    drop of the Dice curve, and the challenge's DSC_AUC and NSD_AUC over the click steps."""
    row = {"case": case, "lesion": lesion, "kind": kind}
    steps = sorted(scores)
    for n in steps:
        row[f"dice_{n}"], row[f"nsd_{n}"], row[f"recall_{n}"], row[f"click_{n}"], row[f"boundary_{n}"] = scores[n]
    curve = [scores[n].dice for n in steps]
    row["dice_auc"], row["worst_drop"] = dice_auc(curve[-clicks:]), worst_drop(curve)
    row["dsc_auc_challenge"] = challenge_auc(curve, clicks)
    row["nsd_auc_challenge"] = challenge_auc([scores[n].nsd for n in steps], clicks)
    return row


def groups(rows: List[Dict]) -> Tuple[str, Dict[str, List[Dict]]]:
    """("kind", rows per lesion kind) where kinds are known, else ("case", rows per case); then all rows."""
    key = "kind" if any(r["kind"] for r in rows) else "case"
    names = sorted({r[key] for r in rows})
    return key, {**{name: [r for r in rows if r[key] == name] for name in names}, "all (mean per lesion)": rows}


def background_changes(rows: List[Dict], clicks: int, before=lambda dice: True) -> List[float]:
    """The change of Dice that each background click of ``rows`` caused (Dice@n - Dice@n-1 where click n was a
    background click: mostly a click on a leak), for the clicks whose Dice before them ``before`` accepts."""
    return [float(r[f"dice_{n}"]) - float(r[f"dice_{n - 1}"]) for r in rows for n in range(1, clicks + 1)
            if f"dice_{n - 1}" in r and r[f"click_{n}"] == "background" and before(float(r[f"dice_{n - 1}"]))]


# A background click can only add what the leak it lands on costs: on a mask already near the expert's, little.
LEAKY_BELOW_DICE = 0.8


def background_split(rows: List[Dict], clicks: int) -> str:
    """One sentence: the mean Dice change of the background clicks of ``rows`` on masks under LEAKY_BELOW_DICE,
    and on the others (the Dice before the click decides)."""
    parts = []
    for name, before in (("under", lambda dice: dice < LEAKY_BELOW_DICE), ("at or above", lambda dice: dice >= LEAKY_BELOW_DICE)):
        changes = background_changes(rows, clicks, before)
        parts.append(f"on masks {name} Dice {LEAKY_BELOW_DICE}: " + (f"{np.mean(changes):+.3f} ({len(changes)})" if changes else "none"))
    return "Dice change per background click " + "; ".join(parts) + "."


def markdown_table(rows: List[Dict], clicks: int) -> str:
    key, grouped = groups(rows)
    first = 0 if "dice_0" in rows[0] else 1
    steps = range(first, clicks + 1)
    columns = [f"{metric}_{n}" for metric in ("dice", "nsd") for n in steps] + [f"recall_{first}"]
    names = {"dice": "Dice", "nsd": "NSD", "recall": "recall"}
    header = [key, "lesions"] + [f"{names[c.split('_')[0]]}@{'box' if c.endswith('_0') else c.split('_')[1]}" for c in columns]
    header += ["Dice AUC", "worst drop", "DSC_AUC", "NSD_AUC", "background clicks", "Dice change per background click"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, chosen in grouped.items():
        averaged = columns + ["dice_auc", "worst_drop", "dsc_auc_challenge", "nsd_auc_challenge"]
        cells = [name, str(len(chosen))] + [f"{np.mean([r[c] for r in chosen]):.3f}" for c in averaged]
        changes = background_changes(chosen, clicks)
        cells += [str(len(changes)), f"{np.mean(changes):+.3f}" if changes else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: List[Dict], clicks: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    steps = list(range(1, clicks + 1))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, chosen in groups(rows)[1].items():
        everything = chosen is rows
        ax.plot(steps, [np.mean([r[f"dice_{n}"] for r in chosen]) for n in steps], marker="o",
                label=f"Dice, {name}", linewidth=2.5 if everything else 1, color="black" if everything else None)
    ax.plot(steps, [np.mean([r[f"nsd_{n}"] for r in rows]) for n in steps], "k--", label="NSD, all")
    ax.set(xlabel="clicks", ylabel="mean per lesion", xticks=steps, ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def picture(image_path: str, label: np.ndarray, masks: Dict[int, Tuple[np.ndarray, Clicks]], spacing,
            window: Optional[Tuple[float, float]], title: str, path: str) -> None:
    """The lesion's middle slice (across the thickest voxels' axis: the slice axis of the stored grid) in the
    preset's ``window`` (None: the slice's 1-99 percentiles) with the expert's contour and the mask's after each
    click in ``masks`` ({n: (mask, clicks on the image's grid)})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from monai.transforms import LoadImage

    axis = len(spacing) - 1 - int(np.argmax(np.asarray(spacing)[::-1]))  # the last of the thickest axes
    middle = int(np.median(np.argwhere(label)[:, axis]))
    image = np.asarray(LoadImage(reader=READER, image_only=True)(image_path))

    def cut(volume: np.ndarray) -> np.ndarray:
        return np.take(volume, middle, axis=axis).T  # rows: the second remaining axis

    low, high = window or np.percentile(cut(image), [1, 99])
    others = [a for a in range(3) if a != axis]
    fig, axes = plt.subplots(1, len(masks), figsize=(4 * len(masks), 4.2))
    for ax, (n, (mask, clicks)) in zip(np.atleast_1d(axes), sorted(masks.items())):
        ax.imshow(cut(image), cmap="gray", vmin=low, vmax=high)
        ax.contour(cut(label), levels=[0.5], colors="lime", linewidths=1.2)
        if cut(mask).any():
            ax.contour(cut(mask), levels=[0.5], colors="red", linewidths=1.2)
        for points, marker in ((clicks.foreground, "+"), (clicks.background, "x")):
            near = points[np.abs(points[:, axis] - middle) <= 1] if len(points) else points
            ax.scatter(near[:, others[0]], near[:, others[1]], marker=marker, c="yellow", s=60)
        ax.set_title(f"{title}: after {n} click{'s' if n > 1 else ''}", fontsize=9)
        ax.axis("off")
    fig.text(0.5, 0.01, "green: expert's contour, red: sam3d's mask, yellow: clicks (+ foreground, x background) "
             "on this slice", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="MSD-layout folder (imagesTr/labelsTr) or MONAI Label studies folder")
    parser.add_argument("--checkpoint", help="ours (sam3d.pt) or the authors' (.pth.tar); none: untrained adapters")
    parser.add_argument("--backbone", choices=sorted(CONFIGS), help="default: the checkpoint's, else vit_b")
    parser.add_argument("--sam-checkpoint", help="SAM weights for the frozen backbone (with an authors' checkpoint)")
    parser.add_argument("--preset", default="ct", choices=sorted(PRESETS) + [AUTO],
                        help=f"paper presets: {sorted(PAPER_PRESETS)}; auto: the one the checkpoint was trained with")
    parser.add_argument("--label-value", type=int, help="the tumour's label value (default: the preset's, else any > 0)")
    parser.add_argument("--clicks", type=int, default=5, help="clicks per lesion, each scored")
    parser.add_argument("--first", choices=("click", "box"), default="click",
                        help="the first prompt: a click at the lesion's deepest voxel, or the challenge's box (its "
                             "tight 2D box on the middle axial slice and its slice range), then --clicks clicks")
    parser.add_argument("--tolerance", type=float, default=NSD_TOLERANCE_MM, help="NSD tolerance in mm (paper: 5)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--limit", type=int, help="evaluate the first N cases only")
    parser.add_argument("--follow-max-extent", type=float, default=FollowBounds().max_extent,
                        help="as --conf follow_max_extent: crops per side a lesion is followed into (1: no following)")
    parser.add_argument("--follow-max-crops", type=int, default=FollowBounds().max_crops,
                        help="as --conf follow_max_crops: crops one request may spend on following")
    parser.add_argument("--grid", choices=("model", "image"), default="model",
                        help="where clicks are placed and masks scored: the model's grid (the preset's spacing) or the "
                             "image's stored grid, as the server returns masks and the challenge scores them")
    parser.add_argument("--pictures", type=int, default=0, metavar="K",
                        help="with --grid image: a PNG of each of the first K cases' lesions (middle slice, the "
                             "expert's contour, the masks after the first and the last click) in --out/pictures/")
    parser.add_argument("--out", default="results", help="folder for results.csv, results.md, results.png")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    try:
        cases = find_cases(args.data)[: args.limit]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    torch.manual_seed(0)  # what the checkpoint leaves at initialisation is the same in every run
    model = build_sam3d(checkpoint=args.checkpoint, backbone=args.backbone, sam_checkpoint=args.sam_checkpoint)
    model.to(args.device).eval()

    def no_plan_on_test_cases():
        raise SystemExit(f"--preset auto: {args.checkpoint} records no preset (it would be planned on the test cases);"
                         " name one")

    args.preset, preset = resolve_preset(args.preset, model.weights_info["meta"], no_plan_on_test_cases,
                                         model.crop_size)
    label_value = args.label_value or preset.tumour_value
    spacing = preset.spacing
    clicks = range(1, args.clicks + 1)
    kinds = read_lesion_kinds(args.data)
    bounds = FollowBounds(args.follow_max_extent, args.follow_max_crops)

    if args.pictures and args.grid != "image":
        parser.error("--pictures draws masks on the image's grid: add --grid image")
    os.makedirs(os.path.join(args.out, "pictures") if args.pictures else args.out, exist_ok=True)
    rows = []
    for number, (case, image_path, label_path) in enumerate(tqdm(cases, desc="cases")):
        if args.grid == "image":
            volume, label, grid = load_on_image_grid(image_path, label_path, args.preset, label_value)
            lesions: Dict[int, np.ndarray] = {}
            shown: Dict[int, Dict[int, Tuple[np.ndarray, Clicks]]] = {}

            def keep(index: int, lesion: np.ndarray, n: int, mask: np.ndarray, clicks_so_far: Clicks) -> None:
                if number < args.pictures and n in (1, args.clicks):
                    lesions[index] = lesion
                    shown.setdefault(index, {})[n] = (mask, clicks_so_far)

            per_lesion = lesion_scores(model, volume, label, preset, clicks, tolerance=args.tolerance, bounds=bounds, grid=grid,
                                       observe=keep, first=args.first)
            for index, masks in shown.items():
                picture(image_path, lesions[index], masks, grid.image_spacing, preset.window,
                        f"{case} lesion {index + 1}", os.path.join(args.out, "pictures", f"{case}_{index + 1}.png"))
        else:
            image, label = load_labelled(image_path, label_path, args.preset, label_value)
            per_lesion = lesion_scores(model, image[0], label[0].numpy(), preset, clicks, spacing, args.tolerance, bounds,
                                       first=args.first)
        rows += [lesion_row(case, i + 1, kinds.get(case, ""), scores, args.clicks) for i, scores in enumerate(per_lesion)]
    if not rows:
        raise SystemExit("no lesion in any label: check --label-value")

    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown_table(rows, args.clicks) + "\n\n" + background_split(rows, args.clicks)
    weights = ", ".join(f"{k}: {v}" for k, v in model.weights_info.items())
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"{args.data}, preset {args.preset}, NSD tolerance {args.tolerance} mm, {args.clicks} clicks per lesion "
                f"(challenge protocol, first prompt: {args.first}) on the {args.grid}'s grid, following: {bounds}\n\nweights: {weights}\n\n{table}\n")
    plot(rows, args.clicks, os.path.join(args.out, "results.png"))
    print(table)
    logger.info(f"wrote {args.out}/results.csv, results.md and results.png")


if __name__ == "__main__":
    main()
