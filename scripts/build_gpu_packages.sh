#!/usr/bin/env bash
# Builds, on a machine without a GPU, what `gpu_check.sh --prebuilt DIR` runs, so the GPU machine's
# time goes to tests and measurements:
#   DIR/sm90/vecinfer   the package with kernels for sm_90a (Hopper)
#   DIR/sm80/vecinfer   the package with the kernels as compute_80 PTX (the Ampere path)
#   DIR/bin/vecinfer_bench, DIR/lib   the Google Benchmark binary and the shared libraries it and
#                       the modules need beyond the GPU machine's own
#
#   bash scripts/build_gpu_packages.sh DIR [PYTHON]
#
# PYTHON (default python3.12) must be the GPU machine's Python version and have nanobind (< 3),
# cmake, ninja and nvidia-cutlass installed; Google Benchmark (libbenchmark-dev) builds the binary.
# The CMake build trees are ${BUILD_PREFIX}90 and ${BUILD_PREFIX}80 (default /tmp/vecinfer_gpu_build),
# kept between runs so that a rebuild compiles only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:?usage: build_gpu_packages.sh DIR [PYTHON]}
PY=${2:-python3.12}
PYBIN=$(dirname "$(command -v "$PY")")
CUTLASS=$("$PY" -c "import cutlass_library, os; print(os.path.join(cutlass_library.__path__[0], 'source', 'include'))")
mkdir -p "$DIR/lib" "$DIR/bin"
for arch in sm90 sm80; do
  gencode="-gencode=arch=compute_90a,code=sm_90a"
  bench=ON
  if [ $arch = sm80 ]; then gencode="-gencode=arch=compute_80,code=compute_80"; bench=OFF; fi
  build=${BUILD_PREFIX:-/tmp/vecinfer_gpu_build}${arch#sm}
  t0=$SECONDS
  PATH=$PYBIN:$PATH cmake -S . -B $build -G Ninja -DCMAKE_BUILD_TYPE=Release -DVECINFER_CUDA=ON \
    -DVECINFER_BUILD_PYTHON=ON -DVECINFER_BUILD_BENCHMARKS=$bench -DPython_EXECUTABLE="$(command -v "$PY")" \
    -DVECINFER_CUDA_GENCODE="$gencode" -DVECINFER_CUTLASS_INCLUDE_DIR="$CUTLASS" >/dev/null
  PATH=$PYBIN:$PATH cmake --build $build
  echo "$arch build: $((SECONDS - t0)) s"
  rm -rf "$DIR/$arch" && mkdir -p "$DIR/$arch"
  cp -r python/vecinfer "$DIR/$arch/vecinfer"
  cp $build/_C*.so "$DIR/$arch/vecinfer/"
  [ $bench = ON ] && cp $build/vecinfer_bench "$DIR/bin/"
done
# libraries the GPU machine's image may lack (OpenMP of the CPU paths, Google Benchmark)
for lib in libgomp.so.1 libbenchmark.so.1debian; do
  path=$(ldconfig -p | awk -v l=$lib '$1 == l {print $NF; exit}')
  [ -n "$path" ] && cp -L "$path" "$DIR/lib/"
done
du -sh "$DIR"
