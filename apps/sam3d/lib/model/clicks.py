"""A request's clicks, one type from parsing to the model: foreground and background kept apart, in a grid
that the value names.

Frames (``Clicks.frame``):
- ``"image"``: voxel indices (i, j, k) of the image as stored, as Slicer and OHIF send them;
- ``"model"``: indices (d, h, w) of the pre-processed volume (reoriented and resampled for the model);
- ``"crop"``: indices (d, h, w) of one model crop, what the model's decoder takes.
"""

from dataclasses import dataclass
from typing import Callable, Tuple

import numpy as np
import torch

FRAMES = ("image", "model", "crop")


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
