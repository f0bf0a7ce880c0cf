"""Correction clicks through a real server: the answer is a function of the request alone (whoever clicked before,
restart or not), and a refinement replays one decoder round, not the encoder."""

import os

import nibabel as nib
import numpy as np
import pytest
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


def test_checkpointed_training_rounds_compute_the_same_step_and_hold_little_memory_per_round():
    import torch

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
