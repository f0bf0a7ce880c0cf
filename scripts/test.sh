#!/usr/bin/env bash
# Set up and run the whole test suite (CPU). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# tests/test_dicomweb.py runs a real Orthanc PACS with its DICOMweb plugin and OHIF in Chromium (Debian packages).
if [ ! -x /usr/sbin/Orthanc ] || [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || [ ! -x /usr/bin/chromium ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends orthanc orthanc-dicomweb chromium
fi
exec .venv/bin/python -m pytest tests "$@"
