#!/usr/bin/env bash
# The test command (README): installs vecinfer from source into the current Python environment,
# then runs the C++ unit tests (GoogleTest, CPU paths) and the Python test suite. GPU tests run
# when a CUDA GPU is present and skip otherwise.
#
#   bash scripts/test.sh
#
# Environment: VECINFER_CUDA=ON makes a missing nvcc an error (CI sets it, so CUDA compile errors
# fail the run); VECINFER_CUDA_JOBS bounds concurrent nvcc processes (default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

# torch 2.13.0: the CPU wheel where one is provided locally; a bare `torch` would pull CUDA wheels.
$PY -c "import torch" 2>/dev/null || $PY -m pip install torch==2.13.0
t0=$SECONDS
$PY -m pip install ".[test,hf]"
echo "vecinfer build + install: $((SECONDS - t0)) s"
$PY -c "import vecinfer; print('vecinfer', vecinfer.__version__, '| CUDA kernels built:', vecinfer.cuda_built(), '| GPU usable:', vecinfer.cuda_available())"

# C++ unit tests of the CPU reference implementations (a CPU-only build of the core: fast).
if ! { [ -f /usr/include/gtest/gtest.h ] || [ -f /usr/local/include/gtest/gtest.h ]; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libgtest-dev >/dev/null
  else
    echo "GoogleTest not found: install libgtest-dev (Debian/Ubuntu) to run the C++ tests" >&2
    exit 1
  fi
fi
t0=$SECONDS
cmake -S . -B build/cpp-tests $(command -v ninja >/dev/null && echo -G Ninja) -DVECINFER_CUDA=OFF -DVECINFER_BUILD_TESTS=ON -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/cpp-tests
echo "C++ tests build: $((SECONDS - t0)) s"
ctest --test-dir build/cpp-tests --output-on-failure

$PY -m pytest tests -q -rs
