"""A request's clicks -> foreground probability on the model's grid (what the infer task and the evaluation run).

Clicks on one lesion share a crop (``plan_crops``). When the mask of a crop reaches one of its faces inside the
volume (or fills much of the crop), the lesion goes on beyond it, and sam3d follows it, as nnInteractive's AutoZoom
does:

1. zoom out: the same centre, a box 1.5x larger averaged down to the crop's size, predicted from the same clicks;
   again 1.5x larger while that mask still reaches a face, up to ``max_extent`` crops per side;
2. refine at the model's spacing: the coarse mask, upsampled, is the mask so far; the first crop, then crops tiled
   over the mask (nearest the click first), each with the mask so far in its box as its previous mask (the mask
   prompt) and a click (the request's, else the deepest voxel of the mask so far in the tile), replace the mask so
   far near its border (deeper inside and farther out the coarse answer stands), so that neighbours agree at their
   seams.

A box says how far its lesion goes, so its crop is never followed by the mask: a box that fits in the crop is served
by that crop alone; a larger one is zoomed out to at once (its whole box with a margin, averaged down to the crop's
size) and refined as above, each refining crop seeing its share of the box.

At most ``max_crops`` crops are spent on following per request; where the bound stops it, the coarse answer stands
and the result says so. Every crop's encoding goes through the feature cache: a further click runs the encoder
only for crops it has not seen. A lesion whose mask stays off the crop's faces is served by the one crop, as before.
Last, each click's neighbourhood takes the click's class (``honour_clicks``).
"""

import itertools
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from lib.model import Box, Clicks, CropEncoding, Sam3D, Sam3DPredictor
from lib.model.predictor import BOX_MARGIN, kept_near_box
from lib.regions import deepest_voxel
from lib.transforms.crops import Crop, box_slices, crop_start, extract_box, paste_max, zoomed_box
from lib.transforms.presets import PRESETS

from .cache import BoundedCache, CropRounds, crop_key

# A mask reaches a face when at least this fraction of the face is foreground (a speck of noise or the tip of a
# thin leak does not start following).
FACE_CONTACT = 0.01
# A mask that fills this much of its crop belongs to a lesion about the crop's size or larger: look wider even when
# it stays off the faces (a crop that sees only the inside of a large lesion tends to get a round blob inside it).
FILLED_CROP = 0.4
ZOOM_STEP = 1.5  # each zoom-out level sees 1.5x more per side (nnInteractive's step)
# Refining tiles cover the coarse mask with this margin (in crops) so that its border is seen with context.
TILE_MARGIN = 1 / 16
# Tile positions are rounded to this fraction of a crop: a further click that moves the coarse mask a little keeps
# the tiles, and with them their cached encodings.
TILE_QUANTUM = 1 / 8
# A refining crop decides only within this distance (in crops) of the border of the mask so far: deeper inside a
# lesion larger than the crop, or farther out, the coarse answer stands (a crop that sees only the inside of a
# lesion, or only a sliver of it, answers worse there than the zoomed-out crop that saw it whole).
REFINE_BAND = 1 / 4
# A click is the user's word on the voxel under it: the voxels within this many of it along each axis (the model's
# grid) take the click's class in the answer, whatever the model said there. A model can leave a correction click's
# own voxel on the wrong side (a background click on a leak that it takes for the lesion), and the voxel the user
# pointed at staying wrong is the one error a user cannot miss; one voxel's reach keeps the clicked image voxel
# right after the answer is resampled to the image's grid.
CLICK_REACH = 1


@dataclass(frozen=True)
class FollowBounds:
    max_extent: float = 4.0  # crops per side of the largest box a lesion is followed into; 1: no following
    max_crops: int = 27  # crops (zoomed out and refining) one request may spend on following; 0: no following

    @property
    def enabled(self) -> bool:
        return self.max_extent > 1 and self.max_crops > 0


@dataclass
class Segmentation:
    prob: torch.Tensor  # (D, H, W) foreground probability on the model's grid, zero outside ``boxes``
    boxes: List[Tuple[Tuple[int, int, int], int]] = field(default_factory=list)  # (start, size) of what was computed
    crops: List[List[int]] = field(default_factory=list)  # starts of the crops at the model's spacing
    zoomed_crops: List[dict] = field(default_factory=list)  # {"start", "size", "zoom"} of the zoomed-out crops
    growth_bounded: bool = False  # a mask still reached a face where the bounds stopped following
    follow_crops: int = 0  # crops spent on following (zoomed-out ones and refining tiles)
    encoder_runs: int = 0
    cache_hits: int = 0

    def report(self) -> dict:
        """What the result JSON says about the crops."""
        return {
            "crops": self.crops,
            "zoomed_crops": self.zoomed_crops,
            "zoom_levels": [c["zoom"] for c in self.zoomed_crops],
            "growth_bounded": self.growth_bounded,
            "encoder_runs": self.encoder_runs,
            "cache_hits": self.cache_hits,
        }


@dataclass
class Request:
    """One request's share of the work: what every step of it reads (the pre-processed volume, the preset, the
    background clicks, which go to every zoomed-out crop and tile they fall in) and the result it builds."""

    volume: torch.Tensor  # (D, H, W) pre-processed
    preset: str  # a name in PRESETS
    background: np.ndarray  # (M, 3) ``"model"`` frame
    result: Segmentation


def reaches_face(mask: torch.Tensor, start: Sequence[int], size: int, shape: Sequence[int]) -> bool:
    """Whether ``mask`` (S, S, S), the prediction for the box (``start``, ``size``) of a volume of ``shape`` (seen at
    S / size of the model's spacing), covers at least FACE_CONTACT of one of the box's faces that lie inside the
    volume (the lesion can go on there)."""
    out = mask.shape[0]
    scale = out / size
    # The part of the mask inside the volume; beyond it is padding.
    valid = [min(out, int(np.ceil((n - s) * scale))) for s, n in zip(start, shape)]
    mask = mask[tuple(slice(0, v) for v in valid)]
    threshold = FACE_CONTACT * out * out
    for axis in range(3):
        faces = []
        if start[axis] > 0:
            faces.append(0)
        if start[axis] + size < shape[axis]:
            faces.append(valid[axis] - 1)
        for index in faces:
            if int(mask.select(axis, index).sum()) >= threshold:
                return True
    return False


def honour_clicks(prob: torch.Tensor, clicks: Clicks, reach: int = CLICK_REACH) -> None:
    """prob: (D, H, W) foreground probability on the model's grid, changed in place; clicks: the request's
    (``"model"`` frame). The voxels within ``reach`` of a click (per axis) take its class: 1 near foreground clicks,
    0 near background ones, the model's answer where clicks of both kinds are that near; the clicked voxels
    themselves always take their click's class (background where one voxel was clicked both ways)."""
    # Worked click by click in each one's own neighbourhood: a request's answer spans the whole volume, its clicks
    # a few voxels each.
    shape = np.asarray(prob.shape)
    for points, others, value in ((clicks.foreground, clicks.background, 1.0), (clicks.background, clicks.foreground, 0.0)):
        for point in points:
            low, high = np.maximum(point - reach, 0), np.minimum(point + reach + 1, shape)
            contested = torch.zeros(tuple(high - low), dtype=torch.bool)  # also near a click of the other kind
            for other in others:
                other_low, other_high = np.maximum(other - reach, low), np.minimum(other + reach + 1, high)
                if (other_high > other_low).all():
                    contested[tuple(slice(a - o, b - o) for a, b, o in zip(other_low, other_high, low))] = True
            prob[tuple(slice(a, b) for a, b in zip(low, high))][~contested] = value
    for points, value in ((clicks.foreground, 1.0), (clicks.background, 0.0)):
        for point in points:
            prob[tuple(int(c) for c in point)] = value


def upsampled(logits: torch.Tensor, start: Sequence[int], side: int, shape: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """A zoomed-out crop's (S, S, S) log-odds of the box (``start``, ``side``) back at the model's spacing: (R, R, R)
    log-odds and the bool mask of its voxels inside a volume of ``shape``."""
    region = F.interpolate(logits[None, None], size=(side,) * 3, mode="trilinear", align_corners=False)[0, 0]
    in_volume = torch.zeros_like(region, dtype=torch.bool)
    in_volume[tuple(slice(0, max(0, min(side, n - s))) for s, n in zip(start, shape))] = True
    return region, in_volume


def plan_tiles(mask: torch.Tensor, size: int) -> List[Tuple[int, int, int]]:
    """Starts (in ``mask``'s coordinates) of the fewest size^3 tiles, side by side, that cover ``mask``'s foreground
    with a margin of TILE_MARGIN crops, the block centred on it and rounded to TILE_QUANTUM crops."""
    nonzero = torch.nonzero(mask)
    if len(nonzero) == 0:
        return []
    low, high = nonzero.min(0).values.numpy(), nonzero.max(0).values.numpy() + 1
    margin, quantum = round(size * TILE_MARGIN), max(1, round(size * TILE_QUANTUM))
    per_axis = []
    for lo, hi in zip(low, high):
        need = hi - lo + 2 * margin
        count = max(1, int(np.ceil(need / size)))
        first = int(round((lo - margin - (count * size - need) / 2) / quantum)) * quantum
        per_axis.append([first + k * size for k in range(count)])
    return [tuple(int(s) for s in start) for start in itertools.product(*per_axis)]


class Segmenter:
    """Serves one request with one model: ``cache`` holds crop encodings, ``rounds`` correction rounds (both shared
    between requests); ``version`` names the model in their keys."""

    def __init__(
        self, model: Sam3D, version: str, cache: BoundedCache, rounds: BoundedCache, bounds: FollowBounds = FollowBounds()
    ) -> None:
        self.model = model
        self.predictor = Sam3DPredictor(model)
        self.version = version
        self.cache = cache
        self.rounds = rounds
        self.bounds = bounds
        self.size = model.crop_size

    @torch.no_grad()
    def segment(self, volume: torch.Tensor, crops: List[Crop], clicks: Clicks, preset: str) -> Segmentation:
        """volume: (D, H, W) pre-processed by ``preset`` (a name in PRESETS); crops: ``plan_crops``' for the
        request's ``clicks`` (``"model"`` frame), whose background clicks also go to the zoomed-out crops and tiles
        they fall in."""
        request = Request(volume, preset, clicks.background, Segmentation(torch.zeros(volume.shape)))
        result = request.result
        for crop in crops:
            if crop.box is not None and not self.fits(crop):
                self.follow_box(request, crop)
                continue
            result.crops.append(list(crop.start))
            box = None if crop.box is None else crop.box.in_crop(crop.start, self.size)
            logits = self.crop_logits(request, extract_box(volume, crop.start, self.size), crop.clicks, box)
            if box is not None:  # the box says how far the lesion goes: nothing to follow
                paste_max(result.prob, logits.sigmoid(), crop.start)
                result.boxes.append((crop.start, self.size))
                continue
            if not self.beyond_crop(logits > 0, crop.start, volume.shape):
                paste_max(result.prob, logits.sigmoid(), crop.start)
                result.boxes.append((crop.start, self.size))
                continue
            followed = self.follow(request, crop, logits) if self.bounds.enabled else None
            if followed is None:
                result.growth_bounded = True
                paste_max(result.prob, logits.sigmoid(), crop.start)
                result.boxes.append((crop.start, self.size))
                continue
            start, region = followed
            paste_max(result.prob, region.sigmoid(), start)
            result.boxes.append((start, region.shape[0]))
        honour_clicks(result.prob, clicks)
        return result

    def beyond_crop(self, mask: torch.Tensor, start: Sequence[int], shape: Sequence[int]) -> bool:
        """Whether the lesion of a crop's mask may go on beyond the crop. Never for untrained weights: their mask
        fills the crop wherever one clicks, and following it would only spend crops (an encoder run each) on
        noise."""
        if self.model.weights_info.get("state") == "untrained":
            return False
        return reaches_face(mask, start, self.size, shape) or float(mask.float().mean()) >= FILLED_CROP

    def encode(self, request: Request, pixels: torch.Tensor) -> Tuple[CropEncoding, str]:
        result = request.result
        key = crop_key(pixels, self.version, request.preset)
        encoding = self.cache.get(key)
        if encoding is None:
            model_input = PRESETS[request.preset].crop_input(pixels)
            encoding = self.model.encode(model_input[None, None].to(self.model.device))
            self.cache.put(key, encoding)
            result.encoder_runs += 1
        else:
            result.cache_hits += 1
        return encoding, key

    def crop_logits(
        self, request: Request, pixels: torch.Tensor, clicks: Clicks, box: Optional[Box] = None
    ) -> torch.Tensor:
        """A crop's foreground log-odds (S, S, S) for the request's clicks and box in it (``"crop"`` frame), every
        prompt answered as the server answers a request (``Sam3DPredictor.correction_logits``)."""
        encoding, key = self.encode(request, pixels)
        memo = CropRounds(self.rounds, key if box is None else f"{key}/{box.key()}")
        return self.predictor.correction_logits(encoding, clicks, memo, box).float().cpu()

    def fits(self, crop: Crop) -> bool:
        """Whether the crop's box lies inside the crop."""
        start = np.asarray(crop.start)
        return bool((crop.box.start >= start).all() and (crop.box.stop <= start + self.size).all())

    def follow_box(self, request: Request, crop: Crop) -> None:
        """A box larger than the crop: one crop zoomed out to the box with a margin (within ``max_extent``
        crops), then refining crops over its mask, each seeing its share of the box."""
        box, result, volume = crop.box, request.result, request.volume
        side = int(np.ceil(box.size.max() * (1 + 2 * BOX_MARGIN)))
        limit = int(round(self.size * max(self.bounds.max_extent, 1.0)))
        if side > limit:
            side, result.growth_bounded = limit, True
        start = crop_start(box.centre, volume.shape, side)
        scale = self.size / side
        foreground = crop.clicks.foreground + np.asarray(crop.start)
        zoomed = Clicks(self.to_box(foreground, start, scale),
                        self.to_box(self.in_box(request.background, start, side), start, scale), "crop")
        logits = self.crop_logits(request, zoomed_box(volume, start, side, self.size), zoomed, box.in_crop(start, side, scale))
        result.zoomed_crops.append({"start": list(start), "size": side, "zoom": round(side / self.size, 4)})
        result.follow_crops += 1
        region, in_volume = upsampled(logits, start, side, volume.shape)
        if self.bounds.enabled:
            self.refine(request, crop, region, start, in_volume, self.band((region > 0) & in_volume), first=None)
        region = kept_near_box(region, box.in_crop(start, side), torch.as_tensor(foreground - np.asarray(start)))
        paste_max(result.prob, region.sigmoid(), start)
        result.boxes.append((start, side))

    def follow(
        self, request: Request, crop: Crop, logits: torch.Tensor
    ) -> Optional[Tuple[Tuple[int, int, int], torch.Tensor]]:
        """The lesion of ``crop`` (whose log-odds ``logits`` reach a face) followed: (start, (R, R, R) log-odds) of
        the box it was followed into, or None when the bounds allowed no zoomed-out crop."""
        coarse = self.zoom_out(request, crop)
        if coarse is None:
            return None
        start, size, coarse_logits = coarse
        region, in_volume = upsampled(coarse_logits, start, size, request.volume.shape)
        band = self.band((region > 0) & in_volume)
        # The first crop lies inside the box (both are centred on it); it is the first refining crop.
        first = box_slices(np.asarray(crop.start) - start, self.size)
        region[first] = torch.where(band[first], logits, region[first])
        self.refine(request, crop, region, start, in_volume, band, first=crop.start)
        return start, region

    def zoom_out(self, request: Request, crop: Crop) -> Optional[Tuple[Tuple[int, int, int], int, torch.Tensor]]:
        """Predict on ever larger boxes about the crop's centre, averaged down to the crop's size, until the mask
        stays off the box's faces or the bounds stop it: (start, side, (S, S, S) log-odds) of the last, or None."""
        result, volume = request.result, request.volume
        centre = np.asarray(crop.start) + self.size // 2
        foreground = crop.clicks.foreground + np.asarray(crop.start)
        zoom, coarse = 1.0, None
        while True:
            if zoom >= self.bounds.max_extent or result.follow_crops >= self.bounds.max_crops:
                result.growth_bounded = True
                return coarse
            zoom = min(zoom * ZOOM_STEP, self.bounds.max_extent)
            side = int(round(self.size * zoom))
            start = crop_start(centre, volume.shape, side)
            scale = self.size / side
            pixels = zoomed_box(volume, start, side, self.size)
            inside = self.in_box(request.background, start, side)
            zoomed = Clicks(self.to_box(foreground, start, scale), self.to_box(inside, start, scale), "crop")
            logits = self.crop_logits(request, pixels, zoomed)
            result.zoomed_crops.append({"start": list(start), "size": side, "zoom": round(zoom, 4)})
            result.follow_crops += 1
            coarse = (start, side, logits)
            if not reaches_face(logits > 0, start, side, volume.shape):
                return coarse

    def to_box(self, points: np.ndarray, start: Sequence[int], scale: float) -> np.ndarray:
        """Model-grid voxel indices -> indices of a box at ``start`` seen at ``scale`` (output voxels per input)."""
        mapped = np.floor((points - np.asarray(start) + 0.5) * scale).astype(np.int64).reshape(-1, 3)
        return np.clip(mapped, 0, self.size - 1)

    def in_box(self, points: np.ndarray, start: Sequence[int], side: Optional[int] = None) -> np.ndarray:
        """The points (N, 3) that lie in the box at ``start`` (side: the crop's by default)."""
        end = np.asarray(start) + (side or self.size)
        return points[np.all((points >= np.asarray(start)) & (points < end), axis=1)]

    def band(self, mask: torch.Tensor) -> torch.Tensor:
        """bool, ``mask``'s shape: voxels within REFINE_BAND crops of ``mask``'s border, on either side."""
        width = self.size * REFINE_BAND
        mask = mask.numpy()
        inside = ndimage.distance_transform_edt(mask) <= width
        outside = ndimage.distance_transform_edt(~mask) <= width
        return torch.as_tensor(inside & outside)

    def refine(
        self, request: Request, crop: Crop, region: torch.Tensor, start: Sequence[int], in_volume: torch.Tensor,
        band: torch.Tensor, first: Optional[Sequence[int]],
    ) -> None:
        """Tile ``region`` (the (R, R, R) log-odds of the box at ``start``, changed in place; ``in_volume``: its
        voxels inside the volume) with crops at the model's spacing, nearest the first click (or the crop's box's
        centre) first, but for the crop already at ``first``; each decides within ``band`` only, seeing its share
        of the crop's box where the model was trained on boxes."""
        result, volume = request.result, request.volume
        side = region.shape[0]
        start = np.asarray(start)
        upper = np.maximum(np.minimum(np.asarray(volume.shape), start + side) - self.size, 0)
        tiles = []
        for local in plan_tiles((region > 0) & in_volume, self.size):
            # Inside the box and inside the volume where they are large enough.
            tile = np.clip(np.clip(np.asarray(local), 0, side - self.size) + start, 0, upper)
            if (first is None or tuple(tile) != tuple(first)) and tuple(tile) not in tiles:
                tiles.append(tuple(int(t) for t in tile))
        foreground = crop.clicks.foreground + np.asarray(crop.start)
        click = foreground[0] if len(foreground) else crop.box.centre
        tiles.sort(key=lambda t: (float(np.linalg.norm(np.asarray(t) + self.size / 2 - click)), t))
        for tile in tiles:
            box = box_slices(np.asarray(tile) - start, self.size)
            mask = (region[box] > 0) & in_volume[box]
            if not mask.any() or bool(mask.sum() == in_volume[box].sum()) or not (band[box] & in_volume[box]).any():
                continue  # nothing of the lesion here, or all of it, or no border: the mask so far stands
            if result.follow_crops >= self.bounds.max_crops:
                result.growth_bounded = True
                return
            result.crops.append(list(tile))
            result.follow_crops += 1
            pixels = extract_box(volume, tile, self.size)
            encoding, _ = self.encode(request, pixels)
            fg = self.in_box(foreground, tile) - tile
            if len(fg) == 0:
                fg = deepest_voxel(mask.numpy())[None]
            bg = self.in_box(request.background, tile) - tile
            points, labels = Clicks(fg, bg, "crop").points_and_labels()
            share = None
            if crop.box is not None and self.model.box_trained:
                share = crop.box.in_crop(tile, self.size)
                share = None if share is None else share.mask(self.size)
            answer = self.predictor.click_logits(encoding, points, labels, region[box].clone(), box=share).float().cpu()
            region[box] = torch.where(band[box], answer, region[box])
