#!/usr/bin/env bash
# Build the images the real node runs, with podman, from the repository's own Dockerfiles (unchanged but for
# BASE_IMAGE), on a Debian bookworm base made by mmdebstrap from Debian's packages (no registry needed):
#   sftjob-operator  operator/Dockerfile
#   sftjob-trainer   trainer_image/Dockerfile (the ML stack layer is rebuilt only when install.sh or the
#                    constraints change: podman's layer cache; the code and model-cache layers when they do)
#   sftjob-pause     the pod sandbox, from build.sh's static pause binary
# Each image is tagged by its image id (recorded in $CACHE/images/images.env); tests/testbed/images.py streams
# an image from podman into the node's containerd only when that tag is missing there (its store persists
# in the cache). Idempotent: seconds when warm.
#
#   bash tests/testbed/images.sh          # (provision.sh runs it)
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE=${SFTJOB_TESTBED_CACHE:-$HOME/.cache/sftjob-testbed}
OUT=$CACHE/images
BASE_PACKAGES=python3,python3-venv,ca-certificates
BASE=localhost/sftjob-base:bookworm-$(echo "$BASE_PACKAGES" | sha256sum | cut -c1-8)
mkdir -p "$OUT"

log() { printf '[images %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

# This sandbox lacks CAP_SYS_RESOURCE: podman's default rlimits (above the hard limits) fail every RUN
# with "error setting rlimit type 7". Lower defaults, for the build containers only.
export CONTAINERS_CONF=$OUT/containers.conf
printf '[containers]\ndefault_ulimits = ["nofile=4096:4096", "nproc=8192:8192"]\n' > "$CONTAINERS_CONF"

# The host's CA bundle and pip config (e.g. a TLS-intercepting egress proxy), mounted into build steps
# only: nothing of the host is baked into the images.
BUILD_MOUNTS=()
[[ -d /etc/ssl/certs ]] && BUILD_MOUNTS+=(-v /etc/ssl/certs:/etc/ssl/certs:ro)
[[ -f /etc/pip.conf ]] && BUILD_MOUNTS+=(-v /etc/pip.conf:/etc/pip.conf:ro)

base_image() {
  podman image exists "$BASE" && return 0
  log "building $BASE with mmdebstrap (Debian packages: $BASE_PACKAGES)"
  local tar=$OUT/rootfs.tar
  mmdebstrap --quiet --variant=minbase --include="$BASE_PACKAGES" bookworm "$tar" http://deb.debian.org/debian
  podman import --quiet "$tar" "$BASE" >/dev/null
  rm -f "$tar"
}

# tag_by_id NAME REF: tag REF by its image id, drop older tags, record it in images.env.
tag_by_id() {
  local name=$1 ref=$2 id tagged
  id=$(podman image inspect --format '{{.Id}}' "$ref" | cut -c1-12)
  tagged=localhost/$name:$id
  podman tag "$ref" "$tagged"
  # Earlier builds' tags (their layers go with the prune below).
  podman images --noheading --format '{{.Repository}}:{{.Tag}}' "localhost/$name" |
    { grep -vE ":(build|$id)\$" || true; } | xargs -r podman rmi --force >/dev/null
  echo "${name//-/_}_IMAGE=$tagged" >> "$OUT/images.env.tmp"
}

build() {  # build NAME DOCKERFILE
  local name=$1 dockerfile=$2 t0=$SECONDS
  log "building $name from $dockerfile"
  podman build --quiet --network=host "${BUILD_MOUNTS[@]}" --layers \
    --build-arg "BASE_IMAGE=$BASE" -f "$REPO/$dockerfile" -t "localhost/$name:build" "$REPO" >/dev/null
  log "$name built in $((SECONDS - t0)) s"
  tag_by_id "$name" "localhost/$name:build"
}

pause_image() {
  local bin
  bin=$(sed -n 's/^PAUSE_BIN=//p' "$CACHE/versions.env")/pause
  [[ -x $bin ]] || { echo "pause binary missing: run tests/testbed/build.sh" >&2; exit 1; }
  if ! podman image exists localhost/sftjob-pause:build ||
    [[ $(podman image inspect --format '{{index .Labels "bin-sha"}}' localhost/sftjob-pause:build) != \
      $(sha256sum "$bin" | cut -c1-16) ]]; then
    local ctr
    ctr=$(buildah from scratch)
    buildah copy --quiet "$ctr" "$bin" /pause >/dev/null
    buildah config --entrypoint '["/pause"]' --label "bin-sha=$(sha256sum "$bin" | cut -c1-16)" "$ctr"
    buildah commit --quiet "$ctr" localhost/sftjob-pause:build >/dev/null
    buildah rm "$ctr" >/dev/null
  fi
  tag_by_id sftjob-pause localhost/sftjob-pause:build
}

t_all=$SECONDS
rm -f "$OUT/images.env.tmp"
base_image
pause_image
build sftjob-operator operator/Dockerfile
build sftjob-trainer trainer_image/Dockerfile
mv "$OUT/images.env.tmp" "$OUT/images.env"
# Old tags and dangling layers of earlier builds: the trainer image is GBs.
podman image prune --force >/dev/null || true
log "images ready in $((SECONDS - t_all)) s: $(tr '\n' ' ' < "$OUT/images.env")"
