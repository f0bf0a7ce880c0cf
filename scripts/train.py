"""Fine-tune sam3d offline on a labelled dataset, as the server's train task does, and save our checkpoint.

    .venv/bin/python scripts/train.py DATA --sam-checkpoint sam_vit_b_01ec64.pth --preset pancreas --out sam3d.pt
    .venv/bin/python scripts/train.py studies/train --backbone tiny --steps 400 --out tiny.pt   # the demo recipe

DATA is an MSD-layout folder (imagesTr/labelsTr) or a MONAI Label studies folder (labels/final/). Over a SAM
backbone only the paper's parameter-efficient parts train; with no SAM checkpoint everything trains. A run
saves its state beside --out every --save-every steps and resumes from it when started again with the same
settings and global batch (--batch-size), on any number of processes.

Under torchrun it trains with PyTorch's DistributedDataParallel, one process per GPU (or CPU process, gloo),
each drawing its share of every step's --batch-size crops; the first process saves the state and publishes:

    .venv/bin/torchrun --standalone --nproc-per-node 4 scripts/train.py DATA --batch-size 4 --out sam3d.pt
    # several nodes: the same command on each, with --nnodes 2 --node-rank N --rdzv-backend c10d
    #   --rdzv-endpoint HOST:29400 --rdzv-id RUN in place of --standalone (docs/deployment.md)
"""

import argparse
import logging
import os
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "apps", "sam3d"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from lib.cases import find_cases  # noqa: E402
from lib.model import CONFIGS, build_sam3d  # noqa: E402
from lib.model.build import ModelSource  # noqa: E402
from lib.training.fit import batch_share  # noqa: E402
from lib.training.job import TrainingJob, train_and_publish  # noqa: E402
from lib.transforms.planning import AUTO, named_label_value, resolve_preset  # noqa: E402
from lib.transforms.presets import PRESETS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="MSD-layout folder (imagesTr/labelsTr) or MONAI Label studies folder")
    parser.add_argument("--out", required=True, help="where to write our checkpoint")
    parser.add_argument("--checkpoint", help="start from this checkpoint (ours or the authors')")
    parser.add_argument("--backbone", choices=sorted(CONFIGS))
    parser.add_argument("--sam-checkpoint", help="SAM weights for the frozen backbone")
    parser.add_argument("--preset", default="ct", choices=sorted(PRESETS) + [AUTO],
                        help="auto: the starting checkpoint's recorded preset, else planned from the data's labels")
    parser.add_argument("--label-value", type=int, help="the tumour's label value (default: the preset's, else any > 0)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--learning-rate", type=float, help="peak learning rate (default: the configuration's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, help="crops per step over all processes (default or 0: one per process)")
    parser.add_argument("--save-every", type=int, default=25, help="steps between saves of the resumable state")
    parser.add_argument("--activation-checkpointing", choices=("true", "false"), type=str.lower,
                        help="recompute activations in the backward pass (default: on, except for the tiny configuration)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bfloat16", action="store_true", help="bfloat16 autocast (the default on a GPU)")
    args = parser.parse_args()
    rank, world = join_torchrun(args)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=f"[rank {rank}] %(message)s")
    try:
        batch_share(args.batch_size, world)
    except ValueError as e:
        raise SystemExit(f"--batch-size: {e}") from None

    torch.manual_seed(args.seed)
    bfloat16 = args.bfloat16 or args.device.startswith("cuda")
    model = build_sam3d(args.checkpoint, args.backbone, args.sam_checkpoint, bfloat16).to(args.device)
    backbone = model.weights_info["backbone"]

    label_value = args.label_value or named_label_value(args.preset)
    try:
        cases = find_cases(args.data)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    preset_name, preset = resolve_preset(args.preset, model.weights_info["meta"],
                                         lambda: [(image, label) for _, image, label in cases], model.crop_size,
                                         label_value, len(cases))
    checkpointing = None if args.activation_checkpointing is None else args.activation_checkpointing == "true"
    source = ModelSource(args.out, args.checkpoint, backbone, args.sam_checkpoint, model.bfloat16, args.device)
    job = TrainingJob(
        source=source,
        preset_name=preset_name,
        preset=preset,
        backbone=backbone,
        train=[{"image": image, "label": label} for _, image, label in cases],
        val=[],
        skipped={},
        options={"steps": args.steps, "learning_rate": args.learning_rate, "seed": args.seed,
                 "activation_checkpointing": checkpointing, "batch_size": args.batch_size, "save_every": args.save_every},
        publish_path=args.out,
        stats_path=None,
        state_path=args.out + ".state",
        label_value=label_value,
    )
    try:
        train_and_publish(model, job, rank, world)
    finally:
        if world > 1:
            dist.destroy_process_group()
    logging.info(f"{args.out}: {len(model.trained_names)} trained tensors, {args.steps} steps")


def join_torchrun(args: argparse.Namespace) -> tuple:
    """(rank, world size): under torchrun (WORLD_SIZE > 1) this process joins the run's process group and takes
    its local GPU; otherwise (0, 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return dist.get_rank(), world


if __name__ == "__main__":
    main()
