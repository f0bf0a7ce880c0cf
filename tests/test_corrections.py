"""Correction clicks through a real server: the answer is a function of the request alone (whoever clicked before,
restart or not), a refinement decodes one round, not the encoder, and every clicked voxel shows its click's
class."""

import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monailabel.client import MONAILabelClient

from conftest import start_server, stop_server

FIRST = {"foreground": [[83, 73, 47]], "background": []}
CORRECTED = {"foreground": [[83, 73, 47], [86, 70, 52]], "background": [[70, 60, 47]]}
OTHER_USER = {"foreground": [[80, 76, 44], [85, 72, 50]], "background": [[95, 80, 47]]}


def mask(client, params):
    path, result = client.infer("sam3d", "demo_ct_01", params)
    return np.asarray(nib.load(path).dataobj), result


def test_a_correction_gets_the_same_mask_whoever_clicked_before_and_after_a_restart(demo_server, tmp_path):
    url, studies, _ = demo_server
    client = MONAILabelClient(url, tmpdir=str(tmp_path))
    assert client.info()["models"]["sam3d"]["weights"]["correction_trained"]
    mask(client, FIRST)
    corrected, result = mask(client, CORRECTED)
    assert result["encoder_runs"] == 0  # the refinement kept the crop of the first click

    other_user, _ = mask(client, OTHER_USER)  # another user on the same image, with other clicks
    assert not np.array_equal(other_user, corrected)
    again, _ = mask(client, CORRECTED)  # nothing of the other user's clicks leaks into this answer
    assert np.array_equal(again, corrected)

    # A second server on the same app (no state: fresh caches) answers the request alone the same way.
    app = os.path.join(os.path.dirname(studies), "sam3d")
    proc, second_url = start_server(app, studies, [], os.path.join(tmp_path, "second.log"))
    (tmp_path / "second").mkdir()
    try:
        fresh, _ = mask(MONAILabelClient(second_url, tmpdir=str(tmp_path / "second")), CORRECTED)
    finally:
        stop_server(proc)
    assert np.array_equal(fresh, corrected)


class SavedForBackward:
    """A saved-tensors hook that keeps the bytes that autograd holds for the backward pass, and their peak."""

    live = peak = 0

    def __init__(self, tensor):
        self.tensor, self.bytes = tensor, tensor.numel() * tensor.element_size()
        SavedForBackward.live += self.bytes
        SavedForBackward.peak = max(SavedForBackward.peak, SavedForBackward.live)

    def __del__(self):
        SavedForBackward.live -= self.bytes


def test_the_voxels_near_a_click_take_its_class_and_those_near_both_kinds_keep_the_models_answer():
    from lib.engine.segment import honour_clicks
    from lib.model import Clicks

    model_answer = torch.full((10, 10, 10), 0.3)
    model_answer[5:] = 0.8
    foreground = [[1, 1, 1], [0, 9, 9], [5, 5, 5], [2, 8, 2]]
    background = [[8, 8, 8], [7, 5, 5], [2, 8, 2]]  # (7, 5, 5) two voxels from (5, 5, 5); (2, 8, 2) clicked both ways
    prob = model_answer.clone()
    honour_clicks(prob, Clicks(np.array(foreground), np.array(background), "model"), reach=1)

    expected = model_answer.clone()
    expected[0:3, 0:3, 0:3] = 1
    expected[0:2, 8:10, 8:10] = 1  # at the volume's edge: what lies inside it
    expected[7:10, 7:10, 7:10] = 0
    expected[4:6, 4:7, 4:7] = 1  # near (5, 5, 5) only
    expected[7:9, 4:7, 4:7] = 0  # near (7, 5, 5) only; the plane between them near both: the model's answer
    expected[5, 5, 5], expected[7, 5, 5] = 1, 0  # the clicked voxels themselves
    expected[2, 8, 2] = 0  # its neighbours are near both kinds; the voxel itself: background
    assert torch.equal(prob, expected)


def test_every_clicked_voxel_shows_its_clicks_class_where_the_model_would_not_move_it(demo_server, tmp_path):
    """A background click inside the lesion a few voxels from the foreground click (where a model keeps what lies
    nearer the foreground click) and a foreground click just past the first mask's border: in the mask returned on
    the image's grid, each voxel the user pointed at has the class the user gave it, and the lesion stays."""
    url, _, _ = demo_server
    client = MONAILabelClient(url, tmpdir=str(tmp_path))
    first, _ = mask(client, FIRST)
    click = np.asarray(FIRST["foreground"][0])
    inside = click + [0, 0, 4]
    beyond = click.copy()
    while first[tuple(beyond)]:
        beyond[0] += 1
    beyond[0] += 1  # two voxels past the border
    assert first[tuple(inside)] and not first[tuple(beyond)]
    corrected, _ = mask(client, {"foreground": [click.tolist(), beyond.tolist()], "background": [inside.tolist()]})
    assert corrected[tuple(click)] and corrected[tuple(beyond)] and not corrected[tuple(inside)]
    assert corrected.sum() > 0.5 * first.sum()


def test_checkpointed_training_rounds_compute_the_same_step_and_hold_little_memory_per_round():
    from lib.model import CONFIGS, build_sam3d
    from lib.training import fit

    size = CONFIGS["tiny"].crop_size
    crop = torch.randn(1, 1, size, size, size, generator=torch.Generator().manual_seed(0))
    d, h, w = torch.meshgrid(*[torch.arange(size)] * 3, indexing="ij")
    label = (((d - size / 2) ** 2 + (h - size / 2) ** 2 + (w - size / 2) ** 2) <= (size / 5) ** 2).float()[None, None]

    def step(checkpointing: bool, rounds: int):
        torch.manual_seed(0)
        model = build_sam3d(backbone="tiny").train()
        model.image_encoder.gradient_checkpointing = checkpointing
        trainable = [p for p in model.parameters() if p.requires_grad]
        SavedForBackward.live = SavedForBackward.peak = 0
        with torch.autograd.graph.saved_tensors_hooks(SavedForBackward, lambda saved: saved.tensor):
            loss = fit.train_step(
                fit.SimulatedSession(model), [crop], [label], torch.optim.SGD(trainable, lr=0.0),
                [np.random.default_rng(0)], background_probability=0.0, rounds=rounds,
            )
        return loss, [p.grad for p in trainable], SavedForBackward.peak

    kept = {rounds: step(False, rounds) for rounds in (1, 5)}
    recomputed = {rounds: step(True, rounds) for rounds in (1, 5)}
    for rounds in (1, 5):
        assert recomputed[rounds][0] == pytest.approx(kept[rounds][0], abs=1e-6)
        for recomputed_grad, kept_grad in zip(recomputed[rounds][1], kept[rounds][1]):
            assert (recomputed_grad is None) == (kept_grad is None)
            if kept_grad is not None:
                assert torch.allclose(recomputed_grad, kept_grad, atol=1e-6)
    # Four more rounds: measured 27.6 MiB more kept for the backward pass without checkpointing, 5.0 MiB with it
    # (the rounds' decoder activations recomputed, only their inputs and losses kept; with the paper
    # configuration's decoder 5124 against 320 MiB, docs/benchmarks.md).
    growth_kept = kept[5][2] - kept[1][2]
    growth_recomputed = recomputed[5][2] - recomputed[1][2]
    assert growth_recomputed < 0.3 * growth_kept, (growth_recomputed / 2**20, growth_kept / 2**20)
