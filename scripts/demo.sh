#!/usr/bin/env bash
# `make run`: starts the mesh on the bundled demo model, captions and asks questions about the sample images
# through the gateway (answers stream as they are generated), then shuts the mesh down.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
model="${MODEL:-$root/models/blip2-demo}"
port="${PORT:-50051}"
http_port="${HTTP_PORT:-$((port + 1))}"
cd "$root"

./blip2mesh --help >/dev/null   # builds the CLI once, before the clock starts
log=$(mktemp)
./blip2mesh up --model "$model" --port "$port" --http-port "$http_port" >"$log" 2>"$log.err" &
mesh=$!
trap 'kill -TERM $mesh 2>/dev/null; wait $mesh 2>/dev/null || true; rm -f "$log" "$log.err"' EXIT
for _ in $(seq 1 600); do
  grep -q '^ready ' "$log" && break
  kill -0 $mesh 2>/dev/null || { cat "$log.err" >&2; echo "the mesh failed to start" >&2; exit 1; }
  sleep 0.2
done
grep -q '^ready ' "$log" || { echo "the mesh did not become ready" >&2; exit 1; }
echo "mesh ready: gRPC $(sed -n 's/^ready //p' "$log"), playground and JSON API $(sed -n 's/^http //p' "$log")/"

ask() {  # IMAGE PROMPT
  printf '%-14s %-52s → ' "$(basename "$1")" "${2:-(caption)}"
  ./blip2mesh caption "$1" --addr "127.0.0.1:$port" --prompt "$2"
}
for image in "$model"/samples/*.png "$model"/samples/*.jpg; do
  ask "$image" ""
  ask "$image" "Question: what color is the background? Answer:"
  ask "$image" "Question: how many shapes are there? Answer:"
done
