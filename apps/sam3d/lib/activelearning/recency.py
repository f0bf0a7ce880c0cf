"""MONAI Label's ``random`` strategy, without its failure when every candidate was just offered."""

import random
import time
from typing import Any, Dict, Optional

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from lib.transforms.request_clicks import is_finite_number


class Random(Strategy):
    """An unlabelled image at random, weighted by the seconds since it was last offered (never: since 1970).

    MONAI Label's weighs by the same seconds, which are all 0 when every candidate was offered within the last
    second (one image left, asked for twice): ``random.choices`` then raises and the client gets a 500. One
    second more for each keeps the weighting and gives every image a chance."""

    def __init__(self) -> None:
        super().__init__("Random Strategy")

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Optional[Dict[str, Any]]:
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            return None
        now = time.time()
        weights = [now - last_offered(datastore.get_image_info(i), request["strategy"]) + 1 for i in images]
        index = random.choices(range(len(images)), weights=weights)[0]
        return {"id": images[index], "weight": weights[index]}


def last_offered(info: Dict[str, Any], strategy: str) -> float:
    """When ``strategy`` last offered the image (MONAI Label records it in the image's info), or 0; clamped to
    the past, and 0 for what is not a time (the info is writable by annotators)."""
    offered = info.get("strategy")
    offered = offered.get(strategy) if isinstance(offered, dict) else None
    ts = offered.get("ts") if isinstance(offered, dict) else None
    return min(ts, time.time()) if is_finite_number(ts) else 0.0
