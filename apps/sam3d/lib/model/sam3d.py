"""The composed 3DSAM-adapter: encode a crop once, decode it for any prompts (what to prompt it with, and in which
rounds, is the predictor's: predictor.py).

Public axis convention: a crop is a ``(D, H, W)`` array (batched: ``(B, 1, D, H, W)``) and clicks are
``(d, h, w)`` voxel indices of that crop.
"""

import copy
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .image_encoder import ImageEncoder3d
from .mask_decoder import MaskDecoder3d
from .prompt_encoder import PromptEncoder3d
from .refiner import Refiner


@dataclass
class CropEncoding:
    """Everything about one crop that clicks do not change (what the feature cache keeps)."""

    prepared: torch.Tensor  # (B, head_chans, 2g, 2g, 2g): the decoder's click-independent part
    deep: torch.Tensor  # (B, C, g, g, g): the deepest feature map, conditioned on clicks at decode time
    image: torch.Tensor  # (B, 1, S, S, S): the crop's intensities, for the full-resolution refiner

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.prepared, self.deep, self.image))


class Sam3D(nn.Module):
    def __init__(
        self,
        image_encoder: ImageEncoder3d,
        prompt_encoder: PromptEncoder3d,
        mask_decoder: MaskDecoder3d,
        refiner: Refiner,
        crop_size: int,
        correction_trained: bool = False,
        bfloat16: bool = False,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.refiner = refiner
        self.crop_size = crop_size
        self.weights_info: dict = {}  # where the weights came from, filled by build_sam3d
        # The parameters training updates (their requires_grad is on), decided once by build_sam3d.
        self.trained_names: List[str] = [name for name, _ in self.named_parameters()]
        # What the weights are, decided where they are built (build_sam3d, from the checkpoint) or trained (fit):
        # trained as users correct (training's correction rounds), so that background clicks are prompts of their
        # own type and each click sees the previous prediction; otherwise (the authors' checkpoints) the
        # predictor serves background clicks through its rule and decodes all clicks at once.
        self.correction_trained = correction_trained
        # bfloat16 autocast, decided where the model is built (the app's precision; outputs differ slightly).
        self.bfloat16 = bfloat16

    def sharing_weights(self, **kind: bool) -> "Sam3D":
        """The same weights (shared, not copied) served as another kind of model, ``correction_trained`` or
        ``bfloat16`` given: benchmarks and tests compare kinds on one set of weights without changing this one."""
        unknown = set(kind) - {"correction_trained", "bfloat16"}
        if unknown:
            raise TypeError(f"a model's kind is correction_trained and bfloat16, not {sorted(unknown)}")
        twin = copy.copy(self)  # a module's copy shares its parameters, buffers and submodules
        twin.__dict__.update(kind)
        return twin

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bfloat16)

    @property
    def box_trained(self) -> bool:
        """Whether this model answers a box itself: its box prompt was trained (its last layer has left zero),
        which only correction training does; otherwise a box is served by the fallback of
        :meth:`Sam3DPredictor.correction_logits`. Read from the weights: nothing needs to say so."""
        return self.correction_trained and self.prompt_encoder.box_prompt.trained()

    @property
    def device(self) -> torch.device:
        return self.image_encoder.pos_embed.device

    @torch.no_grad()
    def encode(self, crop: torch.Tensor) -> CropEncoding:
        """crop: (B, 1, S, S, S) normalised intensities, S = crop_size -> its click-independent encoding."""
        return self.encode_with_grad(crop)

    def encode_with_grad(self, crop: torch.Tensor) -> CropEncoding:
        """:meth:`encode` for training: gradients flow back into the trainable parts."""
        with self.autocast():
            features = self.image_encoder(crop)
            low_res = F.interpolate(crop, scale_factor=0.5, mode="trilinear")
            return CropEncoding(self.mask_decoder.prepare(features[:3], low_res), features[3], crop.detach().clone())  # not a view of a volume

    def decode(
        self,
        encoding: CropEncoding,
        points: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        previous: Optional[torch.Tensor] = None,
        box: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """points: (B, N, 3) (d, h, w) crop voxel indices; labels: (B, N) 1 = foreground, 0 = background,
        BOX_TOKEN = a box's centre (default all foreground); previous: (B, 1, S, S, S) the crop's previous foreground
        log-odds, or None; box: (B, 1, S, S, S) bool, the box's voxels, or None -> logits (B, 2, S, S, S),
        float32."""
        return self.decode_with_decoder_logits(encoding, points, labels, previous, box)[0]

    def decode_with_decoder_logits(
        self,
        encoding: CropEncoding,
        points: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        previous: Optional[torch.Tensor] = None,
        box: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """:meth:`decode`, and the authors' decoder's own logits before the refiner (both (B, 2, S, S, S)), which
        training supervises too."""
        labels = torch.ones(points.shape[:2], dtype=torch.long, device=points.device) if labels is None else labels
        with self.autocast():
            deep = self.prompt_encoder(encoding.deep, points.float(), (self.crop_size,) * 3, labels, previous, box)
            logits = self.mask_decoder(encoding.prepared, deep).float()
        return self.refiner(encoding.image, logits, points, labels, previous), logits
