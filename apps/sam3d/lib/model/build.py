"""Named configurations and :func:`build_sam3d`, the model's entry point."""

import logging
import os
import re
from dataclasses import asdict, dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .checkpoints import CheckpointError, LoadReport, detect_format, load_authors, load_sam, load_sam3d, read_checkpoint
from .image_encoder import ImageEncoder3d
from .mask_decoder import MaskDecoder3d
from .prompt_encoder import PromptEncoder3d
from .refiner import Refiner
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
    refiner_chans: int = 8
    # Whether training recomputes activations in the backward pass unless asked otherwise: the paper's sizes do not
    # fit in a workstation's memory without it; the tiny one keeps little and would only run slower.
    checkpoint_activations: bool = True
    # Training's peak learning rate unless asked otherwise: the paper's for adapters over SAM's backbone; the tiny
    # configuration trains all its weights and learns real tumours better at a higher one (docs/real_scans.md).
    learning_rate: float = 4e-4

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
        checkpoint_activations=False, learning_rate=1e-3,
    ),
}

# What trains, as in the paper: adapters, norms, depth and slice embeddings, depth relative positions,
# necks, prompt encoder and decoder. SAM's patch embedding, positional embedding, attention and MLPs stay frozen.
TRAINABLE = re.compile(
    r"image_encoder\.(depth_embed|patch_embed\.slice_embed\..+|necks\..+"
    r"|blocks\.\d+\.(adapter\..+|norm1\..+|norm2\..+|attn\.rel_pos_d))"
    r"|prompt_encoder\..+|mask_decoder\..+|refiner\..+"
)


def create_model(config: Sam3DConfig, correction_trained: bool = False, bfloat16: bool = False) -> Sam3D:
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
    return Sam3D(encoder, prompt, decoder, Refiner(config.refiner_chans), config.crop_size, correction_trained, bfloat16)


def trainable_names(model: nn.Module) -> Sequence[str]:
    return [name for name, _ in model.named_parameters() if TRAINABLE.fullmatch(name)]


def freeze_backbone(model: nn.Module) -> Tuple[int, int]:
    """Set requires_grad as in the paper; returns (trainable, total) parameter counts."""
    return train_only(model, trainable_names(model))


def train_only(model: nn.Module, names: Sequence[str]) -> Tuple[int, int]:
    """requires_grad on the parameters ``names``, off on the others; returns (trainable, total) parameter counts."""
    names = set(names)
    for name, param in model.named_parameters():
        param.requires_grad = name in names
    counts = [p.numel() for p in model.parameters() if p.requires_grad], [p.numel() for p in model.parameters()]
    return sum(counts[0]), sum(counts[1])


def trained_names(model: nn.Module, pretrained_backbone: bool) -> List[str]:
    """What training updates: over a pretrained backbone (SAM's, or the authors' whole encoder) the paper's
    parameter-efficient parts; over a random one everything (frozen random weights only cripple the model)."""
    return list(trainable_names(model)) if pretrained_backbone else [name for name, _ in model.named_parameters()]


def backbone_of_authors_checkpoint(obj: dict) -> str:
    width = obj["encoder_dict"]["pos_embed"].shape[-1]
    for name, config in CONFIGS.items():
        if config.embed_dim == width:
            return name
    raise CheckpointError(f"the authors' checkpoint has embedding width {width}, which matches no backbone")


def checkpoint_backbone(obj: Optional[dict]) -> Optional[str]:
    """The backbone a checkpoint was made for (None: a SAM file or no checkpoint, which fit any of their size)."""
    kind = detect_format(obj) if obj is not None else None
    if kind == "authors":
        return backbone_of_authors_checkpoint(obj)
    if kind == "sam3d":
        return obj.get("backbone")
    return None


def resolve_backbone(checkpoint: Optional[str], backbone: Optional[str]) -> str:
    """The one answer to "which backbone": the checkpoint's when it names one (a conflicting request is an
    error), else the requested one, else vit_b. Reads the checkpoint memory-mapped where torch can."""
    obj = read_checkpoint(checkpoint, mmap=True) if checkpoint else None
    return choose_backbone(checkpoint, checkpoint_backbone(obj), backbone)


def choose_backbone(checkpoint: Optional[str], from_checkpoint: Optional[str], requested: Optional[str]) -> str:
    if requested and from_checkpoint and requested != from_checkpoint:
        raise CheckpointError(f"{checkpoint} is a {from_checkpoint} checkpoint, but backbone {requested} was asked for")
    backbone = requested or from_checkpoint or "vit_b"
    if backbone not in CONFIGS:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(CONFIGS)}")
    return backbone


INITIALISATION_SEED = 0


def build_sam3d(
    checkpoint: Optional[str] = None,
    backbone: Optional[str] = None,
    sam_checkpoint: Optional[str] = None,
    bfloat16: bool = False,
) -> Sam3D:
    """Build the model in eval mode.

    checkpoint: the authors' checkpoint (the whole model), ours (trained tensors over a SAM backbone) or a
        segment-anything checkpoint (backbone only; adapters untrained).
    backbone: 'vit_b', 'vit_l', 'vit_h' or 'tiny'; by default read from the checkpoint, else 'vit_b'.
    sam_checkpoint: a segment-anything checkpoint for the frozen backbone under our checkpoints.
    bfloat16: run the model under bfloat16 autocast (outputs differ slightly from float32).
    """
    obj = read_checkpoint(checkpoint) if checkpoint else None
    kind = detect_format(obj) if obj is not None else None
    backbone = choose_backbone(checkpoint, checkpoint_backbone(obj), backbone)

    meta = obj.get("meta", {}) if kind == "sam3d" else {}
    # Whatever no checkpoint fills starts the same at every start, so that a training run from it is reproducible
    # (its seed decides its crops and clicks); the caller's random state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INITIALISATION_SEED)
        model = create_model(CONFIGS[backbone], bool(meta.get("correction_trained")), bfloat16)
    reports = []
    sam_path = checkpoint if kind == "sam" else sam_checkpoint
    # The one fact that decides what trains: whether the image backbone holds pretrained weights.
    pretrained_backbone = kind == "authors" or bool(sam_path)
    if kind == "authors":
        reports.append(load_authors(model, obj, checkpoint))
    else:
        if sam_path:
            reports.append(load_sam(model, obj if kind == "sam" else read_checkpoint(sam_path), sam_path))
        if kind == "sam3d":
            reports.append(load_sam3d(model, obj, checkpoint))
    model.weights_info = describe_weights(backbone, kind, checkpoint, sam_checkpoint, reports, meta, pretrained_backbone)

    model.trained_names = trained_names(model, pretrained_backbone)
    trainable, total = train_only(model, model.trained_names)
    logger.info(f"sam3d {backbone}: {trainable:,} trainable of {total:,} parameters")
    return model.eval()


# What a client shows a user about the weights in each state (the model's description, a result's warning).
UNTRAINED_HELP = (
    "pass trained weights with --conf checkpoint (the authors' checkpoint for the preset, e.g. kits.pth.tar, "
    "or a sam3d.pt published by training) or train on saved labels (POST /train/sam3d)"
)


def describe_weights(
    backbone: str,
    kind: Optional[str],
    checkpoint: Optional[str],
    sam_checkpoint: Optional[str],
    reports: Sequence[LoadReport],
    meta: dict,
    pretrained_backbone: bool,
) -> dict:
    """Where the weights came from, as /info/ shows it: ``state`` is authors | trained | demo | untrained, and
    ``warning`` (None when the weights are fit to use) is what every surface says about them."""
    sam_path = checkpoint if kind == "sam" else sam_checkpoint
    if kind == "authors":
        sam, adapters = f"{checkpoint} (the authors' checkpoint holds the whole encoder)", f"{checkpoint} (authors' format)"
    else:
        sam = sam_path or "random initialisation (no SAM checkpoint)"
        adapters = f"{checkpoint} (sam3d format)" if kind == "sam3d" else "untrained (initialisation)"
    if kind == "authors":
        state, warning = "authors", None
    elif kind == "sam3d" and meta.get("demo"):
        state = "demo"
        warning = (
            "DEMO WEIGHTS: a tiny model trained on generated phantoms, made to show the demo studies; its masks on "
            f"real scans mean nothing. To segment patients, {UNTRAINED_HELP}."
        )
    elif kind == "sam3d":
        state, warning = "trained", None
        if any(r.warnings for r in reports):
            warning = "these adapters were trained over another backbone than the one loaded: check --conf sam_checkpoint"
    else:
        state = "untrained"
        backbone_text = "" if pretrained_backbone else " and the image backbone is random (no SAM checkpoint)"
        warning = f"UNTRAINED: no trained weights are loaded{backbone_text}, so masks mean nothing. To fix it, {UNTRAINED_HELP}."
    return {
        "state": state,
        "warning": warning,
        "backbone": backbone,
        "pretrained_backbone": pretrained_backbone,
        # How clicks are served: correction-trained models see the previous prediction and learned background
        # clicks; others (the authors') take background clicks through a fixed rule (lib/model/predictor.py).
        "correction_trained": bool(meta.get("correction_trained")),
        "checkpoint": checkpoint,
        "sam_backbone": sam,
        "adapters": adapters,
        "loads": [r.summary() for r in reports],
        "meta": {k: v for k, v in meta.items() if k != "backbone_sha256"},
        "config": asdict(CONFIGS[backbone]),
    }


def served_file(published: str, checkpoint: Optional[str]) -> Optional[str]:
    """The published model when training made it from ``checkpoint``, else the checkpoint: a model fine-tuned
    from other weights (say the demo's) never stands in for a checkpoint asked for."""
    if not os.path.exists(published):
        return checkpoint
    base = read_checkpoint(published, mmap=True).get("meta", {}).get("base", checkpoint)  # unreadable: raises
    if base != checkpoint:
        logger.warning(f"sam3d: not serving {published}: it was trained from {base}, not from {checkpoint}")
        return checkpoint
    return published


@dataclass(frozen=True)
class ModelSource:
    """Where the model in use comes from, as plain values (training processes on other GPUs rebuild it)."""

    published: str  # our last training result; used when it exists and was trained from ``checkpoint``
    checkpoint: Optional[str]  # otherwise this (the conf's, with the demo resolved to its file)
    backbone: str  # resolved once (resolve_backbone) from the file served
    sam_checkpoint: Optional[str]
    bfloat16: bool
    device: str

    def build(self, device: Optional[str] = None) -> Sam3D:
        checkpoint = served_file(self.published, self.checkpoint)
        model = build_sam3d(checkpoint, self.backbone, self.sam_checkpoint, self.bfloat16)
        return model.to(device or self.device)
