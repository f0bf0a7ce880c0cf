#!/usr/bin/env bash
# Set up, write the demo studies (unless SAM3D_STUDIES names a folder), and start the sam3d MONAI Label server on loopback.
# Extra arguments go to `monailabel start_server`, e.g. --conf backbone tiny --conf preset lits
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# SAM3D_STUDIES: a studies folder of one's own (e.g. made by scripts/import_dataset.py), served as it is.
studies=${SAM3D_STUDIES:-studies/demo}
[ -n "${SAM3D_STUDIES:-}" ] || .venv/bin/python scripts/make_demo_studies.py --out "$studies"
export PATH="$PWD/.venv/bin:$PATH"  # monailabel's launcher runs the `python` on PATH
exec monailabel start_server --app apps/sam3d --studies "$studies" --host 127.0.0.1 --port "${PORT:-8000}" "$@"
