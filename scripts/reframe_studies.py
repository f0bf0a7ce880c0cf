"""Copies of a labelled studies folder with another field of view, to measure what a scan's framing does to a model.

    .venv/bin/python scripts/reframe_studies.py studies/sts_mr_test studies/sts_mr_test_padded --pad 0.5
    .venv/bin/python scripts/reframe_studies.py studies/sts_mr_test studies/sts_mr_test_cut --margin-mm 15

Collections such as the IBSI sarcoma scans are cropped about the tumour, where a radiologist's scan holds the whole
limb and air about it. ``--pad F`` widens each image in-plane (every axis but its thickest-voxel one) by F of its
size on each side, filled with the image's lowest value (air in MR and CT); ``--margin-mm M`` cuts each image to
the bounding box of its label plus M mm. Images and labels (``labels/final/``) keep their physical positions
(the affine's origin moves with the first voxel), so the same clicks land on the same tissue.
"""

import argparse
import logging
import os
import sys

import numpy as np
import SimpleITK as sitk
from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "apps", "sam3d"))

from lib.cases import find_cases  # noqa: E402

logger = logging.getLogger("reframe_studies")


def padded(image: sitk.Image, label: sitk.Image, share: float):
    """Both widened in-plane by ``share`` of the image's size on each side; the image with its lowest value."""
    thickest = int(np.argmax(image.GetSpacing()))
    pad = [0 if axis == thickest else int(round(size * share)) for axis, size in enumerate(image.GetSize())]
    air = float(sitk.GetArrayViewFromImage(image).min())
    return sitk.ConstantPad(image, pad, pad, air), sitk.ConstantPad(label, pad, pad, 0)


def cut(image: sitk.Image, label: sitk.Image, margin_mm: float):
    """Both cut to the label's bounding box plus ``margin_mm`` (within the image)."""
    voxels = np.argwhere(sitk.GetArrayViewFromImage(label) > 0)[:, ::-1]  # (x, y, z) in SimpleITK's index order
    if len(voxels) == 0:
        raise ValueError("the label is empty")
    margin = np.ceil(margin_mm / np.asarray(image.GetSpacing())).astype(int)
    low = np.maximum(voxels.min(axis=0) - margin, 0)
    high = np.minimum(voxels.max(axis=0) + margin + 1, image.GetSize())
    box = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
    return image[box], label[box]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a studies folder (images beside labels/final/) or an MSD folder")
    parser.add_argument("out", help="the studies folder to write (images and labels/final/)")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--pad", type=float, help="in-plane padding on each side, as a share of the image's size")
    how.add_argument("--margin-mm", type=float, help="cut to the label's bounding box plus this margin")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.pad is not None and args.pad <= 0 or args.margin_mm is not None and args.margin_mm < 0:
        parser.error("--pad must be positive and --margin-mm not negative")

    try:
        cases = find_cases(args.source)
    except ValueError as e:
        sys.exit(str(e))
    os.makedirs(os.path.join(args.out, "labels", "final"), exist_ok=True)
    written = 0
    for case, image_path, label_path in tqdm(cases, desc="studies"):
        image, label = sitk.ReadImage(image_path), sitk.ReadImage(label_path)
        try:
            image, label = padded(image, label, args.pad) if args.pad is not None else cut(image, label, args.margin_mm)
        except ValueError as e:
            logger.warning(f"{case} skipped: {e}")
            continue
        sitk.WriteImage(image, os.path.join(args.out, os.path.basename(image_path)))
        sitk.WriteImage(label, os.path.join(args.out, "labels", "final", os.path.basename(label_path)))
        written += 1
    logger.info(f"wrote {written} of {len(cases)} studies to {args.out}")


if __name__ == "__main__":
    main()
