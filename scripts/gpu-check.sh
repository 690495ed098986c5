#!/usr/bin/env bash
# CUDA check on one NVIDIA GPU: generates every greedy and beam case of the tiny-a fixture on CUDA and counts those
# equal to the Hugging Face references (the caches stay on the device between steps there); meanwhile synthesises a
# random-weight checkpoint with the shapes of Salesforce/blip2-flan-t5-xl in float16 (7.9 GB, once; reused on later
# runs); benches it in-process on CUDA at concurrency 1 and 16, and prints ms/image (vision + Q-Former), ms/token at
# batch 1 and tokens/s at concurrency 16; then ms/token at batch 1 with the decoder's weights in int4 (--weights decoder=int4).
# Runs the CLI of a GPU kit (BLIP2MESH_KIT; scripts/gpu-kit.sh, docs/gpu.md: no .NET needed) or, without one, builds
# it here with the .NET 10 SDK. LD_LIBRARY_PATH gets the CUDA 13 and cuDNN 9 libraries of the Python wheels
# (scripts/cuda-libs.sh) when they are there. Each step has its own time limit and writes its results when it ends.
#   BLIP2MESH_KIT    an assembled GPU kit's folder (the one holding blip2mesh-kit.json)
#   REPORT_DIR       where the report and logs go (default $OUT when set, else a new temporary folder):
#                    summary.txt, gpu-check.log, nvidia-smi.txt, parity-cuda.jsonl, synth.log, bench-xl-f16.json,
#                    bench-xl-f16-decoder-int4.json
#   BLIP2_SYNTH_DIR  where the checkpoint goes (default /tmp/blip2-flan-t5-xl-synth-f16; ~8 GB free needed)
#   REQUESTS         requests per concurrency (default 32)     MAX_NEW_TOKENS (default 30; every answer that long)
#   PARITY_TIMEOUT, SYNTH_TIMEOUT, BENCH_TIMEOUT, INT4_TIMEOUT   seconds per step (default 120, 180, 240, 150)
#   TOTAL_BUDGET     the int4 step runs only in what is left of these seconds (default 450)
set -euo pipefail
scripts="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
report_dir="${REPORT_DIR:-${OUT:-$(mktemp -d)}}"
mkdir -p "$report_dir"
report_dir="$(cd "$report_dir" && pwd)"
summary="$report_dir/summary.txt"
: > "$summary"
parity_timeout="${PARITY_TIMEOUT:-120}" synth_timeout="${SYNTH_TIMEOUT:-180}" bench_timeout="${BENCH_TIMEOUT:-240}"
int4_timeout="${INT4_TIMEOUT:-150}" total_budget="${TOTAL_BUDGET:-450}"
synth_pid=""

# What a reader must see also goes to summary.txt, with the seconds since the start, as each step ends.
note() { echo "[$(printf '%3d' "$SECONDS") s] $*" | tee -a "$summary"; }
fail() {
  note "gpu-check: $*" >&2
  if [ -n "$synth_pid" ]; then kill "$synth_pid" 2>/dev/null || true; fi
  exit 1
}

check() {
  local cli
  if [ -n "${BLIP2MESH_KIT:-}" ]; then
    [ -f "$BLIP2MESH_KIT/blip2mesh-kit.json" ] || fail "$BLIP2MESH_KIT is not a GPU kit (no blip2mesh-kit.json)"
    cd "$BLIP2MESH_KIT"
    cli="$PWD/bin/blip2mesh"
    note "gpu-check: kit $PWD $(tr -d '\n' < blip2mesh-kit.json | tr -s ' ')"
  else
    cd "$scripts/.."
    command -v dotnet >/dev/null || fail "the .NET 10 SDK (dotnet) is not installed and no GPU kit was given (BLIP2MESH_KIT; see docs/gpu.md)"
    cli="$PWD/blip2mesh"
    "$cli" --help >/dev/null || fail "the build failed"
  fi

  command -v nvidia-smi >/dev/null || fail "no NVIDIA driver here (nvidia-smi not found): this check needs an NVIDIA GPU"
  nvidia-smi > "$report_dir/nvidia-smi.txt" 2>&1 || true
  local gpu
  gpu="$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)" || true
  [ -n "$gpu" ] || fail "nvidia-smi finds no usable GPU"
  note "gpu-check: GPU $gpu"

  local libs
  if libs="$("$scripts/cuda-libs.sh")"; then
    export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    note "gpu-check: CUDA libraries from $libs"
  else
    note "gpu-check: no Python wheels of the CUDA libraries (above); the system's library path must have them"
  fi

  local dir="${BLIP2_SYNTH_DIR:-/tmp/blip2-flan-t5-xl-synth-f16}" requests="${REQUESTS:-32}" tokens="${MAX_NEW_TOKENS:-30}"

  # The checkpoint is written on the CPU while the parity runs on the GPU, into a side folder renamed when it is
  # complete: a synth cut short is never taken for a finished one.
  if [ ! -f "$dir/model.safetensors.index.json" ]; then
    rm -rf "$dir" "$dir.partial"
    timeout "$synth_timeout" "$cli" synth --like blip2-flan-t5-xl --dtype float16 --out "$dir.partial" > "$report_dir/synth.log" 2>&1 &
    synth_pid=$!
  fi

  # Parity on CUDA: the fixture's references, as the CPU tests check them (float32 on a GPU may flip a near-tie).
  local status=0
  timeout "$parity_timeout" "$scripts/fixture-parity.sh" "$cli" tests/fixtures/blip2-tiny-a cuda "$report_dir/parity-cuda.jsonl" \
    | tee -a "$summary" || status=$?
  case $status in
    0|3) ;;
    124) fail "the CUDA parity run took over $parity_timeout s" ;;
    *) fail "generate on CUDA failed (exit $status, above; the CUDA 13 runtime and cuDNN 9 found?)" ;;
  esac

  if [ -n "$synth_pid" ]; then
    status=0
    wait "$synth_pid" || status=$?
    synth_pid=""
    tr '\r' '\n' < "$report_dir/synth.log" | sed '/^synth \[/{/ 100% /!d}'
    [ "$status" -eq 0 ] || fail "synth failed (exit $status; 124: it took over $synth_timeout s)"
    mv "$dir.partial" "$dir"
  fi
  note "gpu-check: checkpoint $dir ($(du -sh "$dir" | cut -f1))"

  # The first CUDA session fails with a clear message when the CUDA runtime or cuDNN is missing.
  local bench="$report_dir/bench-xl-f16.json"
  status=0
  timeout "$bench_timeout" "$cli" bench --model "$dir" --in-process --device cuda --concurrency 1,16 --requests "$requests" \
      --max-new-tokens "$tokens" --min-new-tokens "$tokens" --out "$bench" 2>&1 | tr '\r' '\n' | sed '/^in-process c=/{/ 100% /!d}' \
    || status=$?
  [ "$status" -eq 0 ] || fail "the CUDA bench failed (exit $status; 124: it took over $bench_timeout s)"

  python3 - "$bench" <<'PY' | tee -a "$summary"
import json, sys
r = json.load(open(sys.argv[1]))
runs = {run["concurrency"]: run for run in r["runs"]}
print("XL float16 checkpoint, in-process on CUDA:")
print(f"ms/image (vision+qformer):  {r['vision_qformer_ms_per_image']}")
print(f"ms/token at batch 1:        {r['decoder_ms_per_token_c1']}")
print(f"tokens/s at concurrency 16: {runs[16]['tokens_per_s']}  (concurrency 1: {runs[1]['tokens_per_s']})")
print(f"load {r['load_s']} s, first request {r['first_request_s']} s, peak RSS (MB): {r['peak_rss_mb']}")
PY

  # The int4 decoder (MatMulNBits' CUDA kernel) at batch 1, the rest exact: quantized once into the cache on this
  # disk. Only in the time the call has left (TOTAL_BUDGET, inside the runbook's 480 s), so it never costs the above.
  local left=$((total_budget - SECONDS))
  [ "$left" -lt "$int4_timeout" ] || left="$int4_timeout"
  if [ "$left" -lt 60 ]; then
    note "gpu-check: no time left for the int4 decoder bench (${SECONDS} s of ${total_budget} s used)"
    note "gpu-check: report in $report_dir"
    return
  fi
  local bench4="$report_dir/bench-xl-f16-decoder-int4.json"
  status=0
  timeout "$left" "$cli" bench --model "$dir" --in-process --device cuda --concurrency 1 --requests 8 \
      --max-new-tokens "$tokens" --min-new-tokens "$tokens" --weights decoder=int4 --cache-dir "$dir.cache" --out "$bench4" 2>&1 \
      | tr '\r' '\n' | sed '/^in-process c=/{/ 100% /!d}' || status=$?
  if [ "$status" -eq 0 ]; then
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"decoder int4 (approximate), ms/token at batch 1: {r['decoder_ms_per_token_c1']}, peak RSS (MB): {r['peak_rss_mb']}\")" "$bench4" | tee -a "$summary"
  else
    note "gpu-check: the int4 decoder bench failed (exit $status; 124: it took over $left s); the exact figures above stand"
  fi
  note "gpu-check: report in $report_dir"
}

check 2>&1 | tee "$report_dir/gpu-check.log"
