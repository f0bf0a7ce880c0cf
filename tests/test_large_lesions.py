"""Whole lesions: one click on a tumour larger than the crop segments all of it; one that fits a crop is served as
before. A tiny model trained on phantoms with large lesions (and zoomed-out crops) serves both."""

import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from monailabel.client import MONAILabelClient
from scipy import ndimage

from conftest import APP, load_kits, start_server, stop_server, train_tiny

LESIONS = (0, 8)  # of large_studies(seed=5000)


@pytest.fixture(scope="module")
def trained_tiny_large(tmp_path_factory):
    """The tiny configuration trained (400 steps) on 12 easy and 12 large generated studies (large_studies' default
    seed; the tests hold out another)."""
    from lib.phantoms import large_studies, random_studies

    return train_tiny(tmp_path_factory, "large", random_studies(12) + large_studies(12))[0]


@pytest.fixture(scope="module")
def large_server(tmp_path_factory, trained_tiny_large):
    """A real server with that model on two held-out large studies (a bright lesion 1.6 crops across, a dark one 2.6;
    two and three zoom levels); yields (client, studies folder). This briefly trained model's first crop on some held-out lesions (5
    of 12 of this seed, dark ones) gets a small blob deep inside the lesion that neither reaches the crop's faces
    nor fills it, so nothing is followed; docs/evaluation.md measures that, and this test the following itself."""
    from lib.phantoms import large_studies, write_studies

    studies = str(tmp_path_factory.mktemp("large_studies"))
    write_studies(studies, studies=[large_studies(9, seed=5000)[i] for i in LESIONS])
    conf = ["--conf", "checkpoint", trained_tiny_large, "--conf", "sam_checkpoint", "none", "--conf", "warmup", "false"]
    proc, url = start_server(APP, studies, conf, str(tmp_path_factory.mktemp("logs") / "server.log"))
    yield MONAILabelClient(url, tmpdir=str(tmp_path_factory.mktemp("client"))), studies
    stop_server(proc)


def lesion_and_clicks(studies, name):
    """The lesion on the image's grid, its deepest voxel (where the challenge's first click goes), and the deepest of
    its voxels at least 20 mm from that one along some body axis (the model grid's axes: more than half a crop
    apart there, so a crop of its own)."""
    image = nib.load(os.path.join(studies, f"{name}.nii.gz"))
    lesion = nib.load(os.path.join(studies, "labels", "final", f"{name}.nii.gz")).get_fdata() > 0
    depth = ndimage.distance_transform_edt(lesion, sampling=image.header.get_zooms()[:3])
    first = np.unravel_index(depth.argmax(), lesion.shape)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in lesion.shape], indexing="ij"), axis=-1)
    world = grid @ image.affine[:3, :3].T  # mm, up to the offset
    far = np.abs(world - world[first]).max(axis=-1) >= 20
    second = np.unravel_index(np.where(far, depth, 0).argmax(), lesion.shape)
    assert lesion[second]
    return lesion, [int(i) for i in first], [int(i) for i in second]


def served_mask(client, name, params, tmp_path):
    path, result = client.infer("sam3d", name, params)
    mask = nib.load(path).get_fdata() > 0
    shutil.move(path, tmp_path / os.path.basename(path))  # the client's files stay in the test's folder
    return mask, result


def test_one_click_covers_a_lesion_larger_than_the_crop_and_a_second_click_reuses_its_encodings(large_server, tmp_path):
    client, studies = large_server
    for name in (f"large5000_{i:03d}" for i in LESIONS):
        lesion, click, other = lesion_and_clicks(studies, name)
        mask, first = served_mask(client, name, {"foreground": [click]}, tmp_path)
        # One 32 mm crop holds at most about 40 % of a lesion 48 mm or more across: the mask must go beyond it.
        recall = (mask & lesion).sum() / lesion.sum()
        dice = 2 * (mask & lesion).sum() / (mask.sum() + lesion.sum())
        assert recall >= 0.8 and dice >= 0.7, (name, recall, dice, first)
        assert first["zoom_levels"] and len(first["crops"]) > 1, first
        assert first["zoomed_crops"][0]["zoom"] == 1.5, first
        assert first["encoder_runs"] == len(first["crops"]) + len(first["zoomed_crops"]), first

        # A second click on the lesion, more than half a crop away: a crop of its own, followed on its own; the
        # first click's crops, zoomed-out boxes and tiles are the same as before, their encodings all from the cache.
        mask, second = served_mask(client, name, {"foreground": [click, other]}, tmp_path)
        assert second["crops"][: len(first["crops"])] == first["crops"], (first, second)
        assert second["cache_hits"] >= first["encoder_runs"], (first, second)
        assert (mask & lesion).sum() / lesion.sum() >= 0.8


def test_a_lesion_inside_one_crop_gives_the_same_mask_as_before(trained_tiny_large, demo_studies):
    """The demo lesions fit a 32 mm crop: the served probability is the one crop's, as before following existed
    (the crop planned on the click, encoded, decoded, pasted into zeros, the click honoured)."""
    from lib.engine.cache import BoundedCache, tensor_bytes
    from lib.engine.segment import Segmenter, honour_clicks
    from lib.model import Clicks, CropEncoding, Sam3DPredictor, build_sam3d
    from lib.transforms.crops import extract_crop, paste_max, plan_crops
    from lib.training.simulated_user import interior_click

    model = build_sam3d(checkpoint=trained_tiny_large)
    segmenter = Segmenter(model, "test", BoundedCache(2**28, CropEncoding.nbytes.fget), BoundedCache(2**26, tensor_bytes))
    for name in ("demo_ct_01", "demo_ct_03_oblique"):
        volume, label = load_kits(demo_studies, name)
        volume = volume[0]
        clicks = Clicks(interior_click(label[0].numpy())[None], np.zeros((0, 3)), "model")
        crops = plan_crops(clicks, volume.shape, model.crop_size)
        served = segmenter.segment(volume, crops, clicks, "kits")
        before = torch.zeros(volume.shape)
        encoding = model.encode(extract_crop(volume, crops[0])[None, None])
        paste_max(before, Sam3DPredictor(model).foreground_probability(encoding, crops[0].clicks), crops[0].start)
        honour_clicks(before, clicks)
        assert len(served.crops) == 1 and not served.zoomed_crops and not served.growth_bounded
        assert (before > 0.5).sum() > 100  # the model finds the lesion
        assert torch.equal(served.prob, before)


def test_a_mask_reaches_a_face_only_inside_the_volume_and_only_with_more_than_a_speck():
    from lib.engine.segment import reaches_face

    mask = torch.zeros(32, 32, 32, dtype=torch.bool)
    mask[10:20, 10:20, 0:12] = True  # 100 voxels on the face w = 0, a tenth of it
    assert reaches_face(mask, (40, 40, 40), 32, (100, 100, 100))
    assert not reaches_face(mask, (40, 40, 0), 32, (100, 100, 100))  # that face is the volume's: nothing beyond
    speck = torch.zeros(32, 32, 32, dtype=torch.bool)
    speck[10:13, 10:13, 0] = True  # 9 voxels: under 1 % of the face
    assert not reaches_face(speck, (40, 40, 40), 32, (100, 100, 100))
    # A zoomed-out box (96 voxels seen as 32) in a volume that ends 60 voxels in: its far face lies outside, and
    # the mask's last row inside the volume is the face that counts.
    far = torch.zeros(32, 32, 32, dtype=torch.bool)
    far[10:20, 10:20, 19] = True  # voxel 19 of 32 covers volume voxels 57-59, the last ones
    assert not reaches_face(far, (40, 40, 0), 96, (100, 100, 60))


def test_refining_tiles_cover_the_mask_side_by_side_with_a_margin():
    from lib.engine.segment import plan_tiles

    mask = torch.zeros(120, 120, 120, dtype=torch.bool)
    mask[20:90, 30:60, 40:41] = True  # 70 x 30 x 1 voxels
    tiles = plan_tiles(mask, 32)
    starts = [sorted({t[axis] for t in tiles}) for axis in range(3)]
    assert [len(s) for s in starts] == [3, 2, 1]  # with 2 voxels of margin: 74 needs 3 crops, 34 two, 5 one
    assert np.diff(starts[0]).tolist() == [32, 32] and all(s % 4 == 0 for axis in starts for s in axis)
    covered = torch.zeros_like(mask)
    for t in tiles:
        covered[tuple(slice(max(s, 0), s + 32) for s in t)] = True
    assert covered[mask].all()
    assert plan_tiles(torch.zeros(10, 10, 10, dtype=torch.bool), 32) == []
