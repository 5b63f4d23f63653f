#!/usr/bin/env bash
# One call on a GPU machine: build the package and the C++ benchmarks (one CMake build, for the
# H100/H200's sm_90a: CI compiles every architecture), run the GPU tests and the benchmarks, then
# compute-sanitizer (memcheck over the CUDA tests, racecheck over the kernels with shared memory).
# The most important steps run first, so a run cut short still reports them. Writes summary.md
# (as it goes) and logs.tgz (every log) into $OUT (default ./gpu-out).
#
#   bash scripts/gpu_check.sh [--quick|--attention]
#     --quick:     build + all tests, no sanitizer, no benchmarks
#     --attention: build + the attention tests + the attention benchmark (two shapes)
#     --e2e:       build + all tests + the end-to-end generation benchmark (needs an H200's
#                  memory for the default cache at batch 16 x 32k)
#
# Needs: nvcc, cmake, ninja, python3 with torch, nanobind, scikit-build-core and pytest, Google
# Benchmark; the nvidia-cutlass wheel installed or lying in .whl/ (carried to machines without a
# package index).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
MODE=${1:-}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16} VECINFER_CUDA_JOBS=8
SUMMARY="$OUT/summary.md"
BUILD=/tmp/vecinfer_build
: >"$SUMMARY"
status=0

step() {  # step NAME LOGFILE COMMAND...: runs, times, records pass/fail
  local name=$1 log=$2; shift 2
  local t0=$SECONDS
  "$@" >"$LOGS/$log" 2>&1
  local rc=$?
  local line="- $name: $([ $rc -eq 0 ] && echo PASS || echo "FAIL (rc=$rc)") in $((SECONDS - t0)) s (log: $log)"
  echo "$line" | tee -a "$SUMMARY"
  [ $rc -eq 0 ] || status=1
  return $rc
}

finish() {
  echo "overall: $([ $status -eq 0 ] && echo PASS || echo FAIL)" | tee -a "$SUMMARY"
  tar -C "$LOGS" -czf "$OUT/logs.tgz" .
  exit $status
}

{
  echo "# vecinfer GPU check, $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  nvcc --version | tail -1
  $PY -c 'import torch; print("torch", torch.__version__)'
} | tee -a "$SUMMARY"

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

BENCH_FLAG=ON
[ "$MODE" == "" ] || BENCH_FLAG=OFF
step "build package (pip, sm_90a; C++ benchmarks: $BENCH_FLAG)" build.log \
  $PY -m pip install -v --no-build-isolation --no-deps --target /tmp/vecinfer_pkg --upgrade \
  -C build-dir=$BUILD -C "cmake.define.VECINFER_CUDA_GENCODE=-gencode=arch=compute_90a,code=sm_90a" \
  -C cmake.define.VECINFER_BUILD_BENCHMARKS=$BENCH_FLAG . || finish
export PYTHONPATH=/tmp/vecinfer_pkg:$PYTHONPATH
grep -E "ptxas (warning|error)|spill" "$LOGS/build.log" | sort | uniq -c | head -20 >"$LOGS/ptxas_warnings.txt"

if [ "$MODE" == "--e2e" ]; then
  step "pytest (all, GPU present)" pytest.log $PY -m pytest tests -q -rs -p no:cacheprovider
  tail -3 "$LOGS/pytest.log" | tee -a "$SUMMARY"
  # expandable segments: the longest-context run allocates ~100 GiB of codes after the other runs
  step "end-to-end generation benchmark" bench_e2e.log env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    $PY -m vecinfer bench --e2e --json "$OUT/bench_e2e.json"
  cat "$LOGS/bench_e2e.log" >>"$SUMMARY"
  finish
fi

if [ "$MODE" == "--attention" ]; then
  step "pytest (attention)" pytest.log $PY -m pytest tests/test_attention.py -q -rs -x -p no:cacheprovider
  tail -15 "$LOGS/pytest.log" | tee -a "$SUMMARY"
  step "attention benchmark (quick)" bench_attn.log $PY -m vecinfer bench --quick
  cat "$LOGS/bench_attn.log" >>"$SUMMARY"
  finish
fi

step "pytest (all, GPU present)" pytest.log $PY -m pytest tests -q -rs -p no:cacheprovider
tail -3 "$LOGS/pytest.log" | tee -a "$SUMMARY"
[ "$MODE" == "--quick" ] && finish

step "attention benchmark (Python, against torch SDPA)" bench_attn.log \
  $PY -m vecinfer bench --json "$OUT/bench_attention.json" --plot "$OUT/bench_attention.png"
cat "$LOGS/bench_attn.log" >>"$SUMMARY"
step "C++ benchmarks (Google Benchmark: copy, attention)" bench_cpp.log \
  $(find $BUILD -name vecinfer_bench -type f | head -1) --benchmark_filter='copy|attention' \
  --benchmark_out="$OUT/bench_cpp.json" --benchmark_out_format=json
grep -E "^attention|^copy|^-|^Benchmark" "$LOGS/bench_cpp.log" >>"$SUMMARY"

export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # so out-of-bounds accesses do not land in cached blocks
step "compute-sanitizer memcheck (CUDA tests)" memcheck.log \
  timeout 300 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \
  $PY -m pytest tests -q -x -p no:cacheprovider -k "cuda and not long_sequence and not hf"
tail -2 "$LOGS/memcheck.log" | tee -a "$SUMMARY"
step "compute-sanitizer racecheck (attention, encode, decode kernels)" racecheck.log \
  timeout 200 compute-sanitizer --tool racecheck --error-exitcode 1 --print-limit 20 \
  $PY -m pytest tests/test_attention.py tests/test_vq.py -q -x -p no:cacheprovider \
  -k "cuda and (bit_presets or real_kv or empty_parts or agrees)"
tail -2 "$LOGS/racecheck.log" | tee -a "$SUMMARY"
unset PYTORCH_NO_CUDA_MEMORY_CACHING

step "end-to-end generation benchmark" bench_e2e.log env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
  $PY -m vecinfer bench --e2e --json "$OUT/bench_e2e.json"
cat "$LOGS/bench_e2e.log" >>"$SUMMARY"
step "vecinfer demo (GPU)" demo.log $PY -m vecinfer demo
cat "$LOGS/demo.log" >>"$SUMMARY"
step "calibration timing (30 layers, 256-entry codebooks)" bench_calib.log $PY bench/bench_calibration.py
cat "$LOGS/bench_calib.log" >>"$SUMMARY"
step "transform/codec benchmark (Python)" bench_py.log $PY bench/bench_ops.py --json "$OUT/bench_ops.json"
cat "$LOGS/bench_py.log" >>"$SUMMARY"
finish
