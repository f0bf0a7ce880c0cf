"""One training run, without a server: load the labelled pairs, fit (resumable, DistributedDataParallel across
processes), validate and publish our checkpoint. The train task (lib/trainers/sam3d_trainer.py) and
scripts/train.py run it."""

import json
import logging
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from lib.files import atomic_write
from lib.model import CONFIGS, Sam3D, save_sam3d
from lib.model.build import ModelSource
from lib.transforms.planning import preset_values
from lib.transforms.presets import Preset

from .data import load_labelled
from .evaluate import lesion_scores
from .fit import batch_share, fit

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingJob:
    """One run, as plain values, so that each GPU's process can carry it out."""

    source: ModelSource  # the model trained from (its checkpoint is the published model's ``base``)
    preset_name: str
    preset: Preset  # the values, which a process started for training has even for a planned preset
    backbone: str
    train: List[Dict[str, str]]  # {"image": path, "label": path}
    val: List[Dict[str, str]]
    skipped: Dict[str, str]  # image file name -> why its pair is not used
    options: Dict[str, Any]  # steps, learning_rate and activation_checkpointing (None: auto), seed, ...
    publish_path: str
    stats_path: Optional[str]  # None: the stats go into the published file's metadata only
    state_path: str  # the resumable state, removed once published
    label_value: Optional[int] = None  # the lesion's value in the labels; None: any non-zero voxel


def run(rank: int, world: int, job: TrainingJob) -> None:
    """Train on this process's share (rank of world); rank 0 validates and publishes. With several GPUs each
    process holds a replica under DistributedDataParallel (lib/training/fit.py)."""
    start = time.time()
    device = job.source.device
    if world > 1:
        device = f"cuda:{rank}" if device.startswith("cuda") else device
        if device.startswith("cuda"):
            torch.cuda.set_device(device)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # MONAI Label sets both for its training process
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=rank, world_size=world)
    try:
        train_and_publish(job.source.build(device), job, rank, world, start)
    finally:
        if world > 1:
            dist.destroy_process_group()


def train_and_publish(
    model: Sam3D, job: TrainingJob, rank: int = 0, world: int = 1, start: Optional[float] = None
) -> None:
    """The one training run, of the train task and of scripts/train.py: load and pre-process the pairs, fit
    (resumable through ``job.state_path``), then on the first process validate and publish."""
    start = time.time() if start is None else start
    job = replace(job, options=configured(job.options, job.backbone))
    options = job.options
    model.image_encoder.gradient_checkpointing = options["activation_checkpointing"]
    volumes = [
        load_labelled(d["image"], d["label"], job.preset, job.label_value)
        for d in tqdm(job.train, desc="loading", disable=rank > 0)
    ]
    losses, resumed_at = fit(
        model,
        volumes,
        options["steps"],
        job.preset,
        options["learning_rate"],
        options["seed"],
        state_path=job.state_path,
        save_every=options.get("save_every", 25),
        batch_size=options.get("batch_size") or None,
    )
    if rank == 0:
        publish(job, model, losses, resumed_at, world, time.time() - start)


# The training options whose ``auto`` (None) the model's configuration decides, and the field that does.
CONFIGURED = {"activation_checkpointing": "checkpoint_activations", "learning_rate": "learning_rate"}


def configured(options: Dict[str, Any], backbone: str) -> Dict[str, Any]:
    """``options`` with each ``auto`` (None, or absent) of CONFIGURED as ``backbone``'s configuration says: whether
    a step recomputes activations in its backward pass (on for the paper's sizes, off for tiny) and the peak
    learning rate (the paper's, or tiny's own)."""
    config = CONFIGS[backbone]
    return {**options, **{name: getattr(config, field) for name, field in CONFIGURED.items() if options.get(name) is None}}


def publish(job: TrainingJob, model, losses: List[float], resumed_at: int, world: int, seconds: float) -> None:
    scores = []
    for d in job.val:
        image, label = load_labelled(d["image"], d["label"], job.preset, job.label_value)
        scores += [s[1] for s in lesion_scores(model, image[0], label[0].numpy(), job.preset, (1,), job.preset.spacing)]
    stats = {
        "total_time": round(seconds, 2),
        "steps": len(losses),
        # The recipe, so that a published model says how it was made.
        "batch_size": batch_share(job.options.get("batch_size"), world)[0],
        "learning_rate": job.options["learning_rate"],
        "seed": job.options["seed"],
        "resumed_at_step": resumed_at,
        "processes": world,
        "train_loss": float(np.mean(losses[-20:])),
        "val_one_click_dice": float(np.mean([s.dice for s in scores])) if scores else None,
        "val_one_click_nsd": float(np.mean([s.nsd for s in scores])) if scores else None,
        "train_images": len(job.train),
        "val_images": len(job.val),
        "skipped": job.skipped,
        "published": job.publish_path,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    meta = {"preset": job.preset_name, "preset_values": preset_values(job.preset), "base": job.source.checkpoint, **stats}
    save_sam3d(model, job.publish_path, job.backbone, model.trained_names, meta=meta)
    if job.stats_path:
        atomic_write(job.stats_path, lambda f: json.dump(stats, f, indent=2), mode="w")
    os.remove(job.state_path)  # published: the next run starts from the published weights
    logger.info(f"sam3d training done: {stats}")
