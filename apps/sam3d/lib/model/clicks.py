"""A request's prompts, one type each from parsing to the model: clicks (foreground and background kept apart) and
a box, in a grid that the value names.

Frames (``Clicks.frame``):
- ``"image"``: voxel indices (i, j, k) of the image as stored, as Slicer and OHIF send them;
- ``"model"``: indices (d, h, w) of the pre-processed volume (reoriented and resampled for the model);
- ``"crop"``: indices (d, h, w) of one model crop, what the model's decoder takes.
"""

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np
import torch

FRAMES = ("image", "model", "crop")
# The label of a box's centre token among the model's click labels (1 foreground, 0 background): the box's round
# is that token with the box's map. The prompt encoder gives it a type of its own, started as a foreground
# click's; the refiner maps it as a foreground click (what makes a low-contrast lesion's first mask).
BOX_TOKEN = 2


@dataclass(frozen=True)
class Clicks:
    foreground: np.ndarray  # (N, 3) int64 voxel indices in ``frame``
    background: np.ndarray  # (M, 3) int64
    frame: str

    def __post_init__(self) -> None:
        if self.frame not in FRAMES:
            raise ValueError(f"unknown click frame {self.frame!r}; one of {FRAMES}")
        for name in ("foreground", "background"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.int64).reshape(-1, 3))

    @classmethod
    def from_points(cls, points, labels, frame: str) -> "Clicks":
        """points: (N, 3); labels: (N,) 1 = foreground, 0 = background, or None (all foreground)."""
        points = np.asarray(torch.as_tensor(points).cpu()).reshape(-1, 3)
        labels = np.ones(len(points), np.int64) if labels is None else np.asarray(torch.as_tensor(labels).cpu())
        return cls(points[labels == 1], points[labels == 0], frame)

    def __len__(self) -> int:
        return len(self.foreground) + len(self.background)

    def mapped(self, to_frame: str, function: Callable[[np.ndarray], np.ndarray]) -> "Clicks":
        """Both lists through ``function`` ((N, 3) -> (N, 3) indices of ``to_frame``)."""
        return Clicks(function(self.foreground), function(self.background), to_frame)

    def in_crop(self, start: np.ndarray, size: int) -> "Clicks":
        """These ``"model"`` clicks as indices of the crop of ``size`` at ``start``: all foreground clicks, and the
        background clicks inside the crop (one outside can remove nothing there)."""
        start = np.asarray(start)
        inside = np.all((self.background >= start) & (self.background < start + size), axis=1)
        return Clicks(self.foreground - start, self.background[inside] - start, "crop")

    def added(self, point: np.ndarray, foreground: bool) -> "Clicks":
        """These clicks and one more, at the end of its list."""
        point = np.asarray(point, dtype=np.int64).reshape(1, 3)
        if foreground:
            return Clicks(np.concatenate([self.foreground, point]), self.background, self.frame)
        return Clicks(self.foreground, np.concatenate([self.background, point]), self.frame)

    def points_and_labels(self, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(N, 3) int64 points and (N,) int64 labels (1 = foreground, 0 = background) for the decoder, in the
        order the request decides: the foreground clicks, then the background ones, each list as sent (clients
        send no order between the two lists)."""
        points = torch.as_tensor(np.concatenate([self.foreground, self.background]), device=device)
        labels = torch.cat([torch.ones(len(self.foreground)), torch.zeros(len(self.background))]).long()
        return points, labels.to(device)


@dataclass(frozen=True, eq=False)
class Box:
    """A box around the lesion: the voxels from ``start`` to ``stop`` (exclusive) along each axis of ``frame``.

    One box per request: it says where one lesion is and how far it goes (a request segments one lesion; clicks
    elsewhere add lesions of their own). Clients send it in other forms (Slicer's ``roi``, the challenge's 2D box
    and slice range); they are converted where the request is parsed."""

    start: np.ndarray  # (3,) int64
    stop: np.ndarray  # (3,) int64, each above start
    frame: str

    def __post_init__(self) -> None:
        if self.frame not in FRAMES:
            raise ValueError(f"unknown box frame {self.frame!r}; one of {FRAMES}")
        for name in ("start", "stop"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.int64).reshape(3))
        if (self.stop <= self.start).any():
            raise ValueError(f"an empty box: start {self.start.tolist()}, stop {self.stop.tolist()}")

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Box) and self.frame == other.frame and np.array_equal(self.start, other.start)
                and np.array_equal(self.stop, other.stop))

    @property
    def size(self) -> np.ndarray:
        return self.stop - self.start

    @property
    def centre(self) -> np.ndarray:
        """The voxel at the box's centre (rounded down)."""
        return (self.start + self.stop - 1) // 2

    def key(self) -> str:
        return f"box{self.start.tolist()}-{self.stop.tolist()}"

    def mapped(self, to_frame: str, corners: Callable[[np.ndarray], np.ndarray]) -> "Box":
        """The box around where ``corners`` ((N, 3) continuous positions, voxel centres at whole numbers, ->
        (N, 3) continuous positions of ``to_frame``) sends this box's eight outer corners: on an oblique grid the
        mapped box holds the whole of this one."""
        low, high = self.start - 0.5, self.stop - 0.5
        outer = np.array([[(low, high)[(n >> a) & 1][a] for a in range(3)] for n in range(8)], dtype=np.float64)
        mapped = corners(outer)
        start = np.floor(mapped.min(0) + 0.5).astype(np.int64)
        stop = np.maximum(np.ceil(mapped.max(0) + 0.5).astype(np.int64), start + 1)
        return Box(start, stop, to_frame)

    def clipped(self, shape) -> Optional["Box"]:
        """The part of the box inside a grid of ``shape`` (same frame), or None if none of it is."""
        start, stop = np.maximum(self.start, 0), np.minimum(self.stop, np.asarray(shape))
        return Box(start, stop, self.frame) if (stop > start).all() else None

    def in_crop(self, start: np.ndarray, size: int, scale: float = 1.0) -> Optional["Box"]:
        """This ``"model"`` box as a box of the crop at ``start`` that sees ``size`` model voxels per side at
        ``scale`` crop voxels per model voxel, clipped to the crop (None if it misses the crop)."""
        low = np.floor((self.start - np.asarray(start)) * scale).astype(np.int64)
        high = np.ceil((self.stop - np.asarray(start)) * scale).astype(np.int64)
        out = int(round(size * scale))
        return Box(low, np.maximum(high, low + 1), "crop").clipped((out,) * 3)

    def grown(self, fraction: float, minimum: int) -> "Box":
        """Each face moved out by ``fraction`` of the box's size along its axis, at least ``minimum`` voxels."""
        margin = np.maximum(np.ceil(self.size * fraction), minimum).astype(np.int64)
        return Box(self.start - margin, self.stop + margin, self.frame)

    def mask(self, size: int, device=None) -> torch.Tensor:
        """(size, size, size) bool: the voxels of a ``"crop"`` box."""
        inside = torch.zeros((size,) * 3, dtype=torch.bool, device=device)
        inside[tuple(slice(int(a), int(b)) for a, b in zip(self.start, self.stop))] = True
        return inside
