"""SAM's ViT image encoder made volumetric, as in the 3DSAM-adapter (Gong et al., arXiv 2306.13465).

Axis convention (the only one in this package): volumes are channel-first ``(B, C, D, H, W)`` and token
grids channels-last ``(B, D, H, W, C)``. ``D`` is the slice axis: SAM's 2D patch embedding runs on each
``(H, W)`` slice, and the depth embeddings and depth relative positions act along ``D``.
"""

import functools
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .conv import Conv3d

# Attention logit offset between tokens of different regions of a shifted window: the paper's value, kept
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
        # In float32 even under autocast: cuDNN's bfloat16 weight gradient of a depthwise 3D convolution runs
        # one kernel per channel, most of a GPU training step (docs/benchmarks.md); float32 takes milliseconds.
        with torch.autocast(x.device.type, enabled=False):
            z = self.conv(y.movedim(-1, 1).float()).movedim(1, -1)
        return x + F.relu(self.linear2(F.relu(z).to(y.dtype)))


def upsample_taps(group: int, upsample: int) -> torch.Tensor:
    """(group, group / upsample + 2) weights that give each of ``group`` consecutive voxels of a linear
    ``upsample``-fold upsampling (align_corners=False) from the source voxels under them plus one either side."""
    taps = torch.zeros(group, group // upsample + 2, dtype=torch.float64)
    for a in range(group):
        source = (a + 0.5) / upsample - 0.5
        low = math.floor(source)
        taps[a, low + 1] += 1 - (source - low)
        taps[a, low + 2] += source - low
    return taps


class PatchEmbed3d(nn.Module):
    """Upsample the crop, embed each slice with SAM's 2D patch embedding, then merge slices in depth.

    A ``(B, 1, D, H, W)`` crop becomes ``(B, D*s/p_d, H*s/p, W*s/p, C)`` tokens, with ``s`` the upsampling
    factor, ``p`` SAM's patch size and ``p_d`` the number of slices merged by the depthwise slice embedding.

    Upsampling and both embeddings are linear, so together they are one strided convolution of the crop
    itself (edge-replicated, as the upsampling clamps at the border), with a (s_d + 2, s + 2, s + 2) kernel per
    channel: the same numbers without building the upsampled volume (64 times the crop) or the per-slice
    embeddings of all its slices.
    """

    def __init__(self, embed_dim: int, patch_size: int, slices_per_token: int, upsample: int) -> None:
        super().__init__()
        # SAM's RGB patch embedding; kept 3-channel so that SAM checkpoints load unchanged.
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.slice_embed = nn.Conv3d(
            embed_dim, embed_dim, kernel_size=(slices_per_token, 1, 1), stride=(slices_per_token, 1, 1), groups=embed_dim
        )
        self.register_buffer("taps_in_plane", upsample_taps(patch_size, upsample).float(), persistent=False)
        self.register_buffer("taps_depth", upsample_taps(slices_per_token, upsample).float(), persistent=False)

    def forward(self, crop: torch.Tensor) -> torch.Tensor:
        # A grey slice repeated to RGB is the same as one channel through the channel-summed kernel.
        in_plane = torch.einsum("oab,at,bs->ots", self.proj.weight.sum(dim=1), self.taps_in_plane, self.taps_in_plane)
        depth = torch.einsum("ca,at->ct", self.slice_embed.weight[:, 0, :, 0, 0], self.taps_depth)
        kernel = depth[:, :, None, None] * in_plane[:, None]  # (C, t_d, t_h, t_w): one 3D kernel per channel
        bias = self.proj.bias * depth.sum(dim=1) + self.slice_embed.bias
        taps = (depth.shape[1], in_plane.shape[1], in_plane.shape[2])
        windows = F.pad(crop, (1, 1, 1, 1, 1, 1), mode="replicate")[:, 0]
        for axis, t in enumerate(taps, start=1):  # (B, D', H', W', t_d, t_h, t_w), strided windows
            windows = windows.unfold(axis, t, t - 2)
        return windows.reshape(*windows.shape[:4], -1) @ kernel.reshape(kernel.shape[0], -1).T + bias


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


@dataclass(frozen=True)
class WindowLayout:
    """How a (D, H, W) token grid, rolled by ``-shift``, splits into cubic windows: one gather there, one back."""

    gather: torch.Tensor  # (num_windows * w^3,) flattened-grid index of each window token; D*H*W = zero padding
    scatter: torch.Tensor  # (D*H*W,) window-token index of each grid token
    regions: Optional[torch.Tensor]  # (num_windows, w^3) from shifted_window_regions, in shifted blocks
    padded: bool


@functools.lru_cache(maxsize=32)
def window_layout(grid: Tuple[int, int, int], window: int, shift: int, device: torch.device) -> WindowLayout:
    """Replaces roll + pad + partition (and their inverses), several copies of the whole grid, by two gathers."""
    n = grid[0] * grid[1] * grid[2]
    index = torch.arange(1, n + 1, device=device).view(1, *grid, 1)  # 0 is left for padding
    if shift:
        index = torch.roll(index, shifts=(-shift,) * 3, dims=(1, 2, 3))
    gather = window_partition(index, window)[0].flatten() - 1
    padded = bool((gather < 0).any())
    gather[gather < 0] = n
    valid = gather < n
    scatter = torch.empty(n, dtype=torch.long, device=device)
    scatter[gather[valid]] = torch.arange(len(gather), device=device)[valid]
    regions = shifted_window_regions(grid, window, shift, device) if shift else None
    return WindowLayout(gather, scatter, regions, padded)


def shifted_window_regions(grid: Sequence[int], window: int, shift: int, device: torch.device) -> torch.Tensor:
    """Region label (0..7) of every token of every window of a grid rolled by ``-shift``: (num_windows, w^3).

    Tokens of different regions were not neighbours before the roll, so they must not attend to each other.
    Along each axis the rolled grid splits into the bands [0, G - window), [G - window, G - shift) and
    [G - shift, G); a window meets at most two of them per axis, so three bits name a region within it."""
    axes = [
        torch.bucketize(torch.arange(g, device=device), torch.tensor([g - window, g - shift], device=device), right=True)
        for g in grid
    ]
    bands = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)[None].float()  # (1, D, H, W, 3)
    bands = window_partition(bands, window)[0].view(-1, window**3, 3)
    differs = (bands != bands[:, :1]).long()  # per axis: not in the band of the window's first token
    return (differs * torch.tensor([4, 2, 1], device=device)).sum(-1)  # CUDA has no integer matmul


def relative_position_table(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """(2 * size - 1 or any L, C) table -> (size, size, C) embeddings of query-minus-key offsets."""
    length = 2 * size - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.T.unsqueeze(0), size=length, mode="linear").squeeze(0).T
    coords = torch.arange(size, device=rel_pos.device)
    return rel_pos[coords[:, None] - coords[None, :] + size - 1]


NUM_SHIFT_REGIONS = 8  # within a window: two bands per axis at most


def key_position_codes(size: Tuple[int, int, int], like: torch.Tensor) -> torch.Tensor:
    """One-hot (depth, height, width) position of every key of a window: (N, d + h + w)."""
    d, h, w = size
    index = torch.arange(d * h * w, device=like.device)
    parts = [(index // (h * w), d), ((index // w) % h, h), (index % w, w)]
    return torch.cat([F.one_hot(i, n) for i, n in parts], dim=-1).to(like.dtype)


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

    def forward(self, x: torch.Tensor, regions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, d, h, w, C) windows; regions: (num_windows, N) from :func:`shifted_window_regions` in a
        shifted block, N = d*h*w. Returns (B, d, h, w, C).

        The decomposed relative positions and the shifted-window mask join the query and key vectors as
        extra channels, so that attention runs in one fused kernel without an (N, N) bias per head:
        - q.R_d[q_d - k_d] + q.R_h[..] + q.R_w[..] = [q.R_d[q_d - :] | ..] . [onehot(k_d) | onehot(k_h) | onehot(k_w)];
        - softmax ignores a constant added to a row, so "-100 across regions" (the paper's mask) equals
          "+100 within a region" = (100 onehot(region_q)) . onehot(region_k).
        """
        b, d, h, w, c = x.shape
        n = d * h * w
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        head_dim = q.shape[-1]

        grid_q = q.reshape(b, self.num_heads, d, h, w, head_dim)
        rel = [
            torch.einsum("bndhwc,dkc->bndhwk", grid_q, relative_position_table(d, self.rel_pos_d)),
            torch.einsum("bndhwc,hkc->bndhwk", grid_q, relative_position_table(h, self.rel_pos_h)),
            torch.einsum("bndhwc,wkc->bndhwk", grid_q, relative_position_table(w, self.rel_pos_w)),
        ]
        positions = key_position_codes((d, h, w), q)
        extra = positions.shape[1] + (NUM_SHIFT_REGIONS if regions is not None else 0)
        # Fused kernels want one head size for q, k and v, a multiple of 8: the unused channels are zero.
        width = -(-(head_dim + extra) // 8) * 8
        queries, keys, values = (q.new_empty((b, self.num_heads, n, width)) for _ in range(3))
        for t in (queries, keys):
            t[..., head_dim + extra :] = 0
        values[..., head_dim:] = 0
        queries[..., :head_dim] = q * head_dim**-0.5
        keys[..., :head_dim] = k
        values[..., :head_dim] = v
        start = head_dim
        for r in rel:
            queries[..., start : start + r.shape[-1]] = r.reshape(b, self.num_heads, n, -1) * self.rel_pos_scale
            start += r.shape[-1]
        keys[..., head_dim:start] = positions
        if regions is not None:
            codes = F.one_hot(regions, NUM_SHIFT_REGIONS).to(q.dtype).repeat(b // regions.shape[0], 1, 1)[:, None]
            queries[..., start : start + NUM_SHIFT_REGIONS] = -SHIFTED_WINDOW_MASK_VALUE * codes
            keys[..., start : start + NUM_SHIFT_REGIONS] = codes
        out = F.scaled_dot_product_attention(queries, keys, values, scale=1.0)[..., :head_dim]
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
        b, d, h, w, c = x.shape
        layout = window_layout((d, h, w), self.window, self.shift, x.device)
        tokens = self.norm1(x).reshape(b, d * h * w, c)
        if layout.padded:
            tokens = torch.cat([tokens, tokens.new_zeros(b, 1, c)], dim=1)
        windows = tokens[:, layout.gather].view(-1, self.window, self.window, self.window, c)
        attended = self.attn(windows, layout.regions).reshape(b, -1, c)[:, layout.scatter]
        x = shortcut + attended.view(b, d, h, w, c)
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
                Conv3d(embed_dim, out_chans, 1, bias=False),
                LayerNorm3d(out_chans),
                Conv3d(out_chans, out_chans, 3, padding=1, bias=False),
                LayerNorm3d(out_chans),
            )
            for _ in range(4)
        )
        self.feature_every = depth // 4
        # Training only: recompute each block's activations in the backward pass instead of keeping them
        # (a paper-configuration 128^3 step keeps ~10 GB of them per block otherwise).
        self.gradient_checkpointing = False

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
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i % self.feature_every == 0:
                features.append(self.necks[len(features)](x.movedim(-1, 1)))
        return features
