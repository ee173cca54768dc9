#!/usr/bin/env bash
# Build the test bed's binaries from Go modules into a cache outside the checkout (CI clones afresh).
# Idempotent: a component whose stamp file and binaries exist is skipped, so a warm run takes seconds.
#
#   tests/testbed/build.sh            # build whatever is missing
#   SFTJOB_TESTBED_CACHE=/x build.sh  # another cache root (default ~/.cache/sftjob-testbed)
set -euo pipefail

K8S_VERSION=v1.34.12   # kube-apiserver, kube-controller-manager, kube-scheduler
ETCD_VERSION=v3.6.16   # Kubernetes 1.34 expects etcd 3.6.x
KWOK_VERSION=v0.7.0
HELM_VERSION=v3.21.4

CACHE=${SFTJOB_TESTBED_CACHE:-$HOME/.cache/sftjob-testbed}
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
GOPROXY_URL=${GOPROXY_URL:-https://proxy.golang.org}
export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod

log() { printf '[build %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }

# done_already NAME BIN...: true when the stamp and every binary exist.
done_already() {
  local dir=$CACHE/$1; shift
  [[ -f $dir/.stamp ]] || return 1
  for b in "$@"; do [[ -x $dir/bin/$b ]] || return 1; done
}

stamp() { date -u +%FT%TZ > "$CACHE/$1/.stamp"; log "$1 built"; }

build_kubernetes() {
  local name=kubernetes-$K8S_VERSION
  done_already "$name" kube-apiserver kube-controller-manager kube-scheduler && return 0
  log "building $name (cold: tens of minutes on 2 cores)"
  local src=$CACHE/src/$name dst=$CACHE/$name/bin
  mkdir -p "$src" "$dst"
  # k8s.io/kubernetes points its staging modules at ./staging/src/..., which the module zip lacks.
  # Generate the wrapper's replace block from that release's own go.mod: k8s.io/x => k8s.io/x v0.Y.Z.
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
  } > "$src/go.mod"
  local n; n=$(grep -c " => k8s.io/" "$src/go.mod")
  [[ $n -ge 20 ]] || { echo "only $n staging replaces generated; upstream go.mod changed?" >&2; exit 1; }
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local ld="-s -w" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$(date -u +%FT%TZ)"
  done
  (cd "$src" && "$GO" mod download k8s.io/kubernetes &&
    "$GO" build -trimpath -ldflags "$ld" -o "$dst/" \
      k8s.io/kubernetes/cmd/kube-apiserver \
      k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kube-scheduler)
  "$dst/kube-apiserver" --version | grep -q "$K8S_VERSION"
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
    "$GO" build -trimpath -ldflags "-s -w" -o "$dst/etcd" go.etcd.io/etcd/server/v3)
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
    GOFLAGS= GOBIN=$CACHE/$name/bin "$GO" install -trimpath -ldflags "-s -w" "$p@$version"
  done
  stamp "$name"
}

main() {
  mkdir -p "$CACHE"
  local t0=$SECONDS
  # Small ones first so a partial cold build already gives a usable etcd/kwok.
  build_etcd
  go_install kwok "$KWOK_VERSION" sigs.k8s.io/kwok/cmd/kwok
  go_install helm "$HELM_VERSION" helm.sh/helm/v3/cmd/helm
  build_kubernetes
  # One file the Python fixtures read, so versions live in this script only.
  cat > "$CACHE/versions.env" <<EOF
KUBERNETES_BIN=$CACHE/kubernetes-$K8S_VERSION/bin
ETCD_BIN=$CACHE/etcd-$ETCD_VERSION/bin
KWOK_BIN=$CACHE/kwok-$KWOK_VERSION/bin
HELM_BIN=$CACHE/helm-$HELM_VERSION/bin
EOF
  log "all binaries ready under $CACHE ($((SECONDS - t0)) s)"
}

main "$@"
