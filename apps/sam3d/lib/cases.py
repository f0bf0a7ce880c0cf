"""Labelled cases on disk, as the offline scripts find them: an MSD folder (imagesTr/labelsTr) or a MONAI Label
studies folder (images beside labels/final/)."""

import glob
import os
from typing import List, Tuple

EXTENSIONS = (".nii.gz", ".nii", ".nrrd")


def strip_extension(name: str) -> str:
    return next((name[: -len(e)] for e in EXTENSIONS if name.endswith(e)), name)


def find_cases(data: str) -> List[Tuple[str, str, str]]:
    """(case id, image path, label path) of every image with a label in ``data``; raises ValueError when none."""
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
        raise ValueError(f"no image with a label in {data} (expected imagesTr/labelsTr or labels/final/)")
    return cases
