"""sam3d: the 3DSAM-adapter as a MONAI Label app."""

import logging
import os
import pathlib
from typing import Dict

import torch
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First

from lib.activelearning.recency import Random
from lib.activelearning.uncertain import INFO_KEY as UNCERTAINTY_KEY
from lib.activelearning.uncertain import Uncertain
from lib.configs.sam3d import Sam3DTaskConfig
from lib.datastore import SafeLocalDatastore
from lib.dicomweb import DICOMwebStudies, bounded_client
from lib.scoring import TumourDice
from lib.server.configure import configure_server, verify_tokens_with_pyjwt2
from lib.server.endpoints import check_infer_request, is_request_file
from lib.settings import Settings
from lib.errors import InvalidRequest, NotFound

logger = logging.getLogger(__name__)


class Sam3DApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]):
        verify_tokens_with_pyjwt2()
        try:
            self.settings = Settings.from_conf(conf, torch.cuda.is_available())
        except ValueError as e:
            logger.error(f"sam3d cannot start: {e}")
            raise
        self.model_dir = os.path.join(app_dir, "model")
        self.task = Sam3DTaskConfig()
        self.task.init("sam3d", self.model_dir, conf, None, settings=self.settings, studies=studies)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="sam3d",
            description="3DSAM-adapter: promptable 3D tumour segmentation from clicks",
            version="0.1.0",
        )

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return SafeLocalDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def _init_dicomweb_datastore(self) -> Datastore:
        if "googleapis.com" in self.studies:  # Google's own session and retries; not bounded here
            return super()._init_dicomweb_datastore()
        self._download_dcmqi_tools()  # finds the dcmqi wheel's tool on PATH; downloads it only when missing
        client = bounded_client(
            self.studies,
            self.settings.dicomweb_timeout,
            settings.MONAI_LABEL_DICOMWEB_USERNAME,
            settings.MONAI_LABEL_DICOMWEB_PASSWORD,
            qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
            wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
            stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
        )
        cache_path = (settings.MONAI_LABEL_DICOMWEB_CACHE_PATH or "").strip()
        return DICOMwebStudies(
            client,
            timeout=self.settings.dicomweb_timeout,
            search_filter=settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER,
            cache_path=cache_path or None,
            fetch_by_frame=settings.MONAI_LABEL_DICOMWEB_FETCH_BY_FRAME,
            convert_to_nifti=settings.MONAI_LABEL_DICOMWEB_CONVERT_TO_NIFTI,
        )

    def init_infers(self) -> Dict[str, InferTask]:
        return self.task.infer()

    def init_trainers(self) -> Dict[str, TrainTask]:
        return {self.task.name: self.task.trainer()}

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"uncertain": Uncertain(), "random": Random(), "first": First()}

    def init_scoring_methods(self) -> Dict[str, ScoringMethod]:
        return {"dice": TumourDice(self.settings.label_value)}

    def on_init_complete(self):
        super().on_init_complete()
        # Only the server calls this (not MONAI Label's training subprocess), so only it warms up and serves.
        configure_server(self.settings)
        if self.task.warmup:
            self._infers[self.task.name].start_warm_up()

    @staticmethod
    def is_upload(image: str) -> bool:
        """MONAI Label hands an uploaded file (or a session's image) to the app as a server path. Any other
        existing path, sent as an image id or in params, would let a request read files of the server."""
        if not os.path.isfile(image):
            return False
        if is_request_file(image):
            return True
        folder = os.path.realpath(os.path.dirname(os.path.realpath(image)))
        sessions = (settings.MONAI_LABEL_SESSION_PATH or "").strip() or os.path.join(
            pathlib.Path.home(), ".cache", "monailabel", "sessions"  # MONAI Label's default
        )
        sessions = os.path.realpath(sessions)
        return folder == sessions or folder.startswith(sessions + os.sep)

    def train(self, request):
        # Runs in MONAI Label's training process, or in the server with run_sync, where the errors raised here are
        # answered with a 4xx (lib/server/endpoints.py's ERROR_STATUS).
        if request.get("model") not in self._trainers:
            raise NotFound(f"unknown model {request.get('model')!r}; this app trains {list(self._trainers)}")
        return super().train(request)

    def next_sample(self, request):
        if request.get("strategy") not in self._strategies:
            raise NotFound(f"unknown strategy {request.get('strategy')!r}; this app has {list(self._strategies)}")
        return super().next_sample(request)

    @staticmethod
    def deleted_meanwhile(datastore: Datastore, image: str) -> bool:
        """A stored image whose file went away while its click was on the way (a folder datastore only: asking a
        DICOMweb datastore would fetch the series again)."""
        if not isinstance(datastore, SafeLocalDatastore):
            return False
        uri = datastore.get_image_uri(image)
        return not (uri and os.path.exists(uri))

    def infer(self, request, datastore=None):
        if request.get("model") not in self._infers:
            raise NotFound(f"unknown model {request.get('model')!r}; this app has {list(self._infers)}")
        check_infer_request(request)
        image = request.get("image")
        datastore = datastore or self.datastore()
        upload = isinstance(image, str) and self.is_upload(image)
        stored = isinstance(image, str) and not upload and bool(datastore.get_image_uri(image))
        if isinstance(image, str) and not (upload or stored):
            raise NotFound(f"unknown image {image!r}: not in the datastore")
        try:
            result = super().infer(request, datastore)
        except (InvalidRequest, FileNotFoundError) as e:  # a file that vanishes before the read, or during it
            if stored and self.deleted_meanwhile(datastore, image):
                raise NotFound(f"image {image!r} was deleted from the datastore") from e
            raise
        uncertainty = (result.get("params") or {}).get("uncertainty")
        if uncertainty is not None and stored:
            datastore.update_image_info(image, {UNCERTAINTY_KEY: uncertainty})  # for the uncertain strategy
        return result
