"""Write deterministic CT-like demo studies with tumour-like lesions, in MONAI Label's local datastore layout.

    python scripts/make_demo_studies.py --out studies/demo
    python scripts/make_demo_studies.py --hard 24 --seed 3000 --out studies/hard   # held-out hard lesions
    python scripts/make_demo_studies.py --large 12 --seed 5000 --out studies/large  # lesions 1.5-3 tiny crops

Images go to ``OUT/<id>.nii.gz`` and lesion masks to ``OUT/labels/final/<id>.nii.gz``; large and hard studies also record
their lesion kinds in ``OUT/lesion_kinds.json`` (the phantoms: ``apps/sam3d/lib/phantoms.py``).
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "apps", "sam3d"))

from lib.phantoms import STUDIES, hard_studies, large_studies, random_studies, write_studies  # noqa: E402

logger = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="studies/demo", help="datastore folder to write into")
    parser.add_argument("--force", action="store_true", help="rewrite studies that already exist")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--random", type=int, metavar="N", help="write N random studies (training data) instead")
    choice.add_argument("--hard", type=int, metavar="N", help="write N hard studies (one lesion each, kinds in turn)")
    choice.add_argument("--large", type=int, metavar="N", help="write N studies of one lesion larger than a crop")
    parser.add_argument("--crop-mm", type=float, default=32.0,
                        help="--large: the model's crop in mm (32: tiny, 128: the paper's); lesions are 1.5-3 of it")
    parser.add_argument("--seed", type=int, help="seed of the random, hard or large studies (default: the generator's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    seed = {} if args.seed is None else {"seed": args.seed}
    if args.random:
        studies = random_studies(args.random, **seed)
    elif args.hard:
        studies = hard_studies(args.hard, **seed)
    elif args.large:
        studies = large_studies(args.large, crop_mm=args.crop_mm, **seed)
    else:
        studies = STUDIES
    written = write_studies(args.out, args.force, studies)
    logger.info(f"{len(written)} studies written to {args.out} ({len(studies) - len(written)} already there)")


if __name__ == "__main__":
    main()
