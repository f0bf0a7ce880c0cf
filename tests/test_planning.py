"""The preset "auto": planned from labelled images (modality, CT window, grid), recorded in what training
publishes, and followed by a real server when training publishes a model planned on more labels."""

import dataclasses
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monailabel.client import MONAILabelClient

from conftest import copy_app, start_server, stop_server, train_and_wait
from lib.cases import studies_images
from lib.settings import Settings
from lib.transforms.planning import model_preset, plan_preset, preset_values, register_preset, resolve_preset
from lib.transforms.presets import PRESETS

TINY_CROP = 32
SHAPE, SPACING = (96, 96, 48), (1.5, 1.5, 3.0)  # x, y, z as NIfTI stores them: 144 mm each way


def scan(lesion_mm: float, ct: bool, seed: int = 0, tumour_value: int = 1):
    """A limb-like volume (a cylinder of tissue in air for CT, no negative values for MR) with an ellipsoidal
    lesion whose longest side is ``lesion_mm`` (along x) and a small satellite lesion (the size is the largest
    lesion's); its label holds a rim of another class with
    ``tumour_value`` 2. -> (image, label) arrays in (x, y, z)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[(np.arange(n) - n / 2 + 0.5) * s for n, s in zip(SHAPE, SPACING)], indexing="ij")
    body = x**2 + y**2 < 68**2
    lesion = (x / (lesion_mm / 2)) ** 2 + (y / 20) ** 2 + (z / 20) ** 2 < 1
    if ct:
        image = np.where(body, rng.normal(40, 10, SHAPE), -1000.0)
        image[lesion] = rng.normal(70, 15, int(lesion.sum()))
    else:
        image = np.where(body, rng.gamma(20, 20, SHAPE), rng.gamma(2, 5, SHAPE))
        image[lesion] = rng.gamma(30, 25, int(lesion.sum()))
    satellite = (x - 50) ** 2 + (y - 30) ** 2 + (z - 50) ** 2 < 5**2  # a small second lesion, far from the first
    image[satellite] = image[lesion][: int(satellite.sum())]
    label = (lesion | satellite).astype(np.uint8) * tumour_value
    if tumour_value != 1:
        label[(x / (lesion_mm / 2 + 8)) ** 2 + (y / 28) ** 2 + (z / 28) ** 2 < 1] = 1
        label[lesion] = tumour_value
    return image.astype(np.int16 if ct else np.float32), label


def write_case(folder: str, name: str, image: np.ndarray, label=None) -> None:
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])  # RAS from LPS-stored data, as ITK writes it
    nib.save(nib.Nifti1Image(image, affine), os.path.join(folder, f"{name}.nii.gz"))
    if label is not None:
        os.makedirs(os.path.join(folder, "labels", "final"), exist_ok=True)
        nib.save(nib.Nifti1Image(label, affine), os.path.join(folder, "labels", "final", f"{name}.nii.gz"))


def test_ct_plan_takes_its_window_from_the_tumour_and_its_grid_from_the_lesions_size(tmp_path):
    tumours = []
    for i, size in enumerate((60, 80, 100)):
        image, label = scan(size, ct=True, seed=i)
        write_case(str(tmp_path), f"ct_{i}", image, label)
        tumours.append(image[label > 0])
    write_case(str(tmp_path), "unlabelled", scan(140, ct=True)[0])
    preset = plan_preset(studies_images(str(tmp_path)), TINY_CROP)
    values = np.concatenate(tumours).astype(float)
    low, high = np.percentile(values, [0.5, 99.5])
    assert preset.window[0] == pytest.approx(low, abs=3) and preset.window[1] == pytest.approx(high, abs=3)
    assert preset.mean == pytest.approx(np.clip(values, *preset.window).mean(), abs=1)
    assert preset.std == pytest.approx(np.clip(values, *preset.window).std(), abs=1)
    # The median lesion (80 mm) spans 0.85 of a 32-voxel crop at 2.94 mm: 3 in whole millimetres.
    assert preset.spacing == (3.0, 3.0, 3.0)
    assert not preset.in_plane_augmentation  # 3 mm slices are not twice a 3 mm grid
    assert "CT" in preset.description and "3 labelled images" in preset.description
    # The same lesions for the paper's 128-voxel crop: never finer than the paper's 1 mm, and its 3 mm slices
    # (three times the grid) are augmented within slices, as the authors do for thick-slice data.
    paper = plan_preset(studies_images(str(tmp_path)), 128)
    assert paper.spacing == (1.0, 1.0, 1.0) and paper.in_plane_augmentation


def test_mr_plan_normalises_per_image_and_per_crop_and_a_multiclass_label_is_read_for_its_tumour(tmp_path):
    for i, size in enumerate((60, 60, 60)):
        image, label = scan(size, ct=False, seed=i, tumour_value=2)
        write_case(str(tmp_path), f"mr_{i}", image, label)
    tumour_only = plan_preset(studies_images(str(tmp_path)), TINY_CROP, label_value=2)
    assert tumour_only.window is None and tumour_only.mean is None and "MR" in tumour_only.description
    assert tumour_only.crop_statistics
    # 60 mm at 0.85 of 32 voxels: 2.2 mm -> 2; the kidney-like rim about it (76 mm) would give 2.8 mm -> 3.
    assert tumour_only.spacing == (2.0, 2.0, 2.0)
    assert plan_preset(studies_images(str(tmp_path)), TINY_CROP).spacing == (3.0, 3.0, 3.0)


def test_without_labels_the_plan_is_the_generic_preset_of_the_modality(tmp_path):
    (tmp_path / "ct").mkdir()
    (tmp_path / "mr").mkdir()
    write_case(str(tmp_path / "ct"), "a", scan(50, ct=True)[0])
    write_case(str(tmp_path / "mr"), "a", scan(50, ct=False)[0])
    (tmp_path / "mr" / "broken.nii.gz").write_bytes(b"not a volume")
    assert plan_preset(studies_images(str(tmp_path / "ct")), TINY_CROP) == PRESETS["ct"]
    assert plan_preset(studies_images(str(tmp_path / "mr")), TINY_CROP) == PRESETS["mr"]  # the broken file left out
    assert plan_preset([], TINY_CROP) == PRESETS["ct"]
    assert studies_images("http://127.0.0.1:8042/dicom-web") == []


def test_a_model_keeps_the_preset_it_was_trained_with(tmp_path):
    planned = dataclasses.replace(PRESETS["mr"], description="MR, planned", spacing=(4.5, 4.5, 4.5))
    name = register_preset(planned)
    assert name.startswith("auto-") and PRESETS[name] == planned and register_preset(planned) == name
    assert register_preset(PRESETS["sts_ct"]) == "sts_ct"
    # Saved as torch saves a published model's metadata, and read back.
    torch.save({"meta": {"preset": name, "preset_values": preset_values(planned)}}, tmp_path / "m.pt")
    meta = torch.load(tmp_path / "m.pt", weights_only=True)["meta"]
    assert model_preset(meta) == planned
    assert model_preset(json.loads(json.dumps(meta))) == planned  # lists in place of tuples
    assert model_preset({"preset": "kits"}) == PRESETS["kits"]  # models published before values were recorded
    assert model_preset({"preset": "kits", "demo": True}) is None  # the demo weights: planned for the user's scans
    assert model_preset({}) is None and model_preset({"preset_values": {"window": 1, "colour": 2}}) is None
    # An MR model published before crops were normalised by their own statistics is served as it was trained.
    before = {k: v for k, v in preset_values(planned).items() if k != "crop_statistics"}
    assert planned.crop_statistics and not model_preset({"preset_values": before}).crop_statistics
    # "auto" serves what the model records, and plans only for a model that records nothing; a training run
    # plans again once it has more than twice the labels the model's plan was made from.
    assert resolve_preset("auto", meta, lambda: pytest.fail("planned"), TINY_CROP) == (name, planned)
    early = dataclasses.replace(planned, planned_from=4)
    early_meta = {"preset_values": preset_values(early)}
    assert resolve_preset("auto", early_meta, lambda: pytest.fail("planned"), TINY_CROP, labelled_now=8)[1] == early
    for i, size in enumerate((60, 60, 60)):
        write_case(str(tmp_path), f"ct_{i}", *scan(size, ct=True, seed=i))
    replanned = resolve_preset("auto", early_meta, lambda: studies_images(str(tmp_path)), TINY_CROP, labelled_now=9)[1]
    assert replanned.window is not None and replanned.planned_from == 3 and replanned.spacing == (2.0, 2.0, 2.0)
    assert resolve_preset("sts_mr", meta, lambda: pytest.fail("planned"), TINY_CROP) == ("sts_mr", PRESETS["sts_mr"])
    assert Settings.from_conf({"preset": "auto"}, cuda_available=False).preset == "auto"
    with pytest.raises(ValueError, match="auto"):
        Settings.from_conf({"preset": "automatic"}, cuda_available=False)


@pytest.mark.slow
def test_a_server_on_auto_serves_the_plan_of_the_model_training_publishes(tmp_path_factory):
    """One labelled case (a 50 mm lesion: 2 mm) at the start, trained on; two more saved through REST (100 mm
    each: median 100 mm, 4 mm). The second run has three times the labels of the model's plan and plans again,
    and the next click is pre-processed on the published model's grid."""
    studies = str(tmp_path_factory.mktemp("studies"))
    write_case(studies, "case_0", *scan(50, ct=True, seed=0))
    for i in (1, 2):
        write_case(studies, f"case_{i}", scan(100, ct=True, seed=i)[0])
    app = copy_app(str(tmp_path_factory.mktemp("app")))
    conf = ["--conf", "backbone", "tiny", "--conf", "sam_checkpoint", "none", "--conf", "warmup", "false",
            "--conf", "preset", "auto"]
    proc, url = start_server(app, studies, conf, str(tmp_path_factory.mktemp("logs") / "server.log"))
    try:
        tmp = str(tmp_path_factory.mktemp("client"))
        client = MONAILabelClient(url, tmpdir=tmp)
        info = client.info()
        start_name = info["models"]["sam3d"]["config"]["preset"][0]
        assert start_name.startswith("auto-")
        assert "CT, planned from 1 labelled images" in info["models"]["sam3d"]["presets"][start_name]
        assert "2 mm" in info["models"]["sam3d"]["presets"][start_name]

        def click(**params):
            path, result = client.infer("sam3d", "case_1", {"foreground": [[48, 48, 24]], **params})
            result = json.loads(result) if isinstance(result, str) else result
            assert nib.load(path).shape == SHAPE  # on the image's own grid
            return result["preset"]

        assert click() == start_name
        task = train_and_wait(client, {"steps": 3, "val_split": 0.0})
        assert task["status"] == "DONE", task
        first = torch.load(os.path.join(app, "model", "sam3d.pt"), weights_only=True)["meta"]["preset_values"]
        assert first["planned_from"] == 1 and tuple(first["spacing"]) == (2.0, 2.0, 2.0)
        assert click() == start_name  # the published model's plan: the one the server made at start-up
        for i in (1, 2):
            label = os.path.join(tmp, f"case_{i}.nii.gz")
            nib.save(nib.Nifti1Image(scan(100, ct=True, seed=i)[1], np.diag([-1.5, -1.5, 3.0, 1.0])), label)
            client.save_label(f"case_{i}", label)
        task = train_and_wait(client, {"steps": 3, "val_split": 0.0})
        assert task["status"] == "DONE", task
        meta = torch.load(os.path.join(app, "model", "sam3d.pt"), weights_only=True)["meta"]
        assert tuple(meta["preset_values"]["spacing"]) == (4.0, 4.0, 4.0) and meta["preset_values"]["planned_from"] == 3
        assert meta["train_images"] == 3
        served = click(preset="auto")  # the first click after publishing swaps the model, and its preset, in
        assert served != start_name and "4 mm" in client.info()["models"]["sam3d"]["presets"][served]
        assert client.info()["models"]["sam3d"]["config"]["preset"][0] == served
    finally:
        stop_server(proc)
