"""The TaskConfig that wires the 3DSAM-adapter's weights, infer task (and later trainer) from the app's conf."""

import logging
import os
import uuid
from typing import Any, Dict, Optional

import torch
from monai.apps import download_url
from monailabel.interfaces.config import TaskConfig

from lib.infers.sam3d_infer import Sam3DInfer
from lib.trainers.sam3d_trainer import Sam3DTrainer
from lib.model import CONFIGS
from lib.model.build import ModelSource
from lib.transforms.presets import PRESETS

logger = logging.getLogger(__name__)

SAM_URLS = {
    "vit_b": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
    "vit_l": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
    "vit_h": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
}
PUBLISHED_MODEL = "sam3d.pt"  # our checkpoint in the model folder, used when conf names none


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
            os.makedirs(model_dir, exist_ok=True)
            download_url(url, path, progress=False)
        except Exception as e:  # offline or blocked: the app still starts, with a random backbone
            logger.warning(
                f"Could not download the SAM {backbone} checkpoint from {url} ({type(e).__name__}: {e}). "
                f"The backbone stays randomly initialised. Put the file at {path}, or pass "
                f"--conf sam_checkpoint /path/to/{os.path.basename(url)}"
            )
            return None
    return path


class Sam3DTaskConfig(TaskConfig):
    """conf options: backbone (vit_b | vit_l | vit_h | tiny), checkpoint (the authors' or ours), sam_checkpoint
    (download | none | path), preset, labels (comma-separated), device (cpu | cuda), precision (auto | float32 |
    bfloat16; auto is bfloat16 on a GPU), compile (auto | true | false; auto compiles the encoder on a GPU), warmup (true | false), cache_mb (crop encodings), volume_cache_mb
    (pre-processed images), max_crops (per request)."""

    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner: Any, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.labels = [label.strip() for label in conf.get("labels", "tumor").split(",") if label.strip()]
        self.preset = conf.get("preset", "kits")
        if self.preset not in PRESETS:
            raise ValueError(f"conf preset {self.preset!r} is unknown; choose one of {sorted(PRESETS)}")
        backbone = conf.get("backbone")
        if backbone is not None and backbone not in CONFIGS:
            raise ValueError(f"conf backbone {backbone!r} is unknown; choose one of {sorted(CONFIGS)}")
        precision = conf.get("precision", "auto")
        if precision not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"conf precision {precision!r} is unknown; choose auto, float32 or bfloat16")
        device = conf.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.source = ModelSource(
            published=os.path.join(model_dir, PUBLISHED_MODEL),
            checkpoint=conf.get("checkpoint"),
            backbone=backbone,
            sam_checkpoint=sam_checkpoint_path(conf.get("sam_checkpoint", "download"), backbone or "vit_b", model_dir),
            bfloat16=precision == "bfloat16" or (precision == "auto" and device.startswith("cuda")),
            device=device,
        )
        compile_setting = conf.get("compile", "auto").lower()
        if compile_setting not in ("auto", "true", "false"):
            raise ValueError(f"conf compile {compile_setting!r} is unknown; choose auto, true or false")
        # torch.compile of the encoder: 71 -> 39 ms per first click on an H100 (docs/benchmarks.md), at 15-40 s
        # of compilation during warm-up; on CPUs it did not pay.
        self.compile = compile_setting == "true" or (compile_setting == "auto" and device.startswith("cuda"))
        self.cache_bytes = int(float(conf.get("cache_mb", 2048)) * 2**20)
        self.volume_cache_bytes = int(float(conf.get("volume_cache_mb", 1024)) * 2**20)
        self.warmup = conf.get("warmup", "true").lower() in ("true", "1", "yes")
        self.max_crops = int(conf.get("max_crops", 16))
        if self.max_crops < 1:
            raise ValueError(f"conf max_crops {self.max_crops}: give a whole number above 0")
        self.network = self.build_model()

    def build_model(self):
        """The model in use: the last published training result if any, else the conf checkpoint."""
        model = self.source.build()
        self.path = model.weights_info["checkpoint"]
        if self.compile:
            model.image_encoder.compile()  # in place: the module and its state_dict keys stay as they are
        return model

    def infer(self):
        return {
            self.name: Sam3DInfer(
                model=self.network,
                model_version=uuid.uuid4().hex,
                labels=self.labels,
                preset=self.preset,
                device=self.source.device,
                cache_bytes=self.cache_bytes,
                volume_cache_bytes=self.volume_cache_bytes,
                max_crops=self.max_crops,
                published_path=self.source.published,
                rebuild=self.build_model,
            )
        }

    def trainer(self):
        return Sam3DTrainer(
            source=self.source,
            preset=self.preset,
            backbone=self.network.weights_info["backbone"],
            publish_path=self.source.published,
            stats_path=os.path.join(self.model_dir, "train_stats.json"),
            state_path=os.path.join(self.model_dir, "train_state.pt"),
        )
