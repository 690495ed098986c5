#!/usr/bin/env bash
# `make run`: starts the mesh on the bundled demo model, captions and asks questions about the sample images
# through the gateway (answers stream as they are generated), then shuts the mesh down. Where the model's
# samples/scenes.json gives the ground truth, a wrong answer is followed by the scene's, and the last line counts
# the answers that match it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
model="${MODEL:-$root/models/blip2-demo}"
port="${PORT:-50051}"
http_port="${HTTP_PORT:-$((port + 1))}"
cli="${BLIP2MESH:-$root/blip2mesh}"   # the tests run the CLI they built
scenes="$model/samples/scenes.json"
cd "$root"

"$cli" --help >/dev/null   # builds the CLI once, before the clock starts
log=$(mktemp)
answer=$(mktemp)
"$cli" up --model "$model" --port "$port" --http-port "$http_port" >"$log" 2>"$log.err" &
mesh=$!
trap 'kill -TERM $mesh 2>/dev/null; wait $mesh 2>/dev/null || true; rm -f "$log" "$log.err" "$answer"' EXIT
for _ in $(seq 1 600); do
  grep -q '^ready ' "$log" && break
  kill -0 $mesh 2>/dev/null || { cat "$log.err" >&2; echo "the mesh failed to start" >&2; exit 1; }
  sleep 0.2
done
grep -q '^ready ' "$log" || { echo "the mesh did not become ready" >&2; exit 1; }
echo "mesh ready: gRPC $(sed -n 's/^ready //p' "$log"), playground and JSON API $(sed -n 's/^http //p' "$log")/"

# The scene's target for every (image, prompt), keyed "FILE|PROMPT". scenes.json is pretty-printed JSON: each
# image's "file", then its tasks' "prompt" and "target", one key per line, plain strings without escapes. The
# fields travel separated by \x1f, which (unlike a tab) keeps the caption's empty prompt as a field of its own.
declare -A target=()
if [ -f "$scenes" ]; then
  while IFS=$'\x1f' read -r file prompt text; do target["$file|$prompt"]=$text; done < <(awk '
    function value(line) { sub(/^[^:]*: *"/, "", line); sub(/",? *$/, "", line); return line }
    /^ *"file": "/   { file = value($0) }
    /^ *"prompt": "/ { prompt = value($0) }
    /^ *"target": "/ { print file "\037" prompt "\037" value($0) }' "$scenes")
fi

asked=0
matched=0
ask() {  # IMAGE PROMPT
  printf '%-14s %-52s → ' "$(basename "$1")" "${2:-(caption)}"
  "$cli" caption "$1" --addr "127.0.0.1:$port" --prompt "$2" | tee "$answer"
  local key
  key="$(basename "$1")|$2"
  [ -n "${target[$key]+set}" ] || return 0
  asked=$((asked + 1))
  if [ "$(cat "$answer")" = "${target[$key]}" ]; then matched=$((matched + 1))
  else printf '%-14s %-52s   ✗ the scene: %s\n' "" "" "${target[$key]}"
  fi
}
for image in "$model"/samples/*.png "$model"/samples/*.jpg; do
  ask "$image" ""
  ask "$image" "Question: what color is the background? Answer:"
  ask "$image" "Question: how many shapes are there? Answer:"
done
if [ "$asked" -gt 0 ]; then echo "accuracy: $matched/$asked answers match the scene ($(basename "$model")/samples/scenes.json)"; fi
