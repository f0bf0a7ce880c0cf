"""SAM's ViT image encoder made volumetric, as in the 3DSAM-adapter (Gong et al., arXiv 2306.13465).

Axis convention (the only one in this package): volumes are channel-first ``(B, C, D, H, W)`` and token
grids channels-last ``(B, D, H, W, C)``. ``D`` is the slice axis: SAM's 2D patch embedding runs on each
``(H, W)`` slice, and the depth embeddings and depth relative positions act along ``D``.
"""

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

# Attention logits between tokens of different regions of a shifted window; the paper's value, kept
# (rather than -inf) so that outputs match checkpoints trained with it.
SHIFTED_WINDOW_MASK_VALUE = -100.0


class LayerNorm3d(nn.Module):
    """Layer norm over the channels of a ``(B, C, D, H, W)`` volume."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.movedim(1, -1), x.shape[1:2], self.weight, self.bias, self.eps)
        return x.movedim(-1, 1)


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, act: type = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden_dim)
        self.lin2 = nn.Linear(hidden_dim, dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class SpatialAdapter(nn.Module):
    """Bottleneck adapter with a depthwise 3D convolution, added before every frozen ViT block."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden_dim)
        self.conv = nn.Conv3d(hidden_dim, hidden_dim, kernel_size=3, padding=1, groups=hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, D, H, W, C) -> (B, D, H, W, C)."""
        y = F.relu(self.linear1(x))
        y = F.relu(self.conv(y.movedim(-1, 1)).movedim(1, -1))
        return x + F.relu(self.linear2(y))


class PatchEmbed3d(nn.Module):
    """Upsample the crop, embed each slice with SAM's 2D patch embedding, then merge slices in depth.

    A ``(B, 1, D, H, W)`` crop becomes ``(B, D*s/p_d, H*s/p, W*s/p, C)`` tokens, with ``s`` the upsampling
    factor, ``p`` SAM's patch size and ``p_d`` the number of slices merged by the depthwise slice embedding.
    """

    def __init__(self, embed_dim: int, patch_size: int, slices_per_token: int, upsample: int) -> None:
        super().__init__()
        # SAM's RGB patch embedding; kept 3-channel so that SAM checkpoints load unchanged.
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.slice_embed = nn.Conv3d(
            embed_dim, embed_dim, kernel_size=(slices_per_token, 1, 1), stride=(slices_per_token, 1, 1), groups=embed_dim
        )
        self.slices_per_token = slices_per_token
        self.upsample = upsample

    def forward(self, crop: torch.Tensor) -> torch.Tensor:
        volume = F.interpolate(crop, scale_factor=self.upsample, mode="trilinear")  # (B, 1, sD, sH, sW)
        # A grey slice repeated to RGB is the same as one channel through the channel-summed kernel.
        weight = self.proj.weight.sum(dim=1, keepdim=True)
        tokens = []
        # One depth token at a time, so that the per-slice embeddings never exist for the whole volume.
        for slab in volume.split(self.slices_per_token, dim=2):
            b, _, d, h, w = slab.shape
            slices = slab.transpose(1, 2).reshape(b * d, 1, h, w)
            embedded = F.conv2d(slices, weight, self.proj.bias, stride=self.proj.stride)  # (b*d, C, h/p, w/p)
            embedded = embedded.reshape(b, d, *embedded.shape[1:]).transpose(1, 2)  # (b, C, d, h/p, w/p)
            tokens.append(self.slice_embed(embedded))
        return torch.cat(tokens, dim=2).movedim(1, -1)


def window_partition(x: torch.Tensor, window: int) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """(B, D, H, W, C) -> (B * num_windows, window, window, window, C), zero-padding to whole windows."""
    b, d, h, w, c = x.shape
    pads = [(window - n % window) % window for n in (d, h, w)]
    if any(pads):
        x = F.pad(x, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
    dp, hp, wp = d + pads[0], h + pads[1], w + pads[2]
    x = x.view(b, dp // window, window, hp // window, window, wp // window, window, c)
    windows = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, window, window, window, c)
    return windows, (dp, hp, wp)


def window_unpartition(
    windows: torch.Tensor, window: int, padded: Tuple[int, int, int], size: Tuple[int, int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * num_windows, w, w, w, C) -> (B, D, H, W, C)."""
    dp, hp, wp = padded
    b = windows.shape[0] // ((dp // window) * (hp // window) * (wp // window))
    x = windows.view(b, dp // window, hp // window, wp // window, window, window, window, -1)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, dp, hp, wp, -1)
    d, h, w = size
    return x[:, :d, :h, :w].contiguous()


def shifted_window_mask(grid: Sequence[int], window: int, shift: int, device: torch.device) -> torch.Tensor:
    """Additive mask (num_windows, w^3, w^3) that keeps tokens of a rolled grid from attending across the wrap."""
    region = torch.zeros((1, *grid, 1), device=device)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for d in bands:
        for h in bands:
            for w in bands:
                region[:, d, h, w, :] = label
                label += 1
    windows = window_partition(region, window)[0].view(-1, window**3)
    differs = windows.unsqueeze(1) != windows.unsqueeze(2)
    return torch.zeros(differs.shape, device=device).masked_fill(differs, SHIFTED_WINDOW_MASK_VALUE)


def relative_position_table(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """(2 * size - 1 or any L, C) table -> (size, size, C) embeddings of query-minus-key offsets."""
    length = 2 * size - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.T.unsqueeze(0), size=length, mode="linear").squeeze(0).T
    coords = torch.arange(size, device=rel_pos.device)
    return rel_pos[coords[:, None] - coords[None, :] + size - 1]


class WindowAttention3d(nn.Module):
    """Multi-head self-attention in cubic windows, with decomposed (depth, height, width) relative positions."""

    def __init__(self, dim: int, num_heads: int, rel_pos_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        # SAM's 2D tables (sized for its own windows or global grid, resized at run time) plus a depth table.
        self.rel_pos_d = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, head_dim))
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, head_dim))
        self.rel_pos_scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, d, h, w, C) windows; mask: (num_windows, N, N) additive, N = d*h*w. Returns (B, d, h, w, C)."""
        b, d, h, w, c = x.shape
        n = d * h * w
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

        r_q = q.reshape(b * self.num_heads, d, h, w, -1)
        rel_d = torch.einsum("bdhwc,dkc->bdhwk", r_q, relative_position_table(d, self.rel_pos_d))
        rel_h = torch.einsum("bdhwc,hkc->bdhwk", r_q, relative_position_table(h, self.rel_pos_h))
        rel_w = torch.einsum("bdhwc,wkc->bdhwk", r_q, relative_position_table(w, self.rel_pos_w))
        bias = (
            rel_d[..., :, None, None] + rel_h[..., None, :, None] + rel_w[..., None, None, :]
        ) * self.rel_pos_scale
        bias = bias.reshape(b, self.num_heads, n, n)
        if mask is not None:
            bias = (bias.view(-1, mask.shape[0], self.num_heads, n, n) + mask[None, :, None]).view(b, -1, n, n)

        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(b, d, h, w, c))


class Block3d(nn.Module):
    """A frozen SAM ViT block with a spatial adapter in front, attending in (optionally shifted) 3D windows."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, window: int, shift: int, rel_pos_size: int
    ) -> None:
        super().__init__()
        self.adapter = SpatialAdapter(dim, dim // 2)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = WindowAttention3d(dim, num_heads, rel_pos_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.window = window
        self.shift = shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, D, H, W, C) -> (B, D, H, W, C)."""
        x = self.adapter(x)
        shortcut = x
        x = self.norm1(x)
        size = x.shape[1:4]
        mask = None
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift,) * 3, dims=(1, 2, 3))
            mask = shifted_window_mask(size, self.window, self.shift, x.device)
        windows, padded = window_partition(x, self.window)
        x = window_unpartition(self.attn(windows, mask), self.window, padded, size)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift,) * 3, dims=(1, 2, 3))
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class ImageEncoder3d(nn.Module):
    """Volumetric SAM ViT: a (B, 1, D, H, W) normalised crop -> four multi-layer feature maps."""

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        global_attn_indexes: Sequence[int],
        out_chans: int = 256,
        patch_size: int = 16,
        slices_per_token: int = 16,
        upsample: int = 4,
        token_grid: int = 32,
        pretrain_grid: int = 64,
        sam_window: int = 14,
        window: int = 8,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed3d(embed_dim, patch_size, slices_per_token, upsample)
        self.pos_embed = nn.Parameter(torch.zeros(1, pretrain_grid, pretrain_grid, embed_dim))  # SAM's (h, w)
        # Initialised to ones as in the authors' training script, so a fresh depth embedding shifts all tokens alike.
        self.depth_embed = nn.Parameter(torch.ones(1, token_grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block3d(
                embed_dim,
                num_heads,
                mlp_ratio,
                window=window,
                shift=window // 2 if i % 2 == 0 else 0,
                rel_pos_size=pretrain_grid if i in global_attn_indexes else sam_window,
            )
            for i in range(depth)
        )
        self.necks = nn.ModuleList(
            nn.Sequential(
                nn.Conv3d(embed_dim, out_chans, 1, bias=False),
                LayerNorm3d(out_chans),
                nn.Conv3d(out_chans, out_chans, 3, padding=1, bias=False),
                LayerNorm3d(out_chans),
            )
            for _ in range(4)
        )
        self.feature_every = depth // 4

    def positional_embedding(self, grid: Tuple[int, int, int]) -> torch.Tensor:
        """SAM's 2D embedding pooled to the in-plane grid, plus the learned depth embedding: (1, D, H, W, C)."""
        pool = self.pos_embed.shape[1] // grid[1]
        in_plane = F.avg_pool2d(self.pos_embed.permute(0, 3, 1, 2), kernel_size=pool).permute(0, 2, 3, 1)
        return in_plane.unsqueeze(1) + self.depth_embed[:, : grid[0], None, None, :]

    def forward(self, crop: torch.Tensor) -> List[torch.Tensor]:
        """crop: (B, 1, D, H, W) -> four feature maps (B, out_chans, D', H', W'), shallow to deep."""
        x = self.patch_embed(crop)
        x = x + self.positional_embedding(x.shape[1:4])
        features = []
        for i, block in enumerate(self.blocks, start=1):
            x = block(x)
            if i % self.feature_every == 0:
                features.append(self.necks[len(features)](x.movedim(-1, 1)))
        return features
