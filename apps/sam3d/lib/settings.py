"""The app's settings: every ``--conf`` option, parsed and checked once at start.

The value parsers are shared with the training options (``lib/trainers/sam3d_trainer.py``), so a number or a
boolean means the same wherever a client or an administrator writes one.
"""

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

from lib.browser_guard import origin_of, parse_hosts, parse_origins
from lib.model import CONFIGS
from lib.transforms.presets import DEFAULT_MAX_MEGAVOXELS, PRESETS

TRUE_TEXTS, FALSE_TEXTS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_bool(value: Any, what: str) -> bool:
    """``True``/``False`` or their text (``true``/``false``, ``1``/``0``, ``yes``/``no``, ``on``/``off``)."""
    text = str(value).strip().lower()
    if text in TRUE_TEXTS:
        return True
    if text in FALSE_TEXTS:
        return False
    raise ValueError(f"{what}: {value!r} is not true or false")


def parse_number(value: Any, what: str, lowest: float, highest: float, integer: bool = False) -> float:
    """A finite number within [lowest, highest]; with ``integer``, a whole one (returned as int)."""
    try:
        if isinstance(value, bool):  # True is 1 to Python, not to a user
            raise ValueError
        number = float(value)
        if not math.isfinite(number):
            raise ValueError
        if integer:
            if number != int(number):
                raise ValueError
            number = int(number)
    except (TypeError, ValueError, OverflowError):
        kind = "a whole number" if integer else "a number"
        raise ValueError(f"{what}: {value!r} is not {kind}") from None
    if not lowest <= number <= highest:
        raise ValueError(f"{what}: {value!r} is outside [{lowest:g}, {highest:g}]")
    return number


def parse_choice(value: Any, what: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{what}: {value!r} is unknown; choose one of {', '.join(choices)}")
    return value


def parse_label_value(value: Any, labels: Sequence[str], what: str) -> Optional[int]:
    """The tumour's value in multi-class final labels (KiTS: kidney 1, tumour 2): ``any`` (None: every non-zero
    voxel), a whole number, or a name in ``labels``, which MONAI Label numbers from 1 in their order."""
    text = str(value).strip()
    if text.lower() == "any":
        return None
    if text in labels:
        return labels.index(text) + 1
    try:
        return int(parse_number(text, what, 1, 65535, integer=True))
    except ValueError:
        raise ValueError(f"{what}: {value!r} is not any, a whole number or one of the labels {list(labels)}") from None


DEMO = "demo"  # the checkpoint setting that serves the demo weights (lib/demo.py)
NO_FILE = "none"
MEGABYTE = 2**20
BACKBONES, PRESET_NAMES = tuple(CONFIGS), tuple(PRESETS)

# name -> (default text, what it accepts): the README's configuration table lists the same options.
OPTIONS: Dict[str, Tuple[Optional[str], str]] = {
    "backbone": (None, f"{', '.join(BACKBONES)} (default: the checkpoint's)"),
    "checkpoint": (None, "a checkpoint file (the authors' or ours), demo, or none"),
    "sam_checkpoint": ("download", "download, none, or a segment-anything checkpoint file"),
    "preset": ("kits", ", ".join(PRESET_NAMES)),
    "labels": ("tumor", "comma-separated label names"),
    "label_value": ("any", "any (every non-zero voxel), a whole number 1 to 65535, or a name in labels"),
    "device": (None, "cpu, cuda or cuda:N (default: cuda when available)"),
    "precision": ("auto", "auto, float32 or bfloat16"),
    "compile": ("auto", "auto, true or false"),
    "warmup": ("true", "true or false"),
    "cache_mb": ("2048", "megabytes, 0 to 1e7"),
    "volume_cache_mb": ("1024", "megabytes, 0 to 1e7"),
    "max_crops": ("16", "a whole number, 1 to 1000"),
    "follow_max_extent": ("4", "crops per side, 1 (no following) to 16"),
    "follow_max_crops": ("27", "a whole number, 0 (no following) to 1000"),
    "max_megavoxels": (str(DEFAULT_MAX_MEGAVOXELS), "millions of voxels, 1 to 1e5"),
    "max_upload_mb": ("2048", "megabytes, above 0"),
    "dicomweb_timeout": ("60", "seconds, above 0"),
    "allowed_hosts": ("", "comma-separated host names or addresses the server answers to besides loopback's"),
    "cors_origins": ("", "comma-separated origins (scheme://host[:port]) whose pages may use the server"),
    "trainer": ("", "empty (this server trains) or the URL (scheme://host[:port]) of the replica that trains"),
}


@dataclass(frozen=True)
class Settings:
    """What the conf asked for, typed. ``checkpoint`` is a path, ``DEMO`` or None (untrained adapters);
    ``backbone`` None means: the checkpoint's. Choices that need the checkpoint's content (the backbone, the SAM
    file) are made in ``lib/configs/sam3d.py``."""

    backbone: Optional[str]
    checkpoint: Optional[str]
    sam_checkpoint: str
    preset: str
    labels: Tuple[str, ...]
    label_value: Optional[int]  # the tumour's value in final labels; None: every non-zero voxel
    device: str
    precision: str  # auto | float32 | bfloat16
    compile: str  # auto | true | false
    warmup: bool
    cache_bytes: int
    volume_cache_bytes: int
    max_crops: int
    follow_max_extent: float
    follow_max_crops: int
    max_megavoxels: float
    max_upload_bytes: int
    dicomweb_timeout: float
    allowed_hosts: Tuple[str, ...]
    cors_origins: Tuple[str, ...]
    trainer: Optional[str]  # the replica that trains, when it is another server (this one then answers 409)

    @classmethod
    def from_conf(cls, conf: Dict[str, str], cuda_available: bool) -> "Settings":
        """Raises ValueError naming the option and what it accepts."""
        unknown = sorted(set(conf) - set(OPTIONS))
        if unknown:
            raise ValueError(f"--conf {', '.join(unknown)}: unknown option(s); sam3d takes {', '.join(OPTIONS)}")
        text = {name: conf.get(name, default) for name, (default, _) in OPTIONS.items()}

        def what(name: str) -> str:
            return f"--conf {name} (accepts {OPTIONS[name][1]})"

        backbone = text["backbone"] and parse_choice(text["backbone"], what("backbone"), BACKBONES)
        checkpoint = text["checkpoint"]
        if checkpoint is None:  # nothing asked: the demo, unless a backbone was chosen to train from scratch
            checkpoint = DEMO if "backbone" not in conf else None
        elif checkpoint == NO_FILE:
            checkpoint = None
        if checkpoint == DEMO and backbone not in (None, "tiny"):
            raise ValueError(f"{what('checkpoint')}: the demo weights are for the tiny backbone, not {backbone}")
        device = text["device"] or ("cuda" if cuda_available else "cpu")
        if not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
            raise ValueError(f"{what('device')}: {device!r} is unknown")
        try:
            allowed_hosts = parse_hosts(text["allowed_hosts"])
        except ValueError as e:
            raise ValueError(f"{what('allowed_hosts')}: {e}") from None
        try:
            cors_origins = parse_origins(text["cors_origins"])
        except ValueError as e:
            raise ValueError(f"{what('cors_origins')}: {e}") from None
        try:
            trainer = origin_of(text["trainer"]) if text["trainer"].strip() else None
        except ValueError as e:
            raise ValueError(f"{what('trainer')}: {e}") from None
        labels = tuple(label.strip() for label in text["labels"].split(",") if label.strip())
        if not labels:
            raise ValueError(f"{what('labels')}: no label name given")
        return cls(
            backbone=backbone or None,
            label_value=parse_label_value(text["label_value"], labels, what("label_value")),
            checkpoint=checkpoint,
            sam_checkpoint=text["sam_checkpoint"],
            preset=parse_choice(text["preset"], what("preset"), PRESET_NAMES),
            labels=labels,
            device=device,
            precision=parse_choice(text["precision"], what("precision"), ("auto", "float32", "bfloat16")),
            compile=parse_choice(str(text["compile"]).lower(), what("compile"), ("auto", "true", "false")),
            warmup=parse_bool(text["warmup"], what("warmup")),
            cache_bytes=int(parse_number(text["cache_mb"], what("cache_mb"), 0, 1e7) * MEGABYTE),
            volume_cache_bytes=int(parse_number(text["volume_cache_mb"], what("volume_cache_mb"), 0, 1e7) * MEGABYTE),
            max_crops=int(parse_number(text["max_crops"], what("max_crops"), 1, 1000, integer=True)),
            follow_max_extent=parse_number(text["follow_max_extent"], what("follow_max_extent"), 1, 16),
            follow_max_crops=int(parse_number(text["follow_max_crops"], what("follow_max_crops"), 0, 1000, integer=True)),
            max_megavoxels=parse_number(text["max_megavoxels"], what("max_megavoxels"), 1, 1e5),
            max_upload_bytes=int(parse_number(text["max_upload_mb"], what("max_upload_mb"), 1e-6, 1e9) * MEGABYTE),
            dicomweb_timeout=parse_number(text["dicomweb_timeout"], what("dicomweb_timeout"), 1e-3, 1e6),
            allowed_hosts=allowed_hosts,
            cors_origins=cors_origins,
            trainer=trainer,
        )

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")
