"""The model learns: a tiny configuration trained briefly on generated lesions segments held-out ones."""

import os

import numpy as np
import pytest
import torch
from monai.transforms import EnsureChannelFirstd, LoadImaged, RandCropByPosNegLabeld, RandFlipd

from lib.model import build_sam3d
from lib.trainers.evaluate import lesion_dice
from lib.trainers.fit import make_optimizer, train_step
from lib.transforms.presets import PRESETS, intensity_transforms, spatial_transforms

STEPS = 400


def load(folder, name):
    preset = PRESETS["kits"]
    data = {"image": os.path.join(folder, f"{name}.nii.gz"), "label": os.path.join(folder, "labels", "final", f"{name}.nii.gz")}
    for t in [LoadImaged(keys=["image", "label"], reader="ITKReader"), EnsureChannelFirstd(keys=["image", "label"]),
              *spatial_transforms(preset, ("image", "label"), ("bilinear", "nearest")), *intensity_transforms(preset)]:
        data = t(data)
    return data["image"].as_tensor().float(), data["label"].as_tensor() > 0.5


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
    rng = np.random.default_rng(0)
    model = build_sam3d(backbone="tiny")
    # No pretrained backbone exists for the tiny configuration, so nothing is worth freezing here.
    for p in model.parameters():
        p.requires_grad = True
    before = held_out_dice(model, demo_studies)

    size = model.crop_size
    sample = RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=(size,) * 3, pos=1, neg=0)
    flips = [RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=axis) for axis in range(3)]
    for t in [sample, *flips]:
        t.set_random_state(0)
    optimizer, schedule = make_optimizer(model, STEPS, lr=1e-3)
    model.train()
    losses = []
    for _ in range(STEPS):
        image, label = training_studies[rng.integers(len(training_studies))]
        crop = sample({"image": image, "label": label.float()})[0]
        for flip in flips:
            crop = flip(crop)
        losses.append(train_step(model, torch.as_tensor(crop["image"])[None], torch.as_tensor(crop["label"])[None], optimizer, rng))
        schedule.step()
    model.eval()
    after = held_out_dice(model, demo_studies)

    assert np.mean(losses[-50:]) < np.mean(losses[:50])
    assert before < 0.3, before
    assert after >= 0.8, (before, after)
