"""The TaskConfig that wires the 3DSAM-adapter's weights, infer task and trainer from the app's settings."""

import hashlib
import logging
import os
import uuid
from typing import Any, Dict, Optional

import torch
from monai.apps import download_url
from monailabel.interfaces.config import TaskConfig

from lib.infers.sam3d_infer import Sam3DInfer
from lib.trainers.sam3d_trainer import Sam3DTrainer
from lib.training.demo import demo_weights
from lib.files import PARTIAL_PREFIX, PARTIAL_SUFFIX
from lib.model.build import ModelSource, resolve_backbone, served_file
from lib.cases import studies_images
from lib.settings import DEMO, Settings

logger = logging.getLogger(__name__)

SAM_URLS = {
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
}
PUBLISHED_MODEL = "sam3d.pt"  # our checkpoint in the model folder, used when conf names none


def file_md5(path: str) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_sam(url: str, path: str) -> None:
    """Fetch into a temporary file beside ``path`` and rename it into place once whole: an interrupted download
    never becomes the model. SAM's file names end in the first six hex digits of the file's MD5, checked too."""
    expected = os.path.splitext(os.path.basename(url))[0].rsplit("_", 1)[-1]
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # A name that does not exist yet: MONAI's download_url skips a download whose destination exists.
    partial = os.path.join(folder, f"{PARTIAL_PREFIX}{uuid.uuid4().hex}{PARTIAL_SUFFIX}")
    try:
        download_url(url, partial, progress=False)
        if not file_md5(partial).startswith(expected):
            raise ValueError(f"the file from {url} is damaged (its MD5 does not start with {expected})")
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def sam_checkpoint_path(setting: str, backbone: str, model_dir: str) -> Optional[str]:
    """'none': no SAM weights; a path: that file; 'download' (default): the official file in the model folder,
    fetched on first start. Offline, this logs how to supply the file and returns None (random backbone)."""
    if setting == "none" or backbone not in SAM_URLS:
        return None
    if setting != "download":
        return setting
    url = SAM_URLS[backbone]
    path = os.path.join(model_dir, os.path.basename(url))
    if not os.path.exists(path):
        try:
            download_sam(url, path)
        except Exception as e:  # offline or blocked: the app still starts, with a random backbone
            logger.warning(
                f"Could not download the SAM {backbone} checkpoint from {url} ({type(e).__name__}: {e}). "
                f"The backbone stays randomly initialised. Put the file at {path}, or pass "
                f"--conf sam_checkpoint /path/to/{os.path.basename(url)}"
            )
            return None
    return path


def cpu_has_bfloat16() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def model_source(settings: Settings, model_dir: str) -> ModelSource:
    """Where the model comes from. The backbone is decided once, from the file that will be served, and the SAM
    file is chosen for that backbone (a vit_l checkpoint gets SAM's vit_l weights without --conf backbone)."""
    checkpoint = demo_weights(model_dir) if settings.checkpoint == DEMO else settings.checkpoint
    published = os.path.join(model_dir, PUBLISHED_MODEL)
    backbone = resolve_backbone(served_file(published, checkpoint), settings.backbone)
    # auto: bfloat16 on GPUs and on CPUs with bf16 units (docs/benchmarks.md: the speed and the masks it gives)
    bfloat16 = settings.precision == "bfloat16" or (
        settings.precision == "auto" and (settings.on_gpu or cpu_has_bfloat16())
    )
    return ModelSource(
        published=published,
        checkpoint=checkpoint,
        backbone=backbone,
        sam_checkpoint=sam_checkpoint_path(settings.sam_checkpoint, backbone, model_dir),
        bfloat16=bfloat16,
        device=settings.device,
    )


class Sam3DTaskConfig(TaskConfig):
    """Builds the model, the infer task and the trainer from the app's settings (``lib/settings.py``)."""

    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner: Any, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        settings = kwargs.get("settings") or Settings.from_conf(conf, torch.cuda.is_available())
        self.settings = settings
        self.labels = list(settings.labels)
        self.label_value = settings.label_value
        self.source = model_source(settings, model_dir)
        # torch.compile of the encoder pays on a GPU, not on CPUs (docs/benchmarks.md).
        self.compile = settings.compile == "true" or (settings.compile == "auto" and settings.on_gpu)
        self.warmup = settings.warmup
        self.network = self.build_model()
        self.studies = kwargs.get("studies") or ""

    def build_model(self):
        """The model in use: the last published training result if it was trained from the checkpoint asked
        for, else that checkpoint."""
        model = self.source.build()
        self.path = model.weights_info["checkpoint"]
        if model.weights_info["warning"]:
            logger.warning(f"sam3d: {model.weights_info['warning']}")
        if self.compile:
            model.image_encoder.compile()  # in place: the module and its state_dict keys stay as they are
        return model

    def infer(self):
        return {
            self.name: Sam3DInfer(
                model=self.network,
                settings=self.settings,
                model_version=uuid.uuid4().hex,
                # "auto" without a model that records its preset: planned from the studies folder's labels
                plan_cases=lambda: studies_images(self.studies),
                published_path=self.source.published,
                rebuild=self.build_model,
            )
        }

    def trainer(self):
        return Sam3DTrainer(
            source=self.source,
            preset=self.settings.preset,  # "auto" plans from the run's own training pairs
            model_meta=self.network.weights_info["meta"],
            backbone=self.network.weights_info["backbone"],
            publish_path=self.source.published,
            stats_path=os.path.join(self.model_dir, "train_stats.json"),
            state_path=os.path.join(self.model_dir, "train_state.pt"),
            label_value=self.label_value,
        )
