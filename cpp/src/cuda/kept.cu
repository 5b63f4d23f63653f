// The kept-token decode step (kept.h) in two kernels, one after the other on the stream.
//   kept_step_kernel, one block per sequence (a sequence still filling its sinks or its window
//   only takes the token: a sink row here, a window row in the second kernel):
//     1. each warp takes KV heads in turn: per dimension, the mean of the new key's predecessors
//        (the window's keys; while filling, the last `window` of the sinks' and window's), then the
//        head's ||k - m||^2 and ||k||^2 reduced across the warp; every thread also scans its share
//        of the kept scores for the lowest (lowest row on ties), reduced across the block;
//     2. thread 0 adds the heads' terms in head order (so the score does not depend on
//        scheduling), applies the budget and decides grow / swap;
//     3. the window scores move up one; the encode row and the kept row that changes are written.
//   shift_window_kernel, one block per (sequence, KV head, keys or values): the window's rows move
//     up one and the new token becomes the last, staged through shared memory a chunk of rows at a
//     time, so that every load of a chunk is in flight at once (a row-by-row shift in place is a
//     chain of dependent global loads: ~5 ms per decode step of a 32-layer model).
#include <algorithm>
#include <cfloat>

#include "launch.cuh"
#include "vecinfer/kept.h"

namespace vecinfer {
namespace cuda_detail {
namespace {

constexpr int kKeptThreads = 256;
constexpr int64_t kShiftStagingBytes = 32 * 1024;
constexpr int64_t kMaxKeptHeads = 4096;  // the step kernel's per-head terms in shared memory (16 KB)

__device__ __forceinline__ float as_float(float x) { return x; }
__device__ __forceinline__ float as_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float as_float(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ int64_t clamp_to(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

// Sequence b's row of the per-sequence buffers, clamped into them (the caller checked the slots)
__device__ __forceinline__ int64_t sequence_row(const KeptStep& st, int64_t b) {
  return st.seq_slots ? clamp_to(st.seq_slots[b], 0, st.num_slots - 1) : b;
}

// A sequence's state before the step, its lengths clamped into the buffers (the caller checked
// them on its host copy), and where the new token goes (kept.h): a sink row, the next window row,
// or, once the sinks and the window are full, the last window row after the shift ("steady").
struct SequenceState {
  int64_t sinks_held, kept, coded, recent;
  bool to_sink, steady;
  __device__ SequenceState(const KeptStep& st, const int32_t* len) {
    sinks_held = clamp_to(len[0], 0, st.sinks);
    kept = clamp_to(int64_t{len[0]} - st.sinks, 0, st.kept_capacity);
    coded = clamp_to(len[1], 0, st.code_capacity - 1);
    recent = clamp_to(len[2], 0, st.window);
    to_sink = sinks_held < st.sinks;
    steady = !to_sink && recent == st.window;
  }
};

// (score, row) is lower than (other_score, other_row): the lower score, the lower row on ties; row -1 is none
__device__ __forceinline__ bool lower(float score, int row, float other_score, int other_row) {
  return row >= 0 && (other_row < 0 || score < other_score || (score == other_score && row < other_row));
}

template <typename T>
__global__ void __launch_bounds__(kKeptThreads) kept_step_kernel(KeptStep st) {
  extern __shared__ float head_terms[];  // [num_kv_heads]: each head's ||k - m||^2 / max(||k||^2, 1e-12)
  __shared__ float warp_low_score[kKeptThreads / 32];
  __shared__ int warp_low_row[kKeptThreads / 32];
  __shared__ int64_t decided[4];  // grow, swap, low, slot
  __shared__ float new_score;
  const int64_t b = blockIdx.x, seq = sequence_row(st, b);
  const int64_t hkv = st.num_kv_heads, d = st.head_dim, w = st.window, sink_rows = st.sinks + st.kept_capacity;
  const SequenceState state(st, st.lengths + 3 * seq);
  const int64_t kept = state.kept, coded = state.coded;
  // the new key's predecessors: the window when steady; else the sinks, then window rows [0, recent)
  const int64_t before_sinks = state.steady ? 0 : state.sinks_held, before_rows = state.steady ? w : state.recent;
  const int64_t count = before_sinks + before_rows < w ? before_sinks + before_rows : w;
  const int64_t first = before_sinks + before_rows - count;  // the first of the last `count`
  const T* sink_keys = static_cast<const T*>(st.sink_keys) + seq * hkv * sink_rows * d;
  const T* window_keys = static_cast<const T*>(st.window_keys) + seq * hkv * w * d;
  const T* new_keys = static_cast<const T*>(st.new_keys) + b * hkv * d;
  const float* kept_scores = st.kept_scores + seq * st.kept_capacity;
  float* window_scores = st.window_scores + seq * w;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t h = warp; h < hkv; h += kKeptThreads / 32) {
    float diff2 = 0.f, norm2 = 0.f;
    for (int64_t i = lane; i < d; i += 32) {
      float sum = 0.f;
      for (int64_t r = first; r < before_sinks; ++r) sum += as_float(sink_keys[(h * sink_rows + r) * d + i]);
#pragma unroll 16
      for (int64_t r = first > before_sinks ? first - before_sinks : 0; r < before_rows; ++r)
        sum += as_float(window_keys[(h * w + r) * d + i]);
      const float k = as_float(new_keys[h * d + i]), diff = k - (count > 0 ? sum / float(count) : 0.f);
      diff2 += diff * diff;
      norm2 += k * k;
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      diff2 += __shfl_xor_sync(0xffffffffu, diff2, offset);
      norm2 += __shfl_xor_sync(0xffffffffu, norm2, offset);
    }
    if (lane == 0) head_terms[h] = count > 0 ? diff2 / fmaxf(norm2, 1e-12f) : 0.f;  // none before: 0
  }
  float low_score = FLT_MAX;
  int low_row = -1;
  for (int64_t r = threadIdx.x; r < kept; r += kKeptThreads)
    if (lower(kept_scores[r], static_cast<int>(r), low_score, low_row)) low_score = kept_scores[r], low_row = int(r);
  for (int offset = 16; offset > 0; offset /= 2) {
    const float other_score = __shfl_xor_sync(0xffffffffu, low_score, offset);
    const int other_row = __shfl_xor_sync(0xffffffffu, low_row, offset);
    if (lower(other_score, other_row, low_score, low_row)) low_score = other_score, low_row = other_row;
  }
  if (lane == 0) warp_low_score[warp] = low_score, warp_low_row[warp] = low_row;
  __syncthreads();

  if (threadIdx.x == 0) {
    float score = 0.f;
    for (int64_t h = 0; h < hkv; ++h) score += head_terms[h];
    new_score = score;
    int low = -1;
    float low_of_all = FLT_MAX;
    for (int i = 0; i < kKeptThreads / 32; ++i)
      if (lower(warp_low_score[i], warp_low_row[i], low_of_all, low)) low_of_all = warp_low_score[i], low = warp_low_row[i];
    int32_t* next = st.next_lengths + 3 * seq;
    int32_t* encode = st.encode_lengths + 3 * seq;
    encode[0] = 0, encode[1] = static_cast<int32_t>(coded), encode[2] = 0;
    bool grow = false, swap = false;
    int64_t slot = -1;
    if (state.steady) {
      const int64_t left = kept + coded + 1;
      const int64_t fraction = static_cast<int64_t>(st.keep_fraction * double(left) + 0.5);
      const int64_t floor_or_fraction = fraction > st.keep_tokens ? fraction : st.keep_tokens;
      const int64_t budget = floor_or_fraction < left ? floor_or_fraction : left;
      grow = budget > kept && kept < st.kept_capacity;
      const float out_score = window_scores[0];
      swap = !grow && low >= 0 && out_score > low_of_all;
      slot = grow ? kept : low;
      const int32_t out_position = static_cast<int32_t>(st.sinks + kept + coded);
      int32_t* kept_positions = st.kept_positions + seq * st.kept_capacity;
      if (!grow && st.code_positions)
        st.code_positions[seq * st.code_capacity + coded] = swap ? kept_positions[low] : out_position;
      if (grow || swap) st.kept_scores[seq * st.kept_capacity + slot] = out_score, kept_positions[slot] = out_position;
      next[0] = static_cast<int32_t>(st.sinks + kept + (grow ? 1 : 0));
      next[1] = static_cast<int32_t>(coded + (grow ? 0 : 1));
      next[2] = static_cast<int32_t>(w);
    } else {  // filling: nothing leaves the window, nothing is kept or coded
      next[0] = static_cast<int32_t>(state.sinks_held + (state.to_sink ? 1 : 0));
      next[1] = static_cast<int32_t>(coded);
      next[2] = static_cast<int32_t>(state.recent + (state.to_sink ? 0 : 1));
      if (!state.to_sink) window_scores[state.recent] = score;
    }
    decided[0] = grow, decided[1] = swap, decided[2] = low, decided[3] = slot;
  }
  __syncthreads();
  // steady: the window scores move up one, a block of them at a time (each read before it is overwritten)
  for (int64_t first = 0; state.steady && first < w; first += kKeptThreads) {
    const int64_t r = first + threadIdx.x;
    const float moved = r + 1 < w ? window_scores[r + 1] : new_score;
    __syncthreads();
    if (r < w) window_scores[r] = moved;
    __syncthreads();
  }
  const bool grow = decided[0], swap = decided[1];
  const int64_t low = decided[2], slot = decided[3];
  for (int which = 0; which < 2; ++which) {
    const T* window = static_cast<const T*>(which ? st.window_values : st.window_keys) + seq * hkv * w * d;
    const T* fresh = static_cast<const T*>(which ? st.new_values : st.new_keys) + b * hkv * d;
    T* sink = static_cast<T*>(which ? st.sink_values : st.sink_keys) + seq * hkv * sink_rows * d;
    T* encode = static_cast<T*>(which ? st.encode_values : st.encode_keys) + b * hkv * d;
    for (int64_t e = threadIdx.x; e < hkv * d; e += kKeptThreads) {
      const int64_t h = e / d, i = e - h * d;
      if (!state.steady) {  // the encode row is written to code c, unread: the new token, finite
        encode[e] = fresh[e];
        if (state.to_sink) sink[(h * sink_rows + state.sinks_held) * d + i] = fresh[e];
        continue;
      }
      const T out = window[h * w * d + i];  // window row 0: the token leaving the window
      encode[e] = swap ? sink[(h * sink_rows + st.sinks + low) * d + i] : out;
      if (grow || swap) sink[(h * sink_rows + st.sinks + slot) * d + i] = out;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kKeptThreads) shift_window_kernel(KeptStep st, int64_t chunk_rows) {
  extern __shared__ unsigned char staging_bytes[];  // [chunk_rows, head_dim] elements
  T* staging = reinterpret_cast<T*>(staging_bytes);
  const int64_t d = st.head_dim, w = st.window, h = blockIdx.y, seq = sequence_row(st, blockIdx.x);
  const int64_t row = seq * st.num_kv_heads + h, fresh_row = blockIdx.x * st.num_kv_heads + h;
  const bool values = blockIdx.z;
  T* window = static_cast<T*>(values ? st.window_values : st.window_keys) + row * w * d;
  const T* fresh = static_cast<const T*>(values ? st.new_values : st.new_keys) + fresh_row * d;
  const SequenceState state(st, st.lengths + 3 * seq);
  if (!state.steady) {  // a filling window takes the new token as its next row; a filling sink: nothing here
    for (int64_t i = threadIdx.x; !state.to_sink && i < d; i += kKeptThreads) window[state.recent * d + i] = fresh[i];
    return;
  }
  for (int64_t first = 0; first < w; first += chunk_rows) {  // destination rows [first, first + rows)
    const int64_t elements = (chunk_rows < w - first ? chunk_rows : w - first) * d;
#pragma unroll 4
    for (int64_t e = threadIdx.x; e < elements; e += kKeptThreads) {
      const int64_t source = first * d + d + e;  // one row further down; past the window: the new token
      staging[e] = source < w * d ? window[source] : fresh[source - w * d];
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < elements; e += kKeptThreads) window[first * d + e] = staging[e];
    __syncthreads();
  }
}

}  // namespace
}  // namespace cuda_detail

namespace cuda {

Status kept_step(DType dtype, const KeptStep& step, void* stream) {
  using namespace cuda_detail;
  Status s = check_kept_step(step);
  if (!s.ok()) return s;
  if (step.batch > 0x7fffffff || step.num_kv_heads > kMaxKeptHeads)
    return unsupported("kept_step: at most 2**31 - 1 sequences and 4096 KV heads on the GPU");
  const size_t step_shared = static_cast<size_t>(step.num_kv_heads) * sizeof(float);
  return with_dtype(dtype, [&](auto type_tag) {
    using T = decltype(type_tag);
    const int64_t row_bytes = step.head_dim * int64_t{sizeof(T)};
    const int64_t chunk_rows = std::max<int64_t>(1, std::min<int64_t>(step.window, kShiftStagingBytes / row_bytes));
    auto kernel = kept_step_kernel<T>;
    int sm_count = 0;
    Status ls = opt_in_shared_memory(kernel, step_shared, sm_count);
    if (!ls.ok()) return ls;
    auto cu_stream = static_cast<cudaStream_t>(stream);
    kernel<<<static_cast<unsigned>(step.batch), kKeptThreads, step_shared, cu_stream>>>(step);
    Status launched = cuda_status(cudaGetLastError());
    if (!launched.ok()) return launched;
    const dim3 grid(static_cast<unsigned>(step.batch), static_cast<unsigned>(step.num_kv_heads), 2);
    shift_window_kernel<T><<<grid, kKeptThreads, static_cast<size_t>(chunk_rows * row_bytes), cu_stream>>>(step,
                                                                                                         chunk_rows);
    return cuda_status(cudaGetLastError());
  });
}

}  // namespace cuda
}  // namespace vecinfer
