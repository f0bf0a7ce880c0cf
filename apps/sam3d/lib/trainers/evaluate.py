"""Simulated users for validation and evaluation: a first click at a lesion's centre, then corrections.

Metrics are the paper's: Dice and the normalised surface Dice (NSD) at a tolerance of 5 mm, the latter with
sub-voxel surfaces as in the DeepMind implementation the authors used.
"""

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from monai.metrics import compute_surface_dice
from scipy import ndimage

from lib.model import Sam3D
from lib.transforms.crops import extract_crop, paste_max, plan_crops

from .clicks import correction_click, interior_click

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


def bounding_box(*masks: np.ndarray, margin: int) -> Tuple[slice, ...]:
    """The box around every True voxel of ``masks`` (same shape), grown by ``margin`` and clipped."""
    union = np.logical_or.reduce(masks)
    nonzero = np.nonzero(union)
    return tuple(slice(max(int(i.min()) - margin, 0), int(i.max()) + margin + 1) for i in nonzero)


@torch.no_grad()
def lesion_scores(
    model: Sam3D,
    volume: torch.Tensor,
    label: np.ndarray,
    clicks: Sequence[int] = (1,),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    tolerance: float = NSD_TOLERANCE_MM,
) -> List[Dict[int, Tuple[float, float]]]:
    """Per lesion (connected component of ``label``) of a pre-processed (D, H, W) volume: {n: (Dice, NSD)}
    after n simulated clicks for each n in ``clicks``. The first click goes at the lesion's deepest voxel,
    each next one on the largest error (foreground on a miss, background on a leak). The crop is planned
    around the first click as the server does; lesion voxels outside it count as missed."""
    components, count = ndimage.label(label)
    results = []
    for index in range(1, count + 1):
        lesion = components == index
        crop = plan_crops(interior_click(lesion)[None], np.zeros((0, 3), int), volume.shape, model.crop_size)[0]
        truth_in_crop = extract_crop(torch.as_tensor(lesion), crop).numpy()
        encoding = model.encode(extract_crop(volume, crop)[None, None].to(model.device))
        points, labels, scores = [crop.foreground[0]], [1], {}
        for n in range(1, max(clicks) + 1):
            prob = model.foreground_probability(encoding, torch.as_tensor(np.stack(points)), torch.tensor(labels))
            in_crop = prob.cpu().numpy() > 0.5
            if n in clicks:
                pasted = torch.zeros(lesion.shape)
                paste_max(pasted, torch.as_tensor(in_crop, dtype=torch.float32), crop)
                prediction = pasted.numpy() > 0.5
                box = bounding_box(prediction, lesion, margin=int(np.ceil(tolerance / min(spacing))) + 1)
                scores[n] = (
                    dice(prediction[box], lesion[box]),
                    surface_dice(prediction[box], lesion[box], spacing, tolerance),
                )
            correction = correction_click(in_crop, truth_in_crop)
            if correction is not None:
                points.append(correction[0])
                labels.append(correction[1])
        results.append(scores)
    return results


def lesion_dice(model: Sam3D, volume: torch.Tensor, label: np.ndarray, clicks: int = 1) -> List[float]:
    """Per lesion: the Dice after ``clicks`` simulated clicks."""
    return [scores[clicks][0] for scores in lesion_scores(model, volume, label, (clicks,))]
