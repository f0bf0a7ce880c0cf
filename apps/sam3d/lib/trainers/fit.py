"""One training step of the 3DSAM-adapter: the paper's loss and optimiser, with clicks simulated as a user gives them."""

import logging
from typing import List, Sequence, Tuple

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.transforms import RandCropByPosNegLabeld, RandFlipd
from torch.optim import AdamW
from torch.optim.lr_scheduler import LinearLR

from lib.model import Sam3D

from .clicks import correction_click, interior_click

logger = logging.getLogger(__name__)

# The paper's loss: Dice and cross-entropy, half each, on the foreground channel.
LOSS = DiceCELoss(include_background=False, softmax=True, to_onehot_y=True, lambda_dice=0.5, lambda_ce=0.5)


def make_optimizer(model: Sam3D, steps: int, lr: float = 4e-4) -> Tuple[AdamW, LinearLR]:
    """AdamW over the trainable parts only, decaying linearly to 1 % over ``steps`` (the paper's schedule)."""
    optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0)
    return optimizer, LinearLR(optimizer, start_factor=1.0, end_factor=0.01, total_iters=steps)


def train_step(
    model: Sam3D,
    crop: torch.Tensor,
    label: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    rng: np.random.Generator,
    max_corrections: int = 2,
) -> float:
    """crop, label: (1, 1, S, S, S), the label 0/1 with some lesion in the crop. Returns the loss.

    A first click inside the lesion, then up to ``max_corrections`` correction clicks on what the current
    prediction misses, so that the model learns to use further clicks. The encoder runs once."""
    lesion = label[0, 0].bool().cpu().numpy()
    clicks = [interior_click(lesion, rng)]
    encoding = model.encode_with_grad(crop)
    for _ in range(rng.integers(0, max_corrections + 1)):
        with torch.no_grad():
            prediction = model.decode(encoding, torch.as_tensor(np.stack(clicks))[None]).argmax(1)[0].cpu().numpy()
        correction = correction_click(prediction.astype(bool), lesion)
        if correction is None or correction[1] == 0:  # background clicks are not learned (see README)
            break
        clicks.append(correction[0])
    logits = model.decode(encoding, torch.as_tensor(np.stack(clicks), device=crop.device)[None])
    loss = LOSS(logits, label)
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    return loss.item()


def fit(
    model: Sam3D, volumes: Sequence[Tuple[torch.Tensor, torch.Tensor]], steps: int, lr: float = 4e-4, seed: int = 0
) -> List[float]:
    """Train ``model`` for ``steps`` crops drawn from ``volumes`` ((1, D, H, W) image, (1, D, H, W) bool label
    pairs on the model's grid), each centred on a random lesion voxel and randomly flipped. Returns the losses."""
    rng = np.random.default_rng(seed)
    size = (model.crop_size,) * 3
    transforms = [RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=size, pos=1, neg=0)]
    transforms += [RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=axis) for axis in range(3)]
    for t in transforms:
        t.set_random_state(seed)
    optimizer, schedule = make_optimizer(model, steps, lr)
    model.train()
    losses = []
    for step in range(steps):
        image, label = volumes[rng.integers(len(volumes))]
        crop = transforms[0]({"image": image, "label": label.float()})[0]
        for t in transforms[1:]:
            crop = t(crop)
        image_crop = torch.as_tensor(crop["image"])[None].to(model.device)
        label_crop = torch.as_tensor(crop["label"])[None].to(model.device)
        losses.append(train_step(model, image_crop, label_crop, optimizer, rng))
        schedule.step()
        if (step + 1) % 50 == 0:
            logger.info(f"step {step + 1}/{steps}: loss {np.mean(losses[-50:]):.4f}")
    model.eval()
    return losses
