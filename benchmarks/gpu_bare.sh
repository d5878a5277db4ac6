#!/usr/bin/env bash
# Every GPU check on a GPU box where `pip install -e .` is not possible (no package index,
# a system torch): builds the kernels in place with CMake, runs from the source tree.
#
#   bash benchmarks/gpu_bare.sh [OUT_DIR] [gpu_check args...]
#
# Needs python3 with torch (CUDA), numpy, Pillow, onnx and cuda-python; nvcc + cmake for the
# prebuilt kernels (without them the CUDA kernels come from NVRTC and the host kernels from
# the numpy twin, and the report says so). ZEROPUR_SHARED must name the shared data folder.
set -u
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_check}
shift || true
export PYTHONPATH="$PWD:$PWD/export${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
build=$(mktemp -d)
if cmake -S . -B "$build/b" -DZEROPUR_CUDA_ARCHS="${ZEROPUR_CUDA_ARCHS:-90}" >"$build/cmake.log" 2>&1 \
   && cmake --build "$build/b" -j 8 >>"$build/cmake.log" 2>&1 \
   && cmake --install "$build/b" --prefix "$build/i" >>"$build/cmake.log" 2>&1; then
  cp "$build"/i/zeropur_rt/kernels/* zeropur_rt/kernels/
  echo "kernels built: $(ls "$build"/i/zeropur_rt/kernels | tr '\n' ' ')"
else
  echo "CMake build failed (NVRTC and the numpy twin will be used); log:"; tail -20 "$build/cmake.log"
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used,memory.total --format=csv || true
python3 -m benchmarks.gpu_check --out "$out" "$@"
