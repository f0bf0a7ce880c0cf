"""The MONAI Label train task: fine-tune on the datastore's final labels, then publish our checkpoint (the run
itself is lib/training/job.py's)."""

import json
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk
import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from lib.datastore import require_label_of, require_volume
from lib.model.build import ModelSource
from lib.settings import Option, typed_defaults
from lib.errors import InvalidRequest
from lib.training.fit import batch_share
from lib.training.job import TrainingJob, run
from lib.model import CONFIGS
from lib.transforms.planning import resolve_preset


logger = logging.getLogger(__name__)


# One row per training option (the README's table lists the same; tests/test_configs.py checks it).
TRAINING_OPTIONS: Dict[str, Option] = {
    "steps": Option("200", "a whole number, 1 to 1e6", number=(1, 10**6, True)),
    "learning_rate": Option("auto", "auto (1e-3 for the tiny configuration, the paper's 4e-4 otherwise) or 1e-8 to 1: "
                            "AdamW's peak, decaying linearly to 1 % over the run", number=(1e-8, 1.0, False), or_auto=True),
    "val_split": Option("0.2", "the share of the images held out to validate the published model, 0 to 0.5",
                        number=(0.0, 0.5, False)),
    "seed": Option("0", "a whole number, 0 to 2^32 - 1: the crops, clicks and split of the run",
                   number=(0, 2**32 - 1, True)),
    "batch_size": Option("0", "crops per step over all training processes, 0 to 1024; 0: one per process",
                         number=(0, 1024, True)),
    # Recompute activations in the backward pass: a paper-configuration step then fits a modest GPU or a
    # workstation's memory at a third more compute; the tiny one's does anyway (docs/benchmarks.md).
    "activation_checkpointing": Option("auto", "auto (on, except for the tiny configuration), true or false: recompute the "
                                       "encoder's and each round's activations in the backward pass", boolean=True,
                                       or_auto=True),
    # One process per visible GPU (MONAI Label's `gpus` request option chooses which are visible).
    "multi_gpu": Option("true", "true or false: one DistributedDataParallel process per visible GPU", boolean=True),
}
DEFAULT_OPTIONS = typed_defaults(TRAINING_OPTIONS)
SHOWN_OPTIONS = {name: TRAINING_OPTIONS[name].shown(value) for name, value in DEFAULT_OPTIONS.items()}


# What MONAI Label puts into a train request itself (its client, the server, and the training process it starts).
MONAI_LABEL_KEYS = ("model", "gpus", "local_rank", "bundle_path", "client_id")


def training_options(request: Dict[str, Any]) -> Dict[str, Any]:
    """The defaults with the request's values of the same options, each checked and typed. A key that is neither
    an option nor MONAI Label's is refused: silently ignored, a misspelt or another trainer's option
    (``max_epochs``) would train otherwise than asked."""
    unknown = sorted(set(request) - set(TRAINING_OPTIONS) - set(MONAI_LABEL_KEYS))
    if unknown:
        raise InvalidRequest(f"training option {unknown[0]!r} is unknown; the options are {sorted(TRAINING_OPTIONS)}")
    options = dict(DEFAULT_OPTIONS)
    for name, option in TRAINING_OPTIONS.items():
        if name in request:
            try:
                options[name] = option.parse(request[name], f"training option {name}")
            except ValueError as e:
                raise InvalidRequest(str(e)) from None
    return options


def check_gpus(value: Any) -> None:
    """MONAI Label passes ``gpus`` to the training process as CUDA_VISIBLE_DEVICES: anything but ``all`` or
    indices of this machine's GPUs leaves the run without a process (not text) or without a GPU."""
    count = torch.cuda.device_count()
    if value in ("all", "", None):
        return
    indices = value.split(",") if isinstance(value, str) else []
    if not indices or not all(i.strip().isdigit() and int(i) < count for i in indices):
        raise InvalidRequest(f"training option gpus: {str(value)[:40]!r} is not 'all' or indices of this "
                             f"server's {count} GPU(s), e.g. '0' or '0,1'")


def usable_pairs(
    datalist: List[Dict[str, str]], label_value: Optional[int] = None
) -> Tuple[List[Dict[str, str]], Dict[str, str]]:
    """The (image, final label) pairs that pass the checks a saved label passes and hold some tumour (voxels of
    ``label_value``; None: any non-zero voxel), sorted; and why the others do not. A label damaged on disk (cut
    short: ITK reads it zero-filled) would otherwise teach the model that the lesion's lost half is background."""
    usable, skipped = [], {}
    for pair in sorted(datalist, key=lambda d: d["image"]):
        name = os.path.basename(pair["image"])
        try:
            require_volume(pair["image"], f"the image {name}")
            label = require_label_of(pair["label"], pair["image"], name)
            require_tumour(label, label_value, name)
        except InvalidRequest as e:
            logger.warning(f"sam3d training: skipping {name}: {e}")
            skipped[name] = str(e)
            continue
        usable.append(pair)
    return usable, skipped


def require_tumour(label: sitk.Image, label_value: Optional[int], name: str) -> None:
    values = np.unique(sitk.GetArrayViewFromImage(label))
    if not (label_value in values if label_value else (values != 0).any()):
        wanted = f"no voxel of the tumour's value {label_value}" if label_value else "no labelled voxel"
        raise InvalidRequest(f"the final label of {name} has {wanted} (its values: {values.tolist()[:10]}; "
                             "--conf label_value)")


class Sam3DTrainer(TrainTask):
    """Fine-tunes the model in use on the datastore's images whose labels are tagged final.

    MONAI Label's BasicTrainTask drives ignite's SupervisedTrainer, which calls ``network(inputs)`` once per
    batch. A click-prompted model needs its own iteration (a simulated first click, then correction clicks, all
    decoded from one encoder pass), so this task runs that loop itself and keeps MONAI Label's train contract:
    a request with options, stats on disk for ``/train/``, and a published model that inference picks up."""

    def __init__(
        self, source: ModelSource, preset: str, backbone: str, publish_path: str, stats_path: str, state_path: str,
        label_value: Optional[int] = None, model_meta: Optional[Dict[str, Any]] = None,
    ) -> None:
        """``preset``: a preset's name, or "auto": the preset the model training starts from records (its
        ``model_meta``), else one planned from each run's training pairs (lib/transforms/planning.py)."""
        super().__init__("Fine-tune the 3DSAM-adapter on saved final labels (adapters, necks, prompt encoder, decoder)")
        self.source = source
        self.preset = preset
        self.backbone = backbone
        self.publish_path = publish_path
        self.stats_path = stats_path
        self.state_path = state_path
        self.label_value = label_value
        self.model_meta = model_meta or {}

    def config(self) -> Dict[str, Any]:
        return dict(SHOWN_OPTIONS)

    def stats(self) -> Dict[str, Any]:
        if not os.path.exists(self.stats_path):
            return {}
        with open(self.stats_path) as f:
            return json.load(f)

    def check_request(self, request: Dict[str, Any], datastore: Datastore) -> None:
        """Before a run is started for ``request``: what would make it fail at once (InvalidRequest)."""
        options = training_options(request)
        check_gpus(request.get("gpus", "all"))
        try:
            batch_share(options["batch_size"], self.processes(options))
        except ValueError as e:
            raise InvalidRequest(f"training option batch_size: {e} (one training process per GPU)") from None
        if not datastore.datalist():
            raise InvalidRequest("no images with a final label to train on: save some labels first")

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Dict[str, Any]:
        options = training_options(request)
        datalist, skipped = usable_pairs(datastore.datalist(), self.label_value)
        if not datalist:
            unusable = f" ({len(skipped)} unusable: {skipped})" if skipped else ""
            raise InvalidRequest(f"no images with a final label to train on{unusable}: save some labels first")
        order = np.random.default_rng(options["seed"]).permutation(len(datalist))
        n_val = int(round(len(datalist) * options["val_split"])) if len(datalist) > 1 else 0
        train, val = [datalist[i] for i in order[n_val:]], [datalist[i] for i in order[:n_val]]
        # The training pairs, not the studies folder: a DICOMweb datastore's labels are files only here.
        preset_name, preset = resolve_preset(self.preset, self.model_meta, lambda: [(d["image"], d["label"]) for d in train],
                                             CONFIGS[self.backbone].crop_size, self.label_value, len(train))
        job = TrainingJob(
            source=self.source,
            preset_name=preset_name,
            preset=preset,
            backbone=self.backbone,
            train=train,
            val=val,
            skipped=skipped,
            options=options,
            publish_path=self.publish_path,
            stats_path=self.stats_path,
            state_path=self.state_path,
            label_value=self.label_value,
        )
        logger.info(f"sam3d training: {len(job.train)} training and {len(job.val)} validation images")
        processes = self.processes(options)
        if processes > 1:
            torch.multiprocessing.spawn(run, args=(processes, job), nprocs=processes, join=True)
        else:
            run(0, 1, job)
        return self.stats()

    def processes(self, options: Dict[str, Any]) -> int:
        """One training process per visible GPU with ``multi_gpu``, else one."""
        gpus = torch.cuda.device_count() if self.source.device.startswith("cuda") else 0
        return gpus if options["multi_gpu"] and gpus > 1 else 1
