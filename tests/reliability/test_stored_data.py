"""What a client may do to stored data through a real server: a click never stores more than the model's own
mask, a label is stored only on its image's grid, a new scan never inherits an old scan's labels, training
skips damaged labels, and saved files keep their permissions."""

import gzip
import json
import os
import shutil
import stat
import time

import nibabel as nib
import numpy as np
import pytest
import requests
import SimpleITK as sitk
from monailabel.client import MONAILabelClient

from conftest import copy_app, start_server, stop_server


@pytest.fixture(scope="module")
def store(tmp_path_factory, demo_studies, tiny_checkpoint):
    """A server of its own: these tests change its datastore. Yields (url, studies folder)."""
    studies = str(tmp_path_factory.mktemp("stored_data_studies"))
    shutil.copytree(demo_studies, studies, dirs_exist_ok=True)
    conf = ["--conf", "backbone", "tiny", "--conf", "sam_checkpoint", "none", "--conf", "checkpoint",
            tiny_checkpoint[0], "--conf", "warmup", "false"]
    app = copy_app(str(tmp_path_factory.mktemp("app")))
    proc, url = start_server(app, studies, conf, str(tmp_path_factory.mktemp("logs") / "server.log"))
    yield url, studies
    stop_server(proc)


def label_files(studies, tag, image):
    folder = os.path.join(studies, "labels", tag)
    return sorted(n for n in os.listdir(folder) if n.split(".")[0] == image) if os.path.isdir(folder) else []


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def infer(url, image, params):
    return requests.post(f"{url}/infer/sam3d", params={"image": image, "output": "json"},
                         data={"params": json.dumps(params)})


@pytest.mark.parametrize("tag", ["final", "../final", "Final", "original2"])
def test_a_click_cannot_store_a_label_other_than_the_models_own(store, tag):
    url, studies = store
    final = os.path.join(studies, "labels", "final", "demo_ct_01.nii.gz")
    before = read_bytes(final)
    answer = infer(url, "demo_ct_01", {"foreground": [[83, 73, 47]], "save_label": True, "label_tag": tag})
    assert answer.status_code == 422 and "original" in answer.json()["detail"], answer.text
    assert read_bytes(final) == before and label_files(studies, "final", "demo_ct_01") == ["demo_ct_01.nii.gz"]


def test_a_click_stores_its_mask_as_original_once_whatever_the_format(store):
    url, studies = store
    for extension in (".nii.gz", ".nrrd", ".nii.gz"):
        answer = infer(url, "demo_ct_01", {"foreground": [[83, 73, 47]], "save_label": True,
                                           "result_extension": extension})
        assert answer.status_code == 200, answer.text
        assert label_files(studies, "original", "demo_ct_01") == ["demo_ct_01" + extension]
    answer = infer(url, "demo_ct_01", {"foreground": [[83, 73, 47]], "save_label": "false"})
    assert answer.status_code == 422 and "save_label" in answer.json()["detail"]


def flipped_first_axis(affine, shape):
    flipped = affine.copy()
    flipped[:3, 0] *= -1
    flipped[:3, 3] = affine[:3, :3] @ [shape[0] - 1, 0, 0] + affine[:3, 3]
    return flipped


ON_ANOTHER_GRID = {
    "mirrored axis": flipped_first_axis,
    "identity affine": lambda affine, shape: np.eye(4),
    "3x spacing": lambda affine, shape: affine @ np.diag([3.0, 3.0, 3.0, 1.0]),
    "half a voxel off": lambda affine, shape: affine @ np.array([[1, 0, 0, 0.5], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),
}


@pytest.mark.parametrize("change", sorted(ON_ANOTHER_GRID))
def test_a_label_on_another_grid_is_refused_and_the_stored_one_kept(store, tmp_path, change):
    url, studies = store
    final = os.path.join(studies, "labels", "final", "demo_ct_01.nii.gz")
    before = read_bytes(final)
    stored = nib.load(final)
    moved = str(tmp_path / "demo_ct_01.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(stored.dataobj), ON_ANOTHER_GRID[change](stored.affine, stored.shape)), moved)
    with open(moved, "rb") as f:
        answer = requests.put(f"{url}/datastore/label", params={"image": "demo_ct_01", "tag": "final"},
                              files={"label": ("demo_ct_01.nii.gz", f)})
    assert answer.status_code == 422 and "not on the image's voxel grid" in answer.json()["detail"], answer.text
    assert read_bytes(final) == before


def test_a_label_on_the_images_grid_is_stored(store, tmp_path):
    url, studies = store
    image = nib.load(os.path.join(studies, "demo_ct_03_oblique.nii.gz"))
    label = np.zeros(image.shape, np.uint8)
    label[50:60, 50:60, 30:40] = 1
    path = str(tmp_path / "demo_ct_03_oblique.nrrd")  # ITK's geometry as Slicer writes it: rounding differs
    reference = sitk.ReadImage(os.path.join(studies, "demo_ct_03_oblique.nii.gz"))
    written = sitk.GetImageFromArray(label.transpose(2, 1, 0))
    written.CopyInformation(reference)
    sitk.WriteImage(written, path)
    client = MONAILabelClient(url, tmpdir=str(tmp_path))
    client.save_label("demo_ct_03_oblique", path, tag="final")
    assert label_files(studies, "final", "demo_ct_03_oblique") == ["demo_ct_03_oblique.nrrd"]


def upload_image(url, image_id, path):
    with open(path, "rb") as f:
        return requests.put(f"{url}/datastore/image", params={"image": image_id},
                            files={"file": (os.path.basename(path), f)}, data={"params": "{}"})


def test_a_new_scan_under_a_labelled_id_is_refused(store, tmp_path):
    url, studies = store
    scan = str(tmp_path / "scan.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((30, 30, 20), np.int16), np.eye(4)), scan)
    image, final = os.path.join(studies, "demo_ct_01.nii.gz"), os.path.join(studies, "labels", "final", "demo_ct_01.nii.gz")
    before = read_bytes(image), read_bytes(final)
    answer = upload_image(url, "demo_ct_01", scan)
    assert answer.status_code == 409 and "has labels" in answer.json()["detail"], answer.text
    assert (read_bytes(image), read_bytes(final)) == before
    assert "final" in requests.get(f"{url}/datastore/", params={"output": "all"}).json()["objects"]["demo_ct_01"]["labels"]


def test_an_unlabelled_scan_is_replaced_whole_in_any_format(store, tmp_path):
    url, studies = store
    nib.save(nib.Nifti1Image(np.zeros((30, 30, 20), np.int16), np.eye(4)), str(tmp_path / "scan.nii.gz"))
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "scan.nii.gz")), str(tmp_path / "scan.nrrd"))
    for extension in (".nii.gz", ".nrrd"):
        assert upload_image(url, "new_scan", str(tmp_path / f"scan{extension}")).status_code == 200
        assert sorted(n for n in os.listdir(studies) if n.startswith("new_scan")) == [f"new_scan{extension}"]


def test_saved_files_keep_the_mode_of_the_file_they_replace(store, tmp_path):
    url, studies = store
    final = os.path.join(studies, "labels", "final", "demo_ct_01.nii.gz")
    os.chmod(final, 0o640)
    client = MONAILabelClient(url, tmpdir=str(tmp_path))
    copy = str(tmp_path / "demo_ct_01.nii.gz")
    shutil.copy(final, copy)
    client.save_label("demo_ct_01", copy, tag="final")
    assert stat.S_IMODE(os.stat(final).st_mode) == 0o640

    nib.save(nib.Nifti1Image(np.zeros((30, 30, 20), np.int16), np.eye(4)), str(tmp_path / "fresh.nii.gz"))
    assert upload_image(url, "fresh_scan", str(tmp_path / "fresh.nii.gz")).status_code == 200
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(os.path.join(studies, "fresh_scan.nii.gz")).st_mode) == 0o666 & ~umask
    assert stat.S_IMODE(os.stat(os.path.join(studies, "datastore_v2.json")).st_mode) == 0o666 & ~umask


def test_background_clicks_alone_are_refused_and_change_nothing(store):
    url, _ = store
    assert infer(url, "demo_ct_03_oblique", {"foreground": [[60, 60, 40]]}).status_code == 200
    recorded = requests.get(f"{url}/datastore/image/info", params={"image": "demo_ct_03_oblique"}).json()
    answer = infer(url, "demo_ct_03_oblique", {"foreground": [], "background": [[60, 60, 40]]})
    assert answer.status_code == 422 and "foreground" in answer.json()["detail"], answer.text
    after = requests.get(f"{url}/datastore/image/info", params={"image": "demo_ct_03_oblique"}).json()
    assert after["sam3d_uncertainty"] == recorded["sam3d_uncertainty"]


def test_training_skips_a_damaged_label_and_reports_it(store):
    url, studies = store
    final = os.path.join(studies, "labels", "final", "demo_ct_02_aniso.nii.gz")
    raw = gzip.decompress(read_bytes(final))
    with open(final, "wb") as f:
        f.write(gzip.compress(raw[: len(raw) // 2]))  # a valid gzip of half a label: ITK reads it zero-filled
    answer = requests.post(f"{url}/train/sam3d", json={"steps": 2, "val_split": 0})
    assert answer.status_code == 200, answer.text
    deadline = time.time() + 300
    while (task := requests.get(f"{url}/train/").json())["status"] not in ("DONE", "ERROR"):
        assert time.time() < deadline, task
        time.sleep(1)
    assert task["status"] == "DONE", task
    stats = requests.get(f"{url}/info/").json()["train_stats"]["sam3d"]
    assert stats["train_images"] == 2 and list(stats["skipped"]) == ["demo_ct_02_aniso.nii.gz"], stats
    assert "stop short" in stats["skipped"]["demo_ct_02_aniso.nii.gz"]
