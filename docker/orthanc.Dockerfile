# Orthanc with its DICOMweb plugin from Debian's packages (the PACS that tests/test_dicomweb.py runs), for
# docker/compose.yaml: built here, so compose needs no image beyond a Debian base.
#   docker build -f docker/orthanc.Dockerfile -t sam3d-orthanc .
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
# Debian's package versions within a release only take security fixes (see docker/Dockerfile).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends orthanc orthanc-dicomweb curl \
    && rm -rf /var/lib/apt/lists/*

COPY docker/orthanc.json /etc/orthanc-compose/orthanc.json
RUN mkdir -p /var/lib/orthanc/db && chown -R orthanc:orthanc /var/lib/orthanc

# The system user that Debian's package creates.
# hadolint ignore=DL3066
USER orthanc
EXPOSE 8042
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8042/system"]
CMD ["Orthanc", "/etc/orthanc-compose/orthanc.json"]
