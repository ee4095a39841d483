#!/usr/bin/env bash
# Build the operator and runtime images with buildah, pulling from no registry (`make images`; images/README.md).
#
#   hack/images/build.sh [build]   both images, each skipped when its inputs are unchanged ("up to date")
#   hack/images/build.sh push      push both tags to $REGISTRY (after a build with the same REGISTRY)
#
# The base is Debian bookworm made here with debootstrap (Python 3.11 is bookworm's python3), imported once per
# recipe; both images install a wheel of this repository into a virtualenv, with the exact versions the test
# suite ran against (.venv's `uv pip freeze`) as constraints, through uv and its cache on this machine. torch is
# PyPI's build, whose CUDA libraries come as nvidia-* wheels: the node's driver is all a GPU pod adds.
#
# ai-toolkit (the default training backend) is fetched from GitHub at the commit docs/facts.md was verified at,
# with its requirements (one a git URL). Where github.com cannot be reached the runtime image is built without it,
# labelled io.kleinstyle.ai-toolkit=absent, and the script says so: such an image trains with `backend: builtin`
# only (a run asking for ai-toolkit fails with reason AIToolkitMissing).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
REGISTRY=${REGISTRY:-ghcr.io/kleinstyle}
VERSION=${VERSION:-$(sed -n 's/^version = "\(.*\)"$/\1/p' "$REPO/pyproject.toml" | head -1)}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BASE_PACKAGES=python3,ca-certificates
AI_TOOLKIT_REPO=${AI_TOOLKIT_REPO:-https://github.com/ostris/ai-toolkit.git}
AI_TOOLKIT_COMMIT=${AI_TOOLKIT_COMMIT:-27a03a91f23eb1b757d5ec2e80ee3e129cfcc350}
AI_TOOLKIT=${AI_TOOLKIT:-auto} # auto: where its repository answers; no: never; yes: or fail
VENV=${VENV:-$REPO/.venv}
UV=${UV:-$VENV/bin/uv}
UV_CACHE=${UV_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/uv}
# The build machine's CA bundle, for uv inside the build where egress is re-signed; never copied into an image.
BUILD_CA=${BUILD_CA:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$HERE/containers.conf}

OPERATOR_TAG=$REGISTRY/operator:$VERSION
RUNTIME_TAG=$REGISTRY/runtime:$VERSION
say() { echo "images: $*" >&2; }

need() {
	local missing=()
	for tool in "$@"; do command -v "$tool" >/dev/null || missing+=("$tool"); done
	if ((${#missing[@]})); then
		say "missing ${missing[*]}: on Debian, apt-get install podman buildah debootstrap runc"
		exit 1
	fi
}

# stdin: `name==version` lines; out: those naming a dependency of pyproject.toml's base, operator or runtime lists.
DIRECT_ONLY='
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras = project["optional-dependencies"]
def name(requirement): return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement)[0]).lower()
direct = {name(r) for r in project["dependencies"] + extras["operator"] + extras["runtime"]}
sys.stdout.writelines(line for line in sys.stdin if "==" in line and name(line) in direct)
'

label_of() { podman image inspect --format "{{index .Labels \"$2\"}}" "$1" 2>/dev/null || true; }

# --- the base: Debian from debootstrap, once per recipe -------------------------------------------------------------
base_image() {
	local key tag root
	key=$(printf '%s\n' "$SUITE" "$BASE_PACKAGES" "$(sed -n '/^base_image()/,/^}/p' "${BASH_SOURCE[0]}")" |
		sha256sum | cut -c1-12)
	tag=localhost/kleinstyle/base:$SUITE-$key
	if podman image exists "$tag"; then
		echo "$tag"
		return
	fi
	[[ $(id -u) == 0 ]] || { say "debootstrap needs root (or run the script under \`buildah unshare\`)"; exit 1; }
	root=$(mktemp -d /var/tmp/kleinstyle-base.XXXXXX)
	trap 'rm -rf "$root"' RETURN
	say "debootstrap $SUITE ($BASE_PACKAGES) from $MIRROR"
	local started=$SECONDS
	debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$root/fs" "$MIRROR" >"$root/log" 2>&1 ||
		{ tail -20 "$root/log" >&2; exit 1; }
	# What a container never needs: package indexes, docs, man pages, translations.
	rm -rf "$root"/fs/var/lib/apt/lists/* "$root"/fs/var/cache/apt/*.bin "$root"/fs/usr/share/{doc,man,info,locale}/*
	# The one user both images run as (the chart's runAsUser), home /tmp: the only writable place in a pod.
	chroot "$root/fs" groupadd --gid 1000 kleinstyle
	chroot "$root/fs" useradd --uid 1000 --gid 1000 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin \
		kleinstyle
	chroot "$root/fs" dpkg-query -W -f '${Package} ${Version}\n' >"$root/fs/etc/kleinstyle-base-packages"
	tar -C "$root/fs" --numeric-owner -c . |
		podman import --change 'CMD ["/bin/bash"]' \
			--change "LABEL io.kleinstyle.base=debootstrap $SUITE $BASE_PACKAGES" - "$tag" >/dev/null
	say "base $tag in $((SECONDS - started)) s"
	echo "$tag"
}

# --- what both builds read: a wheel of this repository, the tested versions, uv --------------------------------------
context() {
	local ctx=$1
	mkdir -p "$ctx/dist"
	"$UV" build --quiet --wheel --out-dir "$ctx/dist" "$REPO" >&2
	# The versions `make test` ran against of the package's own direct dependencies (base, operator, runtime): what
	# it pulls in besides, the cloud extra's object-store clients among them, resolves freely around them.
	"$UV" pip freeze --python "$VENV/bin/python" --exclude-editable |
		"$VENV/bin/python" -c "$DIRECT_ONLY" "$REPO/pyproject.toml" >"$ctx/constraints.txt"
	cp "$UV" "$ctx/uv"
}

# A hash of what decides an image: the Containerfiles, this script, the base, the versions, and $@'s files.
inputs_of() {
	local base=$1 ctx=$2
	shift 2
	{
		sha256sum "${BASH_SOURCE[0]}" "$REPO"/images/*.Containerfile
		sha256sum <"$ctx/constraints.txt" # by content: the folder's name is new each build
		podman image inspect --format '{{.Id}}' "$base"
		cd "$REPO" && find "$@" -type f -not -path '*/__pycache__/*' -not -name '*.pyc' -not -path '*.egg-info/*' \
			-print0 | sort -z | xargs -0 sha256sum
	}
}

bud() {
	local mounts=(-v "$UV_CACHE:/uv-cache")
	[[ -f $BUILD_CA ]] && mounts+=(-v "$BUILD_CA:/run/build-ca.crt:ro")
	mkdir -p "$UV_CACHE"
	buildah bud --quiet --pull-never --layers=false --network host "${mounts[@]}" \
		--build-arg SSL_CERT_FILE="$([[ -f $BUILD_CA ]] && echo /run/build-ca.crt)" "$@" >/dev/null
}

# Two steps, so that a change to the code rebuilds seconds, not minutes: NAME.Containerfile makes the image with
# every dependency (torch's 5 GB for the runtime), tagged by what decides it (the pyproject, the versions, the base)
# and kept until those change; package.Containerfile adds the package itself, without dependencies, on top.
build_one() {
	local name=$1 tag=$2 base=$3 ctx=$4 check=$5
	shift 5
	local inputs deps deps_inputs started=$SECONDS old
	deps_inputs=$({ inputs_of "$base" "$ctx" pyproject.toml; echo "$*"; } | sha256sum | cut -c1-16)
	deps=localhost/kleinstyle/$name-deps:$deps_inputs
	inputs=$({ inputs_of "$base" "$ctx" pyproject.toml contract operator runtime cli; echo "$*"; } | sha256sum | cut -c1-16)
	if [[ $(label_of "$tag" io.kleinstyle.inputs) == "$inputs" ]]; then
		say "$tag: up to date"
		return
	fi
	local stale
	stale=$(podman images --format '{{.Repository}}:{{.Tag}}' "localhost/kleinstyle/$name-deps" | grep -vx "$deps" || true)
	if ! podman image exists "$deps"; then
		say "building $deps (the dependencies of $tag)"
		bud --build-arg BASE_IMAGE="$base" "$@" -f "$REPO/images/$name.Containerfile" -t "$deps" "$ctx"
		say "$deps in $((SECONDS - started)) s"
	fi
	say "building $tag"
	old=$(podman image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
	bud --build-arg DEPS_IMAGE="$deps" --build-arg CHECK="$check" \
		--label io.kleinstyle.inputs="$inputs" --label org.opencontainers.image.version="$VERSION" \
		-f "$REPO/images/package.Containerfile" -t "$tag" "$ctx"
	# What this build replaced would only hold disk (5 GB for each of the runtime's dependency images).
	for image in $old $stale; do podman rmi "$image" >/dev/null 2>&1 || true; done
	say "$tag in $((SECONDS - started)) s, $(podman image inspect --format '{{.Size}}' "$tag" | numfmt --to=iec) uncompressed"
}

ai_toolkit_args() {
	case $AI_TOOLKIT in
	no) ;;
	yes | auto)
		if timeout 15 git ls-remote --quiet "$AI_TOOLKIT_REPO" HEAD >/dev/null 2>&1; then
			echo "--build-arg AI_TOOLKIT_COMMIT=$AI_TOOLKIT_COMMIT --build-arg AI_TOOLKIT_REPO=$AI_TOOLKIT_REPO"
		elif [[ $AI_TOOLKIT == yes ]]; then
			say "$AI_TOOLKIT_REPO cannot be reached and AI_TOOLKIT=yes"
			exit 1
		else
			say "WARNING: $AI_TOOLKIT_REPO cannot be reached: the runtime image is built WITHOUT ai-toolkit" \
				"(label io.kleinstyle.ai-toolkit=absent); it trains with backend builtin only. Build where GitHub" \
				"answers before pushing it for a cluster whose defaultBackend is ai-toolkit."
		fi
		;;
	*) say "AI_TOOLKIT must be auto, yes or no, not $AI_TOOLKIT"; exit 1 ;;
	esac
}

build() {
	need podman buildah debootstrap
	[[ -x $UV ]] || { say "no $UV: run \`make venv\` first"; exit 1; }
	local base toolkit
	base=$(base_image)
	CTX=$(mktemp -d /var/tmp/kleinstyle-images.XXXXXX)
	trap 'rm -rf "$CTX"' EXIT
	context "$CTX"
	build_one operator "$OPERATOR_TAG" "$base" "$CTX" \
		'import kleinstyle.operator.main, subprocess; subprocess.run(["kleinstyle", "operator", "--help"], check=True, capture_output=True)'

	# shellcheck disable=SC2046 # the arguments are words on purpose
	toolkit=$(ai_toolkit_args)
	# shellcheck disable=SC2086
	build_one runtime "$RUNTIME_TAG" "$base" "$CTX" 'import torch, kleinstyle.runtime.train, kleinstyle.runtime.fuse' $toolkit
}

push() {
	need podman
	for tag in "$OPERATOR_TAG" "$RUNTIME_TAG"; do
		podman image exists "$tag" || { say "no $tag here: run \`make images REGISTRY=$REGISTRY\` first"; exit 1; }
		if [[ $tag == "$RUNTIME_TAG" && $(label_of "$tag" io.kleinstyle.ai-toolkit) == absent ]]; then
			say "WARNING: $tag has no ai-toolkit (built where GitHub could not be reached)"
		fi
		say "pushing $tag"
		podman push "$tag"
	done
}

case ${1:-build} in
build) build ;;
push) push ;;
*) say "usage: $0 [build|push]"; exit 2 ;;
esac
