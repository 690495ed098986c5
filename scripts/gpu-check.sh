#!/usr/bin/env bash
# CUDA check on one NVIDIA GPU: builds the CLI; generates every greedy and beam case of the tiny-a fixture on CUDA and
# counts those equal to the Hugging Face references (the caches stay on the device between steps there); synthesises
# a random-weight checkpoint with the shapes of Salesforce/blip2-flan-t5-xl in float16 (7.9 GB, once; reused on later
# runs), benches it in-process on CUDA at concurrency 1 and 16, and prints ms/image (vision + Q-Former), ms/token at
# batch 1 and tokens/s at concurrency 16.
#   BLIP2_SYNTH_DIR  where the checkpoint goes (default /tmp/blip2-flan-t5-xl-synth-f16; ~8 GB free needed)
#   REQUESTS         requests per concurrency (default 32)     MAX_NEW_TOKENS (default 30; every answer that long)
# Needs the .NET 10 SDK, an NVIDIA driver, the CUDA 13 runtime and cuDNN 9 (what ONNX Runtime's CUDA provider loads).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
fail() { echo "gpu-check: $*" >&2; exit 1; }

command -v dotnet >/dev/null || fail "the .NET 10 SDK (dotnet) is not installed"
command -v nvidia-smi >/dev/null || fail "no NVIDIA driver here (nvidia-smi not found): this check needs an NVIDIA GPU"
gpu="$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)" || true
[ -n "$gpu" ] || fail "nvidia-smi finds no usable GPU"
echo "gpu-check: GPU $gpu"

dir="${BLIP2_SYNTH_DIR:-/tmp/blip2-flan-t5-xl-synth-f16}"
requests="${REQUESTS:-32}"
tokens="${MAX_NEW_TOKENS:-30}"
report="$(mktemp --suffix=.json)"

./blip2mesh --help >/dev/null || fail "the build failed"

# Parity on CUDA: the fixture's references, as the CPU tests check them (float32 on a GPU may flip a near-tie).
fixture=tests/fixtures/blip2-tiny-a
cases="$(mktemp --suffix=.jsonl)"
python3 - "$fixture" > "$cases" <<'PY'
import json, os, sys
fixture = sys.argv[1]
r = json.load(open(os.path.join(fixture, "references.json")))
for image in r["images"]:
    for prompt in image["prompts"]:
        for kind in ("greedy", "beam"):
            request = {"image": os.path.join(fixture, image["file"]), "prompt": prompt["prompt"], "max_new_tokens": r["generation"]["max_new_tokens"]}
            request.update({k: v for k, v in r["generation"][kind].items() if k != "do_sample"})
            print(json.dumps({"request": request, "expected": prompt[kind]["ids"]}))
PY
python3 -c 'import json,sys; [print(json.dumps(json.loads(l)["request"])) for l in open(sys.argv[1])]' "$cases" > "$cases.requests"
./blip2mesh generate --model "$fixture" --device cuda --jsonl "$cases.requests" > "$cases.results" \
  || fail "generate on CUDA failed (see above; CUDA 13 runtime and cuDNN 9 installed?)"
python3 - "$cases" "$cases.results" <<'PY'
import json, sys
expected = [json.loads(l)["expected"] for l in open(sys.argv[1])]
results = [json.loads(l) for l in open(sys.argv[2])]
equal = sum(1 for e, r in zip(expected, results) if r.get("ids") == e)
print(f"CUDA parity: {equal}/{len(expected)} generations equal the Hugging Face references")
PY
if [ ! -f "$dir/model.safetensors.index.json" ]; then
  rm -rf "$dir"
  ./blip2mesh synth --like blip2-flan-t5-xl --dtype float16 --out "$dir" || fail "synth failed"
fi

# The first CUDA session fails with a clear message when the CUDA runtime or cuDNN is missing.
./blip2mesh bench --model "$dir" --in-process --device cuda --concurrency 1,16 --requests "$requests" \
    --max-new-tokens "$tokens" --min-new-tokens "$tokens" --out "$report" || fail "the CUDA bench failed (see above; CUDA 13 runtime and cuDNN 9 installed?)"

python3 - "$report" <<'PY' || cat "$report"
import json, sys
r = json.load(open(sys.argv[1]))
runs = {run["concurrency"]: run for run in r["runs"]}
print(f"ms/image (vision+qformer):  {r['vision_qformer_ms_per_image']:.1f}")
print(f"ms/token at batch 1:        {r['decoder_ms_per_token_c1']:.2f}")
print(f"tokens/s at concurrency 16: {runs[16]['tokens_per_s']:.1f}  (concurrency 1: {runs[1]['tokens_per_s']:.1f})")
print(f"peak RSS (MB): {r['peak_rss_mb']}")
PY
echo "gpu-check: report $report"
