#!/usr/bin/env bash
# A Debian bookworm base image made from Debian's packages alone, for machines that reach no image
# registry: debootstrap (minbase) with python3, python3-venv and ca-certificates, then `docker import`.
#   deploy/local/build-base.sh [TAG]          (default convserve-base:bookworm; needs root and debootstrap)
# The images take it as their base: docker build --build-arg BASE=convserve-base:bookworm ...
set -euo pipefail
tag="${1:-convserve-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
root="$(mktemp -d /var/tmp/convserve-base.XXXXXX)"
trap 'rm -rf "$root"' EXIT

debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" >&2
# an image, not a machine: no package lists or caches, and apt inside it finds the same mirror
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
echo "deb $mirror bookworm main" > "$root/etc/apt/sources.list"
tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' - "$tag" >&2
echo "$tag"
