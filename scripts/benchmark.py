"""sam3d's benchmarks, one command (figures, machines and commands: docs/benchmarks.md):

    .venv/bin/python scripts/benchmark.py clicks [--reference ../3DSAM-adapter] [--bfloat16] [--rest] [--tiny]
    .venv/bin/python scripts/benchmark.py training [--reference ../3DSAM-adapter] [--variants ...] [--tiny]
    .venv/bin/python scripts/benchmark.py preprocessing [--shape 512 512 300 --spacing 0.8 0.8 2.5]
    .venv/bin/python scripts/benchmark.py large-lesion [--checkpoint tiny.pt --extent 2] [--bfloat16]

`scripts/benchmark.py SUBCOMMAND --help` lists a subcommand's options.
"""

import importlib
import os
import sys

SUBCOMMANDS = {
    "clicks": ("benchmarks.clicks", "latency and memory of a first and a refinement click, beside the reference"),
    "training": ("benchmarks.training", "time and memory of a training step, beside the reference's"),
    "preprocessing": ("benchmarks.preprocessing", "resampling a large CT: MONAI's Spacingd against sam3d's"),
    "large-lesion": ("benchmarks.large_lesion", "a first click on a lesion larger than the crop, followed"),
}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in SUBCOMMANDS:
        listed = "\n".join(f"  {name:14} {what}" for name, (_, what) in SUBCOMMANDS.items())
        print(f"{__doc__}\nsubcommands:\n{listed}", file=sys.stderr)
        return 0 if sys.argv[1:2] in (["-h"], ["--help"]) else 2
    # The app's `lib` for every benchmark (scripts/ is on the path already: this file's folder).
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "apps", "sam3d"))
    name = sys.argv[1]
    sys.argv[0] = f"{sys.argv[0]} {name}"  # argparse's usage line names the subcommand
    importlib.import_module(SUBCOMMANDS[name][0]).main(sys.argv[2:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
