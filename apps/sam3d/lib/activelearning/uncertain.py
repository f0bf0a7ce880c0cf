"""A model-based strategy for a click-prompted model: the unlabelled image whose last mask was least decisive.

Ensemble or dropout scores (MONAI Label's epistemic strategy) need a prediction for every image without a
user, but a click-prompted model predicts nothing until someone clicks: without the click there is no
question to be unsure about. The uncertainty that exists is that of the masks users actually asked for, so
the infer task scores each answer (:func:`mask_uncertainty`) and records it in the datastore, and this
strategy offers the unlabelled image whose recorded mask was the least sure. That is the image where a saved
correction moves the model most, and it is what the Dice scoring (original vs final) then confirms.
Images never clicked have no score: they come after the scored ones, in datastore order.
"""

import logging
from typing import Any, Dict, Optional

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from lib.transforms.request_clicks import is_finite_number

logger = logging.getLogger(__name__)

INFO_KEY = "sam3d_uncertainty"


def mask_uncertainty(prob: torch.Tensor) -> float:
    """1 - soft Dice between a probability map and its own 0.5-threshold mask, in [0, 1].

    0 for a crisp mask (every voxel near 0 or 1); it grows with the mass of probabilities near 0.5, relative
    to the mask's size, so small and large lesions compare. It is the Dice the mask would lose if its own
    probabilities were the truth: the quantity the Dice scoring measures once a final label is saved."""
    mask = prob > 0.5
    total = prob.sum() + mask.sum()
    if total == 0:
        return 0.0
    return float(1 - 2 * prob[mask].sum() / total)


def is_score(value: Any) -> bool:
    return is_finite_number(value) and 0 <= value <= 1


class Uncertain(Strategy):
    def __init__(self) -> None:
        super().__init__("The unlabelled image whose last sam3d mask was the least decisive")

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Optional[Dict[str, Any]]:
        images = sorted(datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels")))
        if not images:
            return None
        scores = {image: datastore.get_image_info(image).get(INFO_KEY) for image in images}
        # The info is writable by any annotator (PUT /datastore/image/info): only numbers in [0, 1] are scores.
        scored = [image for image in images if is_score(scores[image])]
        if not scored:
            return {"id": images[0], "uncertainty": None}
        image = max(scored, key=lambda i: scores[i])
        logger.info(f"uncertain strategy: {image} (uncertainty {scores[image]:.4f}) of {len(scored)} scored")
        return {"id": image, "uncertainty": scores[image]}
