"""Named configurations and :func:`build_sam3d`, the model's entry point."""

import logging
import os
import re
from dataclasses import asdict, dataclass
from typing import Optional, Sequence, Tuple

from torch import nn

from .checkpoints import CheckpointError, LoadReport, detect_format, load_authors, load_sam, load_sam3d, read_checkpoint
from .image_encoder import ImageEncoder3d
from .mask_decoder import MaskDecoder3d
from .prompt_encoder import PromptEncoder3d
from .sam3d import Sam3D

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sam3DConfig:
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: Tuple[int, ...]
    crop_size: int = 128  # voxels per side of a crop
    upsample: int = 4  # the crop is upsampled to crop_size * upsample before patch embedding
    patch_size: int = 16
    slices_per_token: int = 16
    pretrain_grid: int = 64  # SAM's token grid (1024 / 16)
    sam_window: int = 14
    window: int = 8  # 3D attention window, in tokens
    out_chans: int = 256
    prompt_heads: int = 8
    prompt_mlp_dim: int = 2048
    decoder_chans: int = 128

    @property
    def token_grid(self) -> int:
        return self.crop_size * self.upsample // self.patch_size


CONFIGS = {
    "vit_b": Sam3DConfig(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": Sam3DConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": Sam3DConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    # The same code at a size that runs in a second on a CPU, for tests and smoke runs.
    "tiny": Sam3DConfig(
        embed_dim=32, depth=4, num_heads=2, global_attn_indexes=(1, 3), crop_size=32, pretrain_grid=16,
        sam_window=4, window=4, out_chans=16, prompt_heads=2, prompt_mlp_dim=32, decoder_chans=8,
    ),
}

# What trains, as in the paper: adapters, norms, depth and slice embeddings, depth relative positions,
# necks, prompt encoder and decoder. SAM's patch embedding, positional embedding, attention and MLPs stay frozen.
TRAINABLE = re.compile(
    r"image_encoder\.(depth_embed|patch_embed\.slice_embed\..+|necks\..+"
    r"|blocks\.\d+\.(adapter\..+|norm1\..+|norm2\..+|attn\.rel_pos_d))"
    r"|prompt_encoder\..+|mask_decoder\..+"
)


def create_model(config: Sam3DConfig) -> Sam3D:
    encoder = ImageEncoder3d(
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        global_attn_indexes=config.global_attn_indexes,
        out_chans=config.out_chans,
        patch_size=config.patch_size,
        slices_per_token=config.slices_per_token,
        upsample=config.upsample,
        token_grid=config.token_grid,
        pretrain_grid=config.pretrain_grid,
        sam_window=config.sam_window,
        window=config.window,
    )
    prompt = PromptEncoder3d(config.out_chans, config.prompt_heads, config.prompt_mlp_dim)
    decoder = MaskDecoder3d(config.out_chans, config.decoder_chans)
    return Sam3D(encoder, prompt, decoder, config.crop_size)


def trainable_names(model: nn.Module) -> Sequence[str]:
    return [name for name, _ in model.named_parameters() if TRAINABLE.fullmatch(name)]


def freeze_backbone(model: nn.Module) -> Tuple[int, int]:
    """Set requires_grad as in the paper; returns (trainable, total) parameter counts."""
    trainable = set(trainable_names(model))
    for name, param in model.named_parameters():
        param.requires_grad = name in trainable
    counts = [p.numel() for p in model.parameters() if p.requires_grad], [p.numel() for p in model.parameters()]
    return sum(counts[0]), sum(counts[1])


def backbone_of_authors_checkpoint(obj: dict) -> str:
    width = obj["encoder_dict"]["pos_embed"].shape[-1]
    for name, config in CONFIGS.items():
        if config.embed_dim == width:
            return name
    raise CheckpointError(f"the authors' checkpoint has embedding width {width}, which matches no backbone")


def build_sam3d(
    checkpoint: Optional[str] = None,
    backbone: Optional[str] = None,
    sam_checkpoint: Optional[str] = None,
) -> Sam3D:
    """Build the model in eval mode.

    checkpoint: the authors' checkpoint (the whole model), ours (trained tensors over a SAM backbone) or a
        segment-anything checkpoint (backbone only; adapters untrained).
    backbone: 'vit_b', 'vit_l', 'vit_h' or 'tiny'; by default read from the checkpoint, else 'vit_b'.
    sam_checkpoint: a segment-anything checkpoint for the frozen backbone under our checkpoints.
    """
    obj = read_checkpoint(checkpoint) if checkpoint else None
    kind = detect_format(obj) if obj is not None else None
    implied = {"authors": lambda: backbone_of_authors_checkpoint(obj), "sam3d": lambda: obj.get("backbone")}
    from_checkpoint = implied[kind]() if kind in implied else None
    if backbone and from_checkpoint and backbone != from_checkpoint:
        raise CheckpointError(f"{checkpoint} is a {from_checkpoint} checkpoint, but backbone {backbone} was asked for")
    backbone = backbone or from_checkpoint or "vit_b"
    if backbone not in CONFIGS:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(CONFIGS)}")

    model = create_model(CONFIGS[backbone])
    reports = []
    if kind == "authors":
        reports.append(load_authors(model, obj, checkpoint))
    else:
        sam_path = checkpoint if kind == "sam" else sam_checkpoint
        if sam_path:
            reports.append(load_sam(model, obj if kind == "sam" else read_checkpoint(sam_path), sam_path))
        if kind == "sam3d":
            reports.append(load_sam3d(model, obj, checkpoint))
    model.weights_info = describe_weights(backbone, kind, checkpoint, sam_checkpoint, reports)

    trainable, total = freeze_backbone(model)
    logger.info(f"sam3d {backbone}: {trainable:,} trainable of {total:,} parameters")
    return model.eval()


def describe_weights(
    backbone: str, kind: Optional[str], checkpoint: Optional[str], sam_checkpoint: Optional[str], reports: Sequence[LoadReport]
) -> dict:
    """Where the weights came from, as /info/ shows it."""
    if kind == "authors":
        sam, adapters = f"{checkpoint} (the authors' checkpoint holds the whole encoder)", f"{checkpoint} (authors' format)"
    else:
        sam_path = checkpoint if kind == "sam" else sam_checkpoint
        sam = sam_path or "random initialisation (no SAM checkpoint)"
        adapters = f"{checkpoint} (sam3d format)" if kind == "sam3d" else "untrained (initialisation)"
    return {
        "backbone": backbone,
        "checkpoint": checkpoint,
        "sam_backbone": sam,
        "adapters": adapters,
        "loads": [r.summary() for r in reports],
        "config": asdict(CONFIGS[backbone]),
    }


@dataclass(frozen=True)
class ModelSource:
    """Where the model in use comes from, as plain values (training processes on other GPUs rebuild it)."""

    published: str  # our last training result; used when it exists
    checkpoint: Optional[str]  # otherwise this (the conf's)
    backbone: Optional[str]
    sam_checkpoint: Optional[str]
    bfloat16: bool
    device: str

    def build(self, device: Optional[str] = None) -> Sam3D:
        path = self.published if os.path.exists(self.published) else self.checkpoint
        model = build_sam3d(checkpoint=path, backbone=self.backbone, sam_checkpoint=self.sam_checkpoint)
        model.bfloat16 = self.bfloat16
        return model.to(device or self.device)
