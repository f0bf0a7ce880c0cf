"""Labelled cases on disk, as the offline scripts and the preset "auto" find them: an MSD folder
(imagesTr/labelsTr) or a MONAI Label studies folder (images beside labels/final/)."""

import glob
import os
from typing import List, Optional, Tuple

EXTENSIONS = (".nii.gz", ".nii", ".nrrd")


def strip_extension(name: str) -> str:
    return next((name[: -len(e)] for e in EXTENSIONS if name.endswith(e)), name)


def label_of(labels: str, image_name: str) -> Optional[str]:
    """The label in folder ``labels`` of the image file named ``image_name``, in any of EXTENSIONS; None if none."""
    stem = strip_extension(image_name)
    return next((os.path.join(labels, stem + e) for e in EXTENSIONS if os.path.exists(os.path.join(labels, stem + e))),
                None)


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
        label = label_of(labels, name)
        if label:
            cases.append((strip_extension(name), path, label))
    if not cases:
        raise ValueError(f"no image with a label in {data} (expected imagesTr/labelsTr or labels/final/)")
    return cases


def studies_images(studies: str) -> List[Tuple[str, Optional[str]]]:
    """(image path, final label path or None) of every image in a local MONAI Label studies folder; nothing for
    a DICOMweb address or a folder that does not exist."""
    if not os.path.isdir(studies):
        return []
    labels = os.path.join(studies, "labels", "final")
    found = []
    for path in sorted(glob.glob(os.path.join(studies, "*"))):
        name = os.path.basename(path)
        if name.startswith(".") or not name.endswith(EXTENSIONS) or not os.path.isfile(path):
            continue
        found.append((path, label_of(labels, name)))
    return found
