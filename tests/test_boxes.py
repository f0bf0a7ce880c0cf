"""Boxes as the first prompt: the request's two forms, the one box type through the grids, the crop planned from
the box, the learned box prompt and the fallback for models that know only points, and the server's answers."""

import json

import numpy as np
import pytest
import torch

from lib.errors import InvalidRequest
from lib.engine.cache import BoundedCache, tensor_bytes
from lib.engine.segment import Segmenter
from lib.model import CONFIGS, Box, Clicks, CropEncoding, Sam3DPredictor, create_model
from lib.model.predictor import OUTSIDE_BOX_LOGIT
from lib.training.evaluate import challenge_auc, slice_axis
from lib.training.simulated_user import challenge_box
from lib.transforms.crops import plan_crops
from lib.transforms.grid import GridMap
from lib.transforms.request_clicks import parse_box, validate_clicks

TINY = CONFIGS["tiny"]
SHAPE = (100, 80, 60)


def test_slicer_roi_on_a_flipped_axis_is_the_same_box_and_ends_are_included():
    assert parse_box({"roi": [40, 20, 10, 30, 5, 9]}, SHAPE) == parse_box({"roi": [20, 40, 30, 10, 9, 5]}, SHAPE)
    box = parse_box({"roi": [40, 20, 10, 30, 5, 9]}, SHAPE)
    assert box.start.tolist() == [20, 10, 5] and box.stop.tolist() == [41, 31, 10] and box.frame == "image"


def test_the_challenge_box_is_x_y_on_the_middle_slice_and_the_z_range():
    challenge = {"z_min": 5, "z_max": 9, "z_mid": 7, "z_mid_x_min": 20, "z_mid_x_max": 40, "z_mid_y_min": 10,
                 "z_mid_y_max": 30}
    assert parse_box({"box": challenge}, SHAPE) == parse_box({"roi": [20, 40, 10, 30, 5, 9]}, SHAPE)


def test_no_roi_placed_is_no_box_and_a_roi_partly_outside_is_clipped():
    assert parse_box({"roi": []}, SHAPE) is None and parse_box({}, SHAPE) is None
    box = parse_box({"roi": [-10, 20, 70, 90, 0, 3]}, SHAPE)
    assert box.start.tolist() == [0, 70, 0] and box.stop.tolist() == [21, 80, 4]


@pytest.mark.parametrize(
    "request_, message",
    [
        ({"roi": [200, 300, 0, 10, 0, 10]}, "outside the image"),
        ({"roi": [5, 5, 7, 7, 0, 10]}, "empty"),
        ({"roi": [1, 2, 3]}, "[i0, i1, j0, j1, k0, k1]"),
        ({"roi": [1.5, 2, 3, 4, 5, 6]}, "whole voxel"),
        ({"roi": [0, 1, 0, 1, 0, float("nan")]}, "whole voxel"),
        ({"roi": "0,1,0,1,0,1"}, "[i0, i1, j0, j1, k0, k1]"),
        ({"box": {"z_min": 1}}, "'box' must be an object"),
        ({"box": [1, 2, 3, 4, 5, 6]}, "'box' must be an object"),
        ({"roi": [0, 10, 0, 10, 0, 10], "box": {"z_min": 0, "z_max": 1, "z_mid_x_min": 0, "z_mid_x_max": 5,
                                               "z_mid_y_min": 0, "z_mid_y_max": 5}}, "one box per request"),
    ],
)
def test_bad_boxes_are_refused_with_the_reason(request_, message):
    with pytest.raises(InvalidRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_box(request_, SHAPE)


def test_a_box_alone_is_a_request_and_background_clicks_alone_are_not():
    box = parse_box({"roi": [10, 20, 10, 20, 10, 20]}, SHAPE)
    assert len(validate_clicks({}, SHAPE, box)) == 0
    with pytest.raises(InvalidRequest, match="no foreground click and no box"):
        validate_clicks({"background": [[1, 1, 1]]}, SHAPE)


def test_a_box_moves_to_the_model_grid_holding_every_voxel_it_held():
    """A permuted, flipped and anisotropic stored grid: every voxel of the box lands inside the mapped box."""
    image_affine = np.array([[0.0, 0, -2.5, 100], [0, -0.8, 0, 50], [1.2, 0, 0, -30], [0, 0, 0, 1]])
    model_affine = np.diag([1.0, 1.0, 1.0, 1.0])
    model_affine[:3, 3] = -200  # model voxel = world + 200
    grid = GridMap(image_affine, (60, 90, 40), model_affine, (400, 400, 400))
    box = Box([10, 20, 5], [30, 50, 15], "image")
    mapped = grid.box_to_model(box)
    voxels = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(box.start, box.stop)], indexing="ij"), -1)
    model = voxels.reshape(-1, 3) @ image_affine[:3, :3].T + image_affine[:3, 3] + 200
    inside = np.all((model >= mapped.start - 0.5) & (model < mapped.stop - 0.5), axis=1)
    assert mapped.frame == "model" and inside.all()
    assert (mapped.size <= np.abs(image_affine[:3, :3]).sum(1) * box.size[[2, 1, 0]] + 2).all()  # and not much more


def test_the_challenge_box_is_the_middle_slices_tight_box_and_a_hand_drawn_one_stays_near_it():
    lesion = np.zeros((40, 50, 60), bool)
    lesion[10:21, 20:30, 30:45] = True  # the middle slice along axis 0 is 15
    lesion[15, 15:35, 25:50] = True
    box = challenge_box(lesion, "model")
    assert box.start.tolist() == [10, 15, 25] and box.stop.tolist() == [21, 35, 50]
    rng = np.random.default_rng(0)
    for _ in range(50):
        drawn = challenge_box(lesion, "model", rng=rng)
        assert (np.abs(drawn.start - box.start) <= np.ceil(0.2 * box.size) + 1).all()
        assert (drawn.stop > drawn.start).all() and (drawn.stop <= lesion.shape).all()
    assert challenge_box(lesion.transpose(2, 1, 0), "image", slice_axis=2).start.tolist() == [25, 15, 10]


def test_the_slice_axis_follows_the_grid_and_the_challenge_auc_is_the_trapezoid_over_the_clicks():
    assert slice_axis(np.diag([-1.0, -1, 3, 1])) == 2
    assert slice_axis(np.array([[0, 0, -1.0, 0], [0, 1.0, 0, 0], [2.5, 0, 0, 0], [0, 0, 0, 1]])) == 0
    assert challenge_auc([0.1, 0.5, 0.6, 0.7, 0.8, 0.9]) == pytest.approx(0.55 + 0.65 + 0.75 + 0.85)


def test_a_box_gets_the_crop_about_its_centre_with_the_clicks_inside_it():
    clicks = Clicks([[50, 50, 50], [5, 5, 5]], [[52, 48, 50]], "model")
    box = Box([40, 40, 40], [60, 60, 60], "model")
    crops = plan_crops(clicks, (100, 100, 100), 32, box)
    assert crops[0].box == box and crops[0].start == (33, 33, 33)
    assert crops[0].clicks.foreground.tolist() == [[17, 17, 17]]  # the click on the boxed lesion
    assert len(crops) == 2 and crops[1].box is None  # the far click is a lesion of its own


def encoded(model, seed=0):
    torch.manual_seed(seed)
    return model.encode(torch.randn(1, 1, TINY.crop_size, TINY.crop_size, TINY.crop_size))


def test_an_untrained_box_prompt_changes_nothing_and_serves_the_box_by_its_centre():
    torch.manual_seed(0)
    model = create_model(TINY).eval()
    encoding = encoded(model)
    assert not model.box_trained
    box = Box([4, 6, 8], [20, 24, 22], "crop")
    dense = box.mask(TINY.crop_size)
    points = torch.tensor([[10, 12, 14]])
    assert torch.equal(model.decode(encoding, points[None]), model.decode(encoding, points[None], box=dense[None, None]))
    answer = Sam3DPredictor(model).correction_logits(encoding, Clicks(np.zeros((0, 3)), np.zeros((0, 3)), "crop"), box=box)
    centre = Sam3DPredictor(model).correction_logits(encoding, Clicks([box.centre], np.zeros((0, 3)), "crop"))
    kept = box.grown(0.25, 2).clipped((TINY.crop_size,) * 3).mask(TINY.crop_size)
    assert torch.equal(answer[kept], centre[kept]) and (answer[~kept] == OUTSIDE_BOX_LOGIT).all()


def test_a_trained_box_prompt_changes_the_answer_only_when_a_box_is_sent():
    torch.manual_seed(0)
    model = create_model(TINY, correction_trained=True).eval()
    encoding = encoded(model)
    clicks = Clicks([[10, 12, 14]], np.zeros((0, 3)), "crop")
    before = Sam3DPredictor(model).correction_logits(encoding, clicks)
    with torch.no_grad():
        model.prompt_encoder.box_prompt.embed[-1].weight.normal_(0, 0.5)
    assert model.box_trained
    assert torch.equal(Sam3DPredictor(model).correction_logits(encoding, clicks), before)  # no box: bit for bit as before
    box = Box([4, 6, 8], [20, 24, 22], "crop")
    alone = Sam3DPredictor(model).correction_logits(encoding, Clicks(np.zeros((0, 3)), np.zeros((0, 3)), "crop"), box=box)
    assert alone.shape == (TINY.crop_size,) * 3 and torch.isfinite(alone).all()
    assert not torch.equal(Sam3DPredictor(model).correction_logits(encoding, clicks, box=box)[box.mask(TINY.crop_size)],
                           before[box.mask(TINY.crop_size)])


def segmenter(model):
    return Segmenter(model, "test", BoundedCache(2**30, CropEncoding.nbytes.fget), BoundedCache(2**28, tensor_bytes))


def test_a_box_that_fits_the_crop_costs_one_encoder_run_and_is_never_followed():
    """A random model's mask fills its crop (which starts following for a click); a box says how far the lesion
    goes, so it is served by its one crop."""
    torch.manual_seed(0)
    model = create_model(TINY).eval()
    volume = torch.randn(90, 90, 90)
    box = Box([30, 30, 30], [45, 50, 44], "model")
    none = Clicks(np.zeros((0, 3)), np.zeros((0, 3)), "model")
    result = segmenter(model).segment(volume, plan_crops(none, volume.shape, TINY.crop_size, box), none, "kits")
    assert result.encoder_runs == 1 and result.zoomed_crops == [] and result.boxes == [(tuple(result.crops[0]), TINY.crop_size)]
    outside = torch.ones_like(result.prob, dtype=torch.bool)
    grown = box.grown(0.25, 2)
    outside[tuple(slice(a, b) for a, b in zip(grown.start, grown.stop))] = False
    assert (result.prob[outside] < 1e-6).all()


def test_a_box_larger_than_the_crop_is_zoomed_out_to_at_once_and_refined():
    torch.manual_seed(0)
    model = create_model(TINY).eval()
    volume = torch.randn(120, 120, 120)
    box = Box([20, 25, 30], [80, 85, 75], "model")  # 60 voxels: about two crops of the tiny configuration
    none = Clicks(np.zeros((0, 3)), np.zeros((0, 3)), "model")
    result = segmenter(model).segment(volume, plan_crops(none, volume.shape, TINY.crop_size, box), none, "kits")
    (zoomed,) = result.zoomed_crops
    assert zoomed["size"] >= 60 * 1.5 and result.boxes[0][1] == zoomed["size"]
    assert result.encoder_runs == 1 + len(result.crops)  # the zoomed-out crop, then refining tiles
    grown = box.grown(0.25, 2)
    outside = torch.ones_like(result.prob, dtype=torch.bool)
    outside[tuple(slice(a, b) for a, b in zip(grown.start, grown.stop))] = False
    assert (result.prob[outside] < 1e-6).all()


@pytest.mark.parametrize(
    "params, message",
    [
        ({"roi": [500, 600, 0, 10, 0, 10]}, "outside the image"),
        ({"roi": [5, 5, 7, 7, 0, 10]}, "empty"),
        ({"roi": [1, 2, 3]}, "[i0, i1, j0, j1, k0, k1]"),
        ({"box": "everything"}, "'box' must be an object"),
        ({"roi": [70, 95, 60, 85, 40, 55], "box": {"z_min": 40, "z_max": 55, "z_mid_x_min": 70, "z_mid_x_max": 95,
                                                   "z_mid_y_min": 60, "z_mid_y_max": 85}}, "one box per request"),
        ({"background": [[60, 60, 47]]}, "no foreground click and no box"),
    ],
)
def test_the_server_refuses_bad_boxes_with_a_422_and_stores_nothing(server, params, message):
    from monailabel.client import MONAILabelClient
    from test_server import post_infer

    url, _, _ = server
    before = MONAILabelClient(url).datastore()
    code, body = post_infer(url, "demo_ct_01", {**params, "save_label": True})
    assert code == 422 and message in json.loads(body)["detail"], body
    assert MONAILabelClient(url).datastore() == before


def test_the_server_answers_a_box_alone_and_a_box_with_clicks(server):
    from test_server import post_infer

    url, _, _ = server
    roi = [70, 95, 60, 85, 40, 55]
    code, result = post_infer(url, "demo_ct_01", {"roi": roi})
    assert code == 200 and result["box"]["prompt"] == "centre click" and result["encoder_runs"] + result["cache_hits"] == 1
    code, refined = post_infer(url, "demo_ct_01", {"roi": roi, "foreground": [[83, 73, 47]], "background": [[72, 62, 47]]})
    assert code == 200 and refined["cache_hits"] == 1 and refined["encoder_runs"] == 0  # the box's crop, again


def test_untrained_weights_never_follow_so_a_first_click_is_one_encoder_run():
    """A random model's mask fills its crop wherever one clicks: weights that say so (state untrained) are not
    followed; the same weights called trained would be."""
    torch.manual_seed(0)
    model = create_model(TINY).eval()
    volume = torch.randn(90, 90, 90)
    click = Clicks([[45, 45, 45]], np.zeros((0, 3)), "model")
    runs = {}
    for state in ("untrained", "trained"):
        model.weights_info = {"state": state}
        result = segmenter(model).segment(volume, plan_crops(click, volume.shape, TINY.crop_size), click, "kits")
        runs[state] = (result.encoder_runs, len(result.zoomed_crops))
    assert runs["untrained"] == (1, 0) and runs["trained"][1] > 0, runs
