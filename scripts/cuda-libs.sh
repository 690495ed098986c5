#!/usr/bin/env bash
# Prints the folders (one LD_LIBRARY_PATH value, colon-separated) that hold the CUDA 13 and cuDNN 9 libraries ONNX
# Runtime's CUDA provider loads, found in the Python wheels of those libraries (nvidia-cuda-runtime, nvidia-cublas,
# nvidia-curand, nvidia-cudnn-cu13 install them under site-packages/nvidia/<name>/lib, CUDA 13's under nvidia/cu13/lib).
#   scripts/cuda-libs.sh                 searches the nvidia package of $PYTHON (default python3)
#   scripts/cuda-libs.sh SITE_PACKAGES…  searches SITE_PACKAGES/nvidia of each folder given instead
#   scripts/cuda-libs.sh --required      lists the libraries looked for
# Exits 1, naming each library it did not find and where it looked, when one is missing.
set -euo pipefail

# libonnxruntime_providers_cuda.so 1.31's NEEDED entries (readelf -d) other than the driver (libcuda.so.1) and the C/C++
# runtime, and cuDNN, which the provider opens itself. scripts/gpu-kit.sh build checks the first part against the file.
required=(libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libcudnn.so.9)

if [ "${1:-}" = --required ]; then printf '%s\n' "${required[@]}"; exit 0; fi

roots=()
if [ $# -gt 0 ]; then
  for site in "$@"; do roots+=("$site/nvidia"); done
else
  python="${PYTHON:-python3}"
  # nvidia is a namespace package: every site-packages folder that has one contributes to its __path__.
  listing="$("$python" -c 'import nvidia; print("\n".join(nvidia.__path__))' 2>/dev/null)" \
    || { echo "cuda-libs: $python has no 'nvidia' package (the pip wheels of the CUDA libraries)" >&2; exit 1; }
  mapfile -t roots <<< "$listing"
fi

folders=()
missing=()
for library in "${required[@]}"; do
  found=""
  for root in "${roots[@]}"; do
    [ -n "$root" ] || continue
    for folder in "$root"/*/lib; do
      if [ -e "$folder/$library" ]; then found="$folder"; break 2; fi
    done
  done
  if [ -z "$found" ]; then missing+=("$library"); continue; fi
  case " ${folders[*]} " in *" $found "*) ;; *) folders+=("$found") ;; esac
done

if [ ${#missing[@]} -gt 0 ]; then
  echo "cuda-libs: not found: ${missing[*]} (looked in ${roots[*]/%//*/lib})" >&2
  exit 1
fi
(IFS=:; echo "${folders[*]}")
