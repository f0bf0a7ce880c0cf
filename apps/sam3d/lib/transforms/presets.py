"""Pre-processing presets: orientation, spacing, intensity window and normalisation.

The four paper presets carry the values of the authors' data loaders (med-air/3DSAM-adapter): a CT window,
then the dataset's global mean and standard deviation of the windowed intensities, at 1 mm isotropic.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from monai.transforms import (
    EnsureChannelFirstd,
    NormalizeIntensityd,
    Orientationd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
)

from .loading import LoadImageOrRejectd, ReplaceNonFinited, RequireSingleChannel3Dd
from .resample import SeparableSpacingd

# The model sees volumes as (D, H, W) with D the slice axis. Axial slices in radiological display:
# D runs inferior -> superior, rows anterior -> posterior, columns right -> left.
MODEL_AXCODES = "SPL"


@dataclass(frozen=True)
class Preset:
    description: str
    window: Optional[Tuple[float, float]]  # HU window; None: the 0.5-99.5 percentiles of the image (MR)
    mean: Optional[float]  # global statistics after windowing; None: the image's own
    std: Optional[float]
    spacing: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    # Training augmentation: in-plane rotation and zoom only (the authors' choice for the thick-slice datasets)
    # rather than 3D zoom.
    in_plane_augmentation: bool = False
    # The tumour's value in the labels of the dataset the preset was made for (the authors' target class); None:
    # every non-zero voxel.
    tumour_value: Optional[int] = None
    # For a preset planned from a collection (lib/transforms/planning.py): how many labelled images it was
    # planned from. None: a named preset.
    planned_from: Optional[int] = None
    # MR: each crop the model sees is windowed and z-scored again by its own statistics (training and serving
    # alike). An MR scan's own statistics move with its field of view (how much air, fat and other limb it holds),
    # a crop's only with what the model sees.
    crop_statistics: bool = False

    def crop_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """A crop of the pre-processed volume (any shape) as the model takes it: itself, or with
        ``crop_statistics`` clipped to its own 0.5-99.5 percentiles and z-scored."""
        if not self.crop_statistics:
            return pixels
        values = pixels.float()
        low, high = torch.quantile(values.flatten(), torch.tensor([0.005, 0.995], device=values.device))
        values = values.clamp(low, high)
        return (values - values.mean()) / values.std().clamp_min(1e-6)


PAPER_PRESETS: Dict[str, Preset] = {
    "kits": Preset("Kidney tumour (KiTS21)", (-54, 247), 59.53867, 55.457336, tumour_value=2),
    "lits": Preset("Liver tumour (LiTS17)", (-48, 163), 60.057533, 40.198017, tumour_value=2),
    "pancreas": Preset("Pancreas tumour (MSD Task07)", (-39, 204), 68.45214, 63.422806, in_plane_augmentation=True,
                       tumour_value=2),
    "colon": Preset("Colon cancer (MSD Task10)", (-57, 175), 65.175035, 32.651197, in_plane_augmentation=True,
                    tumour_value=1),
}


def _mean_of(presets: List[Preset]) -> Preset:
    n = len(presets)
    return Preset(
        "Generic abdominal CT (the mean of the paper's four presets)",
        (sum(p.window[0] for p in presets) / n, sum(p.window[1] for p in presets) / n),
        sum(p.mean for p in presets) / n,
        sum(p.std for p in presets) / n,
    )


STS_SPACING = (4.0, 4.0, 4.0)

PRESETS: Dict[str, Preset] = {
    **PAPER_PRESETS,
    "ct": _mean_of(list(PAPER_PRESETS.values())),
    # MR intensities have no absolute scale: clip to the image's own percentiles, then its own z-score, and each
    # crop to its own.
    "mr": Preset("Generic MR (per-image and per-crop percentile window and z-score)", None, None, None,
                 crop_statistics=True),
    # Soft-tissue sarcomas of the trunk and limbs (TCIA's STS collection, docs/real_scans.md): lesions of 5 to 27 cm,
    # so a coarser grid lets a crop see most of one (4 mm: the tiny crop is 128 mm). The CT window and statistics are nnU-Net's (the 0.5-99.5
    # percentiles of the training split's tumour voxels, then their mean and deviation inside that window).
    "sts_ct": Preset("Soft-tissue sarcoma CT (TCIA STS)", (-86, 147), 29.84, 32.86, spacing=STS_SPACING),
    "sts_mr": Preset("Soft-tissue sarcoma MR T1 (TCIA STS; per-image and per-crop window and z-score)", None, None,
                     None, spacing=STS_SPACING, crop_statistics=True),
}


# The largest image at the model's spacing that pre-processing will make: 1 GiB in float32, more than a
# whole-body CT at 1 mm (about 120 million voxels).
DEFAULT_MAX_MEGAVOXELS = 256


def spatial_transforms(
    preset: Preset, keys=("image",), modes=("bilinear",), max_megavoxels: float = DEFAULT_MAX_MEGAVOXELS
) -> list:
    """Reorient to the model's axes and resample to the preset spacing (labels: ``modes`` "nearest"); an
    image that would exceed ``max_megavoxels`` million voxels there is refused before anything is allocated."""
    return [
        Orientationd(keys=keys, axcodes=MODEL_AXCODES, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        SeparableSpacingd(keys=keys, pixdim=preset.spacing, mode=modes, max_voxels=int(max_megavoxels * 1e6)),
    ]


def intensity_transforms(preset: Preset, keys: str = "image") -> list:
    if preset.window is None:
        return [
            # Clipped to the percentiles and rescaled to [0, 1]; the z-score that follows undoes the scale.
            ScaleIntensityRangePercentilesd(keys=keys, lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True),
            NormalizeIntensityd(keys=keys),
        ]
    low, high = preset.window
    return [
        ScaleIntensityRanged(keys=keys, a_min=low, a_max=high, b_min=low, b_max=high, clip=True),
        NormalizeIntensityd(keys=keys, subtrahend=preset.mean, divisor=preset.std),
    ]


# The reader of every image and label (the stored grid's affine and axis order come from it).
READER = "ITKReader"


def preprocessing(preset: Preset, label: bool = False, max_megavoxels: float = DEFAULT_MAX_MEGAVOXELS) -> list:
    """The one pre-processing of inference and training: load ``image`` (and, with ``label``, the ``label`` on
    its grid, resampled as "nearest"), check it is one 3D volume, zero non-finite voxels, reorient, resample,
    window and normalise. Transforms in turn, not a Compose: Compose would wrap the InvalidRequest they raise."""
    keys, modes = (("image", "label"), ("bilinear", "nearest")) if label else (("image",), ("bilinear",))
    return [
        LoadImageOrRejectd(keys=keys, reader=READER),
        EnsureChannelFirstd(keys=keys),
        RequireSingleChannel3Dd(keys="image"),
        ReplaceNonFinited(keys="image"),
        *spatial_transforms(preset, keys, modes, max_megavoxels),
        *intensity_transforms(preset),
    ]
