"""Training of the 3DSAM-adapter: the paper's loss and optimiser, with clicks simulated as a user gives them,
and a resumable loop (a killed run goes on from its last saved step)."""

import logging
import os
from contextlib import nullcontext
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from monai.losses import DiceCELoss
from torch.optim import AdamW
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LinearLR
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from lib.files import atomic_write
from lib.model import Sam3D, Sam3DPredictor
from lib.model.clicks import BOX_TOKEN
from lib.transforms.presets import Preset

from .augment import training_crops
from .simulated_user import background_click, challenge_box, interior_click, protocol_click

logger = logging.getLogger(__name__)

# The paper's loss: Dice and cross-entropy, half each, on the foreground channel.
LOSS = DiceCELoss(include_background=False, softmax=True, to_onehot_y=True, lambda_dice=0.5, lambda_ce=0.5)
# How often a step starts with a background click besides the first foreground one (users add them to
# keep a mask off a neighbouring organ before any mistake shows).
FIRST_BACKGROUND_PROBABILITY = 0.3
# How often a session starts with a box rather than a click (then corrects it with clicks, as click-first ones).
BOX_FIRST_PROBABILITY = 0.35


def make_optimizer(model: Sam3D, steps: int, lr: float) -> Tuple[AdamW, LinearLR]:
    """AdamW over the trainable parts only at peak rate ``lr`` (each configuration's own: ``Sam3DConfig``),
    decaying linearly to 1 % over ``steps`` (the paper's schedule)."""
    optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0)
    return optimizer, LinearLR(optimizer, start_factor=1.0, end_factor=0.01, total_iters=steps)


# Correction rounds after the first click (SAM-Med3D simulates about eleven; a few already teach the model to
# use its previous prediction, and each round costs a decoder pass with gradients).
MAX_CORRECTION_ROUNDS = 4
# How often a round adds no click: the model also learns to keep, or settle, its previous answer.
NO_CLICK_PROBABILITY = 0.1
# How often a correction click is drawn inside the error rather than at its deepest voxel (users' aim varies;
# evaluation clicks the deepest voxel).
DRAWN_CLICK_PROBABILITY = 0.5
# The first round also supervises the authors' decoder alone (deep supervision), so that it learns to segment as
# the paper trains it and the full-resolution refiner, which sees a few voxels about each, corrects its answer
# rather than drawing the mask alone (measured: docs/evaluation.md).
DECODER_LOSS_WEIGHT = 0.5


def foreground_loss(logit: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """LOSS of (S, S, S) foreground log-odds against a (1, 1, S, S, S) label (two-class logits [0, logit])."""
    return LOSS(torch.stack([torch.zeros_like(logit), logit])[None], label)


def first_clicks(lesion: np.ndarray, rng: np.random.Generator, background_probability: float) -> Tuple[list, list]:
    """A foreground click inside the lesion, sometimes with a background click outside it (near or far)."""
    points, labels = [interior_click(lesion, rng)], [1]
    if rng.random() < background_probability:
        click = background_click(lesion, rng)
        if click is not None:
            points.append(click)
            labels.append(0)
    return points, labels


class SimulatedSession(torch.nn.Module):
    """One simulated user's session on one crop as one forward pass, so that PyTorch's DistributedDataParallel,
    which hooks into a module's forward, sees a whole step (the encoder once, the decoder once per round)."""

    def __init__(self, model: Sam3D) -> None:
        super().__init__()
        self.model = model
        self.predictor = Sam3DPredictor(model)
        # What this training makes of the weights, decided here once (their checkpoint says so): background clicks
        # are prompts of their own type and each round sees the previous prediction.
        model.correction_trained = True

    def forward(
        self,
        crop: torch.Tensor,
        label: torch.Tensor,
        rng: np.random.Generator,
        max_rounds: int = MAX_CORRECTION_ROUNDS,
        background_probability: float = FIRST_BACKGROUND_PROBABILITY,
        rounds: Optional[int] = None,
    ) -> torch.Tensor:
        """crop, label: (1, 1, S, S, S), the label 0/1 with some lesion in the crop. Returns the session's loss.

        The encoder runs once; a first click (or a box, the challenge's with a hand-drawn box's error, kept in
        every round), then up to ``max_rounds`` rounds, each adding a click at the deepest voxel of the largest
        error of the previous round's prediction, or drawn inside it (foreground on a miss, background on a leak;
        sometimes no click) and seeing that prediction as its mask prompt. The loss is the mean over the rounds,
        so every click is taught to improve the mask; the first round's includes the decoder's own answer.
        ``rounds`` (the first included) fixes the number of rounds, which is otherwise drawn from
        1..1 + ``max_rounds`` (a benchmark times a step of known work)."""
        model = self.model
        encoding = model.encode_with_grad(crop)
        correction_round = self.predictor.correction_round
        if model.image_encoder.gradient_checkpointing:
            # Each round's decoder activations at full resolution (about 0.7 GiB for the paper configuration) are
            # recomputed in the backward pass rather than kept, so a step's memory does not grow with its rounds.
            def correction_round(*inputs):
                return checkpoint(self.predictor.correction_round, *inputs, use_reentrant=False)

        lesion = label[0, 0].bool().cpu().numpy()
        box = None
        if rng.random() < BOX_FIRST_PROBABILITY:
            drawn = challenge_box(lesion, "crop", rng=rng)
            box, points, labels = drawn.mask(lesion.shape[0], label.device), [drawn.centre], [BOX_TOKEN]
        else:
            points, labels = first_clicks(lesion, rng, background_probability)
        previous, losses = None, []
        if rounds is None:
            rounds = 1 + int(rng.integers(0, max_rounds + 1))
        for round_index in range(rounds):
            if round_index and rng.random() >= NO_CLICK_PROBABILITY:
                aim = rng if rng.random() < DRAWN_CLICK_PROBABILITY else None
                correction = protocol_click(previous.cpu().numpy() > 0, lesion, rng=aim)
                if correction is None:
                    break
                points.append(correction[0])
                labels.append(correction[1])
            clicks = torch.as_tensor(np.asarray(points, dtype=np.int64).reshape(-1, 3))
            logit, decoder_logit = correction_round(encoding, clicks, torch.tensor(labels, dtype=torch.long), previous, box)
            loss = foreground_loss(logit, label)
            losses.append(loss + DECODER_LOSS_WEIGHT * foreground_loss(decoder_logit, label) if round_index == 0 else loss)
            previous = logit.detach()
        return torch.stack(losses).mean()


def train_step(
    session: Union[SimulatedSession, DistributedDataParallel],
    crops: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    rngs: Sequence[np.random.Generator],
    **session_options,
) -> float:
    """One optimiser step on this process's crops (each (1, 1, S, S, S) with its label and its generator): the
    gradient is the mean over the crops, and under DistributedDataParallel over every process's crops (DDP
    averages across processes in the last crop's backward pass). Returns the mean loss of the global batch."""
    optimizer.zero_grad()
    total = 0.0
    for index, (crop, label, rng) in enumerate(zip(crops, labels, rngs)):
        last = index == len(crops) - 1
        synchronise = session.no_sync() if isinstance(session, DistributedDataParallel) and not last else nullcontext()
        with synchronise:
            loss = session(crop, label, rng, **session_options)
            (loss / len(crops)).backward()
        total += loss.item()
    trainable = [p for p in session.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    mean = torch.tensor(total / len(crops), dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(mean)
        mean /= dist.get_world_size()
    return mean.item()


def step_seed(seed: int, step: int, index: int = 0, batch: int = 1) -> int:
    """The seed of crop ``index`` of a step's global batch, whichever process draws it, so that a resumed run
    takes the same crops and clicks as an unbroken one, and any number of processes the same as one."""
    return (seed * 1_000_003 + step * batch + index) % 2**32


def draw_crop(volumes, transform, rng: np.random.Generator, tries: int = 10) -> dict:
    """One augmented crop with some lesion in it (rotation and zoom can push a small lesion out)."""
    for _ in range(tries):
        image, label = volumes[rng.integers(len(volumes))]
        crop = transform({"image": image, "label": label.float()})[0]
        if crop["label"].sum() > 0:
            return crop
    raise ValueError("no training crop with a lesion in it: are the labels empty?")


def distributed() -> Tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless torch.distributed is initialised."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def batch_share(batch_size: Optional[int], world: int) -> Tuple[int, int]:
    """(global batch, crops per process per step): ``batch_size`` crops per step over all processes (None or 0:
    one per process). A batch the processes cannot share evenly is refused (ValueError): the train task and
    scripts/train.py check a request with this too."""
    batch = batch_size or world
    if batch < 1 or batch % world:
        raise ValueError(f"a batch of {batch} crops cannot be shared evenly by {world} processes: give a positive "
                         "multiple")
    return batch, batch // world


def fit(
    model: Sam3D,
    volumes: Sequence[Tuple[torch.Tensor, torch.Tensor]],
    steps: int,
    preset: Preset,
    lr: float,
    seed: int = 0,
    state_path: Optional[str] = None,
    save_every: int = 25,
    batch_size: Optional[int] = None,
) -> Tuple[List[float], int]:
    """Train ``model`` for ``steps`` steps of ``batch_size`` crops (None: one per process) drawn from ``volumes``
    ((1, D, H, W) image, (1, D, H, W) bool label pairs on the model's grid), augmented as the authors do for
    ``preset``. Returns the losses of all steps and the step the run resumed at (0 for a fresh run).

    Under torch.distributed, the model is wrapped in DistributedDataParallel and each process draws its share of
    every step's crops; the crops a step draws depend on the seed, the step and the global batch only, so the
    same global batch trains alike on any number of processes. The first process saves the state: with
    ``state_path``, the trained tensors, optimiser, schedule and losses are saved there atomically every
    ``save_every`` steps, and a run with the same settings, starting weights and global batch resumes from them,
    whatever the number of processes."""
    optimizer, schedule = make_optimizer(model, steps, lr)
    transform = training_crops(preset, model.crop_size)
    rank, world = distributed()
    batch, local = batch_share(batch_size, world)
    run = {"steps": steps, "lr": lr, "seed": seed, "batch": batch, "start": repr(sorted(model.weights_info.items()))}
    losses = resume(state_path, run, model, optimizer, schedule) if state_path else []
    resumed_at = len(losses)
    model.train()
    session: Union[SimulatedSession, DistributedDataParallel] = SimulatedSession(model)
    if world > 1:
        # Unused parameters: a step's rounds and prompts (box or clicks) differ between processes. The buffers are
        # constants (upsampling taps), so they are not broadcast before every forward.
        device_ids = [model.device] if model.device.type == "cuda" else None
        session = DistributedDataParallel(
            session, device_ids=device_ids, find_unused_parameters=True, broadcast_buffers=False
        )
    progress = tqdm(range(len(losses), steps), desc="sam3d training", initial=len(losses), total=steps, disable=rank > 0)
    for step in progress:
        crops, labels, rngs = [], [], []
        for index in range(rank * local, (rank + 1) * local):
            rng = np.random.default_rng(step_seed(seed, step, index, batch))
            transform.set_random_state(seed=step_seed(seed, step, index, batch))
            crop = draw_crop(volumes, transform, rng)
            # Plain tensors: MONAI's MetaTensor would track metadata through every operation of the model.
            crops.append(torch.as_tensor(crop["image"]).as_subclass(torch.Tensor)[None].to(model.device))
            labels.append(torch.as_tensor(crop["label"]).as_subclass(torch.Tensor)[None].to(model.device))
            rngs.append(rng)
        losses.append(train_step(session, crops, labels, optimizer, rngs))
        schedule.step()
        if (step + 1) % 50 == 0 and rank == 0:
            logger.info(f"step {step + 1}/{steps}: loss {np.mean(losses[-50:]):.4f}")
        if state_path and rank == 0 and ((step + 1) % save_every == 0 or step + 1 == steps):
            save_state(state_path, run, model, optimizer, schedule, losses)
    model.eval()
    return losses, resumed_at


def save_state(path: str, run: dict, model: Sam3D, optimizer, schedule, losses: List[float]) -> None:
    state = {
        "run": run,
        "trained": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "schedule": schedule.state_dict(),
        "losses": losses,
    }
    atomic_write(path, lambda f: torch.save(state, f))


def resume(path: str, run: dict, model: Sam3D, optimizer, schedule) -> List[float]:
    """Load a saved run's state if it is the same run (settings, starting weights, trained tensors);
    -> the losses of the steps already done (empty: start afresh). Under torch.distributed the first process
    reads the file and sends what it read to the others, so that all resume alike (only its disk needs it)."""
    state = read_state(path) if distributed()[0] == 0 else None
    if dist.is_initialized():
        shared = [state]
        dist.broadcast_object_list(shared, src=0)
        state = shared[0]
    if state is None:
        return []
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if state["run"] != run or state["trained"].keys() != trained.keys():
        logger.info(f"{path} holds another run's state: starting afresh")
        return []
    if any(state["trained"][n].shape != p.shape for n, p in trained.items()):
        logger.info(f"{path} holds tensors of other shapes: starting afresh")
        return []
    try:
        schedule.load_state_dict(state["schedule"])
        optimizer.load_state_dict(state["optimizer"])  # last: it cannot fail halfway for a state of this run
    except Exception as e:  # a state that cannot be used is not worth failing the run for
        logger.warning(f"cannot resume from {path} ({e}): starting afresh")
        return []
    with torch.no_grad():  # last, so that a failure above leaves the model as it was
        for name, p in trained.items():
            p.copy_(state["trained"][name])
    logger.info(f"resuming the run saved in {path} at step {len(state['losses'])}/{run['steps']}")
    return list(state["losses"])


def read_state(path: str) -> Optional[dict]:
    """A saved run's state, or None if there is none or it cannot be read."""
    if not os.path.exists(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        logger.warning(f"cannot read the saved run {path} ({e}): starting afresh")
        return None
