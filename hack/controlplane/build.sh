#!/usr/bin/env bash
# Build a real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl)
# and helm from pinned Go modules, once per machine, into a cache outside the repository.
#
# Why from modules: no Docker daemon and no release downloads here, only the Go module proxy. Each tool is built
# in a module of its own (this folder for Kubernetes, etcd/ and helm/ below it) so that each gets exactly the
# dependency versions its own release pins; one module would let Go's version selection mix them.
#
# The bin folder is built in a temporary folder and renamed into place with its stamp, so a half-built cache
# never looks complete; a second run with the same stamp prints "up to date" and returns at once.
set -euo pipefail

KUBE_VERSION=v1.37.2
ETCD_VERSION=v3.7.0 # what Kubernetes v1.37.2 tests with: build/dependencies.yaml and hack/lib/etcd.sh
HELM_VERSION=v4.3.2
# The release dates the module proxy records: a fixed build date keeps the binaries reproducible.
KUBE_BUILD_DATE=2026-10-27T12:01:04Z

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_ROOT=${KLEINSTYLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kleinstyle}
TARGET=$CACHE_ROOT/controlplane/$KUBE_VERSION
BIN=$TARGET/bin
STAMP_NAME=.stamp

# Anything that changes what is built changes the stamp: the pins, this script and the Go toolchain.
stamp() {
	{
		echo "kubernetes $KUBE_VERSION etcd $ETCD_VERSION helm $HELM_VERSION"
		go version
		cd "$HERE" && sha256sum build.sh go.mod go.sum etcd/go.mod etcd/go.sum helm/go.mod helm/go.sum
	}
}

want=$(stamp)
if [[ -f $BIN/$STAMP_NAME ]] && [[ "$(cat "$BIN/$STAMP_NAME")" == "$want" ]]; then
	echo "controlplane $KUBE_VERSION: up to date in $BIN"
	exit 0
fi

mkdir -p "$TARGET"
TMP=$(mktemp -d "$TARGET/bin.tmp.XXXXXX")
chmod 755 "$TMP"
trap 'rm -rf "$TMP"' EXIT

# Static, stripped and path-free as the upstream release builds are (hack/lib/golang.sh): the same build tags,
# CGO off, -trimpath; -p 2 keeps a 2-core machine usable while it builds. -mod=readonly: go.sum is the pin.
export CGO_ENABLED=0
export GOFLAGS="-trimpath -mod=readonly"
KUBE_TAGS=selinux,notest,grpcnotrace

# Without these the server's /version and kubectl say v0.0.0-master, and kubectl and helm warn of version skew:
# set what hack/lib/version.sh sets, in both packages that carry the version (there is no git commit to name).
kube_ldflags="-s -w"
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
	minor=${KUBE_VERSION#v1.}
	minor=${minor%%.*}
	kube_ldflags+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
	kube_ldflags+=" -X $pkg.buildDate=$KUBE_BUILD_DATE -X $pkg.gitCommit= -X $pkg.gitTreeState=clean"
done
helm_ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION"
helm_ldflags+=" -X helm.sh/helm/v4/internal/version.metadata= -X helm.sh/helm/v4/internal/version.gitTreeState=clean"

TIMES=$TMP/build-times.txt
total_start=$SECONDS
build() { # build NAME MODULE_DIR LDFLAGS TAGS PACKAGE
	local name=$1 dir=$2 ldflags=$3 tags=$4 pkg=$5 start=$SECONDS
	echo "building $name ($pkg) ..."
	(cd "$dir" && go build -p 2 -tags "$tags" -ldflags "$ldflags" -o "$TMP/$name" "$pkg")
	echo "$name $((SECONDS - start))s" | tee -a "$TIMES"
}

echo "controlplane $KUBE_VERSION: building into $BIN (etcd $ETCD_VERSION, helm $HELM_VERSION)"
build etcd "$HERE/etcd" "-s -w" "" go.etcd.io/etcd/server/v3
build kube-apiserver "$HERE" "$kube_ldflags" "$KUBE_TAGS" k8s.io/kubernetes/cmd/kube-apiserver
build kube-controller-manager "$HERE" "$kube_ldflags" "$KUBE_TAGS" k8s.io/kubernetes/cmd/kube-controller-manager
build kube-scheduler "$HERE" "$kube_ldflags" "$KUBE_TAGS" k8s.io/kubernetes/cmd/kube-scheduler
build kubectl "$HERE" "$kube_ldflags" "$KUBE_TAGS" k8s.io/kubernetes/cmd/kubectl
build helm "$HERE/helm" "$helm_ldflags" "" helm.sh/helm/v4/cmd/helm
echo "total $((SECONDS - total_start))s" | tee -a "$TIMES"

# Every binary must report the pinned version, or the cache is not what the stamp says. (Whole outputs compared,
# not piped to grep -q: its early exit would kill the writer with SIGPIPE, a failure under pipefail.)
check() { # check WANT COMMAND...: COMMAND's output contains the line WANT
	local want=$1 out
	shift
	out=$("$@")
	if ! grep -qxF -- "$want" <<<"$out"; then
		echo "$*: expected a line '$want', got:" >&2
		echo "$out" >&2
		exit 1
	fi
}
check "Kubernetes $KUBE_VERSION" "$TMP/kube-apiserver" --version
check "Kubernetes $KUBE_VERSION" "$TMP/kube-controller-manager" --version
check "Kubernetes $KUBE_VERSION" "$TMP/kube-scheduler" --version
check "Client Version: $KUBE_VERSION" "$TMP/kubectl" version --client
check "etcd Version: ${ETCD_VERSION#v}" "$TMP/etcd" --version
check "$HELM_VERSION" "$TMP/helm" version --short

echo "$want" >"$TMP/$STAMP_NAME"
# Swap in atomically: the old folder (if any) moves aside first, then the new one takes its name.
if [[ -d $BIN ]]; then
	old=$(mktemp -d "$TARGET/bin.old.XXXXXX")
	mv "$BIN" "$old/bin"
	mv "$TMP" "$BIN"
	rm -rf "$old"
else
	mv "$TMP" "$BIN"
fi
trap - EXIT
echo "controlplane $KUBE_VERSION: built in $BIN"
