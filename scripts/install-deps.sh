#!/usr/bin/env bash
# What `make run` and `make test` need beyond this repository, installed when missing.
#
#   scripts/install-deps.sh run     the .NET 10 SDK (checked; it is not a Debian package, so never installed here)
#   scripts/install-deps.sh test    that, and the Debian packages the tests use: python3-grpcio, python3-protobuf,
#                                   protoc, grpc_python_plugin and the well-known .protos (the Python client),
#                                   redis-server (the shared cache), chromium and a font (the playground test),
#                                   kubectl (the manifests), node and npm (the playground test's runner), xz-utils (the GPU kit's packing)
#
# As root it apt-installs what is missing; otherwise it prints the exact command to run and fails.
set -euo pipefail
what="${1:-test}"
case "$what" in run | test) ;; *) echo "usage: scripts/install-deps.sh run|test" >&2; exit 2 ;; esac

if ! command -v dotnet >/dev/null || ! dotnet --list-sdks 2>/dev/null | grep -q '^10\.'; then
  echo "blip2mesh needs the .NET 10 SDK: https://learn.microsoft.com/dotnet/core/install/linux-debian" >&2
  exit 1
fi
[ "$what" = run ] && exit 0

packages=(python3-grpcio python3-protobuf protobuf-compiler protobuf-compiler-grpc libprotobuf-dev redis-server chromium fonts-dejavu-core xz-utils)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$p"); done
# Some machine images ship kubectl, node and npm from elsewhere; Debian's packages only where there are none.
command -v kubectl >/dev/null || missing+=(kubernetes-client)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "the tests need these Debian packages; install them, then run make test again:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
  exit 1
fi
echo "installing the packages the tests need: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
