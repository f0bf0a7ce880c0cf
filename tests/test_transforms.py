"""Clicks, crops and geometry: the image and the clicks go through the same spatial changes and come back."""

import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
import torch
from monai.transforms import EnsureChannelFirstd, LoadImaged

from lib.errors import InvalidRequest
from lib.model import Clicks
from lib.transforms.grid import map_indices
from lib.transforms.request_clicks import MAX_CLICKS, MapClicksToImaged, parse_clicks, validate_clicks
from lib.transforms.crops import extract_crop, paste_max, plan_crops
from lib.transforms.presets import PRESETS, spatial_transforms
from lib.transforms.resample import ResampleToOriginalGridd

SHAPE = (40, 140, 150)


def test_valid_clicks_parse_to_int_indices():
    clicks = parse_clicks([[0, 1, 2], [39.0, 139, 149]], "foreground", SHAPE)
    assert clicks.dtype == np.int64 and clicks.tolist() == [[0, 1, 2], [39, 139, 149]]


@pytest.mark.parametrize(
    "value, message",
    [
        ([[40, 0, 0]], "outside the image"),
        ([[-1, 0, 0]], "outside the image"),
        ([[1.5, 0, 0]], "whole voxel indices"),
        ([[1, 2]], r"\[i, j, k\]"),
        ([[1, 2, 3, 4]], r"\[i, j, k\]"),
        ([5, 6, 7], r"\[i, j, k\]"),
        ("[[1, 2, 3]]", "must be a list"),
        ([[True, 2, 3]], "finite numbers"),
        ([[float("nan"), 2, 3]], "finite numbers"),
        ([["1", 2, 3]], "finite numbers"),
    ],
)
def test_malformed_or_outside_clicks_are_rejected_with_a_reason(value, message):
    with pytest.raises(InvalidRequest, match=message):
        parse_clicks(value, "foreground", SHAPE)


def test_a_request_needs_some_clicks_and_not_too_many():
    with pytest.raises(InvalidRequest, match="no foreground click"):
        validate_clicks({"foreground": [], "background": None}, SHAPE)
    with pytest.raises(InvalidRequest, match="at most"):
        validate_clicks({"foreground": [[1, 1, 1]] * (MAX_CLICKS + 1)}, SHAPE)


def test_map_indices_follows_world_coordinates_through_a_permuted_flipped_grid():
    source = np.array([[0, 0, 2.5, 0], [0, -0.8, 0, 0], [-0.8, 0, 0, 0], [0, 0, 0, 1.0]])
    target = np.diag([1.0, 1.0, 1.0, 1.0])
    point = np.array([[4, 10, 20]])
    world = source @ np.array([4, 10, 20, 1])
    expected = np.rint(world[:3]).astype(int) - 0  # identity target grid, but clipped into the shape below
    shape = (200, 200, 200)
    shifted_target = target.copy()
    shifted_target[:3, 3] = -100  # voxel 0 at -100 mm, so negative world coordinates stay inside
    mapped = map_indices(point, source, shifted_target, shape)
    assert mapped.tolist() == [(expected + 100).tolist()]


def test_clicks_close_together_share_a_crop_and_far_ones_get_their_own():
    fg = np.array([[50, 50, 50], [60, 55, 40], [150, 150, 150]])
    bg = np.array([[52, 52, 52], [100, 100, 100], [300, 300, 300]])
    crops = plan_crops(Clicks(fg, bg, "model"), (400, 400, 400), 128)
    assert len(crops) == 2
    first, second = crops
    assert len(first.clicks.foreground) == 2 and len(second.clicks.foreground) == 1
    assert first.start == (0, 0, 0) and second.start == (86, 86, 86)
    assert first.clicks.background.tolist() == [[52, 52, 52], [100, 100, 100]]
    assert second.clicks.background.tolist() == [[14, 14, 14]]  # (100, 100, 100) lies in both; (300, ...) in neither
    for crop in crops:
        assert crop.clicks.frame == "crop" and ((crop.clicks.foreground >= 0) & (crop.clicks.foreground < 128)).all()


def test_a_crop_stays_inside_the_volume_and_pads_a_small_one():
    crops = plan_crops(model_clicks([[2, 2, 2]]), (300, 50, 300), 128)
    assert crops[0].start == (0, 0, 0)
    volume = torch.arange(300 * 50 * 300, dtype=torch.float32).reshape(300, 50, 300)
    pixels = extract_crop(volume, crops[0])
    assert pixels.shape == (128, 128, 128)
    assert torch.equal(pixels[:, :50], volume[:128, :, :128]) and (pixels[:, 50:] == 0).all()
    prob = torch.zeros(300, 50, 300)
    paste_max(prob, torch.ones(128, 128, 128), crops[0].start)
    assert prob.sum() == 128 * 50 * 128


def model_clicks(foreground):
    return Clicks(np.array(foreground), np.zeros((0, 3)), "model")


def preprocess(path, clicks=None):
    data = {"image": path, "clicks": clicks or Clicks(np.zeros((0, 3)), np.zeros((0, 3)), "image")}
    for t in [LoadImaged(keys="image", reader="ITKReader"), EnsureChannelFirstd(keys="image"),
              *spatial_transforms(PRESETS["kits"]), MapClicksToImaged(keys="image")]:
        data = t(data)
    return data


@pytest.mark.parametrize("name", ["demo_ct_01", "demo_ct_02_aniso", "demo_ct_03_oblique"])
def test_a_lesion_click_lands_on_the_lesion_after_reorienting_and_resampling(demo_studies, name):
    label_path = os.path.join(demo_studies, "labels", "final", f"{name}.nii.gz")
    label = np.asarray(nib.load(label_path).dataobj)
    for lesion in range(1, ndimage.label(label)[1] + 1):
        inside = ndimage.label(label)[0] == lesion
        click = np.unravel_index(ndimage.distance_transform_edt(inside).argmax(), label.shape)  # deepest voxel
        data = preprocess(label_path, Clicks([click], np.zeros((0, 3)), "image"))  # the label, moved like an image
        mapped = data["clicks"].foreground[0]
        assert data["image"][(0, *mapped)] > 0.5, (click, mapped)


@pytest.mark.parametrize("name", ["demo_ct_01", "demo_ct_02_aniso", "demo_ct_03_oblique"])
def test_a_prediction_on_the_model_grid_comes_back_on_the_original_grid(demo_studies, name):
    label_path = os.path.join(demo_studies, "labels", "final", f"{name}.nii.gz")
    original = np.asarray(nib.load(label_path).dataobj)
    data = preprocess(label_path)  # the label through the image's spatial transforms: a perfect prediction
    data["pred"] = data["image"].float()
    restored = ResampleToOriginalGridd(keys="pred", ref="image")(data)
    mask = restored["pred"]
    assert mask.shape == original.shape and mask.dtype == np.uint8
    dice = 2 * (mask & original).sum() / (mask.sum() + original.sum())
    assert dice > 0.9, dice
    assert np.allclose(restored["pred_meta_dict"]["affine"], nib.load(label_path).affine, atol=1e-4)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_normalises_a_ct_volume_to_finite_values(demo_studies, name):
    from lib.transforms.presets import intensity_transforms

    image = nib.load(os.path.join(demo_studies, "demo_ct_01.nii.gz"))
    data = {"image": torch.as_tensor(np.asarray(image.dataobj, dtype=np.float32))[None]}
    for t in intensity_transforms(PRESETS[name]):
        data = t(data)
    out = torch.as_tensor(data["image"])
    assert torch.isfinite(out).all()
    preset = PRESETS[name]
    if preset.window is None:  # per-image z-score
        assert abs(out.mean()) < 1e-3 and abs(out.std() - 1) < 1e-2
    else:
        raw = torch.as_tensor(np.asarray(image.dataobj, dtype=np.float32))
        expected = (raw.clamp(*preset.window) - preset.mean) / preset.std
        assert torch.allclose(out[0], expected, atol=1e-4)


def mr_volumes_of_two_fields_of_view(demo_studies, preset):
    """A demo volume as an MR scan (air at zero) and the same scan with twice the field of view in-plane (air all
    round, as a scan of the whole limb holds), both normalised by ``preset``: (volume, wider, offset of the first
    in the second)."""
    from lib.transforms.presets import intensity_transforms

    raw = torch.as_tensor(np.asarray(nib.load(os.path.join(demo_studies, "demo_ct_01.nii.gz")).dataobj, dtype=np.float32))
    raw = raw - raw.min()
    offset = np.array([0, raw.shape[1] // 2, raw.shape[2] // 2])
    wider = torch.nn.functional.pad(raw, (offset[2], offset[2], offset[1], offset[1]))

    def normalised(volume):
        data = {"image": volume[None]}
        for t in intensity_transforms(preset):
            data = t(data)
        return torch.as_tensor(data["image"])[0]

    return normalised(raw), normalised(wider), offset


@pytest.mark.parametrize("crop_statistics", [True, False])
def test_an_mr_crop_reaches_the_model_alike_whatever_the_scans_field_of_view(demo_studies, crop_statistics):
    """The MR presets normalise each crop by its own statistics, so a scan taken with more air about the limb
    gives the model the same input; by the image's statistics alone (``crop_statistics`` off) it would not."""
    from dataclasses import replace

    from lib.engine.cache import BoundedCache, tensor_bytes
    from lib.engine.segment import Segmenter
    from lib.model import CONFIGS, CropEncoding, create_model
    from lib.transforms.planning import register_preset

    preset = replace(PRESETS["mr"], crop_statistics=crop_statistics)
    volume, wider, offset = mr_volumes_of_two_fields_of_view(demo_studies, preset)
    centre = np.array(volume.shape) // 2
    inputs = [preset.crop_input(v[tuple(slice(c - 16, c + 16) for c in centre + o)])
              for v, o in ((volume, 0 * offset), (wider, offset))]
    gap = float((inputs[0] - inputs[1]).abs().mean())
    torch.manual_seed(0)
    model = create_model(CONFIGS["tiny"])
    model.weights_info = {"state": "untrained"}  # one crop per click: no following into the added air
    served = []
    for v, o in ((volume, 0 * offset), (wider, offset)):
        segmenter = Segmenter(model, "test", BoundedCache(2**28, CropEncoding.nbytes.fget), BoundedCache(2**26, tensor_bytes))
        clicks = Clicks((centre + o)[None], np.zeros((0, 3)), "model")
        prob = segmenter.segment(v, plan_crops(clicks, v.shape, model.crop_size), clicks, register_preset(preset)).prob
        served.append(prob[tuple(slice(s, s + n) for s, n in zip(o, volume.shape))])
    served_gap = float((served[0] - served[1]).abs().max())
    # Measured: 0.003 and 0.002 per crop, 2.0 and 0.38 by the image's statistics alone.
    if crop_statistics:
        assert gap < 0.02 and served_gap < 0.02, (gap, served_gap)
    else:
        assert gap > 0.5 and served_gap > 0.1, (gap, served_gap)


def test_mr_training_crops_are_normalised_as_serving_normalises_them(demo_studies):
    """Training shows the model each crop z-scored by its own statistics, as ``Segmenter.encode`` does, then
    shifted by at most MR_SHIFT."""
    from lib.training.augment import MR_SHIFT, training_crops
    from lib.training.data import load_labelled

    image, label = load_labelled(os.path.join(demo_studies, "demo_ct_01.nii.gz"),
                                 os.path.join(demo_studies, "labels", "final", "demo_ct_01.nii.gz"), "mr")
    transform = training_crops(PRESETS["mr"], 32)
    transform.set_random_state(0)
    for _ in range(4):
        crop = torch.as_tensor(transform({"image": image, "label": label.float()})[0]["image"])
        assert crop.shape == (1, 32, 32, 32)
        assert abs(float(crop.mean())) <= MR_SHIFT + 1e-4 and abs(float(crop.std()) - 1) < 1e-3


def test_crop_coordinates_of_a_click_address_the_same_voxel_as_in_the_volume():
    volume = torch.randn(150, 90, 200)
    fg = np.array([[10, 80, 190], [140, 5, 3]])
    for crop in plan_crops(Clicks(fg, np.zeros((0, 3)), "model"), volume.shape, 64):
        pixels = extract_crop(volume, crop)
        for local in crop.clicks.foreground:
            assert pixels[tuple(local)] == volume[tuple(local + np.asarray(crop.start))]


@pytest.mark.parametrize("name", ["demo_ct_02_aniso", "demo_ct_03_oblique"])
def test_resampling_only_around_the_crops_gives_the_same_mask(demo_studies, name):
    label_path = os.path.join(demo_studies, "labels", "final", f"{name}.nii.gz")
    data = preprocess(label_path)
    pred = data["image"].float().clone()
    start, size = (20, 30, 25), 40
    outside = torch.ones_like(pred, dtype=torch.bool)
    outside[(0, *[slice(s, s + size) for s in start])] = False
    pred[outside] = 0.0  # what the model returns: zero outside its crops
    pred[(0, *[slice(s, s + size) for s in start])] = 1.0  # and a crop full of foreground, edges included
    data["pred"] = pred
    whole = ResampleToOriginalGridd(keys="pred", ref="image", boxes_key=None)(dict(data))["pred"]
    boxed = ResampleToOriginalGridd(keys="pred", ref="image")({**data, "crop_boxes": [(start, size)]})["pred"]
    assert whole.sum() > 1000
    assert np.array_equal(whole, boxed)
    empty = ResampleToOriginalGridd(keys="pred", ref="image")({**data, "crop_boxes": []})["pred"]
    assert empty.shape == whole.shape and empty.sum() == 0


def test_a_refinement_click_keeps_the_crop_it_falls_in():
    shape = (300, 300, 300)
    first = plan_crops(model_clicks([[100, 100, 100]]), shape, 128)[0]
    assert first.start == (36, 36, 36)
    refined = plan_crops(model_clicks([[100, 100, 100], [110, 95, 120]]), shape, 128)
    assert refined[0].start == first.start  # not re-centred: the cached encoding stays valid
    far = plan_crops(model_clicks([[100, 100, 100], [150, 100, 100]]), shape, 128)
    assert far[0].start != first.start  # 150 lies within an eighth of a crop of the face at 164: re-centre


def oriented(path):
    data = {"image": path}
    for t in [LoadImaged(keys="image", reader="ITKReader"), EnsureChannelFirstd(keys="image"),
              *spatial_transforms(PRESETS["kits"])[:1]]:  # the reorientation only
        data = t(data)
    return data


@pytest.mark.parametrize("pixdim", [(1.0, 1.0, 1.0), (1.5, 0.8, 0.8), (2.5, 0.7, 0.7)])
@pytest.mark.parametrize("name", ["demo_ct_01", "demo_ct_02_aniso", "demo_ct_03_oblique"])
def test_separable_spacing_gives_the_grid_and_values_of_monai_spacing(demo_studies, name, pixdim):
    from monai.transforms import Spacingd

    from lib.transforms.resample import SeparableSpacingd

    data = oriented(os.path.join(demo_studies, f"{name}.nii.gz"))
    reference = Spacingd(keys="image", pixdim=pixdim, mode="bilinear")(dict(data))["image"]  # float64 sampling
    ours = SeparableSpacingd(keys="image", pixdim=pixdim)(dict(data))["image"]
    assert ours.shape == reference.shape and ours.dtype == torch.float32
    assert torch.allclose(ours.affine.double(), reference.affine.double(), atol=1e-6)
    assert torch.allclose(ours.as_tensor(), reference.as_tensor().float(), atol=1e-3)  # HU, float32 vs float64


@pytest.mark.parametrize("name", ["demo_ct_01", "demo_ct_02_aniso", "demo_ct_03_oblique"])
def test_separable_spacing_of_a_label_gives_monai_nearest_neighbours(demo_studies, name):
    """(Grids whose samples fall exactly half-way between voxels are left out: there either neighbour is
    nearest, and MONAI's float32 sampling picks one by rounding error.)"""
    from monai.transforms import Spacingd

    from lib.transforms.resample import SeparableSpacingd

    data = oriented(os.path.join(demo_studies, "labels", "final", f"{name}.nii.gz"))
    reference = Spacingd(keys="image", pixdim=(1.3, 0.9, 0.9), mode="nearest")(dict(data))["image"]
    ours = SeparableSpacingd(keys="image", pixdim=(1.3, 0.9, 0.9), mode=("nearest",))(dict(data))["image"]
    assert torch.equal(ours.as_tensor(), reference.as_tensor().float())


def test_resampling_a_large_ct_adds_at_most_twice_its_result_in_memory():
    """MONAI's Spacingd adds about 14 times its result (a float64 grid of coordinates); see
    scripts/benchmark.py preprocessing and docs/benchmarks.md."""
    from benchmarks.preprocessing import measure

    run = measure("sam3d", shape=(384, 384, 200), spacing=(0.8, 0.8, 2.5))
    assert run["result_shape"] == [498, 307, 307]  # (200 - 1) * 2.5 mm, (384 - 1) * 0.8 mm, at 1 mm
    assert run["added_gib"] <= 2 * run["result_gib"] + 1 / 16, run
