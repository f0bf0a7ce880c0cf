"""scripts/compare_real_scans.py end to end: a real sam3d server on generated studies split into train and test,
trained through POST /train/sam3d and clicked through POST /infer/sam3d (deepgrow_3d is too slow for the suite on
CPUs: one click of its network takes about a minute)."""

import ast
import csv
import os
import re

import nibabel as nib
import numpy as np
import torch
import pytest
from scipy import ndimage

pytestmark = pytest.mark.slow

TRAIN, TEST = 2, 1
CLICKS = 2
STEPS = 2


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """Labelled phantoms (1-2 lesions each): two studies folders, train and test, as the real splits are."""
    from lib.phantoms import random_studies, write_studies

    folder = tmp_path_factory.mktemp("split")
    studies = random_studies(TRAIN + TEST, seed=5151)
    write_studies(str(folder / "train"), studies=studies[:TRAIN])
    write_studies(str(folder / "test"), studies=studies[TRAIN:])
    return folder / "train", folder / "test", [s.name for s in studies[TRAIN:]]


def lesions_of(label_path):
    """The lesions (26-connected components) of a label, read with nibabel: (i, j, k) arrays, and the spacing."""
    label = nib.load(str(label_path))
    components, count = ndimage.label(np.asarray(label.dataobj) > 0, structure=np.ones((3, 3, 3)))
    return [components == index for index in range(1, count + 1)], label.header.get_zooms()[:3]


def infer_requests(log_path):
    """(image file, foreground, background) of every infer request the server logged."""
    pattern = re.compile(r"Infer Request \(final\): (\{.*\})$")
    requests = []
    for line in open(log_path):
        match = pattern.search(line)
        if match:
            request = ast.literal_eval(match.group(1))
            requests.append((os.path.basename(request["image"]), request["foreground"], request["background"]))
    return requests


# Server start, a 2-step run and a few clicks of the tiny model: about a minute and a half on 2 CPU cores.
@pytest.mark.timeout(240)
def test_sam3d_is_trained_and_clicked_through_rest_without_seeing_a_test_label(split, tmp_path):
    from compare_real_scans import main
    from lib.training.simulated_user import protocol_click

    train, test, test_ids = split
    out, workdir = tmp_path / "out", tmp_path / "work"
    summaries = main([
        str(train), str(test), "--budget-minutes", "1", "--out", str(out), "--workdir", str(workdir),
        "--models", "sam3d", "--sam3d-steps", str(STEPS), "--clicks", str(CLICKS),
        "--sam3d-conf", "backbone=tiny,checkpoint=none,sam_checkpoint=none", "--sam3d-conf", "warmup=false",
        "--sam3d-train", "batch_size=2",
    ])

    # The table: one row, for sam3d, trained for the steps asked and scored after each click.
    assert [s["model"] for s in summaries] == ["sam3d"]
    summary = summaries[0]
    assert summary["trained"] == f"{STEPS} steps" and summary["crop"].startswith("32³")
    table = (out / "comparison.md").read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| sam3d |")] == ["sam3d"]
    for n in range(1, CLICKS + 1):
        assert 0 <= float(summary[f"Dice@{n}"]) <= 1 and 0 <= float(summary[f"NSD@{n}"]) <= 1
    meta = torch.load(out / "sam3d.pt", weights_only=True)["meta"]
    assert meta["steps"] == STEPS and meta["batch_size"] == 2  # the model trained as asked, kept

    # The csv: a row per lesion of the test labels, with Dice and NSD in [0, 1] after each click.
    with open(out / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    lesions = {case: lesions_of(test / "labels" / "final" / f"{case}.nii.gz") for case in test_ids}
    assert [(r["case"], int(r["lesion"])) for r in rows] == [
        (case, i + 1) for case in test_ids for i in range(len(lesions[case][0]))]
    for r in rows:
        assert r["click_1"] == "foreground"
        for n in range(1, CLICKS + 1):
            assert 0 <= float(r[f"dice_{n}"]) <= 1 and 0 <= float(r[f"nsd_{n}"]) <= 1
    assert np.isclose(float(summary["Dice@1"]), np.mean([float(r["dice_1"]) for r in rows]), atol=1e-3)

    # The served studies folder held the training labels only; the test image was there, without its label.
    studies = workdir / "sam3d" / "studies"
    assert sorted(os.listdir(studies / "labels" / "final")) == sorted(os.listdir(train / "labels" / "final"))
    assert all((studies / f"{case}.nii.gz").exists() for case in test_ids)

    # Every mask came from a request the server logged: one per click made, the first at the lesion's deepest
    # voxel by the protocol, as [i, j, k] indices of the image.
    requests = infer_requests(out / "logs" / "sam3d.log")
    made = sum(r[f"click_{n}"] != "none" for r in rows for n in range(1, CLICKS + 1))
    assert len(requests) == made and {image for image, _, _ in requests} == {f"{case}.nii.gz" for case in test_ids}
    masks, spacing = lesions[test_ids[0]]
    expected = protocol_click(np.zeros_like(masks[0]), masks[0], spacing)[0].tolist()
    assert requests[0][1:] == ([expected], [])
