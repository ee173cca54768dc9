#!/usr/bin/env bash
# Build the test bed's binaries from Go modules into a cache outside the checkout (CI clones afresh).
# Idempotent: a component whose stamp file and binaries exist is skipped, so a warm run takes seconds.
#
#   tests/testbed/build.sh            # build whatever is missing
#   SFTJOB_TESTBED_CACHE=/x build.sh  # another cache root (default ~/.cache/sftjob-testbed)
set -euo pipefail

K8S_VERSION=v1.34.12   # kube-apiserver, kube-controller-manager, kube-scheduler; kubelet, kube-proxy
ETCD_VERSION=v3.6.16   # Kubernetes 1.34 expects etcd 3.6.x
KWOK_VERSION=v0.7.0
HELM_VERSION=v3.21.4
COREDNS_VERSION=v1.14.7  # cluster DNS for the real node (built with only the plugins it uses)
KUEUE_VERSION=v0.17.0    # Kueue's controller manager (tests/testbed/kueue.py); its CRDs from the same module
PROMETHEUS_VERSION=v0.316.0  # Prometheus 3.x (module versions v0.3xx): Debian's 2.42 lacks kubernetes_sd_configs

CACHE=${SFTJOB_TESTBED_CACHE:-$HOME/.cache/sftjob-testbed}
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
GOPROXY_URL=${GOPROXY_URL:-https://proxy.golang.org}
export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod
# No DWARF from the compiler: -ldflags -s -w drops it at link anyway, and not generating it saves ~10% of the
# compile CPU (etcd: 108 -> 97 CPU-s), the bulk of a cold provision.sh
NODWARF=-gcflags=all=-dwarf=false

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# Our own Go mains are keyed by version and content: a change to them builds a new directory.
COREDNS_NAME=coredns-$COREDNS_VERSION-$(sha256sum "$HERE/node/coredns_main.go" | cut -c1-8)
PAUSE_NAME=pause-$(sha256sum "$HERE/node/pause_main.go" | cut -c1-8)
log() { printf '[build %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

# done_already NAME BIN...: true when the stamp and every binary exist.
done_already() {
  local dir=$CACHE/$1; shift
  [[ -f $dir/.stamp ]] || return 1
  for b in "$@"; do [[ -x $dir/bin/$b ]] || return 1; done
}

stamp() { date -u +%FT%TZ > "$CACHE/$1/.stamp"; log "$1 built"; }

# k8s_wrapper: the source dir of a wrapper module that builds k8s.io/kubernetes commands (prints its path).
# k8s.io/kubernetes points its staging modules at ./staging/src/..., which the module zip lacks.
# Generate the wrapper's replace block from that release's own go.mod: k8s.io/x => k8s.io/x v0.Y.Z.
k8s_wrapper() {
  local src=$CACHE/src/kubernetes-$K8S_VERSION
  if [[ ! -f $src/go.mod ]]; then
    mkdir -p "$src"
    local staging_version=v0.${K8S_VERSION#v1.}
    curl -fsS "$GOPROXY_URL/k8s.io/kubernetes/@v/$K8S_VERSION.mod" > "$src/upstream.mod"
    {
      echo "module sftjob.dev/testbed/kubernetes"
      echo
      grep -E '^go [0-9.]+$' "$src/upstream.mod"
      grep -E '^godebug ' "$src/upstream.mod" || true
      echo
      echo "require k8s.io/kubernetes $K8S_VERSION"
      echo
      echo "replace ("
      awk '$2 == "=>" && $3 ~ /^\.\/staging\// {print "\t" $1 " => " $1 " '"$staging_version"'"}' \
        "$src/upstream.mod"
      echo ")"
    } > "$src/go.mod.new"
    local n; n=$(grep -c " => k8s.io/" "$src/go.mod.new")
    [[ $n -ge 20 ]] || { echo "only $n staging replaces generated; upstream go.mod changed?" >&2; exit 1; }
    mv "$src/go.mod.new" "$src/go.mod"
  fi
  echo "$src"
}

# k8s_build NAME CMD...: build k8s.io/kubernetes/cmd/CMD... into $CACHE/NAME/bin, versions stamped.
k8s_build() {
  local name=$1; shift
  done_already "$name" "$@" && return 0
  log "building $name: $* (cold: tens of minutes on 2 cores; minutes once the Go cache is warm)"
  local src dst=$CACHE/$name/bin
  src=$(k8s_wrapper)
  mkdir -p "$dst"
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local ld="-s -w" pkg cmds=() c
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$(date -u +%FT%TZ)"
  done
  for c in "$@"; do cmds+=("k8s.io/kubernetes/cmd/$c"); done
  (cd "$src" && "$GO" mod download k8s.io/kubernetes &&
    "$GO" build -trimpath $NODWARF -ldflags "$ld" -o "$dst/" "${cmds[@]}")
  "$dst/$1" --version | grep -q "$K8S_VERSION"
  stamp "$name"
}

build_kubernetes() { k8s_build "kubernetes-$K8S_VERSION" kube-apiserver kube-controller-manager kube-scheduler; }

# The real node's kubelet and kube-proxy: the same wrapper, so a warm Go cache makes them minutes.
build_node() { k8s_build "kubernetes-node-$K8S_VERSION" kubelet kube-proxy; }

# CoreDNS with only the plugins the test bed's Corefile uses (the stock build compiles every cloud SDK).
build_coredns() {
  local name=$COREDNS_NAME
  done_already "$name" coredns && return 0
  log "building $name"
  local src=$CACHE/src/$name dst=$CACHE/$name/bin
  mkdir -p "$src" "$dst"
  cp "$HERE/node/coredns_main.go" "$src/main.go"
  printf 'module sftjob.dev/testbed/coredns\n\ngo 1.26.0\n\nrequire github.com/coredns/coredns %s\n' \
    "$COREDNS_VERSION" > "$src/go.mod"
  (cd "$src" && "$GO" mod tidy && "$GO" build -trimpath $NODWARF -ldflags "-s -w" -o "$dst/coredns" .)
  "$dst/coredns" -version | grep -q "${COREDNS_VERSION#v}"
  stamp "$name"
}

# The pod sandbox ("pause") binary: no image can be pulled here, so the test bed builds its own.
build_pause() {
  local name=$PAUSE_NAME
  done_already "$name" pause && return 0
  local src=$CACHE/src/$name dst=$CACHE/$name/bin
  mkdir -p "$src" "$dst"
  cp "$HERE/node/pause_main.go" "$src/main.go"
  printf 'module sftjob.dev/testbed/pause\n\ngo 1.26.0\n' > "$src/go.mod"
  (cd "$src" && "$GO" build -trimpath $NODWARF -ldflags "-s -w" -o "$dst/pause" .)
  stamp "$name"
}

build_etcd() {
  local name=etcd-$ETCD_VERSION
  done_already "$name" etcd && return 0
  log "building $name"
  local src=$CACHE/src/$name dst=$CACHE/$name/bin
  mkdir -p "$src" "$dst"
  # server/v3 replaces its sibling modules with ../ paths; pin them to the same release instead.
  cat > "$src/go.mod" <<EOF
module sftjob.dev/testbed/etcd

go 1.26.0

require go.etcd.io/etcd/server/v3 $ETCD_VERSION

replace (
	go.etcd.io/etcd/api/v3 => go.etcd.io/etcd/api/v3 $ETCD_VERSION
	go.etcd.io/etcd/client/pkg/v3 => go.etcd.io/etcd/client/pkg/v3 $ETCD_VERSION
	go.etcd.io/etcd/client/v3 => go.etcd.io/etcd/client/v3 $ETCD_VERSION
	go.etcd.io/etcd/pkg/v3 => go.etcd.io/etcd/pkg/v3 $ETCD_VERSION
)
EOF
  (cd "$src" && "$GO" mod download go.etcd.io/etcd/server/v3 &&
    "$GO" build -trimpath $NODWARF -ldflags "-s -w" -o "$dst/etcd" go.etcd.io/etcd/server/v3)
  "$dst/etcd" --version | grep -q "${ETCD_VERSION#v}"
  stamp "$name"
}

# go_install NAME VERSION PACKAGE...: modules without replace directives install directly.
go_install() {
  local name=$1-$2 version=$2; shift 2
  local bins=() p
  for p in "$@"; do bins+=("$(basename "$p")"); done
  done_already "$name" "${bins[@]}" && return 0
  log "building $name"
  mkdir -p "$CACHE/$name/bin"
  for p in "$@"; do
    GOFLAGS= GOBIN=$CACHE/$name/bin "$GO" install -trimpath $NODWARF -ldflags "-s -w" "$p@$version"
  done
  stamp "$name"
}

# Kueue: the manager binary only (no kueuectl, no images), and its CRDs copied from the module source.
build_kueue() {
  local name=kueue-$KUEUE_VERSION
  done_already "$name" kueue && [[ -d $CACHE/$name/crds ]] && return 0
  log "building $name (cold: ~30 min on 2 shared cores)"
  mkdir -p "$CACHE/$name/bin" "$CACHE/$name/crds"
  local dir
  dir=$(GOFLAGS= "$GO" mod download -json "sigs.k8s.io/kueue@$KUEUE_VERSION" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [[ -d $dir/config/components/crd/bases ]] || { echo "kueue module source not found ($dir)" >&2; exit 1; }
  cp "$dir"/config/components/crd/bases/*.yaml "$CACHE/$name/crds/"
  GOFLAGS= GOBIN=$CACHE/$name/bin "$GO" install -trimpath $NODWARF -ldflags "-s -w" \
    "sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION"
  stamp "$name"
}

# Prometheus with its Kubernetes service discovery, which Debian's package (2.42) is built without: the
# test bed's Prometheus finds pods through the apiserver as a cluster's does (tests/testbed/monitors.py).
# Only that discovery mechanism (build tags; the others pull in cloud SDKs) and no embedded web UI (the
# tests use the HTTP API). promtool stays Debian's (rule checks and rule unit tests).
build_prometheus() {
  local name=prometheus-$PROMETHEUS_VERSION
  done_already "$name" prometheus && return 0
  log "building $name"
  mkdir -p "$CACHE/$name/bin"
  GOFLAGS= GOBIN=$CACHE/$name/bin "$GO" install -trimpath $NODWARF -tags remove_all_sd,enable_kubernetes_sd \
    -ldflags "-s -w" "github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_VERSION"
  stamp "$name"
}

write_versions_env() {
  # One file the Python fixtures read, so versions live in this script only. Paths only, so it is written
  # first: images.sh (run alongside the builds) finds the pause binary; a fixture names any binary missing.
  cat > "$CACHE/versions.env" <<EOF
KUBERNETES_BIN=$CACHE/kubernetes-$K8S_VERSION/bin
ETCD_BIN=$CACHE/etcd-$ETCD_VERSION/bin
KWOK_BIN=$CACHE/kwok-$KWOK_VERSION/bin
HELM_BIN=$CACHE/helm-$HELM_VERSION/bin
NODE_BIN=$CACHE/kubernetes-node-$K8S_VERSION/bin
COREDNS_BIN=$CACHE/$COREDNS_NAME/bin
PAUSE_BIN=$CACHE/$PAUSE_NAME/bin
KUEUE_BIN=$CACHE/kueue-$KUEUE_VERSION/bin
KUEUE_CRDS=$CACHE/kueue-$KUEUE_VERSION/crds
PROMETHEUS_BIN=$CACHE/prometheus-$PROMETHEUS_VERSION/bin
EOF
}

main() {
  mkdir -p "$CACHE"
  write_versions_env
  if [[ ${1:-} == pause ]]; then build_pause; return 0; fi  # `build.sh pause`: what images.sh needs, first
  local t0=$SECONDS
  # Two streams side by side: one Go build alone left a core idle (module downloads, single-threaded
  # links): a cold build.sh took 27.5 min with 31 min of CPU. Each stream stops at its first failure.
  # Balanced by the cold times of 2026-12-07 (docs/testing.md, "Cold"; minutes under load): kubernetes 23.8
  # + node 2.1 + helm 5.9 + etcd 3.5 = 35.3 beside prometheus 13.4 + kueue 8.3 + kwok 7.6 + coredns 4.5 =
  # 33.8 (the split before, with prometheus behind etcd/kwok/helm, ended at 38.7). node follows kubernetes:
  # it reuses its compiled packages.
  build_pause
  ( build_kubernetes; build_node; go_install helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm; build_etcd ) &
  local control_plane=$!
  ( build_prometheus; build_kueue; go_install kwok "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok; build_coredns ) &
  local others=$! rc=0
  wait $control_plane || rc=$?
  wait $others || rc=$?
  [[ $rc -eq 0 ]] || { log "a build failed (exit $rc): see above"; return $rc; }
  log "all binaries ready under $CACHE ($((SECONDS - t0)) s)"
}

main "$@"
