"""Scoring: how much the radiologist corrected the model's mask, on the tumour only."""

import logging
from typing import Any, Dict, Optional

from monai.transforms import LoadImage
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.scoring import ScoringMethod

from lib.labels import tumour
from lib.training.evaluate import dice

logger = logging.getLogger(__name__)


class TumourDice(ScoringMethod):
    """Dice of the model's mask (``original``) against the saved one (``final``), each image's score kept in its
    info as ``dice``. MONAI Label's own Dice multiplies the label values, so a final label that holds other
    classes (KiTS: kidney 1, tumour 2) would score the kidney too; here the final label's tumour is its voxels of
    ``label_value`` (None: every non-zero voxel) and the model's mask is its non-zero voxels."""

    def __init__(self, label_value: Optional[int] = None) -> None:
        super().__init__("Dice of the model's mask against the saved final label, on the tumour")
        self.label_value = label_value

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Dict[str, float]:
        load = LoadImage(image_only=True)
        tag_truth = request.get("y", DefaultLabelTag.FINAL)
        tag_prediction = request.get("y_pred", DefaultLabelTag.ORIGINAL)
        scores = {}
        for image_id in datastore.list_images():
            truth_id = datastore.get_label_by_image_id(image_id, tag_truth)
            prediction_id = datastore.get_label_by_image_id(image_id, tag_prediction)
            if not (truth_id and prediction_id):
                continue
            truth = tumour(load(datastore.get_label_uri(truth_id, tag_truth)).as_tensor(), self.label_value).numpy()
            prediction = load(datastore.get_label_uri(prediction_id, tag_prediction)).numpy() > 0
            if truth.shape != prediction.shape:
                logger.warning(f"dice: {image_id}'s {tag_prediction} and {tag_truth} labels are on other grids")
                continue
            score = dice(prediction, truth)
            datastore.update_image_info(image_id, {"dice": score})
            scores[image_id] = score
        return scores
