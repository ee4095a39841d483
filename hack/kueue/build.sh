#!/usr/bin/env bash
# Build Kueue's manager (cmd/kueue) from its pinned Go module, once per machine, into a cache outside the
# repository, with the install manifests of the same release beside it (config/default and the components it
# names: CRDs, RBAC, webhook configurations), for the cluster tier's RealKueue (devcluster/kueue_real.py).
#
# Why a module of its own (this folder): Kueue v0.17.0 pins the k8s.io libraries at v0.35.3, the control plane at
# v0.37.2; apart, each gets exactly the versions its release pins (this go.mod's requirements are Kueue's own).
#
# The version folder is built in a temporary folder and renamed into place with its stamp, so a half-built cache
# never looks complete; a second run with the same stamp prints "up to date" and returns at once.
set -euo pipefail

KUEUE_MODULE=sigs.k8s.io/kueue
KUEUE_VERSION=v0.17.0
# The release date the module proxy records: a fixed build date keeps the binary reproducible.
KUEUE_BUILD_DATE=2026-03-31T10:20:15Z

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_ROOT=${KLEINSTYLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kleinstyle}
PARENT=$CACHE_ROOT/kueue
TARGET=$PARENT/$KUEUE_VERSION
STAMP_NAME=.stamp

# Anything that changes what is built changes the stamp: the pin, this script and the Go toolchain.
stamp() {
	{
		echo "kueue $KUEUE_VERSION"
		go version
		cd "$HERE" && sha256sum build.sh go.mod go.sum
	}
}

want=$(stamp)
if [[ -f $TARGET/$STAMP_NAME ]] && [[ "$(cat "$TARGET/$STAMP_NAME")" == "$want" ]]; then
	echo "kueue $KUEUE_VERSION: up to date in $TARGET"
	exit 0
fi

mkdir -p "$PARENT"
TMP=$(mktemp -d "$PARENT/$KUEUE_VERSION.tmp.XXXXXX")
chmod 755 "$TMP"
trap 'rm -rf "$TMP"' EXIT

# As Kueue's Makefile builds its image (CGO off, its version variables set), stripped and path-free as the
# control plane's binaries are; -p 2 keeps a 2-core machine usable while it builds. -mod=readonly: go.sum is the pin.
export CGO_ENABLED=0
export GOFLAGS="-trimpath -mod=readonly"
version_pkg=$KUEUE_MODULE/pkg/version
ldflags="-s -w -X $version_pkg.GitVersion=$KUEUE_VERSION -X $version_pkg.GitCommit="
ldflags+=" -X $version_pkg.BuildDate=$KUEUE_BUILD_DATE"

echo "kueue $KUEUE_VERSION: building into $TARGET"
start=$SECONDS
mkdir "$TMP/bin"
(cd "$HERE" && go build -p 2 -ldflags "$ldflags" -o "$TMP/bin/kueue" "$KUEUE_MODULE/cmd/kueue")
echo "kueue $((SECONDS - start))s" | tee "$TMP/build-times.txt"

# The manager has no --version: the module it was built from is in its build information (the `mod` line of a tool's
# package), which must name the pin.
deps=$(cd "$HERE" && go version -m "$TMP/bin/kueue")
if ! grep -qE "^[[:space:]]+mod[[:space:]]+$KUEUE_MODULE[[:space:]]+$KUEUE_VERSION[[:space:]]" <<<"$deps"; then
	echo "$TMP/bin/kueue: not built from $KUEUE_MODULE $KUEUE_VERSION:" >&2
	echo "$deps" >&2
	exit 1
fi

# The install manifests of the same release, as its own `kustomize build config/default` reads them: RealKueue
# renders them with the cluster's kubectl and applies what runs outside a pod (CRDs, RBAC, webhook configurations).
source_dir=$(cd "$HERE" && go list -m -f '{{.Dir}}' "$KUEUE_MODULE") # in the module cache: the build fetched it
if [[ ! -d $source_dir/config/default ]]; then
	echo "no config/default in $KUEUE_MODULE's source ('$source_dir')" >&2
	exit 1
fi
mkdir "$TMP/config"
cp -R "$source_dir/config/default" "$source_dir/config/components" "$TMP/config/"
chmod -R u+w,a+rX "$TMP/config" # the module cache is read-only; the cache folder must stay removable

echo "$want" >"$TMP/$STAMP_NAME"
# Swap in atomically: the old folder (if any) moves aside first, then the new one takes its name.
if [[ -d $TARGET ]]; then
	old=$(mktemp -d "$PARENT/$KUEUE_VERSION.old.XXXXXX")
	mv "$TARGET" "$old/version"
	mv "$TMP" "$TARGET"
	rm -rf "$old"
else
	mv "$TMP" "$TARGET"
fi
trap - EXIT
echo "kueue $KUEUE_VERSION: built in $TARGET"
