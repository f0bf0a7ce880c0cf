"""Simulated users for validation and evaluation, by the CVPR 2025 interactive 3D segmentation challenge's
protocol: a first click at the lesion's deepest voxel, then each next one at the deepest voxel of the largest
error (``simulated_user.protocol_click``).

Metrics are the paper's: Dice and the normalised surface Dice (NSD) at a tolerance of 5 mm, the latter with
sub-voxel surfaces as in the DeepMind implementation the authors used.
"""

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from monai.metrics import compute_surface_dice
from scipy import ndimage

from lib.model import Clicks, CropEncoding, Sam3D
from lib.transforms.crops import extract_crop, paste_max, plan_crops

from .simulated_user import CONNECTIVITY, grown_box, protocol_click

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


def worst_drop(dice_per_click: Sequence[float]) -> float:
    """The largest fall of Dice that one click caused (Dice@k-1 - Dice@k over k = 2..N), 0 if none fell."""
    return float(max([0.0, *(np.asarray(dice_per_click[:-1]) - np.asarray(dice_per_click[1:]))]))


def predicted_mask(model: Sam3D, encoding: CropEncoding, clicks: Clicks) -> np.ndarray:
    """The mask the server answers these clicks (``"crop"`` frame) with on an encoded crop: (S, S, S) bool.

    The one place evaluation asks the model, so that a change of its inputs (e.g. the previous mask) is made here."""
    return model.foreground_probability(encoding, clicks).cpu().numpy() > 0.5


@torch.no_grad()
def lesion_scores(
    model: Sam3D,
    volume: torch.Tensor,
    label: np.ndarray,
    clicks: Sequence[int] = (1,),
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    tolerance: float = NSD_TOLERANCE_MM,
) -> List[Dict[int, Tuple[float, float]]]:
    """Per lesion (26-connected component of ``label``) of a pre-processed (D, H, W) volume with voxels of
    ``spacing`` mm: {n: (Dice, NSD)} after n protocol clicks for each n in ``clicks``.

    The crop is planned around the first click as the server does, and later clicks go on the errors inside it
    (the lesion's neighbourhood); lesion voxels outside it count as missed. A mask without error gets no
    further click."""
    components, count = ndimage.label(label, structure=CONNECTIVITY)
    results = []
    for index in range(1, count + 1):
        lesion = components == index
        first, _ = protocol_click(np.zeros_like(lesion), lesion, spacing)
        crop = plan_crops(Clicks(first[None], np.zeros((0, 3)), "model"), volume.shape, model.crop_size)[0]
        truth_in_crop = extract_crop(torch.as_tensor(lesion), crop).numpy()
        # Where a crop runs past the volume (zero-padded) there is nothing to click on.
        in_volume = extract_crop(torch.ones(lesion.shape), crop).numpy() > 0
        encoding = model.encode(extract_crop(volume, crop)[None, None].to(model.device))
        crop_clicks, scores = crop.clicks, {}
        for n in range(1, max(clicks) + 1):
            in_crop = predicted_mask(model, encoding, crop_clicks) & in_volume
            if n in clicks:
                pasted = torch.zeros(lesion.shape)
                paste_max(pasted, torch.as_tensor(in_crop, dtype=torch.float32), crop)
                prediction = pasted.numpy() > 0.5
                box = grown_box(prediction, lesion, margin=int(np.ceil(tolerance / min(spacing))) + 1)
                scores[n] = (
                    dice(prediction[box], lesion[box]),
                    surface_dice(prediction[box], lesion[box], spacing, tolerance),
                )
            correction = protocol_click(in_crop, truth_in_crop, spacing)
            if correction is not None:
                crop_clicks = crop_clicks.added(correction[0], foreground=correction[1] == 1)
        results.append(scores)
    return results


def lesion_dice(model: Sam3D, volume: torch.Tensor, label: np.ndarray, clicks: int = 1) -> List[float]:
    """Per lesion: the Dice after ``clicks`` simulated clicks."""
    return [scores[clicks][0] for scores in lesion_scores(model, volume, label, (clicks,))]
