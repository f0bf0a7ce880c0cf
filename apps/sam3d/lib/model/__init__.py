"""The 3DSAM-adapter in pure PyTorch (no MONAI Label): see sam3d.py for the axis convention."""

from .build import CONFIGS, Sam3DConfig, build_sam3d, create_model, freeze_backbone, trainable_names
from .checkpoints import CheckpointError, save_sam3d
from .clicks import Box, Clicks
from .predictor import Sam3DPredictor
from .sam3d import CropEncoding, Sam3D

__all__ = [
    "Box",
    "CONFIGS",
    "CheckpointError",
    "Clicks",
    "CropEncoding",
    "Sam3D",
    "Sam3DConfig",
    "Sam3DPredictor",
    "build_sam3d",
    "create_model",
    "freeze_backbone",
    "save_sam3d",
    "trainable_names",
]
