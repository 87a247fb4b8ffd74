#!/usr/bin/env bash
# Docker for the docker tests, on a fresh Debian machine as root: the daemon from Debian,
# a base image made from Debian packages (Docker Hub is out of reach from CI), and the
# provider image built on it by `mltask image build`. Idempotent: steps already done are
# skipped, so a developer can run it again.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
BASE=mltask-base:bookworm
MIRROR=$(awk '/^URIs:/ && $2 ~ /debian\/?$/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)

if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq docker.io debootstrap >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
    nohup dockerd >/tmp/dockerd.log 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null || { tail -20 /tmp/dockerd.log; exit 1; }
fi
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    rootfs=$(mktemp -d)
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" ${MIRROR:+"$MIRROR"} >/dev/null
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import - "$BASE" >/dev/null
    rm -rf "$rootfs"
fi
pip install -q -e ".[dev]"
# --with lightgbm: the docker tests run LightGBM searches (dev installs it; the image pins its version)
mltask image build --base "$BASE" --with lightgbm

# gvmkit-build (mltask image gvmi) runs its squashfs step in the image scx1332/squashfs,
# which lives on Docker Hub: a stand-in with the same tools, from Debian packages.
if ! docker image inspect scx1332/squashfs:latest >/dev/null 2>&1; then
    printf 'FROM %s\nRUN apt-get update -qq && apt-get install -y -qq squashfs-tools >/dev/null \\\n && rm -rf /var/lib/apt/lists/* && mkdir -p /work/in /work/out\n' "$BASE" \
        | docker build -q --network host -t scx1332/squashfs:latest - >/dev/null
fi
