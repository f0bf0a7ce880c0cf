"""scripts/import_dataset.py on collections written as their producers write them: MSD and nnU-Net folders (nibabel,
SimpleITK, their dataset.json), IBSI-like per-case folders, and DICOM series with a DICOM-SEG written the way MONAI
Label writes one (dcmqi's itkimage2segimage)."""

import json
import os
import runpy
import shutil
import sys
from typing import Dict, Tuple

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from import_dataset import main
from lib.datastore import SafeLocalDatastore

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "import_dataset.py")
SIZE = (24, 24, 16)  # x, y, z voxels: small enough for a few seconds a test
OBLIQUE = tuple(np.array([[0.96, -0.28, 0], [0.28, 0.96, 0], [0, 0, 1]]).ravel())


def ball(centre: Tuple[int, int, int], radius: float) -> np.ndarray:
    """A (z, y, x) mask of a ball around the voxel ``centre`` (x, y, z)."""
    z, y, x = np.indices(SIZE[::-1])
    return (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 <= radius**2


def ct_volume(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1000, SIZE[::-1]).astype(np.int16)


def organ_and_tumour() -> np.ndarray:
    """(z, y, x) labels: 1 an organ, 2 a tumour inside it."""
    labels = ball((12, 12, 8), 7).astype(np.uint8)
    labels[ball((14, 11, 9), 3)] = 2
    return labels


def write_sitk(array: np.ndarray, path: str, spacing=(0.8, 0.8, 2.5), origin=(-10.0, 20.0, 5.0),
               direction=OBLIQUE) -> str:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sitk.WriteImage(image, path, useCompression=True)
    return path


def write_nibabel(array_xyz: np.ndarray, path: str) -> str:
    """As MSD's files are written: nibabel, an (x, y, z[, channel]) array and a scaled affine."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(array_xyz, np.diag([-0.78, -0.78, 5.0, 1.0])), path)
    return path


def write_json(path: str, content: Dict) -> None:
    with open(path, "w") as f:
        json.dump(content, f, indent=4)


def stored(studies: str, image_id: str) -> Tuple[sitk.Image, sitk.Image, Dict, Dict]:
    """The stored image and final label of ``image_id`` and their info, read as the app reads them."""
    store = SafeLocalDatastore(studies, extensions=("*.nii.gz", "*.nii", "*.nrrd"), auto_reload=False)
    image, label = store.get_image_uri(image_id), store.get_label_uri(image_id, "final")
    return (sitk.ReadImage(image), sitk.ReadImage(label), store.get_image_info(image_id),
            store.get_label_info(image_id, "final"))


def assert_tumour_label_on_grid(label: sitk.Image, image: sitk.Image, expected_zyx: np.ndarray) -> None:
    assert label.GetPixelID() == sitk.sitkUInt8
    assert label.GetSize() == image.GetSize()
    for geometry in ("GetOrigin", "GetSpacing", "GetDirection"):  # NIfTI keeps the direction as float32 quaternions
        np.testing.assert_allclose(getattr(label, geometry)(), getattr(image, geometry)(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), expected_zyx.astype(np.uint8))


def datastore_files(studies: str) -> Dict[str, int]:
    """Modification times of the images, labels and datastore_v2.json (not the lock file)."""
    times = {}
    for folder, _, files in os.walk(studies):
        for file in files:
            if file != ".lock":
                path = os.path.join(folder, file)
                times[os.path.relpath(path, studies)] = os.stat(path).st_mtime_ns
    return times


@pytest.fixture
def msd_vessel(tmp_path) -> str:
    """MSD Task08_HepaticVessel's layout: labels 1 vessel, 2 tumour, and macOS ._ files beside the volumes."""
    source = str(tmp_path / "Task08_HepaticVessel")
    for case in ("hepaticvessel_001", "hepaticvessel_002"):
        write_nibabel(ct_volume(1).T, f"{source}/imagesTr/{case}.nii.gz")
        write_nibabel(organ_and_tumour().T, f"{source}/labelsTr/{case}.nii.gz")
    for folder in ("imagesTr", "labelsTr"):
        with open(f"{source}/{folder}/._hepaticvessel_001.nii.gz", "wb") as f:
            f.write(b"\0\5\26\7" + bytes(100))  # AppleDouble resource fork, no NIfTI
    write_json(f"{source}/dataset.json", {
        "name": "HepaticVessel", "description": "Hepatic Vessel Segmentation", "tensorImageSize": "3D",
        "modality": {"0": "CT"}, "labels": {"0": "background", "1": "Vessel", "2": "Tumour"},
        "numTraining": 2, "numTest": 0,
        "training": [{"image": f"./imagesTr/hepaticvessel_00{i}.nii.gz",
                      "label": f"./labelsTr/hepaticvessel_00{i}.nii.gz"} for i in (1, 2)],
        "test": [],
    })
    return source


def test_msd_label_name_resolves_to_its_value(msd_vessel, tmp_path, capsys):
    vessel, tumour = str(tmp_path / "vessel"), str(tmp_path / "tumour")
    assert main([msd_vessel, "--out", vessel, "--label-name", "vessel"]) == 0
    assert "imported 2, already present 0, skipped 0" in capsys.readouterr().out  # the ._ files are no cases
    image, label, image_info, label_info = stored(vessel, "hepaticvessel_001")
    assert_tumour_label_on_grid(label, image, organ_and_tumour() == 1)
    assert label_info["label_value"] == 1
    assert label_info["source"] == f"{msd_vessel}/labelsTr/hepaticvessel_001.nii.gz"
    assert image_info["source"] == f"{msd_vessel}/imagesTr/hepaticvessel_001.nii.gz"

    assert main([msd_vessel, "--out", tumour]) == 0  # no value given: dataset.json's "Tumour"
    image, label, _, label_info = stored(tumour, "hepaticvessel_002")
    assert_tumour_label_on_grid(label, image, organ_and_tumour() == 2)
    assert label_info["label_value"] == 2


def test_msd_4d_image_gives_the_chosen_channel(tmp_path):
    source, out = str(tmp_path / "Task01_BrainTumour"), str(tmp_path / "studies")
    modalities = np.stack([ct_volume(seed).T for seed in range(4)], axis=-1)  # (x, y, z, channel)
    write_nibabel(modalities, f"{source}/imagesTr/BRATS_001.nii.gz")
    write_nibabel(organ_and_tumour().T, f"{source}/labelsTr/BRATS_001.nii.gz")
    write_json(f"{source}/dataset.json", {
        "name": "BRATS", "tensorImageSize": "4D", "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": 1,
        "training": [{"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}],
    })
    assert main([source, "--out", out, "--channel", "2", "--label-value", "2"]) == 0
    image, label, _, _ = stored(out, "BRATS_001")
    assert image.GetDimension() == 3
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), ct_volume(2))
    assert_tumour_label_on_grid(label, image, organ_and_tumour() == 2)


def test_nnunet_channel_suffix_and_tumor_label(tmp_path, capsys):
    source, out = str(tmp_path / "Dataset220_KiTS"), str(tmp_path / "studies")
    for number, case in enumerate(("case_00000", "case_00001")):
        for channel in (0, 1):
            write_sitk(ct_volume(10 * number + channel), f"{source}/imagesTr/{case}_{channel:04d}.nii.gz")
        write_sitk(organ_and_tumour(), f"{source}/labelsTr/{case}.nii.gz")
    write_json(f"{source}/dataset.json", {
        "channel_names": {"0": "CT", "1": "CT late"}, "labels": {"background": 0, "kidney": 1, "tumor": 2},
        "numTraining": 2, "file_ending": ".nii.gz", "name": "KiTS",
    })
    assert main([source, "--out", out, "--channel", "1"]) == 0
    assert "imported 2, already present 0, skipped 0" in capsys.readouterr().out
    store = SafeLocalDatastore(out, extensions=("*.nii.gz",), auto_reload=False)
    assert sorted(store.list_images()) == ["case_00000", "case_00001"]
    image, label, image_info, label_info = stored(out, "case_00001")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), ct_volume(11))
    assert image_info["source"] == f"{source}/imagesTr/case_00001_0001.nii.gz"
    assert label_info["label_value"] == 2
    assert_tumour_label_on_grid(label, image, organ_and_tumour() == 2)


@pytest.fixture
def ibsi(tmp_path) -> str:
    """IBSI soft-tissue sarcoma layout: STS_xxx/CT_image.nii.gz + CT_mask.nii.gz (0/1), MR beside them."""
    source = str(tmp_path / "ibsi")
    tumour = ball((10, 12, 8), 4)
    for case in ("STS_001", "STS_002", "STS_003", "STS_004", "STS_005"):
        write_sitk(tumour.astype(np.uint8), f"{source}/{case}/CT_mask.nii.gz")
        write_sitk(ct_volume(0), f"{source}/{case}/MR_T1_image.nii.gz", spacing=(0.5, 0.5, 3.0))
        if case != "STS_002":  # the collection lacks some images
            write_sitk(ct_volume(int(case[-1])), f"{source}/{case}/CT_image.nii.gz")
    write_sitk(tumour.astype(np.uint8), f"{source}/STS_003/CT_mask.nii.gz", origin=(-10.0, 20.0, 10.0))
    write_sitk(np.zeros(SIZE[::-1], np.uint8), f"{source}/STS_004/CT_mask.nii.gz")
    return source


CT = ["--layout", "cases", "--image", "{case}/CT_image.nii.gz", "--label", "{case}/CT_mask.nii.gz", "--id", "{case}_ct"]


def test_cases_layout_skips_each_bad_pair_with_its_reason(ibsi, tmp_path, capsys):
    out = str(tmp_path / "studies")
    assert main([ibsi, "--out", out, *CT]) == 0
    summary = capsys.readouterr().out
    assert "imported 2, already present 0, skipped 3" in summary
    assert f"STS_002: no image ({ibsi}/STS_002/CT_image.nii.gz)" in summary
    assert "STS_003: the label for STS_003_ct is not on the image's voxel grid" in summary
    assert "STS_004: no tumour voxels" in summary
    store = SafeLocalDatastore(out, extensions=("*.nii.gz",), auto_reload=False)
    assert sorted(store.list_images()) == ["STS_001_ct", "STS_005_ct"]  # no image left without its label
    image, label, _, label_info = stored(out, "STS_005_ct")
    assert label_info == {**label_info, "source": f"{ibsi}/STS_005/CT_mask.nii.gz", "label_value": 1}
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), ct_volume(5))
    assert_tumour_label_on_grid(label, image, ball((10, 12, 8), 4))


def test_second_run_changes_nothing(ibsi, tmp_path, capsys):
    out = str(tmp_path / "studies")
    main([ibsi, "--out", out, *CT])
    files, index = datastore_files(out), open(f"{out}/datastore_v2.json").read()
    capsys.readouterr()
    assert main([ibsi, "--out", out, *CT]) == 0
    assert "imported 0, already present 2, skipped 3" in capsys.readouterr().out
    assert datastore_files(out) == files
    assert open(f"{out}/datastore_v2.json").read() == index


def test_image_stored_without_label_gets_its_label(ibsi, tmp_path, capsys):
    out = str(tmp_path / "studies")
    store = SafeLocalDatastore(out, extensions=("*.nii.gz",), auto_reload=False)
    store.add_image("STS_001_ct", f"{ibsi}/STS_001/CT_image.nii.gz", {"client": "earlier"})
    image_time = os.stat(store.get_image_uri("STS_001_ct")).st_mtime_ns
    assert main([ibsi, "--out", out, *CT, "--cases", "STS_001"]) == 0
    assert "imported 1, already present 0, skipped 0" in capsys.readouterr().out
    image, label, image_info, _ = stored(out, "STS_001_ct")
    assert os.stat(store.get_image_uri("STS_001_ct")).st_mtime_ns == image_time
    assert image_info["client"] == "earlier"
    assert_tumour_label_on_grid(label, image, ball((10, 12, 8), 4))


def test_cases_from_a_file_and_limit(ibsi, tmp_path, capsys):
    split = tmp_path / "test.txt"
    split.write_text("STS_004\nSTS_001\n\nSTS_999\n")
    assert main([ibsi, "--out", str(tmp_path / "a"), *CT, "--cases", f"@{split}"]) == 0
    summary = capsys.readouterr().out
    assert "imported 1, already present 0, skipped 2" in summary
    assert "STS_999: not in the source" in summary and "STS_004: no tumour voxels" in summary
    assert main([ibsi, "--out", str(tmp_path / "b"), *CT, "--limit", "1"]) == 0
    assert "imported 1, already present 0, skipped 0" in capsys.readouterr().out


def test_nothing_usable_exits_1(ibsi, tmp_path, monkeypatch, capsys):
    """Run as a command (in this process: a new one would spend seconds importing the app's libraries)."""
    out = str(tmp_path / "studies")
    monkeypatch.setattr(sys, "argv", [SCRIPT, ibsi, "--out", out, *CT, "--cases", "STS_002,STS_004"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(SCRIPT, run_name="__main__")
    assert exited.value.code == 1
    assert "imported 0, already present 0, skipped 2" in capsys.readouterr().out


def test_ambiguous_labels_refuse_to_start(tmp_path):
    """MSD Task04_Hippocampus: two classes, neither a tumour."""
    source, out = str(tmp_path / "Task04_Hippocampus"), str(tmp_path / "studies")
    write_nibabel(ct_volume(0).T, f"{source}/imagesTr/hippocampus_001.nii.gz")
    write_nibabel(organ_and_tumour().T, f"{source}/labelsTr/hippocampus_001.nii.gz")
    write_json(f"{source}/dataset.json", {"name": "Hippocampus", "modality": {"0": "MRI"},
                                          "labels": {"0": "background", "1": "Anterior", "2": "Posterior"}})
    with pytest.raises(SystemExit) as refused:
        main([source, "--out", out])
    assert "the labels hold the values [0, 1, 2]" in str(refused.value.code)
    assert "--label-value" in str(refused.value.code)
    assert not os.path.exists(out)


def write_dicom_case(tmp_path, monkeypatch) -> Tuple[str, str]:
    """A CT series (scripts/make_dicom_studies.py's writer) and a DICOM-SEG of its labels (kidney 1, tumour 2)
    written by MONAI Label's own converter; -> (the collection's folder, the original volume)."""
    from make_dicom_studies import write_series
    from monailabel.datastore.utils.convert import nifti_to_dicom_seg

    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])  # dcmqi's tools
    identity = (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0)  # the series' own (LPS) axes, so the label is on its grid
    volume = write_sitk(ct_volume(3), str(tmp_path / "nifti/image.nii.gz"), direction=identity)
    labels = write_sitk(organ_and_tumour(), str(tmp_path / "nifti/labels.nii.gz"), direction=identity)
    source = str(tmp_path / "dicom")
    write_series(volume, "patient1", source)
    seg = nifti_to_dicom_seg(f"{source}/patient1", labels, [{"name": "kidney"}, {"name": "tumour"}])
    os.makedirs(f"{source}/patient1/seg")
    shutil.move(seg, f"{source}/patient1/seg/segmentation.dcm")
    return source, volume


def test_dicom_series_and_seg_round_trip(tmp_path, monkeypatch, capsys):
    source, volume = write_dicom_case(tmp_path, monkeypatch)
    series = sitk.ReadImage(volume)
    assert main([source, "--out", str(tmp_path / "tumour")]) == 0  # detected; the segment named tumour
    assert "imported 1, already present 0, skipped 0" in capsys.readouterr().out
    image, label, image_info, label_info = stored(str(tmp_path / "tumour"), "patient1")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), ct_volume(3))
    np.testing.assert_allclose(image.GetOrigin(), series.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), series.GetSpacing(), atol=1e-4)
    assert_tumour_label_on_grid(label, image, organ_and_tumour() == 2)
    assert label_info["source"] == f"{source}/patient1/seg/segmentation.dcm" and label_info["label_value"] == 2
    assert image_info["source"] == f"{source}/patient1"

    assert main([source, "--out", str(tmp_path / "kidney"), "--layout", "dicom", "--label-name", "KIDNEY"]) == 0
    image, label, _, label_info = stored(str(tmp_path / "kidney"), "patient1")
    assert_tumour_label_on_grid(label, image, organ_and_tumour() == 1)
    assert label_info["label_value"] == 1
