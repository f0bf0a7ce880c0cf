"""Latency and memory of sam3d's clicks, side by side with the reference implementation when given.

    .venv/bin/python scripts/benchmark.py clicks                              # paper configuration (vit_b, 128^3)
    .venv/bin/python scripts/benchmark.py clicks --reference ../3DSAM-adapter # + the authors' code, same run
    .venv/bin/python scripts/benchmark.py clicks --bfloat16                   # + the opt-in bfloat16 path
    .venv/bin/python scripts/benchmark.py clicks --rest                       # + a click through a running server
    .venv/bin/python scripts/benchmark.py clicks --tiny --rest                # seconds: a smoke run

Model figures are medians over --repeats runs after one warm-up run; the machine, torch version and thread
count are printed with them. The reference checkout (med-air/3DSAM-adapter) is never part of this repository.
"""

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from lib.engine.cache import BoundedCache, CropRounds, tensor_bytes
from lib.model import Clicks, CropEncoding, Sam3DPredictor, build_sam3d

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int, desc: str) -> Tuple[float, object]:
    """(median seconds over ``repeats`` runs after one warm-up run, the last run's output)."""
    times = []
    for i in tqdm(range(repeats + 1), desc=desc, leave=False):
        synchronize()
        start = time.perf_counter()
        out = fn()
        synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times), out


def matmul_throughput(device: str, dtype: torch.dtype = torch.float32, n: int = 2048) -> float:
    """Multiply-accumulates per second of a large matmul: what this machine can do at best."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return n**3 / timed(lambda: a @ b, 5, f"matmul {dtype}")[0]


def count_macs(fn: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 2


class ReferenceModel:
    """The authors' modules (their test.py configuration), driven the way their test.py drives them."""

    def __init__(self, path: str, device: str) -> None:
        from functools import partial

        sys.path.insert(0, os.path.join(path, "3DSAM-adapter") if os.path.isdir(os.path.join(path, "3DSAM-adapter")) else path)
        from modeling.image_encoder import ImageEncoderViT_3d_v2
        from modeling.mask_decoder import VIT_MLAHead_h
        from modeling.prompt_encoder import PromptEncoder, TwoWayTransformer

        self.encoder = ImageEncoderViT_3d_v2(
            depth=12, embed_dim=768, img_size=1024, mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=12, patch_size=16, qkv_bias=True, use_rel_pos=True, global_attn_indexes=[2, 5, 8, 11],
            window_size=14, cubic_window_size=8, out_chans=256, num_slice=16,
        )
        self.prompts = [
            PromptEncoder(transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8))
            for _ in range(4)
        ]
        self.decoder = VIT_MLAHead_h(img_size=96)
        with torch.no_grad():  # off every initial value, so that a wrong mapping in our loader would show
            for module in [self.encoder, self.decoder, *self.prompts]:
                for p in module.parameters():
                    p.add_(0.02 * torch.randn_like(p))
        for module in [self.encoder, self.decoder, *self.prompts]:
            module.to(device).eval()

    def checkpoint(self) -> dict:
        return {
            "encoder_dict": self.encoder.state_dict(),
            "decoder_dict": self.decoder.state_dict(),
            "feature_dict": [p.state_dict() for p in self.prompts],
        }

    @torch.no_grad()
    def predict(self, crop: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """crop (S, S, S) (d, h, w); points (N, 3) (d, h, w) -> (S, S, S) foreground probability."""
        size = crop.shape[0]
        image = crop[None, None].repeat(1, 3, 1, 1, 1)
        slices = F.interpolate(image, scale_factor=512 / size, mode="trilinear")[0].transpose(0, 1)
        deepest, features = self.encoder(slices)
        features.append(deepest)
        clicks = points[:, [0, 2, 1]].float()[None]  # their click order is (d, w, h)
        features[3] = self.prompts[3](features[3], clicks.clone(), [size] * 3)
        low_res = F.interpolate(image[0, 0].permute(1, 2, 0)[None, None], scale_factor=64 / size, mode="trilinear")
        logits = self.decoder(features + [low_res], 2, size // 64).permute(0, 1, 4, 2, 3)
        return logits.softmax(dim=1)[0, 1]


def correction_figures(model, encoding, first: Clicks, refined: Clicks, repeats: int) -> Dict[str, float]:
    """Refinement clicks on an encoded crop (``first`` clicked before, ``refined`` one more foreground click,
    both foreground only): the decoder side only."""
    size, device = model.crop_size, model.device
    clicks, refine = (torch.as_tensor(c.foreground, device=device) for c in (first, refined))
    rows = {}
    rows["refinement click, cached (s)"], _ = timed(
        lambda: Sam3DPredictor(model).foreground_probability(encoding, refined), repeats, "refinement"
    )
    # A correction-trained model's refinement: one decoder round that also reads the previous mask; the
    # authors' checkpoints take a background click through the rule instead (two decoder passes).
    both, labels = torch.cat([clicks, refine]), torch.tensor([1, 0], device=device)
    # A random decoder's answer covers the crop, so the refiner's box is the whole crop here (the worst case; the
    # refiner's row in a 40-voxel lesion's box below is what a trained model's round adds to a decoder pass).
    noise = torch.randn((size,) * 3, device=device)
    lesion = torch.full((size,) * 3, -5.0, device=device)
    lesion[tuple(slice(int(c) - 20, int(c) + 20) for c in clicks[0])] = 5.0
    # A correction-trained model's refiner has learned something (an untrained one adds zeros and is skipped).
    last = model.refiner.net[-1]
    untrained = [p.detach().clone() for p in last.parameters()]
    with torch.no_grad():
        for p in last.parameters():
            p.normal_(0, 0.01)

    corrected, authors = (Sam3DPredictor(model.sharing_weights(correction_trained=kind)) for kind in (True, False))

    @torch.no_grad()
    def background_click(predictor: Sam3DPredictor, previous: Optional[torch.Tensor] = None) -> torch.Tensor:
        return predictor.click_logits(encoding, both, labels, previous)

    rows["correction round with the previous mask (s)"], _ = timed(
        lambda: background_click(corrected, noise), repeats, "round"
    )
    # A refinement adding two prompts at once against one adding one (issue 26): a correction-trained model answers
    # in two rounds, the first prompt's (kept from the request before) and all prompts', so that the answer is a
    # function of the request alone (whoever sent the prompts before, on whichever server); an authors' checkpoint
    # decodes all prompts at once.
    third = refine + torch.tensor([0, 4, 0], device=device)
    one_added, two_added = (
        Clicks(torch.cat(points).cpu().numpy(), np.zeros((0, 3)), "crop") for points in ([clicks, refine], [clicks, refine, third])
    )
    for kind, predictor in (("correction-trained", corrected), ("authors' checkpoint", authors)):
        with torch.no_grad():
            first_answer = predictor.correction_logits(encoding, first)

        @torch.no_grad()
        def refinement(added: Clicks, predictor=predictor, first_answer=first_answer) -> torch.Tensor:
            memo = CropRounds(BoundedCache(2**40, tensor_bytes), "benchmark")  # the request before: the first click
            memo.put(*first.points_and_labels(device), first_answer)
            return predictor.correction_logits(encoding, added, memo)

        one, _ = timed(lambda: refinement(one_added), repeats, f"{kind}: one prompt added")
        two, _ = timed(lambda: refinement(two_added), repeats, f"{kind}: two prompts added")
        rows[f"{kind}: refinement adding one prompt (s)"] = one
        rows[f"{kind}: refinement adding two prompts at once (s)"] = two
        rows[f"{kind}: two prompts at once / one (ratio)"] = two / one
    # The refiner alone (part of every round of a correction-trained model): over the whole crop in a first round,
    # in the bounding box of the masks and clicks in a correction round (here a 40-voxel lesion's); the second click
    # a foreground one, whose intensity likeness it also computes.
    points, click_labels = both[None], torch.ones_like(labels)[None]
    answer = torch.stack([torch.zeros_like(lesion), lesion])[None]
    for name, mask in (("first round, whole crop", None), ("correction round, 40-voxel lesion", lesion[None, None])):
        rows[f"refiner, {name} (s)"], _ = timed(
            torch.no_grad()(lambda: model.refiner(encoding.image, answer, points, click_labels, mask)), repeats, "refiner"
        )
    with torch.no_grad():
        for p, value in zip(last.parameters(), untrained):
            p.copy_(value)
    rows["background click by the rule (s)"], _ = timed(lambda: background_click(authors), repeats, "rule")
    # In a session the rule's foreground answer was computed by the request before (the memo keeps it): a
    # background click then decodes the background side only.
    with torch.no_grad():
        foreground_answer = authors.object_logits(encoding, clicks, None, None)

    @torch.no_grad()
    def background_click_after_foreground() -> torch.Tensor:
        memo = CropRounds(BoundedCache(2**40, tensor_bytes), "benchmark")
        memo.put(clicks, torch.ones(len(clicks), dtype=torch.long, device=device), foreground_answer)
        return authors.click_logits(encoding, both, labels, memo=memo)

    rows["background click by the rule, foreground answer kept (s)"], _ = timed(
        background_click_after_foreground, repeats, "rule, kept"
    )
    return rows


def random_encoding(model) -> CropEncoding:
    """An encoding of the right shapes without the encoder's minute on a CPU (the decoder's timings do not
    depend on the values)."""
    size = model.crop_size
    grid = size // 4  # the decoder answers at four times its deepest map's grid
    deep = model.prompt_encoder.click_type.shape[1]
    head = model.mask_decoder.classifier[0].weight.shape[0]
    return CropEncoding(
        torch.randn(1, head, 2 * grid, 2 * grid, 2 * grid, device=model.device),
        torch.randn(1, deep, grid, grid, grid, device=model.device),
        torch.randn(1, 1, size, size, size, device=model.device),
    )


def model_figures(args) -> Dict[str, str]:
    device = args.device
    torch.manual_seed(0)
    reference = ReferenceModel(args.reference, device) if args.reference else None
    if reference:
        path = os.path.join(tempfile.mkdtemp(), "reference.pth.tar")
        torch.save(reference.checkpoint(), path)
        model = build_sam3d(checkpoint=path)
    else:
        model = build_sam3d(backbone=args.backbone)
    model.to(device)
    size = model.crop_size
    crop = torch.randn(size, size, size, device=device)
    clicks = torch.tensor([[size // 2, size // 2 + 3, size // 2 - 5]], device=device)
    refine = clicks + torch.tensor([[2, -4, 6]], device=device)
    first, refined = (Clicks.from_points(c, None, "crop") for c in (clicks, refine))

    def first_click(served=model):
        return Sam3DPredictor(served).foreground_probability(served.encode(crop[None, None]), first)

    rows = {}
    rows["first click (s)"], prob = timed(first_click, args.repeats, "first click")
    encoding = model.encode(crop[None, None])
    rows.update(correction_figures(model, encoding, first, refined, args.repeats))
    if reference:
        rows["reference forward (s)"], reference_prob = timed(lambda: reference.predict(crop, clicks), args.repeats, "reference")
        rows["first click speed-up vs reference"] = rows["reference forward (s)"] / rows["first click (s)"]
        rows["refinement speed-up vs reference"] = rows["reference forward (s)"] / rows["refinement click, cached (s)"]
        rows["max |p_ours - p_reference|"] = (prob.float() - reference_prob.float()).abs().max().item()
    if args.bfloat16:
        half_model = model.sharing_weights(bfloat16=True)
        rows["first click, bfloat16 (s)"], half = timed(lambda: first_click(half_model), args.repeats, "first click bf16")
        half, prob = half.float(), prob.float()
        rows["max |p_bf16 - p_fp32|"] = (half - prob).abs().max().item()
        a, b = half > 0.5, prob > 0.5
        rows["Dice(bf16 mask, fp32 mask)"] = (2 * (a & b).sum() / (a.sum() + b.sum()).clamp(min=1)).item()
        if reference:
            rows["first click bfloat16 speed-up vs reference"] = rows["reference forward (s)"] / rows["first click, bfloat16 (s)"]
    macs = count_macs(first_click)
    throughput = matmul_throughput(device)
    rows["first click MACs (counted)"] = macs
    rows["matmul throughput (MAC/s, float32)"] = throughput
    rows["first click share of the floor (MACs / throughput / time)"] = macs / throughput / rows["first click (s)"]
    if device.startswith("cuda"):
        rows["peak GPU memory (GiB)"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        rows["peak RSS (GiB)"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return rows


def ct_like_volume(path: str, shape=(512, 512, 200)) -> List[int]:
    """A 512x512x200 CT-like volume (0.7 x 0.7 x 1.5 mm) with a lesion; returns a click inside the lesion."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    i, j, k = np.ogrid[: shape[0], : shape[1], : shape[2]]
    image = np.full(shape, -1000, np.int16)
    body = ((i - 256) / 230.0) ** 2 + ((j - 256) / 170.0) ** 2 <= 1
    image[np.broadcast_to(body, shape)] = 40
    lesion = ((i - 300) / 20.0) ** 2 + ((j - 220) / 20.0) ** 2 + ((k - 100) / 10.0) ** 2 <= 1
    image[lesion] = 120
    image += rng.normal(0, 10, shape).astype(np.int16)
    nib.save(nib.Nifti1Image(image, np.diag([0.7, 0.7, 1.5, 1.0])), path)
    return [300, 220, 100]


def rest_figures(args) -> Dict[str, str]:
    """One image, first click then a cached click, through a real server on loopback."""
    studies = tempfile.mkdtemp()
    click = ct_like_volume(os.path.join(studies, "ct_512.nii.gz"))
    with socket.socket() as probe:  # a free port on loopback
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    conf = ["--conf", "backbone", args.backbone, "--conf", "sam_checkpoint", "none", "--conf", "warmup", "true"]
    log = open(os.path.join(studies, "server.log"), "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "monailabel.main", "start_server", "--app", os.path.join(ROOT, "apps", "sam3d"),
         "--studies", studies, "--host", "127.0.0.1", "--port", str(port), *conf],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:  # until the server answers and the model is warm
            try:
                info = json.loads(urllib.request.urlopen(f"{url}/info/", timeout=5).read())
                if info["models"]["sam3d"]["warmed_up"]:
                    break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError("the server did not start; see " + log.name)
            time.sleep(1)
        rows = {}
        refinement = [click, [click[0] + 3, click[1] - 2, click[2]]]  # one more click on the same lesion
        for name, clicks in (("first", [click]), ("refinement", refinement)):
            body = json.dumps({"foreground": clicks}).encode()
            boundary = "benchmark"
            form = f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n'.encode() + body
            form += f"\r\n--{boundary}--\r\n".encode()
            request = urllib.request.Request(
                f"{url}/infer/sam3d?image=ct_512&output=json", data=form,
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
            )
            start = time.perf_counter()
            result = json.loads(urllib.request.urlopen(request, timeout=1800).read())
            total = time.perf_counter() - start
            rows[f"REST {name} click, end to end (s)"] = total
            rows[f"REST {name} click, model (s)"] = result["model_seconds"]
            rows[f"REST {name} click, server overhead share"] = 1 - result["model_seconds"] / total
            rows[f"REST {name} click, encoder runs"] = result["encoder_runs"]
        # A replica's memory for deployment sizing: the server and what it started, after both clicks.
        processes = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
        rows["REST server resident memory after the clicks (GiB)"] = sum(p.memory_info().rss for p in processes) / 2**30
        return rows
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()
        shutil.rmtree(studies, ignore_errors=True)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_b")
    parser.add_argument("--tiny", action="store_true", help="the tiny configuration (a smoke run)")
    parser.add_argument("--reference", help="a local checkout of med-air/3DSAM-adapter (vit_b only)")
    parser.add_argument("--bfloat16", action="store_true", help="also time the bfloat16 path and its output change")
    parser.add_argument("--rest", action="store_true", help="also time a click through a server on loopback")
    parser.add_argument("--rest-only", action="store_true", help="only the server figures")
    parser.add_argument("--corrections-only", action="store_true",
                        help="only the refinement and correction figures, on a random encoding (no encoder run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.tiny:
        args.backbone = "tiny"
    if args.reference and not os.path.isdir(args.reference):
        print(f"no reference checkout at {args.reference}: skipping the side-by-side comparison")
        args.reference = None
    if args.reference and args.backbone != "vit_b":
        print("the reference implementation exists for vit_b only: skipping the side-by-side comparison")
        args.reference = None
    torch.set_num_threads(args.threads)

    if args.corrections_only:
        torch.manual_seed(0)
        model = build_sam3d(backbone=args.backbone).to(args.device).eval()
        first, refined = (Clicks([[model.crop_size // 2 + d, model.crop_size // 2, model.crop_size // 2]], [], "crop")
                          for d in (0, 4))
        rows = correction_figures(model, random_encoding(model), first, refined, args.repeats)
    else:
        rows = {} if args.rest_only else model_figures(args)
    if args.rest or args.rest_only:
        rows.update(rest_figures(args))
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    print(f"machine: {device}; {os.cpu_count()} cores; torch {torch.__version__}; threads {torch.get_num_threads()}")
    print(f"configuration: {args.backbone}; repeats {args.repeats} (median after one warm-up)")
    for name, value in rows.items():
        print(f"{name:<62} {value:.4g}")


if __name__ == "__main__":
    main()
