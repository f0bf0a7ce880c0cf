"""The model learns: a tiny configuration trained briefly on generated lesions segments held-out ones."""

import json
import os

import numpy as np
import pytest
import torch

from conftest import CrashingVolumes, load_kits, tiny_trainable
from lib.model import Sam3DPredictor, build_sam3d
from lib.training.evaluate import lesion_dice
from lib.training.fit import fit
from lib.transforms.presets import PRESETS

pytestmark = pytest.mark.slow
# Any rate serves the resume test (it compares two runs); the one it was written at.
RATE = 4e-4


def held_out_dice(model, demo_studies):
    from make_demo_studies import STUDIES

    scores = []
    for study in STUDIES:
        volume, label = load_kits(demo_studies, study.name)
        scores += lesion_dice(model, volume[0], label[0].numpy(), PRESETS["kits"])
    return float(np.mean(scores))


def test_a_tiny_model_learns_to_segment_held_out_lesions_from_one_click(trained_tiny, demo_studies):
    """The demo weights (the trained_tiny fixture: 400 steps on generated studies) against the initialisation they
    started from; held out: the three demo studies."""
    torch.manual_seed(0)  # the initialisation the training started from
    before = held_out_dice(build_sam3d(backbone="tiny"), demo_studies)
    after = held_out_dice(build_sam3d(checkpoint=trained_tiny), demo_studies)

    assert before < 0.3, before
    assert after >= 0.8, (before, after)


def test_corrections_improve_the_mask_on_held_out_hard_lesions(trained_tiny_mixed, tmp_path):
    """Clicks two to five by the challenge protocol on held-out hard lesions (lobulated, ring, low-contrast,
    touching a same-intensity vessel, which makes the first mask leak) must improve the mask, background clicks on
    leaks included, and none may undo what earlier clicks got. Before the mask memory and correction rounds a click cost 0.09 Dice on average;
    before the full-resolution refiner five clicks gained 0.001 (docs/evaluation.md)."""
    from lib.phantoms import hard_studies, write_studies
    from lib.training.evaluate import lesion_scores, worst_drop

    studies = hard_studies(8, seed=3000)
    write_studies(str(tmp_path), studies=studies)
    model = build_sam3d(checkpoint=trained_tiny_mixed[0])
    assert model.correction_trained
    curves, background_changes = [], []
    for study in studies:
        volume, label = load_kits(str(tmp_path), study.name)
        for scores in lesion_scores(model, volume[0], label[0].numpy(), PRESETS["kits"], (1, 2, 3, 4, 5)):
            curves.append([scores[n].dice for n in (1, 2, 3, 4, 5)])
            background_changes += [scores[n].dice - scores[n - 1].dice for n in (2, 3, 4, 5) if scores[n].click == "background"]
    curves = np.array(curves)
    drops = [worst_drop(curve) for curve in curves]
    assert curves[:, 0].mean() >= 0.7, curves.mean(0)
    # Measured on these eight: a mean worst drop of 0.026 (0.09 before the mask memory and correction rounds) and
    # Dice 0.820 -> 0.843 over five clicks (0.864 after four; 0.830 -> 0.862 before the convolutions reached oneDNN,
    # the same training but for float rounding: the spread of one seed on eight lesions; 0.001 gained before the
    # refiner; over eight seeds and 24 lesions it gains more, docs/evaluation.md).
    assert np.mean(drops) <= 0.03, (np.mean(drops), curves.mean(0))
    assert curves[:, 4].mean() >= curves[:, 0].mean() + 0.02, curves.mean(0)
    # A background click (the protocol gives one where the largest error is a leak) must take Dice up on average: before the
    # mask memory the first one on a touching lesion's leak cost 0.22 (docs/evaluation.md). Measured: +0.012 on
    # average over 22 background clicks, the worst -0.025.
    assert len(background_changes) >= 3 and np.mean(background_changes) > 0, background_changes


def test_scored_on_the_images_own_grid_clicks_and_masks_land_where_the_model_grid_puts_them(trained_tiny_mixed, tmp_path):
    """The challenge's way (scripts/evaluate.py --grid image): clicks placed on the errors of the label as stored,
    mapped to the model's grid as a request's clicks are, and masks scored after resampling back as the server
    returns them. On held-out phantoms whose stored grids are anisotropic, oblique or permuted, the first mask
    scores about as on the model's grid; a click or a mask taken through a wrong affine would miss the lesion."""
    from lib.phantoms import hard_studies, write_studies
    from lib.training.data import load_on_image_grid
    from lib.training.evaluate import lesion_scores

    studies = hard_studies(6, seed=3000)
    write_studies(str(tmp_path), studies=studies)
    model = build_sam3d(checkpoint=trained_tiny_mixed[0])
    on_image, on_model, reoriented = [], [], 0
    for study in studies:
        image_path = str(tmp_path / f"{study.name}.nii.gz")
        label_path = str(tmp_path / "labels" / "final" / f"{study.name}.nii.gz")
        volume, label, grid = load_on_image_grid(image_path, label_path, "kits")
        voxel = grid.image_spacing
        axes = grid.image_affine[:3, :3] / voxel
        reoriented += not np.allclose(np.abs(axes), np.eye(3), atol=1e-3) or not np.allclose(voxel, voxel[0])
        on_image += [s[2].dice for s in lesion_scores(model, volume, label, PRESETS["kits"], (2,), grid=grid)]
        volume, label = load_kits(str(tmp_path), study.name)
        on_model += [s[2].dice for s in lesion_scores(model, volume[0], label[0].numpy(), PRESETS["kits"], (2,))]
    assert reoriented >= 3  # the grids the mapping has to get right
    # Measured: Dice@2 0.893 on the stored grids, 0.854 on the model's (where thick-slice labels are stair-stepped).
    assert np.mean(on_image) >= 0.7 and abs(np.mean(on_image) - np.mean(on_model)) <= 0.08, (on_image, on_model)


def test_a_run_that_died_resumes_where_it_stopped_and_ends_as_an_unbroken_run(training_studies, tmp_path):
    steps, state = 12, str(tmp_path / "state.pt")
    unbroken, unbroken_data = tiny_trainable(), CrashingVolumes(training_studies, limit=10**9)
    unbroken_losses, _ = fit(unbroken, unbroken_data, steps, PRESETS["kits"], RATE, seed=3)

    resumed = tiny_trainable()
    with pytest.raises(OSError):
        fit(resumed, CrashingVolumes(training_studies, limit=7), steps, PRESETS["kits"], RATE, seed=3, state_path=state, save_every=4)
    assert len(torch.load(state, weights_only=True)["losses"]) == 4  # saved at step 4, died in step 8
    resumed, resumed_data = tiny_trainable(), CrashingVolumes(training_studies, limit=10**9)
    resumed_losses, resumed_at = fit(resumed, resumed_data, steps, PRESETS["kits"], RATE, seed=3, state_path=state, save_every=4)
    assert resumed_at == 4 and resumed_data.reads < unbroken_data.reads  # went on from step 4, not from 0

    assert np.allclose(resumed_losses, unbroken_losses, atol=1e-5)
    for (name, a), b in zip(unbroken.named_parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-5), name
    # Another run (other settings) does not resume from this state.
    other = tiny_trainable()
    assert fit(other, training_studies, 2, PRESETS["kits"], RATE, seed=4, state_path=state)[1] == 0


def test_background_clicks_train_through_the_inference_rule(training_studies):
    """A step with a background click sends gradients through the background answer, as it is used at inference."""
    model = tiny_trainable()
    image, label = training_studies[0]
    lesion = label[0].numpy()
    centre = np.array(np.nonzero(lesion)).mean(axis=1).astype(int)
    start = np.clip(centre - model.crop_size // 2, 0, np.array(lesion.shape) - model.crop_size)
    box = tuple(slice(s, s + model.crop_size) for s in start)
    crop, truth = image[0][box], torch.as_tensor(lesion[box])
    encoding = model.encode_with_grad(crop[None, None])
    inside = torch.as_tensor(np.array(np.nonzero(truth.numpy())).T[0])
    outside = torch.as_tensor(np.array(np.nonzero(~truth.numpy())).T[0])
    logit = Sam3DPredictor(model).click_logits(encoding, torch.stack([inside, outside]), torch.tensor([1, 0]))
    foreground_only = Sam3DPredictor(model).click_logits(encoding, inside[None], torch.tensor([1]))
    assert (logit <= foreground_only).all()
    assert (logit < foreground_only).any()  # the background answer removed something
    with_background = torch.autograd.grad(logit.sum(), encoding.deep, retain_graph=True)[0]
    without = torch.autograd.grad(foreground_only.sum(), encoding.deep)[0]
    assert not torch.allclose(with_background, without)


def test_the_train_task_runs_one_process_per_device_and_publishes_once(demo_studies, tmp_path):
    from conftest import free_port
    from lib.model.build import ModelSource
    from lib.training.job import TrainingJob, run
    from lib.transforms.presets import PRESETS

    names = ["demo_ct_01", "demo_ct_02_aniso", "demo_ct_03_oblique"]
    pairs = [{"image": os.path.join(demo_studies, f"{n}.nii.gz"),
              "label": os.path.join(demo_studies, "labels", "final", f"{n}.nii.gz")} for n in names]
    job = TrainingJob(
        source=ModelSource(str(tmp_path / "sam3d.pt"), None, "tiny", None, False, "cpu"),
        preset_name="kits", preset=PRESETS["kits"], backbone="tiny", train=pairs[:2], val=pairs[2:], skipped={},
        options={"steps": 3, "learning_rate": 4e-4, "seed": 0, "activation_checkpointing": True},
        publish_path=str(tmp_path / "sam3d.pt"), stats_path=str(tmp_path / "stats.json"),
        state_path=str(tmp_path / "state.pt"),
    )
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    torch.multiprocessing.spawn(run, args=(2, job), nprocs=2)
    with open(tmp_path / "stats.json") as f:
        stats = json.load(f)
    assert stats["processes"] == 2 and stats["steps"] == 3 and 0 <= stats["val_one_click_nsd"] <= 1
    assert build_sam3d(checkpoint=str(tmp_path / "sam3d.pt")).weights_info["backbone"] == "tiny"
    assert not os.path.exists(tmp_path / "state.pt")
