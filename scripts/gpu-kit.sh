#!/usr/bin/env bash
# The GPU kit: the CLI published self-contained for linux-x64 (no .NET needed where it runs) with ONNX Runtime's CUDA
# provider, the tiny-a parity fixture and the bench inputs, as one xz'd tar split into parts that each travel in one
# remote call (docs/gpu.md is the runbook).
#   scripts/gpu-kit.sh build     publishes and packs into out/gpu-kit/parts/: blip2mesh-gpu-kit.tar.xz.part-NN, SHA256SUMS
#   scripts/gpu-kit.sh check     here, no GPU needed: part sizes against the per-call limit, the parts reassembled in a
#                                fresh folder, the tiny-a parity on CPU with no dotnet on PATH, the CUDA error message
#   scripts/gpu-kit.sh receive   on the GPU machine: checks the parts that have arrived so far, shows the GPU, the CUDA
#                                libraries found, xz and the free disk
#   scripts/gpu-kit.sh run       on the GPU machine: reassembles into out/gpu-kit/kit/ (once), then scripts/gpu-check.sh
#                                with that kit; report and logs in $OUT
#   scripts/gpu-kit.sh pack FOLDER PARTS | assemble PARTS DEST | verify PARTS [--all]   the steps the others use
# GPU_ARCH (build): the compute capability whose kernels the CUDA provider keeps (default 90: H100, H200; see
# scripts/fatbin-prune.py), or "all". PART_BYTES: the largest part (default 40 MiB).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
scripts="$root/scripts"
parts="$root/out/gpu-kit/parts"
archive=blip2mesh-gpu-kit.tar.xz
kit_name=blip2mesh-gpu-kit
part_bytes="${PART_BYTES:-$((40 * 1024 * 1024))}"
call_bytes=$((64 * 1024 * 1024))   # what one remote call carries: the working tree and the carried paths
fail() { echo "gpu-kit: $*" >&2; exit 1; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

# pack FOLDER PARTS: FOLDER as one xz'd tar in parts of at most PART_BYTES, and the parts' SHA256SUMS.
pack() {
  local folder="$1" out="$2"
  mkdir -p "$out"
  rm -f "$out/$archive".part-* "$out/SHA256SUMS"
  tar -C "$(dirname "$folder")" -cf - "$(basename "$folder")" | xz -9 -T2 | split -b "$part_bytes" -d -a 2 - "$out/$archive.part-"
  (cd "$out" && sha256sum "$archive".part-* > SHA256SUMS)
}

# verify PARTS [--all]: each part listed in SHA256SUMS that is here has its checksum and fits PART_BYTES; with --all
# every one must be here. Prints one line per part.
verify() {
  local dir="$1" all="${2:-}" sum name size bad=0 missing=()
  [ -f "$dir/SHA256SUMS" ] || fail "$dir/SHA256SUMS is missing (carry it with the parts)"
  while read -r sum name; do
    if [ ! -f "$dir/$name" ]; then missing+=("$name"); echo "  $name: not here yet"; continue; fi
    size=$(stat -c %s "$dir/$name")
    if [ "$size" -gt "$part_bytes" ]; then echo "  $name: $size bytes, over the limit of $part_bytes bytes"; bad=1
    elif [ "$(sha256sum < "$dir/$name" | cut -d' ' -f1)" != "$sum" ]; then echo "  $name: $size bytes, checksum differs (damaged in transfer? send it again)"; bad=1
    else echo "  $name: $size bytes ($(mib "$size")), checksum ok"; fi
  done < "$dir/SHA256SUMS"
  [ "$bad" -eq 0 ] || fail "some parts in $dir are not the ones built"
  if [ "$all" = --all ] && [ ${#missing[@]} -gt 0 ]; then
    fail "missing in $dir: ${missing[*]} (a fresh machine keeps nothing from earlier calls: send those again)"
  fi
}

# assemble PARTS DEST: the verified parts unpacked into DEST; DEST/SHA256SUMS, written last, says which parts it holds.
assemble() {
  local dir="$1" dest="$2"
  verify "$dir" --all
  mkdir -p "$dest"
  rm -f "$dest/SHA256SUMS"
  local names; mapfile -t names < <(cut -d' ' -f3- "$dir/SHA256SUMS" | sed "s|^|$dir/|")
  # xz is on nearly every Linux; Python's lzma reads the same stream where it is not.
  if command -v xz >/dev/null; then
    cat "${names[@]}" | xz -dc -T0 | tar -x -C "$dest"
  else
    cat "${names[@]}" | python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.LZMAFile(sys.stdin.buffer), sys.stdout.buffer, 1 << 20)' | tar -x -C "$dest"
  fi
  cp "$dir/SHA256SUMS" "$dest/SHA256SUMS"
}

# The bytes one remote call sends besides the carried paths: tracked and untracked, not ignored files (and shared/).
tree_bytes() {
  (cd "$root" && { git ls-files -z --cached --others --exclude-standard; if [ -d shared ]; then find shared -type f -print0; fi; } \
    | { xargs -0 -r stat -c %s -- 2>/dev/null || true; } | awk '{ s += $1 } END { print s + 0 }')
}

# Every folder of PATH that holds a dotnet replaced by one of links to its other programs; prints the new PATH.
path_without_dotnet() {
  local shadow="$1" dir copy result=() n=0
  IFS=: read -ra dirs <<< "$PATH"
  for dir in "${dirs[@]}"; do
    if [ -e "$dir/dotnet" ]; then
      copy="$shadow/$((n += 1))"
      mkdir -p "$copy"
      find "$dir" -mindepth 1 -maxdepth 1 ! -name dotnet -exec ln -s -t "$copy" {} +
      result+=("$copy")
    else
      result+=("$dir")
    fi
  done
  (IFS=:; echo "${result[*]}")
}

build() {
  local arch="${GPU_ARCH:-90}" stage="$root/out/gpu-kit/stage"
  local kit="$stage/$kit_name"
  command -v dotnet >/dev/null || fail "building the kit needs the .NET 10 SDK (dotnet)"
  command -v readelf >/dev/null || fail "building the kit needs readelf (binutils)"
  rm -rf "$stage"
  mkdir -p "$kit/bin"
  echo "gpu-kit: publishing the CLI self-contained for linux-x64"
  # Not trimmed: the CLI serialises its JSON (reports, --json, safetensors headers) by reflection, which trimming turns off.
  dotnet publish "$root/src/Blip2Mesh.Cli/Blip2Mesh.Cli.csproj" -c Release -r linux-x64 --self-contained \
    -o "$kit/bin" --nologo -clp:ErrorsOnly
  # Only the CUDA provider is ever asked for.
  rm -f "$kit/bin/libonnxruntime_providers_tensorrt.so"

  local provider="$kit/bin/libonnxruntime_providers_cuda.so" needed library
  [ -f "$provider" ] || fail "the publish output has no $(basename "$provider")"
  # scripts/cuda-libs.sh finds what the provider needs on the GPU machine: its list must cover the provider's own.
  needed=$(readelf -d "$provider" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' \
    | grep -v -E '^(libcuda\.so\.1|libc\.so|libm\.so|libdl\.so|librt\.so|libpthread\.so|libstdc\+\+\.so|libgcc_s\.so|ld-linux)')
  for library in $needed; do
    "$scripts/cuda-libs.sh" --required | grep -qx "$library" || fail "the CUDA provider needs $library, which scripts/cuda-libs.sh does not look for"
  done
  if [ "$arch" != all ]; then python3 "$scripts/fatbin-prune.py" --arch "$arch" "$provider"; fi

  mkdir -p "$kit/tests/fixtures" "$kit/models/blip2-demo"
  cp -r "$root/tests/fixtures/blip2-tiny-a" "$root/tests/fixtures/blip2-flan-t5-xl-config" "$kit/tests/fixtures/"
  # synth copies the demo model's tokenizer into the XL checkpoint (the XL config comes without one).
  cp "$root"/models/blip2-demo/{spiece.model,tokenizer_config.json,special_tokens_map.json} "$kit/models/blip2-demo/"
  python3 - "$kit" "$arch" "$(git -C "$root" rev-parse HEAD)" "$(git -C "$root" status --porcelain | wc -l)" \
    "$(sed -n 's/.*"Microsoft.ML.OnnxRuntime.Gpu.Linux" Version="\([^"]*\)".*/\1/p' "$root/Directory.Packages.props")" <<'PY'
import datetime, json, os, sys
kit, arch, commit, changed, ort = sys.argv[1:]
runtime = json.load(open(os.path.join(kit, "bin", "blip2mesh.runtimeconfig.json")))["runtimeOptions"]["includedFrameworks"]
manifest = {
    "commit": commit + ("" if changed == "0" else f" + {changed} uncommitted change(s)"),
    "built": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "cli": "bin/blip2mesh (linux-x64, self-contained, not trimmed: " + ", ".join(f"{f['name']} {f['version']}" for f in runtime) + ")",
    "onnxruntime": f"Microsoft.ML.OnnxRuntime.Gpu.Linux {ort}, CUDA provider with " + ("every architecture's kernels" if arch == "all" else f"sm_{arch} kernels only"),
    "data": ["tests/fixtures/blip2-tiny-a", "tests/fixtures/blip2-flan-t5-xl-config", "models/blip2-demo (tokenizer files only)"],
}
with open(os.path.join(kit, "blip2mesh-kit.json"), "w") as f:
    f.write(json.dumps(manifest, indent=2) + "\n")
PY

  echo "gpu-kit: packing $(du -sh "$kit" | cut -f1) (xz -9)"
  pack "$kit" "$parts"
  verify "$parts" --all
  sizes
}

# Prints what one call carries; fails when the tree and the largest part would not fit one call.
sizes() {
  local largest=0 size name tree
  for name in "$parts/$archive".part-*; do
    size=$(stat -c %s "$name")
    [ "$size" -le "$largest" ] || largest=$size
  done
  tree=$(tree_bytes)
  local call=$((tree + largest + $(stat -c %s "$parts/SHA256SUMS")))
  echo "gpu-kit: $(ls "$parts/$archive".part-* | wc -l) part(s) in $parts; one call carries the tree ($(mib "$tree")) + a part (at most $(mib "$largest")) + SHA256SUMS = $(mib "$call") of $(mib "$call_bytes")"
  [ "$largest" -le "$part_bytes" ] || fail "a part is over $(mib "$part_bytes")"
  [ "$call" -lt "$call_bytes" ] || fail "the tree and a part are over the $(mib "$call_bytes") one call carries"
}

check() {
  [ -f "$parts/SHA256SUMS" ] || fail "no kit in $parts (make gpu-kit first)"
  echo "gpu-kit: the parts"
  verify "$parts" --all
  sizes
  fresh="$(mktemp -d)"
  trap 'rm -rf "$fresh"' EXIT
  assemble "$parts" "$fresh/kit" >/dev/null
  local kit="$fresh/kit/$kit_name"
  echo "gpu-kit: reassembled in $kit ($(du -sh "$kit" | cut -f1); CLI and libraries $(du -sh "$kit/bin" | cut -f1))"
  sed 's/^/  /' "$kit/blip2mesh-kit.json"

  local clean; clean="$(path_without_dotnet "$fresh/path")"
  if PATH="$clean" command -v dotnet >/dev/null; then fail "could not take dotnet off PATH"; fi
  echo "gpu-kit: with no dotnet on PATH (and no DOTNET_ROOT):"
  local image; image="$(ls "$kit/tests/fixtures/blip2-tiny-a/images" | head -1)"
  (cd "$kit" && env -u DOTNET_ROOT PATH="$clean" "$scripts/fixture-parity.sh" "$kit/bin/blip2mesh" tests/fixtures/blip2-tiny-a cpu "$fresh/parity-cpu.jsonl") \
    || fail "the kit's CLI does not reproduce the references on CPU"
  local status=0
  (cd "$kit" && env -u DOTNET_ROOT PATH="$clean" bin/blip2mesh generate --model tests/fixtures/blip2-tiny-a \
     --image "tests/fixtures/blip2-tiny-a/images/$image" --device cuda) > "$fresh/cuda.out" 2> "$fresh/cuda.err" || status=$?
  grep -q '^blip2mesh: CUDA execution was requested but is not available on this machine' "$fresh/cuda.err" && [ "$status" -eq 1 ] \
    || { cat "$fresh/cuda.err" >&2; fail "--device cuda here did not fail with the CLI's message (exit $status)"; }
  echo "  --device cuda (no GPU here): exit $status, $(grep '^blip2mesh: ' "$fresh/cuda.err")"
  echo "gpu-kit: check passed"
}

# What the last call needs from the GPU machine, shown by every call that brings a part: a missing piece is then known
# before the last one.
probe() {
  echo "gpu-kit: this machine"
  echo "  GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
  echo "  CUDA libraries: $("$scripts/cuda-libs.sh" 2>&1)"
  echo "  xz: $(command -v xz || echo "none (Python's lzma reads the parts)"); $(python3 --version 2>&1)"
  echo "  free for the XL checkpoint (7.9 GB): $(df -h --output=avail "$(dirname "${BLIP2_SYNTH_DIR:-/tmp/x}")" | tail -1 | tr -d ' ')"
}

run() {
  local kits="$root/out/gpu-kit/kit"
  echo "gpu-kit: the parts"
  if ! cmp -s "$parts/SHA256SUMS" "$kits/SHA256SUMS" 2>/dev/null; then
    rm -rf "$kits"
    assemble "$parts" "$kits"
    echo "gpu-kit: reassembled in $kits/$kit_name in ${SECONDS} s"
  else
    echo "  already reassembled in $kits/$kit_name"
  fi
  BLIP2MESH_KIT="$kits/$kit_name" exec "$scripts/gpu-check.sh"
}

case "${1:-}" in
  build) build ;;
  check) check ;;
  receive) echo "gpu-kit: the parts here"; verify "$parts"; probe ;;
  run) run ;;
  pack) [ $# -eq 3 ] || fail "usage: scripts/gpu-kit.sh pack FOLDER PARTS"; pack "$2" "$3" ;;
  assemble) [ $# -eq 3 ] || fail "usage: scripts/gpu-kit.sh assemble PARTS DEST"; assemble "$2" "$3" ;;
  verify) [ $# -ge 2 ] || fail "usage: scripts/gpu-kit.sh verify PARTS [--all]"; verify "$2" "${3:-}" ;;
  *) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
