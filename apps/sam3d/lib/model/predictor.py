"""The click policy of a :class:`Sam3D` model, as segment-anything's ``SamPredictor`` sits beside ``Sam``: which
prompts go to the decoder in which rounds, how background clicks act on weights never trained on them (the
rule), what is kept outside a box, and the memo of rounds already decoded. Training decodes its simulated sessions
through the same decoder round (:meth:`Sam3DPredictor.correction_round`).

Axis convention as the model's: a crop is ``(D, H, W)``, clicks are ``(d, h, w)`` voxel indices of it.
"""

from typing import Optional, Protocol, Tuple, Union

import numpy as np
import torch

from .clicks import BOX_TOKEN, Box, Clicks
from .sam3d import CropEncoding, Sam3D


def exclude_background(logit_fg: torch.Tensor, logit_bg: torch.Tensor, nearer_background: torch.Tensor) -> torch.Tensor:
    """The rule for models never trained on background clicks (the authors'): remove what the background clicks
    claim from what the foreground clicks found (log-odds in and out).

    ``logit_bg`` is the model's answer to the background clicks taken as prompts ("what object is this?").
    Where it claims a voxel more strongly than the foreground answer does, and the voxel lies nearer to a
    background click than to any foreground click (``nearer_background``, bool), the voxel's log-odds drop below
    ``-logit_bg``. A background click on a leak that the model takes for the same object as the lesion thus
    removes the leak's side only, never the clicked lesion; and it never adds foreground. Written on log-odds so
    that training can back-propagate through it.
    """
    removed = (logit_bg > logit_fg) & nearer_background
    return torch.where(removed, torch.minimum(logit_fg, -logit_bg), logit_fg)


def nearer_to_background(points: torch.Tensor, labels: torch.Tensor, size: int) -> torch.Tensor:
    """(S, S, S) bool: crop voxels nearer to some background click than to every foreground click."""
    axis = torch.arange(size, device=points.device, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)  # (S, S, S, 3)

    def nearest(clicks: torch.Tensor) -> torch.Tensor:
        return torch.stack([((grid - c.float()) ** 2).sum(-1) for c in clicks]).amin(0)

    return nearest(points[labels == 0]) < nearest(points[labels == 1])


# Nothing is kept farther outside a box than this fraction of its size per side (at least BOX_MARGIN_VOXELS): a
# hand-drawn box is a little off, and the challenge's 2D box, drawn on the lesion's middle slice, may be narrower
# than the lesion on other slices. A foreground click outside it widens what is kept.
BOX_MARGIN = 0.25
BOX_MARGIN_VOXELS = 2
OUTSIDE_BOX_LOGIT = -20.0


def kept_near_box(logits: torch.Tensor, box: Box, foreground: torch.Tensor) -> torch.Tensor:
    """logits: (S, S, S) foreground log-odds of a crop; box: a ``"crop"`` box; foreground: (N, 3) foreground
    clicks of the crop -> the log-odds with nothing beyond the box's margin (and the clicks')."""
    kept = box.grown(BOX_MARGIN, BOX_MARGIN_VOXELS)
    if len(foreground):
        clicks = foreground.cpu().numpy()
        kept = Box(np.minimum(kept.start, clicks.min(0) - BOX_MARGIN_VOXELS),
                   np.maximum(kept.stop, clicks.max(0) + BOX_MARGIN_VOXELS + 1), "crop")
    inside = kept.clipped(logits.shape).mask(logits.shape[0], logits.device)
    return torch.where(inside, logits, torch.full_like(logits, OUTSIDE_BOX_LOGIT))


class PrefixMemo(Protocol):
    """Answers already computed for one crop encoding, by their clicks: rounds of :meth:`correction_logits`,
    or the rule's one-object answers (:meth:`object_logits`)."""

    def get(self, points: torch.Tensor, labels: torch.Tensor) -> Optional[torch.Tensor]: ...

    def put(self, points: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> None: ...


class Sam3DPredictor:
    """Serves and trains ``model`` by its kind (``model.correction_trained``, ``model.box_trained``)."""

    def __init__(self, model: Sam3D) -> None:
        self.model = model

    def click_logits(
        self,
        encoding: CropEncoding,
        points: torch.Tensor,
        labels: torch.Tensor,
        previous: Optional[torch.Tensor] = None,
        memo: Optional["PrefixMemo"] = None,
        box: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """points: (N, 3) (d, h, w) crop indices, at least one of them foreground; labels: (N,) 1 = foreground,
        0 = background; previous: (S, S, S) the previous foreground log-odds of this crop, or None; box: (S, S, S)
        bool, the box's voxels, for a box-trained model (:meth:`correction_logits` serves a box otherwise) ->
        (S, S, S) float32 foreground log-odds. Differentiable (training uses it).

        A model never trained on corrections answers through the rule (:func:`exclude_background`), from two
        answers that each take a set of clicks as one object's: the foreground clicks' and the background clicks'.
        ``memo`` (used without ``previous``) keeps such answers for this encoding, so that a background click after
        foreground ones decodes only the background side."""
        if self.model.correction_trained:
            return self.correction_round(encoding, points, labels, previous, box)[0]
        points, labels, previous = self.round_inputs(encoding, points, labels, previous)
        logit = self.object_logits(encoding, points[labels == 1], previous, memo)
        if (labels == 0).any():
            logit_bg = self.object_logits(encoding, points[labels == 0], None, memo)
            logit = exclude_background(logit, logit_bg, nearer_to_background(points, labels, self.model.crop_size))
        return logit

    def object_logits(
        self, encoding: CropEncoding, points: torch.Tensor, previous: Optional[torch.Tensor], memo: Optional["PrefixMemo"]
    ) -> torch.Tensor:
        """(S, S, S) foreground log-odds of the object that ``points`` (M, 3) all click on (the authors' decoding:
        every click a foreground prompt); previous: (1, 1, S, S, S) or None. It is the answer to a request of these
        foreground clicks alone, which is how ``memo`` keeps it (not with ``previous``, which it depends on)."""
        kept = memo is not None and previous is None
        ones = torch.ones(len(points), dtype=torch.long, device=points.device)
        answer = memo.get(points, ones) if kept else None
        if answer is None:
            logits = self.model.decode(encoding, points[None], previous=previous)[0]
            answer = logits[1] - logits[0]
            if kept:
                memo.put(points, ones, answer)
        return answer

    @staticmethod
    def round_inputs(encoding: CropEncoding, points, labels, previous: Optional[torch.Tensor]):
        """A round's clicks as tensors on the encoding's device, and the previous log-odds (S, S, S), detached, as
        (1, 1, S, S, S) there (or None)."""
        device = encoding.deep.device
        points = torch.as_tensor(points, dtype=torch.long, device=device).reshape(-1, 3)
        labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
        return points, labels, None if previous is None else previous.detach().to(device)[None, None]

    def correction_round(
        self,
        encoding: CropEncoding,
        points: torch.Tensor,
        labels: torch.Tensor,
        previous: Optional[torch.Tensor] = None,
        box: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """One round of a correction-trained model (arguments as :meth:`click_logits`, background clicks as prompts
        of their own type; a box's centre token, label BOX_TOKEN) -> (S, S, S) foreground log-odds after the refiner, and the
        decoder's own before it."""
        points, labels, previous = self.round_inputs(encoding, points, labels, previous)
        box = None if box is None else box.to(encoding.deep.device)[None, None]
        refined, decoder = self.model.decode_with_decoder_logits(encoding, points[None], labels[None], previous, box)
        # sigmoid(l1 - l0) is the two-class softmax's foreground probability
        return refined[0, 1] - refined[0, 0], decoder[0, 1] - decoder[0, 0]

    def correction_logits(
        self, encoding: CropEncoding, clicks: Clicks, memo: Optional["PrefixMemo"] = None, box: Optional[Box] = None
    ) -> torch.Tensor:
        """Foreground log-odds (S, S, S) after all ``clicks`` and the ``box`` (both ``"crop"`` frame), for a
        request that carries every prompt of the segment.

        A correction-trained model answers in two rounds (:meth:`two_rounds`): the first prompt alone (the box's
        map and its centre's token, else the first foreground click), then every prompt at once, seeing the first
        round's prediction, the box seen in both. The same request thus always gets the same answer, whoever
        clicked before and whether or not the server restarted, and a refinement costs one decoder round however
        many prompts it adds: ``memo`` keeps the first round (it must be one box's). Other models decode all clicks
        at once, through the rule (:meth:`click_logits`), reusing answers ``memo`` kept.

        A model whose box prompt is untrained (the authors' checkpoints) is served a box by its fallback: the
        box's centre as the first foreground click. Either way nothing is kept beyond the box's margin
        (:func:`kept_near_box`)."""
        if box is None:
            return self.two_rounds(encoding, clicks, memo, None)
        if self.model.box_trained:
            logits = self.two_rounds(encoding, clicks, memo, box)
        else:
            with_centre = Clicks(np.concatenate([box.centre[None], clicks.foreground]), clicks.background, "crop")
            logits = self.two_rounds(encoding, with_centre, memo, None)
        return kept_near_box(logits, box, torch.as_tensor(clicks.foreground))

    def two_rounds(
        self, encoding: CropEncoding, clicks: Clicks, memo: Optional["PrefixMemo"], box: Optional[Box]
    ) -> torch.Tensor:
        """:meth:`correction_logits` for a model that answers ``box`` itself (or None): the box's round is its
        centre's token (``BOX_TOKEN``) with the box's map, and the map stays in the second round.

        Two rounds, not one per prompt: clients send no order between their prompts (MONAI Label's send a list of
        foreground and one of background clicks), so the second round takes them all at once, with the first
        prompt's prediction as its previous mask, and prompts sent together cost what one costs."""
        device = encoding.deep.device
        points, labels = clicks.points_and_labels(device)
        dense = None
        if box is not None:
            points = torch.cat([torch.as_tensor(box.centre, device=device)[None], points])
            labels = torch.cat([torch.tensor([BOX_TOKEN], device=device), labels])
            dense = box.mask(self.model.crop_size, device)
        if not self.model.correction_trained:
            return self.click_logits(encoding, points, labels, memo=memo)
        rounds = [(points[:1], labels[:1])] + ([(points, labels)] if len(points) > 1 else [])
        previous = None
        for prompts in rounds:
            answer = None if memo is None else memo.get(*prompts)
            if answer is None:
                answer = self.click_logits(encoding, *prompts, previous, box=dense)
                if memo is not None:
                    memo.put(*prompts, answer)
            previous = answer
        return previous

    @torch.no_grad()
    def foreground_probability(
        self, encoding: CropEncoding, clicks: Clicks, memo: Optional["PrefixMemo"] = None, box: Optional[Box] = None
    ) -> torch.Tensor:
        """clicks, box: (d, h, w) indices of the encoded crop (``"crop"`` frame); memo: see
        :meth:`correction_logits`.

        Returns (S, S, S) foreground probability; zeros when there is neither a foreground click nor a box."""
        if clicks.frame != "crop" or (box is not None and box.frame != "crop"):
            raise ValueError(f"the model takes prompts in the crop's frame, not the {clicks.frame!r} frame")
        if len(clicks.foreground) == 0 and box is None:
            return torch.zeros((self.model.crop_size,) * 3, device=encoding.deep.device)
        return self.correction_logits(encoding, clicks, memo, box).sigmoid()

    def predict_crop(
        self,
        crop: torch.Tensor,
        points: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        device: Optional[Union[str, torch.device]] = None,
    ) -> torch.Tensor:
        """crop: (S, S, S) float32 normalised intensities, axes (d, h, w); points: (N, 3) int64 (d, h, w) indices
        inside the crop; labels: optional (N,) with 1 = foreground, 0 = background.

        Returns (S, S, S) float32 foreground probability on the crop's grid, on the CPU."""
        if device is not None:
            self.model.to(device)
        crop = torch.as_tensor(crop, dtype=torch.float32, device=self.model.device)
        if crop.shape != (self.model.crop_size,) * 3:
            raise ValueError(f"crop must be {(self.model.crop_size,) * 3}, got {tuple(crop.shape)}")
        points = torch.as_tensor(points).reshape(-1, 3)
        if ((points < 0) | (points >= self.model.crop_size)).any():
            raise ValueError(f"points must lie inside the crop [0, {self.model.crop_size}): {points.tolist()}")
        encoding = self.model.encode(crop[None, None])
        return self.foreground_probability(encoding, Clicks.from_points(points, labels, "crop")).float().cpu()
