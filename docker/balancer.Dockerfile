# nginx from Debian's packages in front of the sam3d replicas of docker/compose.scale.yml, configured by
# docker/nginx.conf (scripts/balancer.py's output: one image's requests to one replica, retries on another).
#   docker build -f docker/balancer.Dockerfile -t sam3d-balancer .
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ARG DEBIAN_FRONTEND=noninteractive
# Debian's package versions within a release only take security fixes (see docker/Dockerfile).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends nginx-light curl \
    && rm -rf /var/lib/apt/lists/*

COPY docker/nginx.conf /etc/nginx/nginx.conf
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8000/info/"]
# The master binds the port and drops its workers to Debian's www-data (docker/nginx.conf's `user`).
# hadolint ignore=DL3002
CMD ["nginx", "-g", "daemon off;"]
