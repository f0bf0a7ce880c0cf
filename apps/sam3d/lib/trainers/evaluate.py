"""Simulated users for validation and evaluation: a first click at a lesion's centre, then corrections."""

from typing import List

import numpy as np
import torch
from scipy import ndimage

from lib.model import Sam3D
from lib.transforms.crops import extract_crop, plan_crops

from .clicks import correction_click, interior_click


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    total = prediction.sum() + truth.sum()
    return float(2 * (prediction & truth).sum() / total) if total else 1.0


@torch.no_grad()
def lesion_dice(model: Sam3D, volume: torch.Tensor, label: np.ndarray, clicks: int = 1) -> List[float]:
    """Per lesion (connected component of ``label``) of a pre-processed (D, H, W) volume: the Dice within its
    crop after ``clicks`` simulated clicks, the first at the lesion's deepest voxel, each next one on the
    largest error (foreground on a miss, background on a leak)."""
    components, count = ndimage.label(label)
    scores = []
    for index in range(1, count + 1):
        lesion = components == index
        crop = plan_crops(interior_click(lesion)[None], np.zeros((0, 3), int), volume.shape, model.crop_size)[0]
        truth = extract_crop(torch.as_tensor(lesion), crop).numpy()
        encoding = model.encode(extract_crop(volume, crop)[None, None].to(model.device))
        points, labels = [crop.foreground[0]], [1]
        for _ in range(clicks):
            prob = model.foreground_probability(encoding, torch.as_tensor(np.stack(points)), torch.tensor(labels))
            prediction = prob.cpu().numpy() > 0.5
            correction = correction_click(prediction, truth)
            if correction is None or len(points) == clicks:
                break
            points.append(correction[0])
            labels.append(correction[1])
        scores.append(dice(prediction, truth))
    return scores
