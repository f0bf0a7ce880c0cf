"""Simulated users for validation and evaluation, by the CVPR 2025 interactive 3D segmentation challenge's
protocol: a first click at the lesion's deepest voxel (or the challenge's box: ``simulated_user.challenge_box``),
then each next click at the deepest voxel of the largest error (``simulated_user.protocol_click``).

Metrics are the paper's: Dice and the normalised surface Dice (NSD) at a tolerance of 5 mm, the latter with
sub-voxel surfaces as in the DeepMind implementation the authors used.
"""

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import torch
from monai.metrics import compute_surface_dice
from scipy import ndimage

from lib.engine.cache import BoundedCache, tensor_bytes
from lib.engine.segment import FollowBounds, Segmenter
from lib.model import Clicks, CropEncoding, Sam3D
from lib.regions import grown_box
from lib.transforms.crops import plan_crops
from lib.transforms.grid import GridMap
from lib.transforms.planning import register_preset
from lib.transforms.presets import Preset
from lib.transforms.resample import ResampleToOriginalGridd

from .simulated_user import CONNECTIVITY, challenge_box, protocol_click

NSD_TOLERANCE_MM = 5.0


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    total = prediction.sum() + truth.sum()
    return float(2 * (prediction & truth).sum() / total) if total else 1.0


def surface_dice(prediction: np.ndarray, truth: np.ndarray, spacing: Sequence[float], tolerance: float) -> float:
    if not prediction.any() and not truth.any():
        return 1.0
    if not prediction.any() or not truth.any():
        return 0.0

    def onehot(mask: np.ndarray) -> torch.Tensor:
        mask = torch.as_tensor(mask)
        return torch.stack([~mask, mask])[None].float()

    nsd = compute_surface_dice(onehot(prediction), onehot(truth), [tolerance], spacing=list(spacing), use_subvoxels=True)
    return float(nsd.item())


def dice_auc(dice_per_click: Sequence[float]) -> float:
    """The area under the Dice-vs-clicks curve over clicks 1..N, normalised to [0, 1]: the mean Dice."""
    return float(np.mean(dice_per_click))


def challenge_auc(values: Sequence[float], steps: int = 5) -> float:
    """The challenge's DSC_AUC and NSD_AUC: the trapezoid area under the last ``steps`` values (the click steps;
    a box's step before them does not count) at unit spacing, so in [0, steps - 1]."""
    tail = np.asarray(values[-steps:], dtype=np.float64)
    return float(((tail[1:] + tail[:-1]) / 2).sum())


def slice_axis(affine: np.ndarray) -> int:
    """The axis of a voxel grid (its (4, 4) voxel -> world affine, RAS or LPS) that runs most nearly
    head to foot: the axis across axial slices, on which the challenge draws its 2D box."""
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return int(np.argmax(np.abs(directions[2])))


def worst_drop(dice_per_click: Sequence[float]) -> float:
    """The largest fall of Dice that one click caused (Dice@k-1 - Dice@k over k = 2..N), 0 if none fell."""
    return float(max([0.0, *(np.asarray(dice_per_click[:-1]) - np.asarray(dice_per_click[1:]))]))


def boundary_share(prediction: np.ndarray, truth: np.ndarray) -> float:
    """The fraction of the wrong voxels that lie on the truth's boundary: missed tumour voxels next to
    non-tumour, leaked voxels next to tumour (1 if nothing is wrong). A share near 1 says that what is left is a
    band one voxel wide, which one more click mends only around itself."""
    missed, leaked = truth & ~prediction, prediction & ~truth
    if not missed.any() and not leaked.any():
        return 1.0
    on_boundary = (missed & ~ndimage.binary_erosion(truth, CONNECTIVITY)) | (leaked & ndimage.binary_dilation(truth, CONNECTIVITY))
    return float(on_boundary.sum() / (missed.sum() + leaked.sum()))


class Score(NamedTuple):
    dice: float
    nsd: float
    recall: float  # the fraction of the lesion inside the mask
    click: str  # the click that gave this mask: "foreground", "background" or "none" (the mask was already right)
    boundary: float  # boundary_share of the mask


# Bytes of crop encodings and correction rounds an evaluation keeps per lesion (a lesion followed over many crops
# re-uses them at every further click, as the server does).
EVALUATION_CACHE_BYTES = 2**30


@torch.no_grad()
def lesion_scores(
    model: Sam3D,
    volume: torch.Tensor,
    label: np.ndarray,
    preset: Preset,
    clicks: Sequence[int] = (1,),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    tolerance: float = NSD_TOLERANCE_MM,
    bounds: FollowBounds = FollowBounds(),
    grid: Optional[GridMap] = None,
    observe: Optional[Callable[[int, np.ndarray, int, np.ndarray, Clicks], None]] = None,
    first: str = "click",
) -> List[Dict[int, Score]]:
    """Per lesion (26-connected component of ``label``) of a (D, H, W) volume pre-processed by ``preset`` (whose
    crops the model sees as the server shows them: ``Preset.crop_input``): {n: Score} after n protocol clicks for
    each n in ``clicks``. With ``first="box"`` each lesion starts with the challenge's box (its tight 2D box on its
    middle axial slice, across the slices it spans) and no click, scored as n = 0, and the box stays in every
    later request.

    Each request goes through the model as the server serves it (``Segmenter``: crops planned on all the clicks so
    far, a lesion that reaches a crop's face followed within ``bounds``). The next click goes on the largest error
    anywhere, foreground on a miss, background on a leak; a mask without error gets no further click.

    Without ``grid``, ``label`` is on the model's grid with voxels of ``spacing`` mm, and so are clicks and scores.
    With ``grid`` it is the stored image's (and so is the spacing, the grid's), as in the challenge: each click is
    placed on the image's own errors and mapped to the model's grid as a request's clicks are, and the mask is
    scored as the server returns it, resampled to the image's grid (where a thick-slice label is not stair-stepped
    by resampling). ``observe(lesion index, lesion, n, mask, clicks)`` is called with each scored mask and the
    clicks that gave it (pictures of what a radiologist would see)."""
    if grid:
        spacing = grid.image_spacing
    restore = ResampleToOriginalGridd()
    components, count = ndimage.label(label, structure=CONNECTIVITY)
    results, name = [], register_preset(preset)
    for index in range(1, count + 1):
        lesion = components == index
        segmenter = Segmenter(model, "evaluation", BoundedCache(EVALUATION_CACHE_BYTES, CropEncoding.nbytes.fget),
                              BoundedCache(EVALUATION_CACHE_BYTES // 4, tensor_bytes), bounds)
        frame = "image" if grid else "model"
        box, box_request = None, None
        if first == "box":
            box = challenge_box(lesion, frame, slice_axis(grid.image_affine) if grid else 0)
            box_request = grid.box_to_model(box) if grid else box
            clicks_so_far, kinds, steps = Clicks(np.zeros((0, 3)), np.zeros((0, 3)), frame), ["box"], range(0, max(clicks) + 1)
        else:
            click, _ = protocol_click(np.zeros_like(lesion), lesion, spacing)
            clicks_so_far, kinds, steps = Clicks(click[None], np.zeros((0, 3)), frame), ["foreground"], range(1, max(clicks) + 1)
        scores = {}
        for n in steps:
            request = grid.clicks_to_model(clicks_so_far) if grid else clicks_so_far
            crops = plan_crops(request, volume.shape, model.crop_size, box_request)
            result = segmenter.segment(volume, crops, request, name)
            if grid:
                prediction = grid.mask_to_image(result.prob[None], result.boxes, restore.threshold, restore.resample) > 0
            else:
                prediction = result.prob.numpy() > restore.threshold
            box = grown_box(prediction, lesion, margin=int(np.ceil(tolerance / min(spacing))) + 1)
            if n in clicks or n == 0:
                recall = float((prediction & lesion).sum() / lesion.sum())
                scores[n] = Score(
                    dice(prediction[box], lesion[box]),
                    surface_dice(prediction[box], lesion[box], spacing, tolerance),
                    recall,
                    kinds[-1],
                    boundary_share(prediction[box], lesion[box]),
                )
                if observe:
                    observe(index - 1, lesion, n, prediction, clicks_so_far)
            correction = protocol_click(prediction[box], lesion[box], spacing)
            if correction is None:
                kinds.append("none")
            else:
                click = correction[0] + np.array([b.start for b in box])
                clicks_so_far = clicks_so_far.added(click, foreground=correction[1] == 1)
                kinds.append("foreground" if correction[1] == 1 else "background")
        results.append(scores)
    return results


def lesion_dice(model: Sam3D, volume: torch.Tensor, label: np.ndarray, preset: Preset, clicks: int = 1) -> List[float]:
    """Per lesion: the Dice after ``clicks`` simulated clicks."""
    return [scores[clicks][0] for scores in lesion_scores(model, volume, label, preset, (clicks,))]
