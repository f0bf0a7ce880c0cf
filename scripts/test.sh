#!/usr/bin/env bash
# Set up and run the test suite (CPU). Extra arguments go to pytest.
#   bash scripts/test.sh          # everything (CI): servers, training, Chromium, Orthanc; the 15 slowest listed
#   bash scripts/test.sh --fast   # the inner loop: no server start, no training, no browser, PACS or container
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${1:-}" = "--fast" ]; then
    shift
    export SAM3D_TEST_FAST=1  # tests/conftest.py: a server started anyway fails the test
    exec .venv/bin/python -m pytest -m "not slow and not browser and not pacs and not container" "$@"
fi
# tests/test_dicomweb.py runs a real Orthanc PACS with its DICOMweb plugin and OHIF in Chromium, and
# tests/test_balancer.py puts nginx in front of two servers (Debian packages).
if [ ! -x /usr/sbin/Orthanc ] || [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || [ ! -x /usr/bin/chromium ] \
    || [ ! -x /usr/sbin/nginx ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends orthanc orthanc-dicomweb chromium \
        nginx-light
fi
exec .venv/bin/python -m pytest --durations=15 "$@"
