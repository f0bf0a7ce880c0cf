"""The preset "auto": pre-processing planned from the labelled images themselves, as nnU-Net plans a dataset from
its fingerprint, so that a collection no named preset was made for still gets a sensible grid and window.

- Modality: CT when at least FAT_SHARE of the images' voxels lie below FAT_HU (fat, air or lung in HU); MR
  intensities are not negative. A CT cropped to soft tissue alone reads as MR: name a preset for it.
- CT intensities (nnU-Net's rule, which made ``sts_ct``): the 0.5-99.5 percentiles of the tumour's voxels as the
  window, then their mean and standard deviation inside it. MR: ``mr``'s, each image's and each crop's own window
  and z-score.
- Grid: isotropic, the spacing at which the median lesion (each image's largest) would span LESION_SHARE of a
  crop's side, rounded to SPACING_STEP, never finer than FINEST_SPACING (the paper's grid).
- In-plane augmentation (the authors' choice for thick-slice data): when the slices are at least twice the grid.

A published model records the values it was trained with, and a server asked for "auto" serves a model with
those values (``model_preset``), so that the grid of a model never changes under it.
"""

import logging
import math
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from lib.labels import tumour

from .presets import PRESETS, Preset

logger = logging.getLogger(__name__)

AUTO = "auto"
FAT_HU, FAT_SHARE = -50.0, 0.01
# Set on the sarcomas (docs/real_scans.md): 4 mm beat 3, 4.5 and 5 mm there, where the median lesion spans 0.79
# (CT) and 0.92 (MR) of a 4-mm crop.
LESION_SHARE = 0.85
FINEST_SPACING, COARSEST_SPACING, SPACING_STEP = 1.0, 8.0, 1.0
# Enough cases for stable percentiles and a median size, few enough that a server starts in seconds.
MAX_PLANNED_CASES = 30
# A training run plans again once its labelled pairs outnumber those of the model's plan this many times.
REPLAN_GROWTH = 2
TUMOUR_SAMPLE = 100_000  # tumour voxels per case at most, drawn at random (seeded) for the percentiles


@dataclass(frozen=True)
class CaseFingerprint:
    spacing: Tuple[float, float, float]  # mm, the stored grid's, sorted finest first
    fat_share: float  # share of the image's voxels below FAT_HU
    lesion_extent: Optional[float]  # mm, the largest side of the largest lesion's box; None: no label
    tumour_values: np.ndarray  # a sample of the intensities under the lesion (empty without a label)


def fingerprint(image_path: str, label_path: Optional[str], label_value: Optional[int],
                rng: np.random.Generator) -> CaseFingerprint:
    image = sitk.ReadImage(image_path)
    pixels = sitk.GetArrayViewFromImage(image)
    spacing = tuple(sorted(float(s) for s in image.GetSpacing()[:3]))
    fat_share = float(np.mean(pixels < FAT_HU))
    if label_path is None:
        return CaseFingerprint(spacing, fat_share, None, np.zeros(0, np.float32))
    label = sitk.GetArrayFromImage(sitk.ReadImage(label_path))  # a copy: a view would outlive its image
    mask = tumour(label, label_value)
    if mask.shape != pixels.shape or not mask.any():
        return CaseFingerprint(spacing, fat_share, None, np.zeros(0, np.float32))
    # Components within the lesions' box only: those of a whole-body label would take gigabytes.
    lesions = mask[tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(mask))]
    components, count = ndimage.label(lesions, structure=np.ones((3, 3, 3)))
    largest = int(np.argmax(ndimage.sum_labels(lesions, components, range(1, count + 1)))) + 1
    voxels = np.argwhere(components == largest)
    sides = (voxels.max(axis=0) - voxels.min(axis=0) + 1) * np.asarray(image.GetSpacing()[:3])[::-1]
    values = pixels[mask].astype(np.float32)
    if len(values) > TUMOUR_SAMPLE:
        values = rng.choice(values, TUMOUR_SAMPLE, replace=False)
    return CaseFingerprint(spacing, fat_share, float(sides.max()), values)


def grid_spacing(lesion_extents: Sequence[float], crop_size: int) -> float:
    """The isotropic spacing (mm) at which the median lesion spans LESION_SHARE of a crop, in SPACING_STEP steps."""
    wanted = float(np.median(lesion_extents)) / (LESION_SHARE * crop_size)
    stepped = round(wanted / SPACING_STEP) * SPACING_STEP
    return float(min(max(stepped, FINEST_SPACING), COARSEST_SPACING))


def plan_preset(cases: Sequence[Tuple[str, Optional[str]]], crop_size: int,
                label_value: Optional[int] = None) -> Preset:
    """A preset for (image path, label path or None) ``cases`` (the first MAX_PLANNED_CASES, labelled first).
    Without any labelled case: the generic ``ct`` or ``mr`` preset by the images' modality (nothing tells the
    lesions' size or intensities yet); without any readable image, ``ct``."""
    ordered = sorted(cases, key=lambda c: c[1] is None)[:MAX_PLANNED_CASES]
    rng = np.random.default_rng(0)
    prints: List[CaseFingerprint] = []
    for image, label in ordered:
        try:
            prints.append(fingerprint(image, label, label_value, rng))
        except RuntimeError as e:  # SimpleITK's error for a file it cannot read
            logger.warning(f"planning the preset: {image} is left out ({str(e).splitlines()[0]})")
    if not prints:
        logger.warning("preset auto: no image to plan from yet; the generic ct preset until a model trained with "
                       "auto is served")
        return PRESETS["ct"]
    is_ct = float(np.median([p.fat_share for p in prints])) >= FAT_SHARE
    labelled = [p for p in prints if p.lesion_extent is not None]
    if not labelled:
        return PRESETS["ct" if is_ct else "mr"]
    spacing = grid_spacing([p.lesion_extent for p in labelled], crop_size)
    slices = float(np.median([p.spacing[2] for p in prints]))
    in_plane = slices >= 2 * spacing
    source = f"planned from {len(labelled)} labelled images"
    if not is_ct:
        return Preset(f"MR, {source} (per-image and per-crop window and z-score; {spacing:g} mm)", None, None, None,
                      spacing=(spacing,) * 3, in_plane_augmentation=in_plane, planned_from=len(labelled),
                      crop_statistics=True)
    values = np.concatenate([p.tumour_values for p in labelled])
    low, high = np.percentile(values, [0.5, 99.5])
    low, high = float(math.floor(low)), float(max(math.ceil(high), math.floor(low) + 1))
    inside = np.clip(values, low, high)
    return Preset(f"CT, {source} (window {low:g} to {high:g} HU; {spacing:g} mm)", (low, high),
                  round(float(inside.mean()), 2), round(max(float(inside.std()), 1e-3), 2),
                  spacing=(spacing,) * 3, in_plane_augmentation=in_plane, planned_from=len(labelled))


def named_label_value(name: str) -> Optional[int]:
    """The tumour's label value a preset name implies: a named preset's own; ``auto`` implies none."""
    return None if name == AUTO else PRESETS[name].tumour_value


def preset_values(preset: Preset) -> dict:
    """What a published model records of the preset it was trained with (``model_preset`` reads it back)."""
    return asdict(preset)


def model_preset(meta: dict) -> Optional[Preset]:
    """The preset a model was trained with, from its metadata: the values it records, else the named preset it
    names (models published before values were recorded); None for a model that says nothing, and for the demo
    weights: trained on phantoms, they are a starting point whose grid a user's scans need not keep."""
    if meta.get("demo"):
        return None
    values = meta.get("preset_values")
    if isinstance(values, dict):
        try:
            return Preset(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        except TypeError:  # written by another version of Preset
            pass
    return PRESETS.get(meta.get("preset")) if isinstance(meta.get("preset"), str) else None


def register_preset(preset: Preset) -> str:
    """The name under which ``preset`` is known: a named preset's own name, else a new name for these values
    (planned presets get one each, so that caches keyed by a preset's name never mix two grids)."""
    for name, known in PRESETS.items():
        if known == preset:
            return name
    name = f"auto-{len([n for n in PRESETS if n.startswith('auto-')]) + 1}"
    PRESETS[name] = preset
    return name


def resolve_preset(name: str, model_meta: dict, cases: Callable[[], Sequence[Tuple[str, Optional[str]]]],
                   crop_size: int, label_value: Optional[int] = None,
                   labelled_now: Optional[int] = None) -> Tuple[str, Preset]:
    """(name, values) of the preset ``name``; for AUTO, the preset the model was trained with when its metadata
    records one (a model keeps its grid), else one planned from ``cases()`` (called only then).

    ``labelled_now``: a training run's number of labelled pairs. A preset planned from fewer than 1 /
    REPLAN_GROWTH of them is planned again from ``cases()``, so that a plan made from the first few labels of an
    active-learning session does not hold for good (the run then fine-tunes the model onto the new grid)."""
    if name != AUTO:
        return name, PRESETS[name]
    preset = model_preset(model_meta)
    outgrown = (preset is not None and preset.planned_from is not None and labelled_now is not None
                and labelled_now > REPLAN_GROWTH * preset.planned_from)
    if preset is None or outgrown:
        preset = plan_preset(cases(), crop_size, label_value)
        logger.info(f"preset auto: {preset.description}")
    return register_preset(preset), preset
