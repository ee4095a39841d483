#!/usr/bin/env bash
# Debian's Prometheus server and promtool, pinned by package version and checksum, unpacked once per machine into
# the cache beside the control plane: tests/chart checks the chart's alerts with promtool, tests/cluster scrapes the
# operator with the server and runs the Grafana dashboard's queries on what it scraped (docs/real-cluster.md).
#
# Why Debian's package: the only archive reachable here besides PyPI, npm and the Go module proxy, and its binaries
# are the upstream release's (Go, static but for libc). `apt-get download` needs no root. Where apt-get or the
# package is missing, or the machine's architecture has no pinned checksum, the script says that the Prometheus
# tests will skip and exits 0, so `make test` still passes there; a checksum that differs is an error.
set -euo pipefail

VERSION=2.42.0+ds-5+deb12u1 # bookworm's (apt-cache policy prometheus)
declare -A SHA256=(
	[amd64]=81d59a24fce84f7fbe97a45a4f2914b6a5881b5cd1db2a6a0e129e515e1a5f55
)

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_ROOT=${KLEINSTYLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kleinstyle}
TARGET=$CACHE_ROOT/prometheus/$VERSION
BIN=$TARGET/bin
STAMP_NAME=.stamp

skip() {
	echo "prometheus $VERSION: $1." >&2
	echo "prometheus $VERSION: NOT fetched; the Prometheus tests (promtool on the chart's alerts, the dashboard on a" \
		"real Prometheus) will skip." >&2
	exit 0
}

command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || skip "no apt-get and dpkg-deb on this machine"
ARCH=$(dpkg --print-architecture)
SUM=${SHA256[$ARCH]:-}
[[ -n $SUM ]] || skip "no pinned checksum for $ARCH (hack/prometheus/fetch.sh pins ${!SHA256[*]})"

want="prometheus $VERSION $ARCH $SUM $(cd "$HERE" && sha256sum fetch.sh)"
if [[ -f $BIN/$STAMP_NAME ]] && [[ "$(cat "$BIN/$STAMP_NAME")" == "$want" ]]; then
	echo "prometheus $VERSION: up to date in $BIN"
	exit 0
fi

mkdir -p "$TARGET"
TMP=$(mktemp -d "$TARGET/bin.tmp.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
started=$SECONDS
mkdir "$TMP/deb" "$TMP/root" "$TMP/bin"
# As root apt drops to its _apt user to download, who may not write here: download as whoever runs this.
if ! (cd "$TMP/deb" && apt-get download -q -o APT::Sandbox::User="$(id -un)" "prometheus=$VERSION"); then
	skip "apt-get download prometheus=$VERSION failed (not in this machine's package lists? \`apt-get update\` reads them)"
fi
deb=("$TMP"/deb/*.deb)
got=$(sha256sum "${deb[0]}" | cut -d' ' -f1)
if [[ $got != "$SUM" ]]; then
	echo "prometheus $VERSION: ${deb[0]##*/} has sha256 $got, not the pinned $SUM" >&2
	exit 1
fi
dpkg-deb -x "${deb[0]}" "$TMP/root"
for tool in prometheus promtool; do
	mv "$TMP/root/usr/bin/$tool" "$TMP/bin/$tool"
	# Each must run here and be the pinned build (its first line: "TOOL, version 2.42.0+ds (... revision: VERSION)").
	out=$("$TMP/bin/$tool" --version 2>&1)
	first=${out%%$'\n'*}
	if [[ $first != "$tool, version ${VERSION%%-*} "*"revision: $VERSION)" ]]; then
		echo "prometheus $VERSION: $tool --version says: $first" >&2
		exit 1
	fi
done

echo "$want" >"$TMP/bin/$STAMP_NAME"
chmod 755 "$TMP/bin"
rm -rf "$BIN"
mv "$TMP/bin" "$BIN"
echo "prometheus $VERSION: fetched into $BIN in $((SECONDS - started))s"
