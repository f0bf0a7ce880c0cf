"""Demo weights: the tiny configuration trained on generated phantoms, made once at the first start that needs
them, so that a new user's clicks on the demo studies give masks on the lesions.

They are trained on phantoms drawn by ``random_studies``, never on the demo studies, and are labelled as demo
weights on every surface (``lib/model/build.py`` ``describe_weights``): they know phantoms, not patients.
"""

import logging
import os
import tempfile
import time

import numpy as np
import torch

from lib.model import CheckpointError, build_sam3d, save_sam3d
from lib.model.checkpoints import read_checkpoint
from lib.phantoms import random_studies, write_studies
from lib.training.data import load_labelled
from lib.training.fit import fit
from lib.transforms.presets import PRESETS

logger = logging.getLogger(__name__)

DEMO_FILE = "sam3d_demo_tiny.pt"
DEMO_PRESET = "kits"  # the server's default preset, which the demo click uses
# The recipe of the learning test (tests/test_learning.py); its time is in the README, the Dice it gives on the
# held-out demo lesions in docs/evaluation.md.
DEMO_STUDIES = 12
DEMO_STEPS = 400
DEMO_LEARNING_RATE = 1e-3
# Raised when the model or its training changes what demo weights hold (2: the full-resolution refiner; 3:
# training zooms a quarter of its crops out, for following large lesions; 4: the decoder supervised on its own
# too; 5: zoom-out only for lesions large enough to be followed; 6: the refiner's likeness input; 7: box-first sessions; 8: the box's centre token; 9: it starts as a foreground click, and the refiner maps it as one), so that a
# model folder kept from an older version gets weights made by this one.
DEMO_RECIPE = 10


def recipe_of(path: str) -> object:
    try:
        return read_checkpoint(path, mmap=True).get("meta", {}).get("recipe")
    except CheckpointError:
        return None  # unreadable (e.g. cut short): made again


def demo_weights(model_dir: str) -> str:
    """The demo checkpoint in ``model_dir``, trained and written (atomically) when it is not there yet."""
    path = os.path.join(model_dir, DEMO_FILE)
    if os.path.exists(path):
        if recipe_of(path) == DEMO_RECIPE:
            return path
        logger.warning(f"sam3d: {path} was made by an older sam3d (or is unreadable): making it again")
    logger.warning(
        f"sam3d: no checkpoint given, so the demo weights are being made: the tiny model trained for {DEMO_STEPS} "
        f"steps on {DEMO_STUDIES} generated phantoms (first start only, a few minutes on a CPU; kept in {path})"
    )
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="sam3d-demo-phantoms-") as folder:
        studies = random_studies(DEMO_STUDIES)  # drawn apart from the fixed demo studies
        write_studies(folder, studies=studies)
        labels = os.path.join(folder, "labels", "final")
        volumes = [
            load_labelled(os.path.join(folder, f"{s.name}.nii.gz"), os.path.join(labels, f"{s.name}.nii.gz"), DEMO_PRESET)
            for s in studies
        ]
    torch.manual_seed(0)
    model = build_sam3d(backbone="tiny")
    losses, _ = fit(model, volumes, DEMO_STEPS, PRESETS[DEMO_PRESET], lr=DEMO_LEARNING_RATE)
    meta = {
        "demo": True,
        "recipe": DEMO_RECIPE,
        "preset": DEMO_PRESET,
        "steps": DEMO_STEPS,
        "train_images": DEMO_STUDIES,
        "trained_on": "generated phantoms (lib/phantoms.py), not the demo studies",
        "train_loss": float(np.mean(losses[-20:])),
        "total_time": round(time.time() - start, 1),
    }
    save_sam3d(model, path, "tiny", model.trained_names, meta=meta)
    logger.warning(f"sam3d: demo weights written to {path} in {time.time() - start:.0f}s")
    return path
