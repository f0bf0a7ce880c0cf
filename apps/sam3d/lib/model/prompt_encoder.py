"""The visual-sampler prompt encoder of the 3DSAM-adapter, with three prompts of sam3d's own.

Clicks become tokens by sampling the image features at their locations (no positional code of their
own); learned global queries and the click tokens then update the image embedding through two-way
attention. sam3d adds a click-type embedding (foreground or background) to each click token, a box's token (the
features at its centre, with a type of its own), and two dense prompts on the image embedding (as SAM's mask
prompt): the previous prediction of the crop, and the box. All of them start at zero, so an authors' checkpoint answers exactly as theirs until training has taught
them. Axis convention: feature maps
``(B, C, D, H, W)``, clicks ``(d, h, w)`` voxel indices of the crop.
"""

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .clicks import BOX_TOKEN
from .conv import Conv3d
from .image_encoder import MLPBlock


class Attention(nn.Module):
    """Multi-head attention whose projections may shrink the embedding by ``downsample_rate``."""

    def __init__(self, dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        inner = dim // downsample_rate
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: (B, Nq, C), k and v: (B, Nk, C) -> (B, Nq, C)."""
        out = F.scaled_dot_product_attention(
            self._heads(self.q_proj(q)), self._heads(self.k_proj(k)), self._heads(self.v_proj(v))
        )
        return self.out_proj(out.transpose(1, 2).flatten(2))


class TwoWayBlock(nn.Module):
    """Queries (global + click tokens) attend to each other, then the image tokens attend to the global queries."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, num_global_queries: int = 10) -> None:
        super().__init__()
        self.global_query = nn.Parameter(0.1 * torch.randn(1, num_global_queries, dim))
        self.self_attn = Attention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, mlp_dim, act=nn.ReLU)
        self.norm3 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = Attention(dim, num_heads, downsample_rate=2)
        self.norm4 = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor, clicks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """image: (B, N_image, C), clicks: (B, N_clicks, C) -> both updated, same shapes."""
        num_global = self.global_query.shape[1]
        queries = torch.cat([self.global_query.expand(image.shape[0], -1, -1), clicks], dim=1)
        queries = self.norm2(queries + self.norm1(self.self_attn(queries, queries, queries)))
        clicks, global_queries = queries[:, num_global:], queries[:, :num_global]
        global_queries = self.norm3(global_queries + self.mlp(global_queries))
        image = self.norm4(image + self.cross_attn_image_to_token(image, global_queries, global_queries))
        return image, clicks


class DensePrompt(nn.Module):
    """A crop-sized map in [-1, 1], (B, 1, S, S, S) -> (B, C, g, g, g), pooled to the feature grid and added to the
    image embedding. The last convolution starts at zero: no effect until trained."""

    def __init__(self, dim: int, hidden: int = 16) -> None:
        super().__init__()
        self.embed = nn.Sequential(Conv3d(1, hidden, 3, padding=1), nn.GELU(), Conv3d(hidden, dim, 1))
        nn.init.zeros_(self.embed[-1].weight)
        nn.init.zeros_(self.embed[-1].bias)

    def forward(self, dense: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        return self.embed(F.adaptive_avg_pool3d(dense.float(), tuple(grid)))

    def trained(self) -> bool:
        last = self.embed[-1]
        return bool(last.weight.any() or last.bias.any())


class MaskMemory(DensePrompt):
    """The previous prediction of a crop: (B, 1, S, S, S) log-odds, as probabilities in [-1, 1] (bounded, whatever
    the previous logits' scale)."""

    def forward(self, previous: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        return super().forward(previous.float().sigmoid() * 2 - 1, grid)


class BoxPrompt(DensePrompt):
    """A box around the lesion: (B, 1, S, S, S) bool, the box's voxels in the crop, as 1 inside and -1 outside. A
    dense map rather than corner tokens: a box larger than the crop (a zoomed-out crop's, or a tile's share of it)
    is just the part of it the crop sees."""

    def forward(self, box: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        return super().forward(box.float() * 2 - 1, grid)


class PromptEncoder3d(nn.Module):
    """Conditions the deepest feature map on the clicks (and on the previous prediction, when there is one)."""

    def __init__(self, dim: int = 256, num_heads: int = 8, mlp_dim: int = 2048, depth: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TwoWayBlock(dim, num_heads, mlp_dim) for _ in range(depth))
        self.click_type = nn.Parameter(torch.zeros(2, dim))  # row 0: background, row 1: foreground
        # The token at a box's centre (label BOX_TOKEN): what the image looks like inside the box. Added to the
        # foreground type, so that it starts as a click there and learns how a box's centre differs from a click
        # on the lesion (a ring's or a C-shaped lesion's centre may not be lesion).
        self.box_token = nn.Parameter(torch.zeros(dim))
        self.mask_memory = MaskMemory(dim)
        self.box_prompt = BoxPrompt(dim)

    @staticmethod
    def sample(features: torch.Tensor, points: torch.Tensor, crop_size: Sequence[int]) -> torch.Tensor:
        """The visual sampler: features (B, C, d, h, w) read at points (B, N, 3), (d, h, w) voxel indices of a
        crop of size ``crop_size``, by trilinear interpolation -> click tokens (B, N, C)."""
        size = torch.as_tensor(crop_size, dtype=points.dtype, device=points.device)
        # Voxel centres in [-1, 1]; grid_sample wants (x, y, z) = (w, h, d).
        grid = ((points + 0.5) * 2 / size - 1).flip(-1)
        # In float32 whatever the autocast: click positions need more precision than bfloat16 has.
        tokens = F.grid_sample(features.float(), grid[:, None, None].float(), align_corners=False)  # (B, C, 1, 1, N)
        return tokens.flatten(2).transpose(1, 2)

    def forward(
        self,
        features: torch.Tensor,
        points: torch.Tensor,
        crop_size: Sequence[int],
        labels: Optional[torch.Tensor] = None,
        previous: Optional[torch.Tensor] = None,
        box: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """features: (B, C, d, h, w); points: (B, N, 3) float (d, h, w) voxel indices of a crop of size
        ``crop_size``; labels: (B, N) 1 = foreground, 0 = background, BOX_TOKEN = a box's centre (default all
        foreground); previous: the crop's previous prediction, (B, 1, S, S, S) log-odds; box: (B, 1, S, S, S) bool,
        the box's voxels. Returns the conditioned features, (B, C, d, h, w)."""
        clicks = self.sample(features, points, crop_size)
        labels = torch.ones(points.shape[:2], dtype=torch.long, device=points.device) if labels is None else labels
        labels = labels.long()
        # A box's token starts as a foreground click's and learns its own type from there (box_token: zero at start).
        kind = self.click_type[labels.clamp(max=1)] + (labels == BOX_TOKEN)[..., None] * self.box_token
        clicks = clicks + kind.to(clicks.dtype)
        if previous is not None:
            features = features + self.mask_memory(previous, features.shape[2:]).to(features.dtype)
        if box is not None:
            features = features + self.box_prompt(box, features.shape[2:]).to(features.dtype)
        image = features.flatten(2).transpose(1, 2)
        for layer in self.layers:
            image, clicks = layer(image, clicks)
        return image.transpose(1, 2).reshape(features.shape)
