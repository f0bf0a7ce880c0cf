"""The MONAI Label infer task: validate -> pre-process -> crops -> model (+ feature cache) -> stitch -> invert -> write."""

import logging
import os
import threading
import uuid
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from monai.data import MetaTensor
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from lib.activelearning.uncertain import mask_uncertainty
from lib.model import Box, CheckpointError, Clicks, CropEncoding, Sam3D, Sam3DPredictor
from lib.settings import Settings
from lib.transforms.cached import CachedPreprocessd
from lib.errors import InvalidRequest
from lib.transforms.request_clicks import MapClicksToImaged, ValidateClicksd
from lib.transforms.crops import Crop, plan_crops
from lib.transforms.keys import BOX, CLICKS, CROP_BOXES, IMAGE, PRED, from_cache
from lib.transforms.planning import AUTO, model_preset, preset_values, register_preset, resolve_preset
from lib.transforms.presets import PRESETS, preprocessing
from lib.transforms.resample import ResampleToOriginalGridd

from lib.engine.cache import BoundedCache, file_key, tensor_bytes
from lib.engine.segment import FollowBounds, Segmentation, Segmenter

logger = logging.getLogger(__name__)


class Sam3DInfer(BasicInferTask):
    """Deepgrow-style 3D segmentation from foreground/background clicks with the 3DSAM-adapter."""

    def __init__(
        self,
        model: Sam3D,
        settings: Settings,
        model_version: str,
        plan_cases: Callable[[], Sequence[Tuple[str, Optional[str]]]] = lambda: [],
        published_path: Optional[str] = None,
        rebuild: Optional[Callable[[], Sam3D]] = None,
        description: str = "3DSAM-adapter: a 3D tumour mask from foreground/background clicks",
    ) -> None:
        """``settings``: the app's (lib/settings.py): labels, device, cache sizes and the bounds of a request
        (crops, following, image size) and the preset served by default. With preset "auto" that is the model's
        own, else one planned from ``plan_cases()`` ((image, final label or None) pairs) at the first request or
        /info/: planning reads images, which the processes MONAI Label starts for training and scoring, loading
        the whole app, need not; it follows the model training publishes."""
        super().__init__(
            path=None,
            network=None,
            type=InferType.DEEPGROW,
            labels=list(settings.labels),
            dimension=3,
            description=description,
            # A list is shown as a choice in Slicer; its first item is the default.
            config={"preset": self.preset_choices(settings.preset), "device": settings.device},
        )
        self.follow_model_preset = settings.preset == AUTO
        self.plan_cases = plan_cases
        self.label_value = settings.label_value
        self._preset_lock = threading.Lock()
        self.model = model.to(settings.device)
        self.model_version = model_version
        self.device = settings.device
        self.max_crops = settings.max_crops
        self.max_megavoxels = settings.max_megavoxels
        self.follow_bounds = FollowBounds(settings.follow_max_extent, settings.follow_max_crops)
        self.cache = BoundedCache(settings.cache_bytes, CropEncoding.nbytes.fget)
        self.volumes = BoundedCache(settings.volume_cache_bytes, tensor_bytes)  # pre-processed images
        # Correction rounds (the previous predictions a refinement click builds on), 8 MiB each for a 128^3 crop:
        # a quarter of the feature cache's budget.
        self.rounds = BoundedCache(settings.cache_bytes // 4, tensor_bytes)
        self._model_lock = threading.Lock()  # one crop through the model at a time: no doubled peak memory
        self.warmed_up = threading.Event()
        # A model that training publishes later replaces this one at the next click (see reload_if_published).
        self.published_path = published_path
        self.rebuild = rebuild
        self._published_mtime = self.published_mtime() if model.weights_info.get("checkpoint") == published_path else None

    def start_warm_up(self) -> None:
        """In the background: the server answers at once, and a click during warm-up waits for it."""
        threading.Thread(target=self.warm_up, name="sam3d-warm-up", daemon=True).start()

    def warm_up(self) -> None:
        """Run one crop through the model so that the first user click pays no one-off costs (kernel selection,
        allocator growth)."""
        size = self.model.crop_size
        start = time.time()
        with self._model_lock:
            encoding = self.model.encode(torch.zeros(1, 1, size, size, size, device=self.device))
            Sam3DPredictor(self.model).foreground_probability(encoding, Clicks([[size // 2] * 3], np.zeros((0, 3)), "crop"))
        self.warmed_up.set()
        logger.info(f"sam3d: warm-up done in {time.time() - start:.1f}s")

    def published_mtime(self) -> Optional[int]:
        if not self.published_path or not os.path.exists(self.published_path):
            return None
        return os.stat(self.published_path).st_mtime_ns

    def reload_if_published(self) -> None:
        """Swap in a newly published model (training writes it atomically); a broken file keeps the current one."""
        mtime = self.published_mtime()
        if mtime is None or mtime == self._published_mtime or self.rebuild is None:
            return
        with self._model_lock:
            if mtime == self._published_mtime:
                return
            self._published_mtime = mtime
            try:
                model = self.rebuild()
            except CheckpointError as e:
                logger.error(f"sam3d: keeping the model in use; the published one does not load: {e}")
                return
            self.model, self.model_version = model.to(self.device), uuid.uuid4().hex
            preset = model_preset(model.weights_info["meta"]) if self.follow_model_preset else None
            if preset is not None:
                with self._preset_lock:
                    self._config["preset"] = self.preset_choices(register_preset(preset))
        logger.info(f"sam3d: now serving {self.published_path} (preset {self._config['preset'][0]})")

    @staticmethod
    def preset_choices(default: str) -> List[str]:
        """The preset names as Slicer shows a choice: a list whose first item is the default."""
        return [default] + [p for p in PRESETS if p != default]

    def served_preset(self) -> str:
        """The name of the preset served by default; "auto" is resolved here, once."""
        with self._preset_lock:
            if self._config["preset"][0] == AUTO:
                name, _ = resolve_preset(AUTO, self.model.weights_info["meta"], self.plan_cases, self.model.crop_size,
                                         self.label_value)
                self._config["preset"] = self.preset_choices(name)
            return self._config["preset"][0]

    def info(self) -> Dict[str, Any]:
        served = self.served_preset()
        info = super().info()
        warning = self.model.weights_info.get("warning")
        if warning:  # what Slicer and OHIF show beside the model's name
            info["description"] = f"{warning} ({info['description']})"
        return {
            **info,
            "weights": self.model.weights_info,
            "precision": "bfloat16" if self.model.bfloat16 else "float32",
            "warmed_up": self.warmed_up.is_set(),
            "presets": {k: p.description for k, p in PRESETS.items()},
            # The default preset's values: with "auto" they are planned, and a client cannot look them up.
            "preset": {"name": served, **preset_values(PRESETS[served])},
        }

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: Dict[str, Any], callbacks=None):
        # The newest published model first: its preset (with "auto") decides the pre-processing below.
        self.reload_if_published()
        # The request checked once: every step after reads data["preset"] as a known preset's name.
        request = {**request, "preset": self.preset_name({**self._config, **request})}
        return super().__call__(request, callbacks)

    def preset_name(self, data: Dict[str, Any]) -> str:
        """The request's preset (Slicer sends the config's list, whose first item is the choice), checked."""
        preset = data.get("preset")
        preset = preset[0] if isinstance(preset, (list, tuple)) and preset else preset
        if preset == AUTO and self.follow_model_preset:  # what this server serves for "auto"
            preset = self.served_preset()
        elif preset == AUTO:
            raise InvalidRequest("preset auto is a server's setting, planned from its studies: start the server with "
                                 f"--conf preset auto, or choose one of {sorted(PRESETS)}")
        if not isinstance(preset, str) or preset not in PRESETS:
            raise InvalidRequest(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        # Slicer sends the name of the segment being edited; the mask is binary, so any name will do.
        label = data.get("label")
        if label is not None and not isinstance(label, str):
            raise InvalidRequest(f"'label' must be a segment name (a string), got {label!r}")
        return preset

    def pre_transforms(self, data: Optional[Dict[str, Any]] = None) -> Sequence[Callable]:
        name = data["preset"]
        preprocess = preprocessing(PRESETS[name], max_megavoxels=self.max_megavoxels)
        return [
            CachedPreprocessd(IMAGE, preprocess, self.volumes, lambda path: file_key(path, name)),
            ValidateClicksd(keys=IMAGE),
            MapClicksToImaged(keys=IMAGE),
        ]

    def inverse_transforms(self, data=None):
        return None  # ResampleToOriginalGridd maps the prediction back through the affines instead

    def post_transforms(self, data: Optional[Dict[str, Any]] = None) -> Sequence[Callable]:
        return [ResampleToOriginalGridd(keys=PRED, ref=IMAGE, boxes_key=CROP_BOXES)]

    def run_inferer(self, data: Dict[str, Any], convert_to_batch: bool = True, device: str = "cpu") -> Dict[str, Any]:
        """The model's part of a request: the crops of the clicks (bounded), the
        segmentation (crops, lesions followed beyond them), and the result JSON."""
        preset = data["preset"]  # checked once per request (__call__)
        image: MetaTensor = data[IMAGE]
        volume = image[0].as_tensor().float()
        clicks, box = data[CLICKS], data.get(BOX)
        crops = self.planned_crops(volume.shape, clicks, box)
        with self._model_lock:  # one request's crops through the model at a time: no doubled peak memory
            segmenter = Segmenter(self.model, self.model_version, self.cache, self.rounds, self.follow_bounds)
            start = time.time()
            segmentation = segmenter.segment(volume, crops, clicks, preset)
            seconds = time.time() - start
        data[PRED] = MetaTensor(segmentation.prob[None], meta=dict(image.meta))  # the meta holds the model grid's affine
        data[CROP_BOXES] = segmentation.boxes
        data["result"] = self.report(data, preset, segmentation, seconds)
        if box is not None:
            data["result"]["box"] = {
                "model_grid": {"start": box.start.tolist(), "stop": box.stop.tolist()},
                "prompt": "learned" if self.model.box_trained else "centre click",
            }
        return data

    def planned_crops(self, shape: Sequence[int], clicks: Clicks, box: Optional[Box] = None) -> List[Crop]:
        """The crops of the request's box and click groups, bounded (following a lesion beyond them is bounded
        apart)."""
        crops = plan_crops(clicks, shape, self.model.crop_size, box)
        if len(crops) > self.max_crops:  # each crop is an encoder pass, which holds the model for every user
            raise InvalidRequest(f"these clicks need {len(crops)} crops (clicks more than half a crop apart get one "
                                 f"each); at most {self.max_crops} are run per request (--conf max_crops)")
        return crops

    def report(self, data: Dict[str, Any], preset: str, segmentation: Segmentation, seconds: float) -> Dict[str, Any]:
        result = {
            "preset": preset,
            "image_from_cache": data[from_cache(IMAGE)],
            **segmentation.report(),
            "model_seconds": round(seconds, 4),
            "uncertainty": round(mask_uncertainty(segmentation.prob), 6),
        }
        if self.model.weights_info.get("warning"):
            result["warning"] = self.model.weights_info["warning"]
        logger.info(
            f"sam3d: {len(segmentation.crops)} crop(s), {len(segmentation.zoomed_crops)} zoomed out, "
            f"{segmentation.encoder_runs} encoded, {segmentation.cache_hits} from cache"
            + (" (stopped by the follow bounds)" if segmentation.growth_bounded else "")
        )
        return result
