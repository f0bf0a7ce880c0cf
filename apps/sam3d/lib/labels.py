"""Which voxels of a label are the tumour: one rule for training, scoring, planning and the scripts."""

from typing import Optional

import torch


def tumour(label: torch.Tensor, label_value: Optional[int]) -> torch.Tensor:
    """The voxels equal to ``label_value`` (KiTS: 2), or all non-zero ones (of a tensor or a numpy array)."""
    return (label.round() == label_value) if label_value else label > 0.5
