"""The model learns: a tiny configuration trained briefly on generated lesions segments held-out ones."""

import os

import numpy as np
import pytest
import torch

from lib.model import build_sam3d
from lib.trainers.data import load_labelled
from lib.trainers.evaluate import lesion_dice
from lib.trainers.fit import fit

STEPS = 400


def load(folder, name):
    return load_labelled(
        os.path.join(folder, f"{name}.nii.gz"), os.path.join(folder, "labels", "final", f"{name}.nii.gz"), "kits"
    )


@pytest.fixture(scope="module")
def training_studies(tmp_path_factory):
    from make_demo_studies import random_studies, write_studies

    folder = str(tmp_path_factory.mktemp("training"))
    studies = random_studies(12)
    write_studies(folder, studies=studies)
    return [load(folder, s.name) for s in studies]


def held_out_dice(model, demo_studies):
    from make_demo_studies import STUDIES

    scores = []
    for study in STUDIES:
        volume, label = load(demo_studies, study.name)
        scores += lesion_dice(model, volume[0], label[0].numpy())
    return float(np.mean(scores))


def test_a_tiny_model_learns_to_segment_held_out_lesions_from_one_click(training_studies, demo_studies):
    torch.manual_seed(0)
    model = build_sam3d(backbone="tiny")
    # No pretrained backbone exists for the tiny configuration, so nothing is worth freezing here.
    for p in model.parameters():
        p.requires_grad = True
    before = held_out_dice(model, demo_studies)

    losses = fit(model, training_studies, STEPS, lr=1e-3)
    after = held_out_dice(model, demo_studies)

    assert np.mean(losses[-50:]) < np.mean(losses[:50])
    assert before < 0.3, before
    assert after >= 0.8, (before, after)
