"""Checkpoint loaders with explicit key maps: SAM's, the 3DSAM-adapter authors', and ours.

Every load is strict in the sense that matters: a key that no rule maps is an error, a shape mismatch
is an error naming the tensor, and the report lists what was filled, what stayed at initialisation and
what was deliberately ignored (with the reason). Files are read with ``weights_only=True``: nothing in
a checkpoint is executed.
"""

import hashlib
import logging
import os
import re
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..files import atomic_write

logger = logging.getLogger(__name__)

FORMAT_NAME = "sam3d"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the problem."""


@dataclass
class LoadReport:
    source: str
    filled: List[str] = field(default_factory=list)
    left_at_init: List[str] = field(default_factory=list)
    ignored: Dict[str, str] = field(default_factory=dict)  # checkpoint key -> why it is not used
    origin: Dict[str, str] = field(default_factory=dict)  # model key -> checkpoint key, where they differ
    warnings: List[str] = field(default_factory=list)

    def describe(self, name: str) -> str:
        return f"{name} (checkpoint key {self.origin[name]})" if name in self.origin else name

    def summary(self) -> str:
        return (
            f"{self.source}: filled {len(self.filled)} tensors, left {len(self.left_at_init)} at initialisation, "
            f"ignored {len(self.ignored)} ({', '.join(sorted(set(self.ignored.values()))) or 'none'})"
            + "".join(f"; WARNING: {w}" for w in self.warnings)
        )


# What the authors' checkpoints hold besides tensors: their train.py saves ``best_val_loss`` as a numpy float64,
# which pickles as numpy's scalar constructor with a dtype. Allowed by name (numpy 1 and numpy 2 spell the module
# differently); these only rebuild numbers, so no code from a file runs.
NUMPY_SCALAR_GLOBALS = [
    (np.core.multiarray.scalar, "numpy.core.multiarray.scalar"),
    (np.core.multiarray.scalar, "numpy._core.multiarray.scalar"),
    np.dtype,
    *dict.fromkeys(type(np.dtype(code)) for code in "?bhilqBHILQefdg"),  # numpy.dtypes.Float64DType and kin (numpy >= 1.25)
]


def load_failure_reason(error: Exception) -> str:
    """The line of torch's message that says what is wrong (a weights-only refusal explains at length first)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    refused = next((line for line in lines if "Unsupported global" in line), None)
    if refused:  # "...Unsupported global: GLOBAL argparse.Namespace was not an allowed global by default. ..."
        return refused[refused.index("Unsupported global") :].split(". ")[0] + " (sam3d never runs code from a file)"
    return lines[0] if lines else "no detail"


def read_checkpoint(path: str, mmap: bool = False) -> dict:
    """A checkpoint dictionary, read with torch's weights-only unpickler (plus numpy scalars). ``mmap``: map
    the tensors of a zip-format file instead of reading them (a cheap look at its metadata)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(NUMPY_SCALAR_GLOBALS):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as e:  # torch raises pickle, zip and runtime errors alike for a bad file
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {load_failure_reason(e)}). "
            "sam3d reads the authors' files (e.g. kits.pth.tar from their OneDrive folder), its own (model/sam3d.pt) and "
            "segment-anything's (sam_vit_b_01ec64.pth); check that the file was downloaded whole, or pass another with "
            "--conf checkpoint"
        ) from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dictionary")
    return obj


def detect_format(obj: dict) -> str:
    """'authors' (med-air/3DSAM-adapter training script), 'sam3d' (ours) or 'sam' (segment-anything)."""
    if {"encoder_dict", "decoder_dict", "feature_dict"} <= obj.keys():
        return "authors"
    if obj.get("format") == FORMAT_NAME:
        return "sam3d"
    if "image_encoder.patch_embed.proj.weight" in obj:
        return "sam"
    raise CheckpointError(
        "unrecognised checkpoint: expected the authors' dict (encoder_dict, decoder_dict, feature_dict), "
        f"a {FORMAT_NAME} checkpoint, or a segment-anything state dict; top-level keys: {sorted(obj)[:8]}"
    )


def apply_state(model: nn.Module, mapped: Dict[str, torch.Tensor], report: LoadReport) -> LoadReport:
    """Copy ``mapped`` (model key -> tensor) into ``model``; every key must exist with the same shape."""
    target = model.state_dict()
    unknown = sorted(set(mapped) - set(target))
    if unknown:
        names = [report.describe(name) for name in unknown[:10]]
        raise CheckpointError(f"{report.source}: tensors with no place in this model: {names}")
    for name, tensor in mapped.items():
        if tensor.shape != target[name].shape:
            raise CheckpointError(
                f"{report.source}: shape mismatch for {report.describe(name)}: checkpoint {tuple(tensor.shape)}, "
                f"model {tuple(target[name].shape)} (another backbone size or architecture?)"
            )
    model.load_state_dict({**target, **mapped}, strict=True)
    report.filled = sorted(mapped)
    report.left_at_init = sorted(set(target) - set(mapped))
    logger.info(report.summary())
    return report


# --- segment-anything --------------------------------------------------------------------------------

# SAM image-encoder tensors that our encoder takes unchanged, under the same names.
SAM_ENCODER_TENSORS = re.compile(
    r"image_encoder\.(patch_embed\.proj\.(weight|bias)|pos_embed"
    r"|blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.lin1|mlp\.lin2)\.(weight|bias)"
    r"|blocks\.\d+\.attn\.rel_pos_[hw])"
)
SAM_UNUSED = (
    ("image_encoder.neck.", "SAM's 2D neck (replaced by 3D necks)"),
    ("prompt_encoder.", "SAM's 2D prompt encoder (replaced by the visual sampler)"),
    ("mask_decoder.", "SAM's 2D mask decoder (replaced by the 3D MLA decoder)"),
)


def map_sam(state: Dict[str, torch.Tensor], report: LoadReport) -> Dict[str, torch.Tensor]:
    mapped = {}
    for key, tensor in state.items():
        reason = next((why for prefix, why in SAM_UNUSED if key.startswith(prefix)), None)
        if reason:
            report.ignored[key] = reason
        elif SAM_ENCODER_TENSORS.fullmatch(key):
            mapped[key] = tensor
        else:
            raise CheckpointError(f"{report.source}: unexpected key in a SAM checkpoint: {key}")
    # The paper starts each depth table as the mean of SAM's height and width tables.
    for key in [k for k in mapped if k.endswith("attn.rel_pos_h")]:
        mapped[key[: -len("h")] + "d"] = 0.5 * (mapped[key] + mapped[key[: -len("h")] + "w"])
    return mapped


def load_sam(model: nn.Module, state: Dict[str, torch.Tensor], source: str) -> LoadReport:
    """Fill the frozen backbone from a segment-anything state dict; every SAM encoder tensor must be there."""
    report = LoadReport(source)
    mapped = map_sam(state, report)
    expected = {k for k in model.state_dict() if SAM_ENCODER_TENSORS.fullmatch(k)}
    missing = sorted(expected - set(mapped))
    if missing:
        raise CheckpointError(f"{source}: SAM checkpoint lacks {missing[:10]} (another backbone size?)")
    return apply_state(model, mapped, report)


# --- the authors' training script (med-air/3DSAM-adapter) ----------------------------------------------


def depth_last_to_depth_first(tensor: torch.Tensor) -> torch.Tensor:
    """Their 3D conv kernels are laid out (out, in, H, W, D); ours (out, in, D, H, W)."""
    return tensor.permute(0, 1, 4, 2, 3).contiguous() if tensor.dim() == 5 else tensor


Rule = Tuple[str, Union[str, Callable, None]]  # (regex on their key, our key; None: ignored, see below)

AUTHORS_ENCODER_RULES: Tuple[Rule, ...] = (
    (r"patch_embed\.proj\.(.+)", r"image_encoder.patch_embed.proj.\1"),
    (r"slice_embed\.(.+)", r"image_encoder.patch_embed.slice_embed.\1"),
    (r"(pos_embed|depth_embed)", r"image_encoder.\1"),
    (r"blocks\.(\d+)\.attn\.lr", r"image_encoder.blocks.\1.attn.rel_pos_scale"),
    (r"blocks\.(\d+)\.attn_mask", None),
    (r"blocks\.(\d+)\.(.+)", r"image_encoder.blocks.\1.\2"),
    (r"neck_3d\.(.+)", r"image_encoder.necks.\1"),
)
AUTHORS_PROMPT_RULES: Tuple[Rule, ...] = (
    (r"transformer\.layers\.(\d+)\.cross_attn_token_to_image\..+", None),
    (r"transformer\.layers\.(\d+)\.(.+)", r"prompt_encoder.layers.\1.\2"),
    (r"positional_encoding_gaussian_matrix", None),
)
AUTHORS_DECODER_RULES: Tuple[Rule, ...] = (
    (r"mlahead\.head([2-5])\.(.+)", lambda m: f"mask_decoder.heads.{int(m.group(1)) - 2}.{m.group(2)}"),
    (r"cls\.(.+)", r"mask_decoder.classifier.\1"),
)
# sam3d's own prompts (prompt_encoder.py) and refiner (refiner.py): absent from the authors' files, they stay at
# their zero start there.
SAM3D_ONLY = ("prompt_encoder.click_type", "prompt_encoder.box_token", "prompt_encoder.mask_memory.",
              "prompt_encoder.box_prompt.", "refiner.")
AUTHORS_IGNORED_WHY = {
    "attn_mask": "shifted-window mask, recomputed from the configuration",
    "cross_attn_token_to_image": "unused by the authors' forward pass",
    "positional_encoding_gaussian_matrix": "unused by the authors' forward pass",
}


def map_by_rules(
    state: Dict[str, torch.Tensor], rules: Iterable[Rule], part: str, report: LoadReport
) -> Dict[str, torch.Tensor]:
    mapped = {}
    for key, tensor in state.items():
        for pattern, target in rules:
            match = re.fullmatch(pattern, key)
            if not match:
                continue
            if target is None:
                report.ignored[f"{part}.{key}"] = next(w for k, w in AUTHORS_IGNORED_WHY.items() if k in key)
            else:
                name = target(match) if callable(target) else match.expand(target)
                mapped[name] = depth_last_to_depth_first(tensor)
                report.origin[name] = f"{part}.{key}"
            break
        else:
            raise CheckpointError(f"{report.source}: unexpected key {part}.{key}")
    return mapped


def load_authors(model: nn.Module, obj: dict, source: str) -> LoadReport:
    """The authors' checkpoint holds the whole model; the fourth prompt encoder is the one their test uses."""
    report = LoadReport(source)
    feature_dicts = obj["feature_dict"]
    if not isinstance(feature_dicts, (list, tuple)) or len(feature_dicts) != 4:
        raise CheckpointError(f"{source}: feature_dict must be a list of four prompt-encoder state dicts")
    for i in range(3):
        report.ignored[f"feature_dict[{i}]"] = "prompt encoders 1-3 are unused by the authors' test"
    for key in obj.keys() - {"encoder_dict", "decoder_dict", "feature_dict"}:
        report.ignored[key] = "training state (optimisers, epoch)"
    mapped = {
        **map_by_rules(obj["encoder_dict"], AUTHORS_ENCODER_RULES, "encoder_dict", report),
        **map_by_rules(feature_dicts[3], AUTHORS_PROMPT_RULES, "feature_dict[3]", report),
        **map_by_rules(obj["decoder_dict"], AUTHORS_DECODER_RULES, "decoder_dict", report),
    }
    missing = sorted(k for k in set(model.state_dict()) - set(mapped) if not k.startswith(SAM3D_ONLY))
    if missing:
        raise CheckpointError(f"{source}: the authors' checkpoint lacks {missing[:10]}")
    return apply_state(model, mapped, report)


# --- ours ------------------------------------------------------------------------------------------------


def backbone_checksum(model: nn.Module, trained: Iterable[str]) -> str:
    """sha256 over the tensors a checkpoint of ``trained`` tensors leaves out: the frozen backbone under it."""
    trained, digest = set(trained), hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name not in trained:
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_sam3d(model: nn.Module, obj: dict, source: str) -> LoadReport:
    """Our checkpoints hold the trained tensors only; the frozen backbone comes from SAM (load that first).

    Adapters trained over one backbone are meaningless over another (e.g. a random one because the SAM
    download failed), so a backbone other than the training one is logged and reported, not silently used."""
    if obj.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{source}: {FORMAT_NAME} checkpoint version {obj.get('version')} is not supported")
    report = apply_state(model, with_refiner_inputs(model, dict(obj["state_dict"]), source), LoadReport(source))
    expected = obj.get("meta", {}).get("backbone_sha256")
    if expected and backbone_checksum(model, obj["state_dict"]) != expected:
        report.warnings.append("the frozen backbone differs from the one these tensors were trained over")
        logger.warning(f"{source}: {report.warnings[-1]} (check --conf sam_checkpoint)")
    return report


# The refiner's first convolution, whose inputs grew at the end (refiner.py's REFINER_INPUTS).
REFINER_FIRST_CONV = "refiner.net.0.weight"


def with_refiner_inputs(model: nn.Module, state: Dict[str, torch.Tensor], source: str) -> Dict[str, torch.Tensor]:
    """A checkpoint written when the refiner had fewer inputs: the new ones get zero weights, so that it answers
    exactly as it did."""
    weight, target = state.get(REFINER_FIRST_CONV), model.state_dict().get(REFINER_FIRST_CONV)
    if weight is None or target is None or weight.ndim != target.ndim or weight.shape[1] >= target.shape[1]:
        return state
    if weight.shape[0] != target.shape[0] or weight.shape[2:] != target.shape[2:]:
        return state  # another architecture: apply_state says so
    missing = target.shape[1] - weight.shape[1]
    logger.info(f"{source}: written before the refiner's last {missing} input(s); they start at zero weights")
    return {**state, REFINER_FIRST_CONV: torch.cat([weight, weight.new_zeros(weight.shape[0], missing, *weight.shape[2:])], 1)}


def save_sam3d(model: nn.Module, path: str, backbone: str, trainable: Iterable[str], meta: Optional[dict] = None):
    """Write the trained tensors atomically, with what is needed to use them: the crop size, the click types
    the model answers, and a checksum of the frozen backbone they were trained over."""
    state, trainable = model.state_dict(), list(trainable)
    obj = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "backbone": backbone,
        "state_dict": {name: state[name].detach().cpu() for name in trainable},
        "meta": {
            "crop_size": model.crop_size,
            "click_types": ["foreground", "background"],
            "correction_trained": model.correction_trained,
            "backbone_sha256": backbone_checksum(model, trainable),
            **(meta or {}),
        },
    }
    atomic_write(path, lambda f: torch.save(obj, f))
