#!/usr/bin/env bash
# Builds the release binaries of ccload: static (CGO_ENABLED=0), without
# local paths (-trimpath), stripped (-s -w), the version stamped into
# main.version. release.yml publishes what it builds; .ci/run builds the same
# targets on every run, so a target that stops compiling is caught before a
# tag. The Dockerfile runs the same go build line (docs_test.go checks that
# the flags match).
#
# usage: scripts/build-release.sh [-o DIR] [VERSION]
#   -o DIR   where the binaries and SHA256SUMS go (default: dist)
#   VERSION  stamped into the binaries (default: git describe, else "dev")
#   TARGETS  (environment) GOOS/GOARCH pairs to build instead of all five
set -euo pipefail
cd "$(dirname "$0")/.."

out=dist
while getopts "o:" opt; do
  case $opt in
    o) out=$OPTARG ;;
    *) echo "usage: $0 [-o DIR] [VERSION]" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
version=${1:-$(git describe --tags --always --dirty 2>/dev/null || echo dev)}
targets=${TARGETS:-linux/amd64 linux/arm64 darwin/amd64 darwin/arm64 windows/amd64}
ldflags="-s -w -X main.version=$version"

mkdir -p "$out"
built=()
for t in $targets; do
  goos=${t%/*} goarch=${t#*/}
  name=ccload-$goos-$goarch
  [ "$goos" = windows ] && name=$name.exe
  start=$SECONDS
  CGO_ENABLED=0 GOOS=$goos GOARCH=$goarch go build -trimpath -ldflags "$ldflags" -o "$out/$name" .
  printf '%-28s %10d bytes  %3ds\n' "$name" "$(wc -c <"$out/$name")" $((SECONDS - start))
  built+=("$name")

  # The binary that runs here must say the version it was stamped with.
  if [ "$goos/$goarch" = "$(go env GOHOSTOS)/$(go env GOHOSTARCH)" ]; then
    got=$("$out/$name" -version)
    [ "$got" = "ccload $version" ] || { echo "$name -version printed \"$got\"; want \"ccload $version\"" >&2; exit 1; }
  fi
done
(cd "$out" && sha256sum "${built[@]}" >SHA256SUMS)
echo "checksums in $out/SHA256SUMS"
