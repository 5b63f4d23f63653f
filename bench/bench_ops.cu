// Microbenchmarks of the GPU ops through the public C++ API (vecinfer::cuda::*), against a
// device-to-device copy of the same bytes as the bandwidth ceiling. The attention benchmarks also
// report "x_vs_fp16_at_copy_bw": the time an fp16 attention kernel would need to read its K/V at
// the copy bandwidth, over the measured time (the Python benchmark compares with torch SDPA).
//
//   vecinfer_bench [--benchmark_filter=REGEX] [--benchmark_format=json] ...
//
// Each iteration is timed with CUDA events around the one op (UseManualTime), after one untimed
// warm-up call. Bytes are what the op must read + write (tables and codebooks are counted where
// they are not negligible), reported as bytes_per_second; "pct_of_copy" is that bandwidth as a
// percentage of the 1 GiB device-to-device copy measured in the same process. Inputs are filled
// with hash-based pseudo-random values (never zeros); inputs smaller than 512 MiB are rotated
// between two buffers, so nothing is served from the 50 MB L2 across iterations.
#include <benchmark/benchmark.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "vecinfer/attention.h"
#include "vecinfer/ops.h"

namespace {

using vecinfer::Codebook;
using vecinfer::DType;
using vecinfer::RowLayout;
using vecinfer::Status;
using vecinfer::Transform;
using vecinfer::TransformKind;

constexpr int64_t kMiB = int64_t{1} << 20;
constexpr int64_t kGiB = int64_t{1} << 30;
constexpr int64_t kKvHeads = 8;       // heads of the benchmark layouts (and rows of the tables)
constexpr int64_t kTokens = 4096;     // tokens_per_head
constexpr double kMinTime = 0.25;     // seconds of measured time per repetition
constexpr int kRepetitions = 3;

// ---------------------------------------------------------------------------------------------
// Initialisation kernels: a counter-based hash gives reproducible, nonzero pseudo-random data.
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ uint64_t mix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Uniform in (0, 1), never 0.
__device__ __forceinline__ float unit(uint64_t h) {
  return (static_cast<float>(h >> 40) + 0.5f) * (1.0f / 16777216.0f);
}

// bf16 values, roughly normal (sum of four uniforms), magnitude bounded away from zero.
__global__ void fill_bf16_kernel(__nv_bfloat16* p, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x) {
    const uint64_t h1 = mix64(seed ^ (2 * i)), h2 = mix64(seed ^ (2 * i + 1));
    float v = unit(h1) + unit(h1 << 24) + unit(h2) + unit(h2 << 24) - 2.0f;  // in (-2, 2)
    v = v >= 0.f ? v + 1e-3f : v - 1e-3f;
    p[i] = __float2bfloat16(1.7f * v);
  }
}

// float32 values uniform in [lo, hi).
__global__ void fill_f32_kernel(float* p, int64_t n, uint64_t seed, float lo, float hi) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    p[i] = lo + (hi - lo) * unit(mix64(seed ^ i));
}

// Random bytes (every byte pattern is a valid code stream for every code width).
__global__ void fill_bytes_kernel(uint8_t* p, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    p[i] = static_cast<uint8_t>(mix64(seed ^ i) >> 56);
}

constexpr int kFillGrid = 1024, kFillThreads = 256;

// ---------------------------------------------------------------------------------------------
// Device buffers, allocated and filled once per process (keyed by name) and shared between
// benchmarks; a benchmark only reads from "input" buffers and writes to "output" buffers.
// ---------------------------------------------------------------------------------------------

enum class Fill { kNone, kBf16, kBytes, kScale, kMean, kCentroids };

struct Buffers {
  std::map<std::string, void*> ptrs;
  ~Buffers() { release(); }
  void release() {
    for (auto& kv : ptrs) cudaFree(kv.second);
    ptrs.clear();
  }
};
Buffers& buffers() {
  static Buffers b;
  return b;
}

cudaStream_t g_stream = nullptr;
double g_copy_bytes_per_s = 0.0;  // the ceiling, from the copy benchmark (or measured on demand)

std::string cuda_message(const char* what, cudaError_t err) {
  return std::string(what) + ": " + cudaGetErrorString(err);
}

bool cuda_ok(benchmark::State& state, cudaError_t err, const char* what) {
  if (err == cudaSuccess) return true;
  state.SkipWithError(cuda_message(what, err).c_str());
  return false;
}

bool status_ok(benchmark::State& state, const Status& s, const char* what) {
  if (s.ok()) return true;
  state.SkipWithError((std::string(what) + ": " + s.message).c_str());
  return false;
}

// A device buffer of `bytes` bytes called `name`, filled as `fill` asks on first use.
void* get_buffer(benchmark::State& state, const std::string& name, int64_t bytes, Fill fill, uint64_t seed) {
  const std::string key = name + "/" + std::to_string(bytes);
  auto it = buffers().ptrs.find(key);
  if (it != buffers().ptrs.end()) return it->second;
  void* p = nullptr;
  if (!cuda_ok(state, cudaMalloc(&p, static_cast<size_t>(bytes)), "cudaMalloc")) return nullptr;
  switch (fill) {
    case Fill::kNone:
      break;
    case Fill::kBf16:
      fill_bf16_kernel<<<kFillGrid, kFillThreads, 0, g_stream>>>(static_cast<__nv_bfloat16*>(p), bytes / 2, seed);
      break;
    case Fill::kBytes:
      fill_bytes_kernel<<<kFillGrid, kFillThreads, 0, g_stream>>>(static_cast<uint8_t*>(p), bytes, seed);
      break;
    case Fill::kScale:
      fill_f32_kernel<<<kFillGrid, kFillThreads, 0, g_stream>>>(static_cast<float*>(p), bytes / 4, seed, 0.5f, 2.0f);
      break;
    case Fill::kMean:
      fill_f32_kernel<<<kFillGrid, kFillThreads, 0, g_stream>>>(static_cast<float*>(p), bytes / 4, seed, -0.5f, 0.5f);
      break;
    case Fill::kCentroids:
      fill_f32_kernel<<<kFillGrid, kFillThreads, 0, g_stream>>>(static_cast<float*>(p), bytes / 4, seed, -2.0f, 2.0f);
      break;
  }
  if (!cuda_ok(state, cudaGetLastError(), "fill kernel launch") ||
      !cuda_ok(state, cudaStreamSynchronize(g_stream), "fill kernel")) {
    cudaFree(p);
    return nullptr;
  }
  buffers().ptrs[key] = p;
  return p;
}

// `count` input buffers of `bytes` each: 2 below 512 MiB (rotated), else 1.
bool get_inputs(benchmark::State& state, const std::string& name, int64_t bytes, Fill fill,
                std::vector<void*>& out) {
  const int count = bytes < 512 * kMiB ? 2 : 1;
  out.clear();
  for (int i = 0; i < count; ++i) {
    void* p = get_buffer(state, name + "#" + std::to_string(i), bytes, fill, 0x5eed0000u + 977u * i + bytes);
    if (!p) return false;
    out.push_back(p);
  }
  return true;
}

RowLayout key_layout(int64_t bytes_of_bf16, int32_t head_dim) {
  RowLayout l;
  l.head_dim = head_dim;
  l.num_rows = bytes_of_bf16 / (2 * head_dim);
  l.num_heads = kKvHeads;
  l.tokens_per_head = kTokens;
  return l;  // callers pass sizes that are whole multiples of kKvHeads * kTokens rows
}

// Scale + mean tables [kKvHeads, head_dim] and the Hadamard rotation.
bool key_transform(benchmark::State& state, int32_t head_dim, Transform& t, int64_t rows = kKvHeads) {
  const int64_t table_bytes = rows * head_dim * int64_t{sizeof(float)};
  t = Transform{};
  t.scale = static_cast<const float*>(get_buffer(state, "scale", table_bytes, Fill::kScale, 11));
  t.mean = static_cast<const float*>(get_buffer(state, "mean", table_bytes, Fill::kMean, 12));
  t.table_rows = rows;
  t.hadamard = true;
  return t.scale != nullptr && t.mean != nullptr;
}

bool codebook(benchmark::State& state, int sub_dim, int code_bits, Codebook& cb) {
  cb = Codebook{};
  cb.sub_dim = sub_dim;
  cb.code_bits = code_bits;
  cb.num_codebooks = 1;
  const int64_t bytes = cb.num_centroids() * sub_dim * int64_t{sizeof(float)};
  cb.centroids = static_cast<const float*>(
      get_buffer(state, "centroids/S" + std::to_string(sub_dim), bytes, Fill::kCentroids, 100 + code_bits));
  return cb.centroids != nullptr;
}

// Device-to-device copy bandwidth (bytes read + written per second), median of 10 copies of
// 1 GiB; used when the copy benchmark did not run (filtered out).
double measure_copy_bandwidth(benchmark::State& state) {
  void* src = get_buffer(state, "copy_src", kGiB, Fill::kBytes, 1);
  void* dst = get_buffer(state, "copy_dst", kGiB, Fill::kNone, 0);
  if (!src || !dst) return 0.0;
  cudaEvent_t a, b;
  if (!cuda_ok(state, cudaEventCreate(&a), "cudaEventCreate")) return 0.0;
  if (!cuda_ok(state, cudaEventCreate(&b), "cudaEventCreate")) {
    cudaEventDestroy(a);
    return 0.0;
  }
  std::vector<float> ms;
  bool ok = cuda_ok(state, cudaMemcpyAsync(dst, src, kGiB, cudaMemcpyDeviceToDevice, g_stream), "cudaMemcpyAsync");
  for (int i = 0; ok && i < 10; ++i) {
    float t = 0.f;
    ok = cuda_ok(state, cudaEventRecord(a, g_stream), "cudaEventRecord") &&
         cuda_ok(state, cudaMemcpyAsync(dst, src, kGiB, cudaMemcpyDeviceToDevice, g_stream), "cudaMemcpyAsync") &&
         cuda_ok(state, cudaEventRecord(b, g_stream), "cudaEventRecord") &&
         cuda_ok(state, cudaEventSynchronize(b), "cudaEventSynchronize") &&
         cuda_ok(state, cudaEventElapsedTime(&t, a, b), "cudaEventElapsedTime");
    ms.push_back(t);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  if (!ok || ms.empty()) return 0.0;
  std::nth_element(ms.begin(), ms.begin() + ms.size() / 2, ms.end());
  return 2.0 * kGiB / (ms[ms.size() / 2] * 1e-3);
}

// Runs the timed loop: launch(i) enqueues iteration i on g_stream and returns the op's Status.
// bytes: read + written per iteration. is_copy: this is the ceiling itself. Returns the mean
// seconds per iteration (0 on failure).
template <class Launch>
double timed_loop(benchmark::State& state, int64_t bytes, Launch&& launch, bool is_copy = false) {
  if (!status_ok(state, vecinfer::cuda::check_device(), "check_device")) return 0.0;
  cudaEvent_t start, stop;
  if (!cuda_ok(state, cudaEventCreate(&start), "cudaEventCreate")) return 0.0;
  if (!cuda_ok(state, cudaEventCreate(&stop), "cudaEventCreate")) {
    cudaEventDestroy(start);
    return 0.0;
  }
  // Untimed warm-up (first launch, shared-memory configuration, page mapping).
  bool ok = status_ok(state, launch(0), "warm-up") &&
            cuda_ok(state, cudaStreamSynchronize(g_stream), "warm-up synchronize");
  double seconds = 0.0;
  int64_t iter = 0;
  if (ok) {
    for (auto _ : state) {
      float ms = 0.f;
      ok = cuda_ok(state, cudaEventRecord(start, g_stream), "cudaEventRecord") &&
           status_ok(state, launch(++iter), "op") &&
           cuda_ok(state, cudaEventRecord(stop, g_stream), "cudaEventRecord") &&
           cuda_ok(state, cudaEventSynchronize(stop), "cudaEventSynchronize") &&
           cuda_ok(state, cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
      if (!ok) break;
      state.SetIterationTime(ms * 1e-3);
      seconds += ms * 1e-3;
    }
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  if (!ok || iter == 0 || seconds <= 0.0) return 0.0;
  state.SetBytesProcessed(state.iterations() * bytes);
  const double bytes_per_s = static_cast<double>(bytes) * iter / seconds;
  if (is_copy) g_copy_bytes_per_s = std::max(g_copy_bytes_per_s, bytes_per_s);
  if (g_copy_bytes_per_s <= 0.0) g_copy_bytes_per_s = measure_copy_bandwidth(state);
  if (g_copy_bytes_per_s > 0.0) state.counters["pct_of_copy"] = 100.0 * bytes_per_s / g_copy_bytes_per_s;
  return seconds / iter;
}

// ---------------------------------------------------------------------------------------------
// The benchmarks
// ---------------------------------------------------------------------------------------------

// (a) The ceiling: cudaMemcpyAsync device to device, 1 GiB (2 GiB read + written).
void BM_CopyD2D(benchmark::State& state) {
  void* src = get_buffer(state, "copy_src", kGiB, Fill::kBytes, 1);
  void* dst = get_buffer(state, "copy_dst", kGiB, Fill::kNone, 0);
  if (!src || !dst) return;
  timed_loop(
      state, 2 * kGiB,
      [&](int64_t) -> Status {
        const cudaError_t err = cudaMemcpyAsync(dst, src, kGiB, cudaMemcpyDeviceToDevice, g_stream);
        if (err != cudaSuccess) return {vecinfer::StatusCode::kCudaError, cudaGetErrorString(err)};
        return Status::Ok();
      },
      /*is_copy=*/true);
}

// (b) Hadamard only, (c) scale + mean + Hadamard key transform: bf16, D = 128, 1 GiB in,
// 1 GiB out (a separate buffer).
void BM_Transform(benchmark::State& state, bool full_key_transform) {
  constexpr int32_t kD = 128;
  void* in = get_buffer(state, "bf16_in", kGiB, Fill::kBf16, 2);
  void* out = get_buffer(state, "bf16_out", kGiB, Fill::kNone, 0);
  if (!in || !out) return;
  Transform t;
  t.hadamard = true;
  if (full_key_transform && !key_transform(state, kD, t)) return;
  const RowLayout l = key_layout(kGiB, kD);
  const int64_t tables = full_key_transform ? 2 * kKvHeads * kD * int64_t{sizeof(float)} : 0;
  timed_loop(state, 2 * kGiB + tables, [&](int64_t) {
    return vecinfer::cuda::transform(DType::kBFloat16, in, out, l, t, TransformKind::kKey, g_stream);
  });
}

// (d) Fused key transform (scale + mean + Hadamard) + vq_encode, bf16 keys, one codebook.
// Bytes: keys read + codes written.
void BM_Encode(benchmark::State& state, int32_t head_dim, int sub_dim, int code_bits, int64_t key_bytes) {
  std::vector<void*> keys;
  if (!get_inputs(state, "keys", key_bytes, Fill::kBf16, keys)) return;
  const RowLayout l = key_layout(key_bytes, head_dim);
  const int64_t code_bytes = l.num_rows * vecinfer::code_row_bytes(head_dim, sub_dim, code_bits);
  auto* codes = static_cast<uint8_t*>(get_buffer(state, "codes_out", code_bytes, Fill::kNone, 0));
  Transform t;
  Codebook cb;
  if (!codes || !key_transform(state, head_dim, t) || !codebook(state, sub_dim, code_bits, cb)) return;
  timed_loop(state, key_bytes + code_bytes, [&](int64_t i) {
    return vecinfer::cuda::vq_encode(DType::kBFloat16, keys[i % keys.size()], codes, l, cb, t, g_stream);
  });
}

// (e) vq_decode with the inverse transform (scale + mean + Hadamard) to bf16.
// Bytes: codes read + vectors written.
void BM_Decode(benchmark::State& state, int32_t head_dim, int sub_dim, int code_bits, int64_t out_bytes) {
  const RowLayout l = key_layout(out_bytes, head_dim);
  const int64_t code_bytes = l.num_rows * vecinfer::code_row_bytes(head_dim, sub_dim, code_bits);
  std::vector<void*> codes;
  if (!get_inputs(state, "codes_in", code_bytes, Fill::kBytes, codes)) return;
  void* out = get_buffer(state, "bf16_out", out_bytes, Fill::kNone, 0);
  Transform t;
  Codebook cb;
  if (!out || !key_transform(state, head_dim, t) || !codebook(state, sub_dim, code_bits, cb)) return;
  timed_loop(state, code_bytes + out_bytes, [&](int64_t i) {
    return vecinfer::cuda::vq_decode(DType::kBFloat16, static_cast<const uint8_t*>(codes[i % codes.size()]), out, l,
                                     cb, t, g_stream);
  });
}

// (f) Fused attention on the compressed cache, on the shapes of `vecinfer bench`: bf16, 4 sinks +
// 128 recent tokens in bf16, key and value bit presets (sub_dim, code_bits). Inputs rotate over
// enough code buffers to read 256 MiB per round (more than 4x the L2). Bytes: codes + fp tokens +
// q + out.
struct AttentionCase {
  const char* label;
  int64_t batch, tokens, q_heads, kv_heads;
  int32_t head_dim;
  int64_t queries;
  int key_sub, key_bits, value_sub, value_bits;
};

void BM_Attention(benchmark::State& state, const AttentionCase& c) {
  constexpr int64_t kSinks = 4, kRecent = 128;
  const int32_t d = c.head_dim;
  const int64_t coded = c.tokens - kSinks - kRecent, capacity = (coded + 15) / 16 * 16;
  const int64_t key_row = vecinfer::code_row_bytes(d, c.key_sub, c.key_bits);
  const int64_t value_row = vecinfer::code_row_bytes(d, c.value_sub, c.value_bits);
  const int64_t key_bytes = c.batch * c.kv_heads * capacity * key_row;
  const int64_t value_bytes = c.batch * c.kv_heads * capacity * value_row;
  const int64_t fp_bytes = c.batch * c.kv_heads * d * 2;  // one token of one part, bf16
  std::vector<int32_t> lengths_host;
  for (int64_t b = 0; b < c.batch; ++b)
    lengths_host.insert(lengths_host.end(), {int32_t(kSinks), int32_t(coded), int32_t(kRecent)});
  auto* lengths =
      static_cast<int32_t*>(get_buffer(state, "lengths/" + std::to_string(c.batch), c.batch * 12, Fill::kNone, 0));
  if (!lengths ||
      !cuda_ok(state, cudaMemcpy(lengths, lengths_host.data(), c.batch * 12, cudaMemcpyHostToDevice), "lengths"))
    return;
  const int64_t sets = std::max<int64_t>(1, std::min<int64_t>(8, (256 * kMiB + key_bytes + value_bytes - 1) /
                                                                     (key_bytes + value_bytes)));
  std::vector<vecinfer::CompressedKV> kvs(sets);
  for (int64_t i = 0; i < sets; ++i) {
    vecinfer::CompressedKV& kv = kvs[i];
    kv.lengths = lengths;
    kv.key_codes = static_cast<uint8_t*>(
        get_buffer(state, "attn_key_codes/" + std::to_string(i), key_bytes, Fill::kBytes, 21 + 2 * i));
    kv.value_codes = static_cast<uint8_t*>(
        get_buffer(state, "attn_value_codes/" + std::to_string(i), value_bytes, Fill::kBytes, 22 + 2 * i));
    kv.code_capacity = capacity;
    kv.sink_keys = get_buffer(state, "sink_k", kSinks * fp_bytes, Fill::kBf16, 3);
    kv.sink_values = get_buffer(state, "sink_v", kSinks * fp_bytes, Fill::kBf16, 4);
    kv.sink_capacity = kSinks;
    kv.recent_keys = get_buffer(state, "recent_k", kRecent * fp_bytes, Fill::kBf16, 5);
    kv.recent_values = get_buffer(state, "recent_v", kRecent * fp_bytes, Fill::kBf16, 6);
    kv.recent_capacity = kRecent;
    kv.max_coded = coded;
    if (!kv.key_codes || !kv.value_codes || !kv.sink_keys || !kv.sink_values || !kv.recent_keys ||
        !kv.recent_values || !codebook(state, c.key_sub, c.key_bits, kv.key_codebook) ||
        !codebook(state, c.value_sub, c.value_bits, kv.value_codebook) ||
        !key_transform(state, d, kv.key_transform, c.kv_heads))
      return;
  }
  vecinfer::AttentionShape shape;
  shape.batch = c.batch;
  shape.num_q_heads = c.q_heads;
  shape.num_kv_heads = c.kv_heads;
  shape.num_queries = c.queries;
  shape.head_dim = d;
  const int64_t q_bytes = c.batch * c.q_heads * c.queries * d * 2;
  void* q = get_buffer(state, "attn_q", q_bytes, Fill::kBf16, 27);
  void* out = get_buffer(state, "attn_out", q_bytes, Fill::kNone, 0);
  const size_t workspace_bytes = vecinfer::cuda::attention_workspace_bytes(shape, kvs[0]);
  void* workspace = get_buffer(state, "attn_workspace", static_cast<int64_t>(workspace_bytes), Fill::kNone, 0);
  if (!q || !out || !workspace) return;
  const int64_t bytes = (key_bytes + value_bytes) / capacity * coded + (kSinks + kRecent) * fp_bytes * 2 + 2 * q_bytes;
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  const double seconds = timed_loop(state, bytes, [&](int64_t i) {
    return vecinfer::cuda::attention(DType::kBFloat16, q, out, nullptr, shape, kvs[i % sets], scale, workspace,
                                     workspace_bytes, g_stream);
  });
  if (seconds > 0.0 && g_copy_bytes_per_s > 0.0) {
    const double fp16_bytes = 2.0 * c.batch * c.kv_heads * c.tokens * d * 2;
    state.counters["x_vs_fp16_at_copy_bw"] = fp16_bytes / g_copy_bytes_per_s / seconds;
    state.counters["memory_x_vs_fp16"] =
        fp16_bytes / static_cast<double>(key_bytes + value_bytes + (kSinks + kRecent) * fp_bytes * 2);
  }
}

void configure(benchmark::internal::Benchmark* b) {
  b->Unit(benchmark::kMicrosecond)
      ->UseManualTime()
      ->MinTime(kMinTime)
      ->Repetitions(kRepetitions)
      ->DisplayAggregatesOnly(true);
}

void register_all() {
  configure(benchmark::RegisterBenchmark("copy_d2d/1GiB", BM_CopyD2D));
  configure(benchmark::RegisterBenchmark("hadamard/bf16/D128/1GiB",
                                         [](benchmark::State& s) { BM_Transform(s, false); }));
  configure(benchmark::RegisterBenchmark("key_transform/bf16/D128/1GiB",
                                         [](benchmark::State& s) { BM_Transform(s, true); }));
  struct EncodeCase {
    int32_t d;
    int s, bits;
    int64_t bytes;
  };
  const EncodeCase encodes[] = {
      {128, 4, 8, 256 * kMiB},  // 2 bits / element
      {64, 4, 8, 256 * kMiB},
      {256, 4, 8, 256 * kMiB},
      {128, 8, 12, 64 * kMiB},  // 1.5 bits / element, 4096 centroids: compute-bound, smaller
  };
  for (const EncodeCase& c : encodes) {
    const std::string name = "encode_fused/bf16/D" + std::to_string(c.d) + "/S" + std::to_string(c.s) + "/B" +
                             std::to_string(c.bits) + "/" + std::to_string(c.bytes / kMiB) + "MiB";
    configure(benchmark::RegisterBenchmark(name.c_str(), [c](benchmark::State& s) {
      BM_Encode(s, c.d, c.s, c.bits, c.bytes);
    }));
  }
  configure(benchmark::RegisterBenchmark("decode_inverse/bf16/D128/S4/B8/1GiB",
                                         [](benchmark::State& s) { BM_Decode(s, 128, 4, 8, kGiB); }));
  static const AttentionCase attention_cases[] = {
      {"B1/S128k", 1, 131072, 32, 8, 128, 1, 4, 8, 4, 8},      {"B8/S32k", 8, 32768, 32, 8, 128, 1, 4, 8, 4, 8},
      {"B32/S32k", 32, 32768, 32, 8, 128, 1, 4, 8, 4, 8},      {"B64/S16k", 64, 16384, 32, 8, 128, 1, 4, 8, 4, 8},
      {"B128/S8k", 128, 8192, 32, 8, 128, 1, 4, 8, 4, 8},      {"B1/S1M", 1, 1048576, 32, 8, 128, 1, 4, 8, 4, 8},
      {"B32/S32k/1.5bit", 32, 32768, 32, 8, 128, 1, 8, 12, 8, 12},
      {"B32/S32k/4bit", 32, 32768, 32, 8, 128, 1, 2, 8, 2, 8},
      {"B32/S32k/Hq28/Hkv4", 32, 32768, 28, 4, 128, 1, 4, 8, 4, 8},
      {"B64/S32k/D64/Hq9/Hkv3", 64, 32768, 9, 3, 64, 1, 4, 8, 4, 8},
      {"B16/S32k/D256/Hq16/Hkv8", 16, 32768, 16, 8, 256, 1, 4, 8, 4, 8},
      {"B32/S32k/Tq4", 32, 32768, 32, 8, 128, 4, 4, 8, 4, 8},
  };
  for (const AttentionCase& c : attention_cases) {
    const std::string name = std::string("attention/bf16/") + c.label;
    configure(benchmark::RegisterBenchmark(name.c_str(), [&c](benchmark::State& s) { BM_Attention(s, c); }));
  }
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  if (!vecinfer::cuda::built()) {
    std::fprintf(stderr, "vecinfer was built without CUDA\n");
    return 1;
  }
  const cudaError_t err = cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking);
  if (err != cudaSuccess) {
    std::fprintf(stderr, "%s\n", cuda_message("cudaStreamCreate", err).c_str());
    return 1;
  }
  register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  buffers().release();
  cudaStreamDestroy(g_stream);
  return 0;
}
