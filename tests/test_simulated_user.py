"""Simulated clicks land where a radiologist would put them."""

import numpy as np

from lib.training.simulated_user import background_click, interior_click, protocol_click


def ball(shape, centre, radius):
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    return ((grid - np.asarray(centre)) ** 2).sum(-1) <= radius**2


def test_the_first_click_is_the_deepest_voxel_or_an_interior_one():
    lesion = ball((40, 40, 40), (20, 15, 25), 8)
    assert interior_click(lesion).tolist() == [20, 15, 25]
    rng = np.random.default_rng(0)
    for _ in range(20):
        click = interior_click(lesion, rng)
        assert lesion[tuple(click)]


def test_a_correction_goes_on_the_largest_error_with_its_kind():
    truth = ball((40, 40, 40), (20, 20, 20), 10)
    missed = truth & ~ball((40, 40, 40), (20, 20, 12), 6)  # a small miss at one end
    leak = truth | ball((40, 40, 40), (20, 33, 20), 5)  # a leak outside
    click, kind = protocol_click(missed, truth)
    assert kind == 1 and truth[tuple(click)] and not missed[tuple(click)]
    click, kind = protocol_click(leak, truth)
    assert kind == 0 and leak[tuple(click)] and not truth[tuple(click)]
    assert protocol_click(truth, truth) is None


def test_background_clicks_fall_outside_the_lesion_near_it_and_far_from_it():
    from scipy import ndimage

    lesion = ball((48, 48, 48), (24, 24, 24), 8)
    distance = ndimage.distance_transform_edt(~lesion)
    rng = np.random.default_rng(0)
    distances = np.array([distance[tuple(background_click(lesion, rng))] for _ in range(200)])
    assert (distances > 2).all()
    near = (distances <= 10).mean()
    assert 0.35 < near < 0.65, near  # half near the lesion, half farther away
    assert background_click(np.ones((8, 8, 8), bool), rng) is None


def test_the_deepest_voxel_found_in_the_regions_box_is_the_whole_arrays_also_at_its_faces():
    from scipy import ndimage

    from lib.regions import deepest_voxel

    rng = np.random.default_rng(0)
    for _ in range(20):
        # Random blobs, some cut by the array's faces (which are not background: a lesion goes on beyond a crop).
        region = ndimage.gaussian_filter(rng.random((24, 20, 28)), 2) > 0.52
        region = region & (ndimage.label(region)[0] == 1)
        whole = np.unravel_index(ndimage.distance_transform_edt(region).argmax(), region.shape)
        assert deepest_voxel(region).tolist() == list(whole)


def test_training_crops_keep_the_crop_size_the_label_binary_and_slices_unmixed_for_thick_slice_presets():
    import torch

    from lib.training.augment import training_crops
    from lib.transforms.presets import PRESETS

    image = torch.arange(60, dtype=torch.float32)[:, None, None].expand(60, 50, 50)[None].clone()  # value = slice
    label = torch.as_tensor(ball((60, 50, 50), (30, 25, 25), 6))[None].float()
    for name, zoom_out in (("kits", 1.0), ("colon", 0.0), ("mr", 0.25)):
        # Zoomed-out crops (serving's view of a lesion larger than the crop) average slices together; the authors'
        # own augmentations never do.
        transform = training_crops(PRESETS[name], 32, zoom_out_probability=zoom_out)
        transform.set_random_state(seed=1)
        for _ in range(8):
            crop = transform({"image": image, "label": label})[0]
            assert crop["image"].shape == (1, 32, 32, 32) and set(crop["label"].unique().tolist()) <= {0.0, 1.0}
            if PRESETS[name].in_plane_augmentation:  # rotations and zooms stay within slices
                in_slice_spread = crop["image"][0].flatten(1).std(dim=1)
                assert in_slice_spread.max() < 1e-3, in_slice_spread.max()


def test_training_crops_of_a_volume_thinner_than_the_crop_are_zero_padded_as_serving_pads():
    import torch

    from lib.training.augment import training_crops
    from lib.transforms.presets import PRESETS

    # 20 slices and 24 columns: thinner than the 32-voxel crop (and its 38-voxel first crop) in two axes, as
    # the paper configuration's 128-voxel crop is for a short scan.
    image = torch.ones(1, 20, 50, 24)
    label = torch.as_tensor(ball((20, 50, 24), (10, 25, 12), 5))[None].float()
    transform = training_crops(PRESETS["kits"], 32, zoom_out_probability=0.0)
    transform.set_random_state(seed=0)
    for _ in range(8):
        crop = transform({"image": image, "label": label})[0]
        assert crop["image"].shape == crop["label"].shape == (1, 32, 32, 32)
        assert crop["label"].sum() > 0
        # The volume (1) beside zero padding, both shifted alike by the intensity augmentation.
        assert crop["image"].max() - crop["image"].min() > 0.9


def test_mask_uncertainty_is_zero_for_a_crisp_mask_and_grows_with_undecided_voxels():
    import torch

    from lib.activelearning.uncertain import mask_uncertainty

    crisp = torch.zeros(20, 20, 20)
    crisp[5:15, 5:15, 5:15] = 1
    assert mask_uncertainty(crisp) == 0 and mask_uncertainty(torch.zeros(5, 5, 5)) == 0
    soft = crisp * 0.9 + 0.05
    softer = crisp * 0.5 + 0.3
    assert 0 < mask_uncertainty(soft) < mask_uncertainty(softer) < 1


def test_the_protocol_click_is_the_deepest_voxel_of_the_largest_error_with_its_sign():
    from lib.training.simulated_user import protocol_click

    shape = (48, 48, 56)
    lesion, satellite = ball(shape, (20, 20, 20), 8), ball(shape, (20, 20, 40), 6)
    truth = lesion | satellite
    assert protocol_click(np.zeros(shape, bool), lesion)[0].tolist() == [20, 20, 20]  # the first click
    assert protocol_click(np.zeros(shape, bool), lesion)[1] == 1
    small_leak = ball(shape, (38, 38, 20), 2)
    click, sign = protocol_click(lesion | small_leak, truth)  # the missed satellite outweighs the small leak
    assert click.tolist() == [20, 20, 40] and sign == 1
    big_leak = ball(shape, (38, 20, 46), 7) & ~truth
    click, sign = protocol_click(truth | big_leak | ~satellite & lesion, truth)
    assert sign == 0 and big_leak[tuple(click)] and click[1] == 20  # the leak, on its plane of symmetry
    assert protocol_click(truth, truth) is None


def test_the_protocol_click_measures_depth_in_millimetres():
    """One error region: a flat ellipsoid (radii 3, 7, 7 voxels) joined by a one-voxel neck to a ball (radius
    5.5). In voxels the ball is deeper; with slices 3 mm apart (along d) the flat one is (9, 7, 7 mm)."""
    from lib.training.simulated_user import protocol_click

    grid = np.stack(np.meshgrid(*[np.arange(n) for n in (13, 21, 40)], indexing="ij"), -1)
    flat = (((grid - [6, 10, 10]) / [3, 7, 7]) ** 2).sum(-1) <= 1
    error = flat | ball(grid.shape[:3], (6, 10, 30), 5.5)
    error[6, 10, 10:31] = True  # the neck: one region
    click, sign = protocol_click(error, np.zeros_like(error), (1.0, 1.0, 1.0))
    assert click.tolist() == [6, 10, 30] and sign == 0
    click, sign = protocol_click(np.zeros_like(error), error, (3.0, 1.0, 1.0))
    assert click.tolist() == [6, 10, 10] and sign == 1


def test_the_boundary_share_tells_a_one_voxel_band_from_a_deeper_miss():
    from lib.training.evaluate import boundary_share

    axis = np.arange(24) - 11.5
    distance = np.sqrt(sum(a**2 for a in np.meshgrid(axis, axis, axis, indexing="ij")))
    truth = distance <= 7
    assert boundary_share(truth, truth) == 1.0
    assert boundary_share(distance <= 8, truth) == 1.0  # a mask one voxel too large all round: all on the boundary
    assert boundary_share(distance <= 6.2, truth) > 0.95  # one voxel too small
    hollow = truth & (distance > 3)  # misses the lesion's core, far from its boundary
    assert boundary_share(hollow, truth) == 0.0
    assert 0 < boundary_share(hollow & (distance <= 6.2), truth) < 1


def test_training_zooms_out_only_lesions_large_enough_to_be_followed_and_keeps_them_visible():
    import torch

    from lib.training.augment import ZOOMED_LESION_SHARE, RandZoomOutd

    zoom_out = RandZoomOutd(38, prob=1.0)
    zoom_out.set_random_state(seed=0)
    image = torch.randn(1, 120, 120, 120)
    small = {"image": image, "label": torch.as_tensor(ball((120, 120, 120), (60, 60, 60), 6))[None].float()}
    for _ in range(5):  # a lesion well inside one crop: serving never zooms out for it, so neither does training
        assert zoom_out(small)["image"] is image
    large = {"image": image, "label": torch.as_tensor(ball((120, 120, 120), (60, 60, 60), 40))[None].float()}
    for _ in range(5):
        crop = zoom_out(large)
        assert crop["image"].shape == (1, 38, 38, 38) and zoom_out.zoom >= 1.5
        lesion = np.argwhere(crop["label"][0].numpy() > 0)
        assert (lesion.max(axis=0) - lesion.min(axis=0) + 1).max() >= ZOOMED_LESION_SHARE * 38 - 1
