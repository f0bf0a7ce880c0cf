"""The app's settings: every ``--conf`` option, parsed and checked once at start.

Each option is one row (``Option``: default, what it accepts, its range), here for ``--conf`` and in
``lib/trainers/sam3d_trainer.py`` for training; the README's tables list the same rows (tests/test_configs.py), and
a number or a boolean means the same wherever a client or an administrator writes one.
"""

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

from lib.server.browser_guard import origin_of, parse_hosts, parse_origins
from lib.model import CONFIGS
from lib.transforms.planning import AUTO
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


DEMO = "demo"  # the checkpoint setting that serves the demo weights (lib/training/demo.py)
NO_FILE = "none"
MEGABYTE = 2**20
BACKBONES, PRESET_NAMES = tuple(CONFIGS), tuple(PRESETS) + (AUTO,)

@dataclass(frozen=True)
class Option:
    """One option: its default as a user writes it (None: decided from the other options), what it accepts (in
    every error message about it and in the README), and for a number its range (lowest, highest, whole).
    With ``or_auto`` a boolean or a number also takes ``auto``, parsed as None: decided by whoever uses it (e.g.
    training, by the model's configuration)."""

    default: Optional[str]
    accepts: str
    number: Optional[Tuple[float, float, bool]] = None
    boolean: bool = False
    or_auto: bool = False

    def parse(self, value: Any, what: str) -> Any:
        """The value, typed and checked (raises ValueError naming ``what``): a number in range, a boolean, or the
        text as given for the options that parse their own."""
        if self.or_auto and str(value).strip().lower() == "auto":
            return None
        try:
            if self.boolean:
                return parse_bool(value, what)
            if self.number:
                lowest, highest, whole = self.number
                return parse_number(value, what, lowest, highest, integer=whole)
        except ValueError as e:
            if not self.or_auto:
                raise
            raise ValueError(f"{e}, nor auto") from None
        return value

    def shown(self, value: Any) -> Any:
        """``value`` (parsed) as /info/ shows it to clients that let a user edit it and send back what they show
        (Slicer's options table): a boolean-or-auto as a choice, a list with the default first, and a number's auto
        as the text ``auto`` (None would come back as '')."""
        if self.or_auto and self.boolean:
            return [self.default] + [c for c in ("auto", "true", "false") if c != self.default]
        return "auto" if self.or_auto and value is None else value


def typed_defaults(options: Dict[str, Option]) -> Dict[str, Any]:
    return {name: option.parse(option.default, name) for name, option in options.items()}


OPTIONS: Dict[str, Option] = {
    "backbone": Option(None, f"{', '.join(BACKBONES)} (default: the checkpoint's)"),
    "checkpoint": Option(None, "a checkpoint file (the authors' or ours), demo, or none"),
    "sam_checkpoint": Option("download", "download, none, or a segment-anything checkpoint file"),
    "preset": Option("kits", ", ".join(PRESET_NAMES)),
    "labels": Option("tumor", "comma-separated label names"),
    "label_value": Option("any", "any (every non-zero voxel), a whole number 1 to 65535, or a name in labels"),
    "device": Option(None, "cpu, cuda or cuda:N (default: cuda when available)"),
    "precision": Option("auto", "auto, float32 or bfloat16"),
    "compile": Option("auto", "auto, true or false"),
    "warmup": Option("true", "true or false", boolean=True),
    "cache_mb": Option("2048", "megabytes, 0 to 1e7", number=(0, 1e7, False)),
    "volume_cache_mb": Option("1024", "megabytes, 0 to 1e7", number=(0, 1e7, False)),
    "max_crops": Option("16", "a whole number, 1 to 1000", number=(1, 1000, True)),
    "follow_max_extent": Option("4", "crops per side, 1 (no following) to 16", number=(1, 16, False)),
    "follow_max_crops": Option("27", "a whole number, 0 (no following) to 1000", number=(0, 1000, True)),
    "max_megavoxels": Option(str(DEFAULT_MAX_MEGAVOXELS), "millions of voxels, 1 to 1e5", number=(1, 1e5, False)),
    "max_upload_mb": Option("2048", "megabytes, above 0", number=(1e-6, 1e9, False)),
    "dicomweb_timeout": Option("60", "seconds, above 0", number=(1e-3, 1e6, False)),
    "allowed_hosts": Option("", "comma-separated host names or addresses the server answers to besides loopback's"),
    "cors_origins": Option("", "comma-separated origins (scheme://host[:port]) whose pages may use the server"),
    "trainer": Option("", "empty (this server trains) or the URL (scheme://host[:port]) of the replica that trains"),
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
        text = {name: conf.get(name, option.default) for name, option in OPTIONS.items()}

        def what(name: str) -> str:
            return f"--conf {name} (accepts {OPTIONS[name].accepts})"

        def value(name: str) -> Any:
            return OPTIONS[name].parse(text[name], what(name))

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
            warmup=value("warmup"),
            cache_bytes=int(value("cache_mb") * MEGABYTE),
            volume_cache_bytes=int(value("volume_cache_mb") * MEGABYTE),
            max_crops=value("max_crops"),
            follow_max_extent=value("follow_max_extent"),
            follow_max_crops=value("follow_max_crops"),
            max_megavoxels=value("max_megavoxels"),
            max_upload_bytes=int(value("max_upload_mb") * MEGABYTE),
            dicomweb_timeout=value("dicomweb_timeout"),
            allowed_hosts=allowed_hosts,
            cors_origins=cors_origins,
            trainer=trainer,
        )

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")
