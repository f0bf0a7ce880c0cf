#!/usr/bin/env bash
# Container entry point: serve SAM3D_STUDIES (a folder, or a DICOMweb URL such as http://orthanc:8042/dicom-web);
# an empty folder gets the demo studies. SAM3D_CONF adds server options, e.g. "--conf preset pancreas".
set -euo pipefail
studies="${SAM3D_STUDIES:-/data/studies}"
if [[ "$studies" != http* ]] && [ -z "$(ls -A "$studies" 2>/dev/null)" ]; then
    python scripts/make_demo_studies.py --out "$studies"
fi
# Inside the container the server listens on every interface; publish the port on the host's loopback unless
# MONAI Label's authentication is configured (see README).
# shellcheck disable=SC2086  # SAM3D_CONF is a list of options
exec monailabel start_server --app apps/sam3d --studies "$studies" --host 0.0.0.0 --port 8000 ${SAM3D_CONF}
