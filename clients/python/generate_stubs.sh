#!/usr/bin/env bash
# Generates the Python gRPC stubs of the public API (protos/blip2/v1/blip2.proto and the google/api protos it
# imports) into OUT (default: this folder), as blip2/v1/blip2_pb2*.py and google/api/*_pb2.py.
# Uses pip's grpcio-tools when the python3 on PATH has it, otherwise protoc and grpc_python_plugin
# (Debian: apt-get install protobuf-compiler protobuf-compiler-grpc libprotobuf-dev).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
protos="$here/../../protos"
out="${1:-$here}"
files=("$protos/blip2/v1/blip2.proto" "$protos/google/api/annotations.proto" "$protos/google/api/http.proto")
mkdir -p "$out"
if python3 -c "import grpc_tools" 2>/dev/null; then
  python3 -m grpc_tools.protoc "-I$protos" "--python_out=$out" "--grpc_python_out=$out" "${files[@]}"
elif command -v protoc >/dev/null && command -v grpc_python_plugin >/dev/null; then
  protoc "-I$protos" "--python_out=$out" "--grpc_out=$out" "--plugin=protoc-gen-grpc=$(command -v grpc_python_plugin)" "${files[@]}"
else
  echo "generating the stubs needs grpcio-tools (pip install -r clients/python/requirements.txt)" \
       "or protoc and grpc_python_plugin (sudo apt-get install protobuf-compiler protobuf-compiler-grpc libprotobuf-dev)" >&2
  exit 1
fi
