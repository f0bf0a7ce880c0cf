#!/usr/bin/env bash
# Create .venv at the repository root and install requirements-dev.txt into it, and requirements-tools.txt apart
# into .venv/tools (their dependencies conflict with the app's); a no-op when up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.requirements.sha256
wanted=$(cat requirements.txt requirements-dev.txt requirements-tools.txt | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ]; then
  exit 0
fi
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements-dev.txt
rm -rf .venv/tools
.venv/bin/python -m pip install --quiet --no-warn-conflicts --target .venv/tools -r requirements-tools.txt
echo "$wanted" > "$stamp"
