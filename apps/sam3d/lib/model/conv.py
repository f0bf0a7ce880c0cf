"""3D convolutions that reach oneDNN on a CPU also for one crop of few channels.

PyTorch sends a float32 CPU convolution to oneDNN when its batch is larger than one, or when N * C * D * H exceeds
ONEDNN_MIN_SIZE (``use_mkldnn`` in ATen's Convolution.cpp, a rule written for 2D images, whose last two sizes are
H and W); otherwise its reference kernels run. sam3d convolves one crop at a time with 2 to 24 channels (the
refiner at the crop's grid, the decoder, the prompt encoder), which all fall below that size, and the reference
kernels take most of a training step there (docs/benchmarks.md). Computing such a convolution as a batch of two, the
two halves along D each with the planes its outputs need beyond it, sends it to oneDNN with the same result.
Axis convention: volumes ``(B, C, D, H, W)``.
"""

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

# ATen's threshold on N * C * D * H above which a batch of one goes to oneDNN anyway.
ONEDNN_MIN_SIZE = 20480
# Off: every convolution as PyTorch dispatches it (scripts/benchmarks/training.py times both).
SPLIT_BATCH_OF_ONE = True

Triple = Union[int, Tuple[int, int, int]]


def _triple(value: Triple) -> Tuple[int, int, int]:
    return (value,) * 3 if isinstance(value, int) else tuple(value)


def splits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether PyTorch would run this convolution on its reference kernels and a batch of two would not: a
    float32 CPU batch of one under ONEDNN_MIN_SIZE, a kernel wider than one voxel (for 1x1x1 kernels the
    reference kernels are the faster ones single-threaded, ATen says), oneDNN present and no autocast."""
    return (
        SPLIT_BATCH_OF_ONE
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.shape[0] == 1
        and x.shape[1] * x.shape[2] * x.shape[3] <= ONEDNN_MIN_SIZE
        and any(k > 1 for k in weight.shape[2:])
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and not torch.is_autocast_enabled("cpu")
    )


def conv3d(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, padding: Triple = 0, dilation: Triple = 1
) -> torch.Tensor:
    """``F.conv3d`` with stride 1 and one group: x (B, C_in, D, H, W), weight (C_out, C_in, kd, kh, kw) ->
    (B, C_out, D', H', W'). A batch of one that :func:`splits` is computed as the two halves along D, batched;
    values agree with ``F.conv3d`` up to float rounding, and so do gradients."""
    pad_d, pad_h, pad_w = _triple(padding)
    reach = _triple(dilation)[0] * (weight.shape[2] - 1)  # the planes beyond an output's first that it reads
    depth = x.shape[2] + 2 * pad_d - reach  # the output's planes
    if depth < 2 or not splits(x, weight):
        return F.conv3d(x, weight, bias, padding=padding, dilation=dilation)
    padded = F.pad(x, (0, 0, 0, 0, pad_d, pad_d))
    half = (depth + 1) // 2
    first, second = padded[:, :, : half + reach], padded[:, :, half:]
    # An odd depth leaves the second half a plane short: a zero plane whose output is dropped.
    second = F.pad(second, (0, 0, 0, 0, 0, first.shape[2] - second.shape[2]))
    out = F.conv3d(torch.cat([first, second]), weight, bias, padding=(0, pad_h, pad_w), dilation=dilation)
    return torch.cat([out[:1], out[1:, :, : depth - half]], dim=2)


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` of stride 1, one group and zero padding (the same parameters, so the same checkpoints),
    computed by :func:`conv3d`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.stride != (1, 1, 1) or self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError("Conv3d: stride 1, one group and numeric zero padding only")

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return conv3d(input, weight, bias, self.padding, self.dilation)
