#!/usr/bin/env bash
# One call on a GPU machine: build the package and the C++ benchmarks, run the GPU tests,
# compute-sanitizer (memcheck over the CUDA tests, racecheck over the kernels with shared memory),
# then the Python and C++ benchmarks. Writes summary.md and logs.tgz (every log) into $OUT
# (default ./gpu-out).
#
#   bash scripts/gpu_check.sh [--quick|--attention]
#     --quick:     build + all tests, no sanitizer, no benchmarks
#     --attention: build + the attention tests + the attention benchmark (two shapes)
#
# Needs: nvcc, cmake, ninja, python3 with torch, nanobind, scikit-build-core and pytest; the
# nvidia-cutlass wheel installed or lying in .whl/ (carried to machines without a package index).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
QUICK=${1:-}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-16} VECINFER_CUDA_JOBS=8
SUMMARY="$OUT/summary.md"
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
CUTLASS_INC=$($PY -c "import importlib.util,os; s=importlib.util.find_spec('cutlass_library'); print(os.path.join(s.submodule_search_locations[0],'source','include'))")

GENCODE=()  # the attention-only check builds for the H100/H200 only, to save device time
[ "$QUICK" == "--attention" ] && GENCODE=(-C "cmake.define.VECINFER_CUDA_GENCODE=-gencode=arch=compute_90a,code=sm_90a")
step "build package (pip)" build.log \
  $PY -m pip install -v --no-build-isolation --no-deps --target /tmp/vecinfer_pkg --upgrade "${GENCODE[@]}" . \
  || { tar -C "$LOGS" -czf "$OUT/logs.tgz" .; exit 1; }
export PYTHONPATH=/tmp/vecinfer_pkg:$PYTHONPATH
grep -E "ptxas (warning|error)|spill" "$LOGS/build.log" | sort | uniq -c | head -20 >"$LOGS/ptxas_warnings.txt"

if [ "$QUICK" == "--attention" ]; then
  step "pytest (attention)" pytest.log $PY -m pytest tests/test_attention.py -q -rs -x -p no:cacheprovider
  tail -15 "$LOGS/pytest.log" | tee -a "$SUMMARY"
  step "attention benchmark (quick)" bench_attn.log $PY bench/bench_attention.py --quick
  cat "$LOGS/bench_attn.log" >>"$SUMMARY"
  echo "overall: $([ $status -eq 0 ] && echo PASS || echo FAIL)" | tee -a "$SUMMARY"
  tar -C "$LOGS" -czf "$OUT/logs.tgz" .
  exit $status
fi
step "pytest (all, GPU present)" pytest.log $PY -m pytest tests -q -rs -p no:cacheprovider
tail -3 "$LOGS/pytest.log" | tee -a "$SUMMARY"

if [ "$QUICK" != "--quick" ]; then
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # so out-of-bounds accesses do not land in cached blocks
  step "compute-sanitizer memcheck (CUDA tests)" memcheck.log \
    timeout 300 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \
    $PY -m pytest tests -q -x -p no:cacheprovider -k "cuda and not long_sequence"
  tail -4 "$LOGS/memcheck.log" | tee -a "$SUMMARY"
  step "compute-sanitizer racecheck (encode/decode kernels)" racecheck.log \
    timeout 120 compute-sanitizer --tool racecheck --error-exitcode 1 --print-limit 20 \
    $PY -m pytest tests/test_vq.py -q -x -p no:cacheprovider -k "cuda and (agrees or large_rows)"
  tail -4 "$LOGS/racecheck.log" | tee -a "$SUMMARY"
  step "compute-sanitizer racecheck (attention kernel)" racecheck_attn.log \
    timeout 200 compute-sanitizer --tool racecheck --error-exitcode 1 --print-limit 20 \
    $PY -m pytest tests/test_attention.py -q -x -p no:cacheprovider -k "cuda and (bit_presets or real_kv or empty_parts)"
  tail -4 "$LOGS/racecheck_attn.log" | tee -a "$SUMMARY"
  unset PYTORCH_NO_CUDA_MEMORY_CACHING

  step "vecinfer demo (GPU)" demo.log $PY -m vecinfer demo
  cat "$LOGS/demo.log" >>"$SUMMARY"
  step "calibration timing (30 layers, 256-entry codebooks)" bench_calib.log $PY bench/bench_calibration.py
  cat "$LOGS/bench_calib.log" >>"$SUMMARY"
  step "python benchmark" bench_py.log $PY bench/bench_ops.py --json "$LOGS/bench_py.json"
  cat "$LOGS/bench_py.log" >>"$SUMMARY"
  step "attention benchmark" bench_attn.log $PY bench/bench_attention.py --json "$LOGS/bench_attn.json"
  cat "$LOGS/bench_attn.log" >>"$SUMMARY"

  step "build C++ benchmarks" build_cpp.log bash -c "cmake -S . -B /tmp/cppbench -G Ninja \
      -DVECINFER_BUILD_BENCHMARKS=ON -DVECINFER_CUTLASS_INCLUDE_DIR='$CUTLASS_INC' \
      -DVECINFER_CUDA_GENCODE='-gencode=arch=compute_90a,code=sm_90a' -DVECINFER_CUDA_JOBS=8 && cmake --build /tmp/cppbench"
  step "C++ benchmarks (Google Benchmark)" bench_cpp.log /tmp/cppbench/vecinfer_bench \
    --benchmark_out="$LOGS/bench_cpp.json" --benchmark_out_format=json
  grep -E "^BM_|^-|^Benchmark" "$LOGS/bench_cpp.log" >>"$SUMMARY"
fi
echo "overall: $([ $status -eq 0 ] && echo PASS || echo FAIL)" | tee -a "$SUMMARY"
tar -C "$LOGS" -czf "$OUT/logs.tgz" .
exit $status
