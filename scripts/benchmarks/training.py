"""Time and memory of one training step (forward, backward, optimiser step), side by side with the reference's.

    .venv/bin/python scripts/benchmark.py training                              # paper configuration (vit_b, 128^3)
    .venv/bin/python scripts/benchmark.py training --reference ../3DSAM-adapter # + the authors' train.py step
    .venv/bin/python scripts/benchmark.py training --variants fp32-ckpt bf16-ckpt --json training.json
    .venv/bin/python scripts/benchmark.py training --tiny --device cpu         # seconds: a smoke run
    .venv/bin/python scripts/benchmark.py training --tiny --device cpu --variants fp32 fp32-aten --rounds 3

Step times are medians over --repeats steps after one warm-up step; peak memory is CUDA's, per variant, with one
model on the device at a time. With --reference both implementations start from the same weights, on the same
crop and label. The reference checkout (med-air/3DSAM-adapter) is never part of this repository.
"""

import argparse
import gc
import json
import os
import platform
import re
import tempfile
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim import AdamW

from benchmarks.clicks import ReferenceModel, timed
from lib.model import CONFIGS, build_sam3d, conv, freeze_backbone
from lib.training import fit

VARIANTS = {
    "reference": "reference (authors' train.py, float32)",
    "fp32": "ours float32",
    "fp32-aten": "ours float32, each convolution as PyTorch dispatches it (no split of a batch of one)",
    "fp32-ckpt": "ours float32 + checkpointing",
    "bf16-ckpt": "ours bfloat16 + checkpointing",
}
# What the authors' train.py trains; it re-initialises rel_pos_d from rel_pos_h/w, which we skip so that both
# implementations hold the same weights.
REFERENCE_TRAINABLE = re.compile(
    r"depth_embed|slice_embed\..+|neck_3d\..+|blocks\.\d+\.((norm1|norm2|adapter)\..+|attn\.rel_pos_d)"
)


class ReferenceTraining(ReferenceModel):
    """The authors' modules, trained the way their train.py trains them: float32, three AdamW, no autocast."""

    def __init__(self, path: str) -> None:
        super().__init__(path, "cpu")  # on the device only during its own variant, so that peaks are per variant
        for name, p in self.encoder.named_parameters():
            p.requires_grad = bool(REFERENCE_TRAINABLE.fullmatch(name))

    def setup(self, device: str, crop: torch.Tensor, label: torch.Tensor) -> Callable[[], float]:
        for module in [self.encoder, self.decoder, *self.prompts]:
            module.to(device).train()
        groups = [self.encoder.parameters(), (p for m in self.prompts for p in m.parameters()), self.decoder.parameters()]
        optimizers = [AdamW([p for p in g if p.requires_grad], lr=4e-4, weight_decay=0) for g in groups]
        return lambda: self.train_step(crop, label, optimizers, np.random.default_rng(0))

    def train_step(self, crop: torch.Tensor, label: torch.Tensor, optimizers, rng: np.random.Generator) -> float:
        """train.py's loop body for crop, label (1, 1, S, S, S)."""
        size = crop.shape[-1]
        image = crop.repeat(1, 3, 1, 1, 1)  # their loader repeats the channel
        slices = F.interpolate(image, scale_factor=512 / size, mode="trilinear")[0].transpose(0, 1)
        deepest, features = self.encoder(slices)
        features.append(deepest)
        # Their clicks: 10 in the lesion and 20 anywhere, all given to the prompt encoder as they are, in (d, w, h)
        # order, sampled on the CPU where their loader leaves the label.
        seg, points = label[:, 0].cpu(), []
        for where, n in ((torch.where(seg == 1), 10), (torch.where(seg < 10), 20)):
            pick = torch.as_tensor(rng.choice(len(where[0]), n))
            points.append(torch.stack([where[1][pick], where[3][pick], where[2][pick]], dim=1))
        points = torch.cat(points).float()[None].to(crop.device)
        features[3] = self.prompts[3](features[3], points.clone(), [size] * 3)
        low_res = F.interpolate(image[:, 0].permute(0, 2, 3, 1)[:, None], scale_factor=64 / size, mode="trilinear")
        logits = self.decoder(features + [low_res], 2, size // 64).permute(0, 1, 4, 2, 3)
        loss = fit.LOSS(logits, label)  # their DiceCELoss, the same as ours
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss.backward()
        for module in (self.encoder, self.decoder, self.prompts[3]):
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        for optimizer in optimizers:
            optimizer.step()
        return loss.item()


def ours(args, checkpoint: Optional[str], bfloat16: bool, checkpointing: bool, crop, label) -> Callable[[], float]:
    torch.manual_seed(0)  # the same initial weights in every variant when there is no checkpoint
    model = build_sam3d(checkpoint=checkpoint, backbone=args.backbone, bfloat16=bfloat16).to(args.device).train()
    freeze_backbone(model)  # the paper's trainable parts, as the reference trains, whatever the backbone's weights
    model.image_encoder.gradient_checkpointing = checkpointing
    optimizer, _ = fit.make_optimizer(model, steps=1, lr=CONFIGS[args.backbone].learning_rate)  # the schedule is never stepped: one step's cost
    # One foreground click, then args.rounds - 1 correction rounds (1: one decoder pass, as in the reference's
    # step); no background first click; the same seed every step, so that every repeat and variant does the same work.
    session = fit.SimulatedSession(model)
    return lambda: fit.train_step(
        session, [crop], [label], optimizer, [np.random.default_rng(0)], background_probability=0.0, rounds=args.rounds
    )


def measure(name: str, setup: Callable[[], Callable[[], float]], args) -> Dict[str, Optional[float]]:
    """Median step time, peak CUDA memory (None on CPU) and the last step's loss; all None when out of memory."""
    cuda = args.device.startswith("cuda")
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        seconds, loss = timed(setup(), args.repeats, name)
    except torch.OutOfMemoryError:
        print(f"{name}: out of memory")
        return {"seconds": None, "peak_gib": None, "loss": None}
    return {"seconds": seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None, "loss": loss}


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_b")
    parser.add_argument("--tiny", action="store_true", help="the tiny configuration (a smoke run)")
    parser.add_argument("--reference", help="a local checkout of med-air/3DSAM-adapter (vit_b only)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="decoder rounds per step: 1 as the reference; 1 + fit.MAX_CORRECTION_ROUNDS the most training runs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.tiny:
        args.backbone = "tiny"
    if not args.reference:
        print("no --reference given: skipping the side-by-side comparison")
    elif not os.path.isdir(args.reference):
        print(f"no reference checkout at {args.reference}: skipping the side-by-side comparison")
        args.reference = None
    elif args.backbone != "vit_b":
        print("the reference implementation exists for vit_b only: skipping the side-by-side comparison")
        args.reference = None

    size = CONFIGS[args.backbone].crop_size
    crop = torch.randn(1, 1, size, size, size, device=args.device)
    d, h, w = torch.meshgrid(*[torch.arange(size, device=args.device)] * 3, indexing="ij")
    label = (((d - size / 2) ** 2 + (h - size / 2) ** 2 + (w - size / 2) ** 2) <= (size / 6) ** 2).float()[None, None]

    results, checkpoint = {}, None
    if args.reference:
        torch.manual_seed(0)
        reference = ReferenceTraining(args.reference)
        checkpoint = os.path.join(tempfile.mkdtemp(), "reference.pth.tar")
        torch.save(reference.checkpoint(), checkpoint)  # ours loads the same weights, before any step changes them
        if "reference" in args.variants:
            results["reference"] = measure(VARIANTS["reference"], lambda: reference.setup(args.device, crop, label), args)
        del reference
    # (bfloat16, activation checkpointing, a batch-of-one CPU convolution split to reach oneDNN: lib/model/conv.py)
    flags = {"fp32": (False, False, True), "fp32-aten": (False, False, False), "fp32-ckpt": (False, True, True),
             "bf16-ckpt": (True, True, True)}
    for key, (bfloat16, checkpointing, split) in flags.items():
        if key in args.variants:
            conv.SPLIT_BATCH_OF_ONE = split
            try:
                results[key] = measure(VARIANTS[key], lambda: ours(args, checkpoint, bfloat16, checkpointing, crop, label), args)
            finally:
                conv.SPLIT_BATCH_OF_ONE = True

    base = results.get("reference", {})
    for figures in results.values():
        both = figures["seconds"] and base.get("seconds")
        figures["speedup_vs_reference"] = base["seconds"] / figures["seconds"] if both else None
        both = figures["peak_gib"] and base.get("peak_gib")
        figures["memory_vs_reference"] = figures["peak_gib"] / base["peak_gib"] if both else None

    machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"machine: {machine}; {os.cpu_count()} cores; torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(f"configuration: {args.backbone}, crop {size}^3; {args.rounds} decoder round(s) per step; repeats {args.repeats}"
          " (median after one warm-up step)")

    def cell(value: Optional[float], unit: str = "") -> str:
        return "n/a" if value is None else f"{value:.3g}{unit}"

    print("\n| variant | step (s) | peak memory (GiB) | speed-up vs reference | memory vs reference | last loss |")
    print("|---|---|---|---|---|---|")
    for key, f in results.items():
        print(f"| {VARIANTS[key]} | {cell(f['seconds'])} | {cell(f['peak_gib'])} | {cell(f['speedup_vs_reference'], 'x')}"
              f" | {cell(f['memory_vs_reference'], 'x')} | {cell(f['loss'])} |")
    report = {"machine": machine, "torch": torch.__version__, "backbone": args.backbone, "crop_size": size,
              "rounds": args.rounds, "repeats": args.repeats, "variants": {VARIANTS[key]: f for key, f in results.items()}}
    print(json.dumps(report))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2)


if __name__ == "__main__":
    main()
