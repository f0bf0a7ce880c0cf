#!/usr/bin/env bash
# Build the sam3d image with podman (or Docker) where no image registry can be reached:
#   bash scripts/container.sh [TAG [DOCKERFILE [BUILD_OPTION...]]]   (localhost/sam3d:latest, docker/Dockerfile)
#   bash scripts/container.sh localhost/sam3d-orthanc:latest docker/orthanc.Dockerfile   (for compose.yaml)
# The base image (SAM3D_BASE_IMAGE, default localhost/sam3d-base:bookworm) is made first if it is missing:
# Debian bookworm (Python 3.11) written by debootstrap from Debian's package mirror (DEBIAN_MIRROR), as root.
# With podman, pip inside the build gets this machine's pip configuration (its settings and environment, merged
# into one file, PIP_CONFIG_FILE) and the local indexes, wheels and files it names, mounted read-only.
# Where a registry can be reached, `docker build -f docker/Dockerfile -t sam3d .` builds on the CUDA base instead.
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-localhost/sam3d:latest}
dockerfile=${2:-docker/Dockerfile}
shift $(($# < 2 ? $# : 2))  # the rest go to the build, e.g. --no-cache
base=${SAM3D_BASE_IMAGE:-localhost/sam3d-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if command -v podman >/dev/null; then
    engine=(podman)
    [ -d /run/systemd/system ] || engine+=(--cgroup-manager cgroupfs)  # no systemd to manage cgroups
elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    engine=(docker)
else
    echo "container.sh: no container engine can run here (install podman: apt-get install podman)" >&2
    exit 3
fi

if ! "${engine[@]}" image inspect "$base" >/dev/null 2>&1; then
    if [ "$base" != localhost/sam3d-base:bookworm ]; then
        echo "container.sh: base image $base is missing; pull it first" >&2
        exit 3
    fi
    command -v debootstrap >/dev/null || { echo "container.sh: debootstrap is needed to make $base" >&2; exit 3; }
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    echo "container.sh: making $base with debootstrap from $mirror"
    debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
        || { tail -20 "$rootfs.log" >&2; exit 1; }
    rm -f "$rootfs.log"
    # Security fixes and point updates, as Debian's own images list them.
    cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb ${mirror%/debian}/debian-security bookworm-security main
EOF
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | "${engine[@]}" import - "$base"
    rm -rf "$rootfs"
    trap - EXIT
fi

build=(build -f "$dockerfile" -t "$tag" --build-arg "BASE_IMAGE=$base")
[ "${engine[0]}" = podman ] && build+=(--format docker)  # OCI images have no HEALTHCHECK
if [ "${engine[0]}" = podman ] && python3 -m pip --version >/dev/null 2>&1; then
    # pip's effective configuration (files and PIP_* variables) as one file, with the local paths it names
    # (indexes, wheels, constraints, CA bundle) mounted under /run/pip-build: the image keeps only that empty folder.
    conf=$(mktemp -d)
    trap 'rm -rf "$conf"' EXIT
    python3 - "$conf" <<'EOF' >"$conf/mounts"
import os, subprocess, sys
conf, root = sys.argv[1], "/run/pip-build"
listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
settings = {}
for line in listed.splitlines():  # scope.key='value'; the environment's (":env:") come last and win
    key, _, value = line.partition("=")
    settings[key.split(".", 1)[1]] = value.strip("'\"")
mounts = set()
for key, value in settings.items():
    items = []
    for item in value.split():
        scheme = "file://" if item.startswith("file://") else ""
        path = item.removeprefix(scheme)
        if os.path.isabs(path) and os.path.exists(path):
            # an index's pages link to files beside its simple/ folder
            mounts.add(os.path.dirname(path) if path.rstrip("/").endswith("/simple") else path)
            item = scheme + root + "/host" + path
        items.append(item)
    settings[key] = " ".join(items)
for path in mounts:  # mount points made beforehand: the folder is mounted read-only
    stub = conf + "/host" + path
    os.makedirs(stub if os.path.isdir(path) else os.path.dirname(stub), exist_ok=True)
    if not os.path.isdir(path):
        open(stub, "w").close()
    print(f"{path}:{root}/host{path}:ro")
with open(os.path.join(conf, "pip.conf"), "w") as f:
    f.write("[global]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items()))
EOF
    build+=(--build-arg PIP_CONFIG_FILE=/run/pip-build/pip.conf --volume "$conf:/run/pip-build:ro")
    while read -r mount; do
        build+=(--volume "$mount")
    done <"$conf/mounts"
fi
start=$(date +%s)
"${engine[@]}" "${build[@]}" "$@" .
echo "container.sh: built $tag in $(($(date +%s) - start)) s"
