"""The MONAI Label train task: fine-tune on the datastore's final labels, then publish our checkpoint."""

import json
import logging
import os
import time
from typing import Any, Callable, Dict

import numpy as np
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.train import TrainTask

from lib.model import Sam3D, freeze_backbone, save_sam3d
from lib.model.checkpoints import atomic_write

from lib.transforms.presets import PRESETS

from .data import load_labelled
from .evaluate import lesion_scores
from .fit import fit

logger = logging.getLogger(__name__)


class Sam3DTrainer(TrainTask):
    """Fine-tunes the model in use on the datastore's images whose labels are tagged final.

    MONAI Label's BasicTrainTask drives ignite's SupervisedTrainer, which calls ``network(inputs)`` once per
    batch. A click-prompted model needs its own iteration (a simulated first click, then correction clicks, all
    decoded from one encoder pass), so this task runs that loop itself and keeps MONAI Label's train contract:
    a request with options, stats on disk for ``/train/``, and a published model that inference picks up."""

    def __init__(
        self,
        build_model: Callable[[], Sam3D],
        preset: str,
        backbone: str,
        publish_path: str,
        stats_path: str,
        state_path: str,
    ) -> None:
        super().__init__("Fine-tune the 3DSAM-adapter on saved final labels (adapters, necks, prompt encoder, decoder)")
        self.build_model = build_model
        self.preset = preset
        self.backbone = backbone
        self.publish_path = publish_path
        self.stats_path = stats_path
        self.state_path = state_path
        self.options = {
            "steps": 200,
            "learning_rate": 4e-4,
            "val_split": 0.2,
            "seed": 0,
            # Recompute encoder activations in the backward pass: a paper-configuration step then fits a
            # modest GPU (see docs/benchmarks.md) at about a third more compute.
            "activation_checkpointing": True,
        }

    def config(self) -> Dict[str, Any]:
        return dict(self.options)

    def stats(self) -> Dict[str, Any]:
        if not os.path.exists(self.stats_path):
            return {}
        with open(self.stats_path) as f:
            return json.load(f)

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Dict[str, Any]:
        options = {**self.options, **request}
        start = time.time()
        datalist = sorted(datastore.datalist(), key=lambda d: d["image"])
        if not datalist:
            raise MONAILabelException(MONAILabelError.INVALID_INPUT, "no images with a final label to train on")
        order = np.random.default_rng(int(options["seed"])).permutation(len(datalist))
        n_val = int(round(len(datalist) * float(options["val_split"]))) if len(datalist) > 1 else 0
        val = [datalist[i] for i in order[:n_val]]
        train = [datalist[i] for i in order[n_val:]]
        logger.info(f"sam3d training: {len(train)} training and {len(val)} validation images")

        model = self.build_model()
        if model.weights_info["sam_backbone"].startswith("random"):
            # Freezing only makes sense over pretrained SAM weights; a random backbone trains with the rest.
            for p in model.parameters():
                p.requires_grad = True
        else:
            freeze_backbone(model)
        model.image_encoder.gradient_checkpointing = str(options["activation_checkpointing"]).lower() in ("true", "1")
        volumes = [load_labelled(d["image"], d["label"], self.preset) for d in train]
        losses, resumed_at = fit(
            model,
            volumes,
            int(options["steps"]),
            PRESETS[self.preset],
            float(options["learning_rate"]),
            int(options["seed"]),
            state_path=self.state_path,
        )

        scores = []
        for d in val:
            image, label = load_labelled(d["image"], d["label"], self.preset)
            scores += [s[1] for s in lesion_scores(model, image[0], label[0].numpy(), (1,), PRESETS[self.preset].spacing)]
        trained = [name for name, p in model.named_parameters() if p.requires_grad]
        stats = {
            "total_time": round(time.time() - start, 2),
            "steps": len(losses),
            "resumed_at_step": resumed_at,
            "train_loss": float(np.mean(losses[-20:])),
            "val_one_click_dice": float(np.mean([d for d, _ in scores])) if scores else None,
            "val_one_click_nsd": float(np.mean([n for _, n in scores])) if scores else None,
            "train_images": len(train),
            "val_images": len(val),
            "published": self.publish_path,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        save_sam3d(model, self.publish_path, self.backbone, trained, meta={"preset": self.preset, **stats})
        atomic_write(self.stats_path, lambda f: json.dump(stats, f, indent=2), mode="w")
        os.remove(self.state_path)  # published: the next run starts from the published weights
        logger.info(f"sam3d training done: {stats}")
        return stats
