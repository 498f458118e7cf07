#!/usr/bin/env bash
# Every image the compose stack runs, built on this machine with no image registry (as root, with
# dockerd running and Debian's debootstrap installed). From the repository root:
#   deploy/local/build-images.sh
#   CONVSERVE_BASE=convserve-base:bookworm docker-compose up --no-build --scale server=2 trainer server lb prometheus
# 1. The base: Debian bookworm from Debian's packages (build-base.sh), made once and kept under a tag
#    named by the hash of build-base.sh; it is printed last, for CONVSERVE_BASE.
# 2. convserve:cpu and convserve-train:cpu FROM it, with BuildKit. Docker's layer cache keeps their
#    pip layers until the Dockerfiles, pyproject.toml or deploy/requirements.lock change: a second
#    run rebuilds only the layers with the code.
# 3. Stand-ins for the nginx and Prometheus images, from Debian's packages, tagged with the compose
#    file's names, never over a real image of that name (one without the stand-in label). Grafana has
#    no Debian package: the stack runs without it here.
# PIP_CERT (a CA bundle) reaches pip as the build secret pip_cert, never a layer. A torch wheel for
# the base's Python found in pip's find-links (PIP_FIND_LINKS, or pip's configuration) goes to deploy/wheels/ and is
# installed from there (TORCH_INDEX empty); otherwise torch comes from its CPU index.
set -euo pipefail
cd "$(dirname "$0")/../.."

# A docker client that builds with BuildKit: one with buildx, or one from before Docker 23 (built in)
docker_cli() {
    local d version
    for d in ${DOCKER:-} docker /usr/bin/docker; do
        command -v "$d" >/dev/null || continue
        if "$d" buildx version >/dev/null 2>&1; then echo "$d"; return; fi
        version="$("$d" --version | sed -n 's/^Docker version \([0-9]*\)\..*/\1/p')"
        if [ -n "$version" ] && [ "$version" -lt 23 ]; then echo "$d"; return; fi
    done
    echo "no docker client that builds with BuildKit (install buildx)" >&2
    return 1
}
docker="$(docker_cli)"
export DOCKER_BUILDKIT=1

base="convserve-base:bookworm-$(sha256sum deploy/local/build-base.sh | cut -c1-12)"
if ! "$docker" image inspect "$base" >/dev/null 2>&1; then
    deploy/local/build-base.sh "$base" >/dev/null
fi

secret=()
if [ -n "${PIP_CERT:-}" ] && [ -s "$PIP_CERT" ]; then
    secret=(--secret "id=pip_cert,src=$PIP_CERT")
fi

torch_version="$(sed -n 's/^ARG TORCH_VERSION=//p' deploy/Dockerfile.train)"
python_tag="$("$docker" run --rm "$base" python3 -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
torch_index=()
find_links="${PIP_FIND_LINKS:-} $(python3 -m pip config get global.find-links 2>/dev/null || true)"
for dir in $find_links; do
    for wheel in "$dir"/torch-"$torch_version"+cpu-"$python_tag"-"$python_tag"-*linux*_x86_64.whl; do
        [ -f "$wheel" ] || continue
        target="deploy/wheels/$(basename "$wheel")"
        if [ ! -f "$target" ]; then
            ln -f "$wheel" "$target.part" 2>/dev/null || cp "$wheel" "$target.part"
            mv "$target.part" "$target"
        fi
        torch_index=(--build-arg TORCH_INDEX=)
        break 2
    done
done

build() {  # build TAG DOCKERFILE [ARGS...]
    local tag="$1" file="$2"
    shift 2
    "$docker" build --quiet -f "$file" --build-arg BASE="$base" "$@" -t "$tag" . >/dev/null
}
build convserve:cpu deploy/Dockerfile "${secret[@]}"
build convserve-train:cpu deploy/Dockerfile.train "${secret[@]}" "${torch_index[@]}"

standin() {  # standin DOCKERFILE IMAGE: tag the stand-in IMAGE unless a real IMAGE is here
    local file="$1" image="$2"
    if "$docker" image inspect "$image" >/dev/null 2>&1 \
        && [ -z "$("$docker" image inspect -f '{{index .Config.Labels "org.convserve.stand-in"}}' "$image")" ]; then
        return
    fi
    build "$image" "$file"
}
standin deploy/local/Dockerfile.nginx "$(sed -n 's/^    image: \(nginx:.*\)$/\1/p' docker-compose.yml)"
standin deploy/local/Dockerfile.prometheus "$(sed -n 's/^    image: \(prom\/prometheus:.*\)$/\1/p' docker-compose.yml)"
echo "$base"
