#!/usr/bin/env bash
# One call on a GPU machine: build the package (sm_90a for the H100/H200; CI compiles every
# architecture) and an Ampere build of the kernels (compute_80 PTX, which the driver compiles for
# the GPU at load), run the GPU tests (the attention tests a second time on the Ampere build, with
# an A100's shared-memory budget), the benchmarks, Nsight Compute on the attention kernel and
# compute-sanitizer. The most important steps run first, so a run cut short still reports them.
# Writes summary.md (as it goes) and logs.tgz (every log) into $OUT (default ./gpu-out).
#
#   bash scripts/gpu_check.sh [--quick|--attention|--prefill|--kept|--paged-kept|--kept-e2e|--e2e|--tp] [--prebuilt DIR]
#     --quick:     build + all tests, no sanitizer, no benchmarks
#     --prefill:   build + the long-query tests (both builds) + their benchmark, Nsight Compute and
#                  compute-sanitizer
#     --attention: build + the attention tests (both builds) + the attention benchmark + Nsight Compute
#     --kept:      build + the kept-token and attention tests (both builds), the paged, long-query,
#                  cache and HF tests, the decode benchmark without kept tokens, with 1% kept, and
#                  with 64 kept and a 64-token window (KEPT_SHAPES, default four shapes; KEPT_BENCH=0
#                  skips them), racecheck over the full-precision blocks and the kept-token step
#                  (QuantizedKVCache and PagedKVCache), memcheck over both
#     --paged-kept: the kept-token and paged tests (both builds), racecheck and memcheck of the paged
#                  cache's kept-token steps, the serving benchmark without and with 64 kept tokens
#                  and a 64-token window
#     --kept-e2e:  the end-to-end generation benchmark at B=1 and B=16 x 32k, 32 new tokens, with
#                  the default quantizer and with 64 kept tokens and a 64-token window
#     --e2e:       build + all tests + the end-to-end generation benchmark (needs an H200's
#                  memory for the default cache at batch 16 x 32k)
#     --tp:        (two GPUs) the tensor-parallel tests, then bench/tp_e2e.py under torchrun, the runs
#                  named in TP_RUNS (default "8b 70b-speed 70b-longest"): the 8B-shaped model's
#                  equality and speed at 128k, the 70B-shaped model's speed at 128k, its longest
#                  contexts; "8b-fp16" runs the equality in fp16 (TP_TESTS=0 skips the tests)
#     --prebuilt DIR: use packages built elsewhere instead of building here (DIR/sm90/vecinfer and
#                  DIR/sm80/vecinfer, each with its _C module; see scripts/build_gpu_packages.sh)
#
# Needs: nvcc, cmake, ninja, python3 with torch, nanobind, scikit-build-core and pytest, Google
# Benchmark; the nvidia-cutlass wheel installed or lying in .whl/ (carried to machines without a
# package index); ncu and compute-sanitizer for those steps.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
LOGS=$(mktemp -d)
mkdir -p "$OUT"
MODE=""
PREBUILT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --prebuilt) PREBUILT=$2; shift 2 ;;
    *) MODE=$1; shift ;;
  esac
done
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
  $PY -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

# The two builds: SM90 (the package as users get it on Hopper) and SM80 (the Ampere path: compute_80
# PTX only, so that on a Hopper GPU the driver JIT-compiles it and the Ampere code runs).
if [ -n "$PREBUILT" ]; then
  SM90=$PWD/$PREBUILT/sm90 SM80=$PWD/$PREBUILT/sm80
  [ -d "$PREBUILT/lib" ] && export LD_LIBRARY_PATH=$PWD/$PREBUILT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  echo "- prebuilt packages: $PREBUILT" | tee -a "$SUMMARY"
else
  SM90=/tmp/vecinfer_pkg SM80=/tmp/vecinfer_sm80
  BENCH_FLAG=ON
  [ "$MODE" == "" ] || BENCH_FLAG=OFF
  step "build package (pip, sm_90a; C++ benchmarks: $BENCH_FLAG)" build.log \
    $PY -m pip install -v --no-build-isolation --no-deps --target $SM90 --upgrade \
    -C build-dir=$BUILD -C "cmake.define.VECINFER_CUDA_GENCODE=-gencode=arch=compute_90a,code=sm_90a" \
    -C cmake.define.VECINFER_BUILD_BENCHMARKS=$BENCH_FLAG . || finish
  grep -E "ptxas (warning|error)|spill" "$LOGS/build.log" | sort | uniq -c | head -20 >"$LOGS/ptxas_warnings.txt"
  if [ "$MODE" != "--e2e" ]; then
    step "build the Ampere path (compute_80 PTX)" build_sm80.log \
      $PY -m pip install -v --no-build-isolation --no-deps --target $SM80 --upgrade -C build-dir=/tmp/vecinfer_build80 \
      -C "cmake.define.VECINFER_CUDA_GENCODE=-gencode=arch=compute_80,code=compute_80" .
  fi
fi
export PYTHONPATH=$SM90:${PYTHONPATH:-}
$PY -c "import vecinfer; print('vecinfer', vecinfer.__file__, 'CUDA usable:', vecinfer.cuda_available())" | tee -a "$SUMMARY"

ampere_tests() {  # the attention tests on the Ampere build with an A100's shared-memory budget
  [ -d "$SM80/vecinfer" ] || { echo "- Ampere path: no SM80 build" | tee -a "$SUMMARY"; status=1; return; }
  step "pytest (attention, Ampere path: compute_80 PTX, A100 shared memory 166912 B)" pytest_sm80.log \
    env PYTHONPATH=$SM80:${PYTHONPATH#$SM90:} VECINFER_MAX_SHARED_BYTES=166912 \
    $PY -m pytest tests/test_attention.py -q -rs -p no:cacheprovider -k cuda
  tail -3 "$LOGS/pytest_sm80.log" | tee -a "$SUMMARY"
}

profile() {  # Nsight Compute on the coded attention kernel at the two shapes of bench/NOTES.md
  for shape in "32 32768" "1 131072"; do
    set -- $shape
    step "ncu attention B=$1 S=$2" "ncu_B$1.log" \
      ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
      --section Occupancy --section SchedulerStats --section LaunchStats -k regex:attention_kernel -c 1 \
      $PY bench/profile_attention.py --batch "$1" --tokens "$2"
    grep -E "DRAM Throughput|L1/TEX Cache Throughput|Memory Throughput|Compute \(SM\) Throughput|Duration|Issue Slots Busy|Eligible Warps|Achieved Occupancy|Registers Per|Shared Memory Config|No Eligible|Block Size" \
      "$LOGS/ncu_B$1.log" | sed 's/^ */    /' >>"$SUMMARY"
  done
}

if [ "$MODE" == "--e2e" ]; then
  step "pytest (all, GPU present)" pytest.log $PY -m pytest tests -q -rs -p no:cacheprovider
  tail -3 "$LOGS/pytest.log" | tee -a "$SUMMARY"
  # expandable segments: the longest-context run allocates ~100 GiB of codes after the other runs
  step "end-to-end generation benchmark" bench_e2e.log env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
    $PY -m vecinfer bench --e2e --json "$OUT/bench_e2e.json"
  cat "$LOGS/bench_e2e.log" >>"$SUMMARY"
  finish
fi

if [ "$MODE" == "--prefill" ]; then
  PREFILL_TESTS="tests/test_prefill.py tests/test_paged.py tests/test_attention.py"
  step "pytest (long queries, paged, attention, second turn)" pytest.log $PY -m pytest $PREFILL_TESTS \
    tests/test_hf_cache.py -k "not smollm2" -q -rs -p no:cacheprovider
  tail -15 "$LOGS/pytest.log" | tee -a "$SUMMARY"
  [ -d "$SM80/vecinfer" ] && step "pytest (long queries, Ampere path, A100 shared memory)" pytest_sm80.log \
    env PYTHONPATH=$SM80:${PYTHONPATH#$SM90:} VECINFER_MAX_SHARED_BYTES=166912 \
    $PY -m pytest tests/test_prefill.py -q -rs -p no:cacheprovider && tail -3 "$LOGS/pytest_sm80.log" | tee -a "$SUMMARY"
  step "long-query benchmark" bench_prefill.log $PY -m vecinfer bench --prefill --json "$OUT/bench_prefill.json"
  cat "$LOGS/bench_prefill.log" >>"$SUMMARY"
  step "ncu long-query kernel Tq=2048 S=32k" ncu_prefill.log \
    ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
    --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis -k regex:prefill_kernel -c 1 \
    $PY bench/profile_attention.py --batch 1 --tokens 32768 --queries 2048
  # the kernel's name says which variant ran (prefill_kernel<T, D, 1>: Hopper, wgmma)
  grep -E "prefill_kernel<|Throughput|Duration|Issue Slots|Eligible|Occupancy|Registers|No Eligible|Pipe|Stall|spill|Local" \
    "$LOGS/ncu_prefill.log" | sed 's/^ */    /' >>"$SUMMARY"
  # uncached allocations: out-of-bounds accesses do not land in cached blocks; tests that capture CUDA
  # graphs are left out, since every allocation inside a capture is then a cudaMalloc, refused there
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  step "compute-sanitizer memcheck (long queries)" memcheck.log timeout 300 compute-sanitizer --tool memcheck \
    --error-exitcode 1 --print-limit 20 $PY -m pytest tests/test_prefill.py -q -x -p no:cacheprovider \
    -k "not split and not lengths_and_dims and not cuda_graph"
  tail -2 "$LOGS/memcheck.log" | tee -a "$SUMMARY"
  step "compute-sanitizer racecheck (long queries)" racecheck.log timeout 200 compute-sanitizer --tool racecheck \
    --error-exitcode 1 --print-limit 20 $PY -m pytest tests/test_prefill.py -q -x -p no:cacheprovider \
    -k "lengths_and_dims and 65 or real_kv or paged"
  tail -2 "$LOGS/racecheck.log" | tee -a "$SUMMARY"
  finish
fi

if [ "$MODE" == "--kept" ]; then
  step "pytest (kept tokens, attention, paged, cache, custom ops, long queries, HF cache)" pytest.log \
    $PY -m pytest tests/test_kept_tokens.py tests/test_attention.py tests/test_paged.py tests/test_cache.py \
    tests/test_custom_ops.py tests/test_prefill.py tests/test_hf_cache.py -k "not smollm2" -q -rs -p no:cacheprovider
  tail -15 "$LOGS/pytest.log" | tee -a "$SUMMARY"
  [ -d "$SM80/vecinfer" ] && step "pytest (kept tokens, Ampere path, A100 shared memory)" pytest_sm80.log \
    env PYTHONPATH=$SM80:${PYTHONPATH#$SM90:} VECINFER_MAX_SHARED_BYTES=166912 \
    $PY -m pytest tests/test_kept_tokens.py tests/test_attention.py -k "cuda" -q -rs -p no:cacheprovider &&
    tail -3 "$LOGS/pytest_sm80.log" | tee -a "$SUMMARY"
  SHAPES_ARG="--shapes=${KEPT_SHAPES:-B=1 S=128k,B=32 S=32k,B=128 S=8k,B=1 S=1M}"
  [ "${KEPT_BENCH:-1}" = 0 ] || for keep in "0 0 128" "0.01 0 128" "0 64 64"; do
    read -r fraction tokens recent <<<"$keep"
    name="keep_${fraction}_${tokens}_w${recent}"
    step "decode benchmark, keep fraction $fraction, keep tokens $tokens, window $recent" "bench_$name.log" \
      $PY -m vecinfer bench "$SHAPES_ARG" --keep-fraction "$fraction" --keep-tokens "$tokens" --recent "$recent" \
      --json "$OUT/bench_$name.json"
    cat "$LOGS/bench_$name.log" >>"$SUMMARY"
  done
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  step "compute-sanitizer racecheck (full-precision parts, in coded blocks)" racecheck.log timeout 300 \
    compute-sanitizer --tool racecheck --error-exitcode 1 --print-limit 20 $PY -m pytest tests/test_kept_tokens.py \
    -q -x -p no:cacheprovider -k "cuda and hundreds"
  tail -2 "$LOGS/racecheck.log" | tee -a "$SUMMARY"
  # the kept-token step kernel (the cache's choice tests) and the attention over kept tokens
  step "compute-sanitizer racecheck (kept-token step)" racecheck_step.log timeout 200 \
    compute-sanitizer --tool racecheck --error-exitcode 1 --print-limit 20 $PY -m pytest tests/test_kept_tokens.py \
    -q -x -p no:cacheprovider -k "cuda and (batched or paged)"
  tail -2 "$LOGS/racecheck_step.log" | tee -a "$SUMMARY"
  step "compute-sanitizer memcheck (kept tokens)" memcheck.log timeout 300 compute-sanitizer --tool memcheck \
    --error-exitcode 1 --print-limit 20 $PY -m pytest tests/test_kept_tokens.py -q -x -p no:cacheprovider \
    -k "cuda and (most_novel or batched or equals or schedules or paged)"
  tail -2 "$LOGS/memcheck.log" | tee -a "$SUMMARY"
  finish
fi

if [ "$MODE" == "--paged-kept" ]; then
  step "pytest (kept tokens, paged)" pytest.log $PY -m pytest tests/test_kept_tokens.py tests/test_paged.py -q -rs \
    -p no:cacheprovider
  tail -5 "$LOGS/pytest.log" | tee -a "$SUMMARY"
  [ -d "$SM80/vecinfer" ] && step "pytest (kept tokens, paged, Ampere path, A100 shared memory)" pytest_sm80.log \
    env PYTHONPATH=$SM80:${PYTHONPATH#$SM90:} VECINFER_MAX_SHARED_BYTES=166912 \
    $PY -m pytest tests/test_kept_tokens.py tests/test_paged.py -k "cuda or gpu" -q -rs -p no:cacheprovider &&
    tail -3 "$LOGS/pytest_sm80.log" | tee -a "$SUMMARY"
  export PYTORCH_NO_CUDA_MEMORY_CACHING=1
  for tool in racecheck memcheck; do
    step "compute-sanitizer $tool (paged kept-token steps)" "${tool}_paged.log" timeout 240 compute-sanitizer \
      --tool $tool --error-exitcode 1 --print-limit 20 $PY -m pytest tests/test_kept_tokens.py -q -x \
      -p no:cacheprovider -k "cuda and paged"
    tail -2 "$LOGS/${tool}_paged.log" | tee -a "$SUMMARY"
  done
  unset PYTORCH_NO_CUDA_MEMORY_CACHING
  for keep in "0 128" "64 64"; do
    read -r tokens recent <<<"$keep"
    step "serving benchmark, keep tokens $tokens, window $recent" "serving_keep_${tokens}.log" \
      $PY -m vecinfer bench --serving --keep-tokens "$tokens" --recent "$recent" --json "$OUT/serving_keep_$tokens.json"
    cat "$LOGS/serving_keep_${tokens}.log" >>"$SUMMARY"
  done
  finish
fi

if [ "$MODE" == "--kept-e2e" ]; then
  for keep in "0 128" "64 64"; do
    read -r tokens recent <<<"$keep"
    extra=""
    [ "$tokens" != 0 ] && extra="--keep-tokens $tokens"
    step "end-to-end generation, keep tokens $tokens, window $recent" "e2e_keep_${tokens}_w$recent.log" \
      env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True $PY -m vecinfer bench --e2e --runs 1x32768,16x32768 \
      --new-tokens 32 --no-longest --recent "$recent" $extra --json "$OUT/e2e_keep_${tokens}_w$recent.json"
    cat "$LOGS/e2e_keep_${tokens}_w$recent.log" >>"$SUMMARY"
  done
  finish
fi

if [ "$MODE" == "--tp" ]; then
  # NVLink multicast stays off: the machine's GPUs are shared (the device tool's KINDS.md)
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
  LOGS=$OUT/logs && mkdir -p "$LOGS"  # in $OUT as they are written: a run cut short still returns them
  [ "$(nvidia-smi -L | wc -l)" -ge 2 ] || { echo "- --tp needs two GPUs" | tee -a "$SUMMARY"; status=1; finish; }
  if [ "${TP_TESTS:-1}" = 1 ]; then
    step "pytest (tensor parallel)" pytest_tp.log $PY -m pytest tests/test_tp.py -q -rs -p no:cacheprovider
    tail -3 "$LOGS/pytest_tp.log" | tee -a "$SUMMARY"
  fi
  TORCHRUN="$PY -m torch.distributed.run --nproc-per-node 2 bench/tp_e2e.py"
  for run in ${TP_RUNS:-8b 70b-speed 70b-longest}; do
    case $run in
      8b) step "torchrun x2: Llama-3.1-8B shape, equality and speed at 128k" tp_8b.log \
            timeout 420 $TORCHRUN --model llama-3.1-8b --phases equality,speed --json "$OUT/tp_8b.json" ;;
      8b-fp16) step "torchrun x2: Llama-3.1-8B shape in fp16, equality" tp_8b_fp16.log \
            timeout 300 $TORCHRUN --model llama-3.1-8b --dtype float16 --phases equality --json "$OUT/tp_8b_fp16.json" ;;
      70b-speed) step "torchrun x2: Llama-3.1-70B shape, speed at 128k" tp_70b_speed.log \
            timeout 420 $TORCHRUN --model llama-3.1-70b --phases speed --json "$OUT/tp_70b_speed.json" ;;
      70b-longest) step "torchrun x2: Llama-3.1-70B shape, longest contexts" tp_70b_longest.log \
            env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 420 \
            $TORCHRUN --model llama-3.1-70b --phases longest --json "$OUT/tp_70b_longest.json" ;;
      *) echo "- unknown TP_RUNS entry: $run" | tee -a "$SUMMARY"; status=1 ;;
    esac
    grep -E "^\[tp_e2e\]|Error|error" "$LOGS/tp_${run//-/_}.log" 2>/dev/null | tail -25 >>"$SUMMARY"
  done
  finish
fi

if [ "$MODE" == "--attention" ]; then
  step "pytest (attention)" pytest.log $PY -m pytest tests/test_attention.py -q -rs -p no:cacheprovider
  tail -15 "$LOGS/pytest.log" | tee -a "$SUMMARY"
  ampere_tests
  step "attention benchmark" bench_attn.log $PY -m vecinfer bench --json "$OUT/bench_attention.json"
  cat "$LOGS/bench_attn.log" >>"$SUMMARY"
  profile
  finish
fi

step "pytest (all, GPU present)" pytest.log $PY -m pytest tests -q -rs -p no:cacheprovider
tail -3 "$LOGS/pytest.log" | tee -a "$SUMMARY"
[ "$MODE" == "--quick" ] && finish
ampere_tests

step "attention benchmark (Python, against torch SDPA)" bench_attn.log \
  $PY -m vecinfer bench --json "$OUT/bench_attention.json" --plot "$OUT/bench_attention.png"
cat "$LOGS/bench_attn.log" >>"$SUMMARY"
BENCH_BIN=$(find $BUILD "${PREBUILT:-/nonexistent}" -name vecinfer_bench -type f 2>/dev/null | head -1)
step "C++ benchmarks (Google Benchmark: copy, attention)" bench_cpp.log \
  "$BENCH_BIN" --benchmark_filter='copy|attention' --benchmark_out="$OUT/bench_cpp.json" --benchmark_out_format=json
grep -E "^attention|^copy|^-|^Benchmark" "$LOGS/bench_cpp.log" >>"$SUMMARY"
profile

export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # as in --prefill: graph captures left out
step "compute-sanitizer memcheck (CUDA tests)" memcheck.log \
  timeout 300 compute-sanitizer --tool memcheck --error-exitcode 1 --print-limit 20 \
  $PY -m pytest tests -q -x -p no:cacheprovider -k "cuda and not long_sequence and not hf and not cuda_graph"
tail -2 "$LOGS/memcheck.log" | tee -a "$SUMMARY"
step "compute-sanitizer racecheck (attention, encode, decode kernels)" racecheck.log \
  timeout 200 compute-sanitizer --tool racecheck --error-exitcode 1 --print-limit 20 \
  $PY -m pytest tests/test_attention.py tests/test_vq.py -q -x -p no:cacheprovider \
  -k "cuda and (bit_presets or real_kv or empty_parts or agrees or paged)"
tail -2 "$LOGS/racecheck.log" | tee -a "$SUMMARY"
unset PYTORCH_NO_CUDA_MEMORY_CACHING

step "vecinfer demo (GPU)" demo.log $PY -m vecinfer demo
cat "$LOGS/demo.log" >>"$SUMMARY"
step "calibration timing (30 layers, 256-entry codebooks)" bench_calib.log $PY bench/bench_calibration.py
cat "$LOGS/bench_calib.log" >>"$SUMMARY"
step "transform/codec benchmark (Python)" bench_py.log $PY bench/bench_ops.py --json "$OUT/bench_ops.json"
cat "$LOGS/bench_py.log" >>"$SUMMARY"
finish
