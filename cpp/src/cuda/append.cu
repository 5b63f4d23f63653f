// Appending tokens to a paged cache with a ring window (paged.h), in one kernel.
//
// Grid: x = sequence of the batch, y = KV head, z = part. With (s0, c0, r0) the sequence's lengths
// before the call, the rule of paged.h moves its tokens as follows (window index j: position
// sinks + j; the window holds j in [c, c + r) at ring rows j % R):
//   - the first min(S - s0, n) new tokens go to the sinks;
//   - the window then ends at j_end = c0 + r0 + w (w: the other new tokens) and keeps the last
//     min(R, ...) of them: c1 = max(c0, j_end - R) (R = 0: every window token is coded);
//   - old window tokens j in [c0, min(c1, c0 + r0)) are encoded from their ring rows (part 0);
//   - new tokens with j < c1 never stay: they are encoded from the input (parts 1..);
//   - new tokens with j >= c1 are written to ring rows j % R (part 0, after its ring reads, which
//     are the only reads of rows a new token may overwrite).
// Every block reads the lengths, then counts itself in arrivals[slot]; the last one writes the new
// lengths, when no block of the sequence will read them again.
#include "launch.cuh"
#include "nearest.cuh"
#include "row_ops.cuh"
#include "vecinfer/ops.h"
#include "vecinfer/paged.h"

namespace vecinfer {
namespace cuda_detail {
namespace {

constexpr int kAppendThreads = 256;
constexpr int kDirectRowsPerPart = 64;  // tokens encoded from the input per block of parts 1..

// The state of one sequence for this call, the same in every block of the sequence.
struct SequenceState {
  int64_t slot, first_row, new_tokens;
  int64_t sinks0, coded0, recent0;
  int64_t to_sink, coded1, recent1;
};

__device__ __forceinline__ int64_t clamp_to(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

__device__ SequenceState read_state(const TokenBatch& tokens, const CompressedKV& kv, int64_t i) {
  SequenceState st;
  st.slot = clamp_to(tokens.seq_slots[i], 0, kv.num_slots - 1);
  st.first_row = clamp_to(tokens.indptr[i], 0, tokens.num_rows);
  st.new_tokens = clamp_to(tokens.indptr[i + 1], st.first_row, tokens.num_rows) - st.first_row;
  const int32_t* len = kv.lengths + 3 * st.slot;
  st.sinks0 = clamp_to(len[0], 0, kv.sink_capacity);
  st.coded0 = clamp_to(len[1], 0, kv.code_capacity);
  st.recent0 = clamp_to(len[2], 0, kv.recent_capacity);
  st.to_sink = min(kv.sink_capacity - st.sinks0, st.new_tokens);
  const int64_t window_end = st.coded0 + st.recent0 + st.new_tokens - st.to_sink;
  st.coded1 = max(st.coded0, window_end - kv.recent_capacity);
  st.recent1 = window_end - st.coded1;
  return st;
}

// Packed codes of `count` rows, into their destinations: row k's 8 elements per lane come from
// source(k) (transformed as `t` says, table entry table_row), its code_row_bytes bytes go to
// target(k) (null: dropped). The codebook `book` of `cb` is loaded into shared memory first.
// A pass takes up to kRows rows, one group of D / 8 lanes each; with fewer rows (a decode step
// encodes one per block) the idle groups split the centroid scan of each row between them, and
// the partial minima are merged in index order, so the codes equal a scan of all centroids.
template <typename T, int D, int S, class Source, class Target>
__device__ void encode_rows(float* smem, int count, const Codebook& cb, int64_t book, const Transform& t,
                            int64_t table_row, Source source, Target target) {
  constexpr int kLanes = RowTile<D>::kThreadsPerRow;
  constexpr int kRows = kAppendThreads / kLanes;
  constexpr int kSubs = 8 / S;
  constexpr int kCodes = D / S;
  const int centroids_count = 1 << cb.code_bits;
  float* centroids = smem;
  float* norms = centroids + centroids_count * S;
  uint16_t* tile = reinterpret_cast<uint16_t*>(norms + centroids_count);          // [kRows][kCodes]
  float* partial_best = reinterpret_cast<float*>(tile + kRows * kCodes);          // [threads][kSubs]
  int* partial_index = reinterpret_cast<int*>(partial_best + kAppendThreads * kSubs);
  const int row_bytes = kCodes * cb.code_bits / 8;
  __syncthreads();  // the previous user of the shared memory is done
  stage_codebook<S>(centroids, norms, cb.centroids + book * centroids_count * S, centroids_count, kAppendThreads);
  __syncthreads();
  const int group = threadIdx.x / kLanes, lane = threadIdx.x % kLanes;
  for (int first = 0; first < count; first += kRows) {
    const int rows = min(kRows, count - first);
    int split = kRows;  // groups per row: kRows / (rows rounded up to a power of two), at most the centroids
    while (split > 1 && (kRows / split < rows || split > centroids_count)) split >>= 1;
    const int r = group / split, part = group % split;
    const int per_part = centroids_count / split;
    float v[8] = {};
    if (r < rows) load8(source(first + r) + lane * 8, v);
    transform_row<D>(v, t, TransformKind::kKey, table_row, lane * 8);  // every lane: shuffles inside
    int best_index[kSubs];
    float best[kSubs];
    nearest_centroids<S>(v, centroids, norms, part * per_part, (part + 1) * per_part, best_index, best);
#pragma unroll
    for (int s = 0; s < kSubs; ++s) {
      partial_best[threadIdx.x * kSubs + s] = best[s];
      partial_index[threadIdx.x * kSubs + s] = best_index[s];
    }
    __syncthreads();
    if (part == 0 && r < rows) {
#pragma unroll
      for (int s = 0; s < kSubs; ++s) {
        int index = best_index[s];
        float dist = best[s];
        for (int other = 1; other < split; ++other) {  // parts in index order: ties keep the lowest
          const int slot = ((group + other) * kLanes + lane) * kSubs + s;
          if (partial_best[slot] < dist) dist = partial_best[slot], index = partial_index[slot];
        }
        tile[r * kCodes + lane * kSubs + s] = static_cast<uint16_t>(index);
      }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < rows * row_bytes; i += kAppendThreads) {
      const int k = i / row_bytes, byte = i - k * row_bytes;
      uint8_t* out = target(first + k);
      if (out) out[byte] = detail::pack_byte(tile + k * kCodes, byte, cb.code_bits);
    }
    __syncthreads();
  }
}

template <typename T, int D, class Source, class Target>
__device__ void encode_rows_any(float* smem, int count, const Codebook& cb, int64_t book, const Transform& t,
                                int64_t table_row, Source source, Target target) {
  switch (cb.sub_dim) {
    case 2: encode_rows<T, D, 2>(smem, count, cb, book, t, table_row, source, target); break;
    case 4: encode_rows<T, D, 4>(smem, count, cb, book, t, table_row, source, target); break;
    default: encode_rows<T, D, 8>(smem, count, cb, book, t, table_row, source, target); break;
  }
}

// Copies `count` rows of D elements, 16 bytes per thread and step.
template <typename T, int D, class Source, class Target>
__device__ void copy_rows(int count, Source source, Target target) {
  constexpr int kVectors = D * sizeof(T) / 16;
  for (int i = threadIdx.x; i < count * kVectors; i += kAppendThreads) {
    const int k = i / kVectors, part = i - k * kVectors;
    reinterpret_cast<uint4*>(target(k))[part] = reinterpret_cast<const uint4*>(source(k))[part];
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kAppendThreads) append_kernel(TokenBatch tokens, CompressedKV kv, int64_t num_kv_heads,
                                                            int32_t* arrivals) {
  extern __shared__ float4 shared_memory[];
  float* smem = reinterpret_cast<float*>(shared_memory);
  __shared__ SequenceState shared_state;
  const int64_t i = blockIdx.x, h = blockIdx.y;
  const int part = blockIdx.z;
  if (threadIdx.x == 0) shared_state = read_state(tokens, kv, i);
  __syncthreads();
  const SequenceState st = shared_state;
  if (threadIdx.x == 0) {
    const int blocks = gridDim.y * gridDim.z;
    if (atomicAdd(arrivals + st.slot, 1) == blocks - 1) {  // every block of the sequence has read
      int32_t* len = kv.lengths + 3 * st.slot;
      len[0] = static_cast<int32_t>(st.sinks0 + st.to_sink);
      len[1] = static_cast<int32_t>(st.coded1);
      len[2] = static_cast<int32_t>(st.recent1);
      arrivals[st.slot] = 0;
    }
  }

  const int64_t R = kv.recent_capacity, P = kv.page_size, D64 = D;
  const int key_bytes = D / kv.key_codebook.sub_dim * kv.key_codebook.code_bits / 8;
  const int value_bytes = D / kv.value_codebook.sub_dim * kv.value_codebook.code_bits / 8;
  const T* keys = static_cast<const T*>(tokens.keys);
  const T* values = static_cast<const T*>(tokens.values);
  T* ring_keys = static_cast<T*>(kv.recent_keys);
  T* ring_values = static_cast<T*>(kv.recent_values);
  const int64_t head_row = st.slot * num_kv_heads + h;  // of the sinks and the ring
  const int32_t* pages = kv.page_table + st.slot * kv.max_pages;
  // Code j of this head: its row in the pools, or -1 when the page id is outside the pool.
  auto code_row = [&](int64_t j) -> int64_t {
    const int64_t page = pages[j / P];
    return page < 0 || page >= kv.num_pages ? -1 : (page * num_kv_heads + h) * P + j % P;
  };
  const int64_t key_book = detail::table_row(h, num_kv_heads, kv.key_codebook.num_codebooks);
  const int64_t value_book = detail::table_row(h, num_kv_heads, kv.value_codebook.num_codebooks);
  const int64_t key_table = detail::table_row(h, num_kv_heads, kv.key_transform.table_rows);
  Transform minus_mean;
  minus_mean.mean = kv.value_mean;
  const int64_t mean_table = detail::table_row(h, num_kv_heads, kv.value_mean_rows);

  // Encodes `count` window tokens j = first_j + k, read from source_keys/values(k).
  auto encode = [&](int count, int64_t first_j, auto source_keys, auto source_values) {
    encode_rows_any<T, D>(smem, count, kv.key_codebook, key_book, kv.key_transform, key_table, source_keys,
                          [&](int k) -> uint8_t* {
                            const int64_t row = code_row(first_j + k);
                            return row < 0 ? nullptr : kv.key_codes + row * key_bytes;
                          });
    encode_rows_any<T, D>(smem, count, kv.value_codebook, value_book, minus_mean, mean_table, source_values,
                          [&](int k) -> uint8_t* {
                            const int64_t row = code_row(first_j + k);
                            return row < 0 ? nullptr : kv.value_codes + row * value_bytes;
                          });
  };
  auto input_key = [&](int64_t t) { return keys + (st.first_row + t) * tokens.row_stride + h * tokens.head_stride; };
  auto input_value = [&](int64_t t) {
    return values + (st.first_row + t) * tokens.row_stride + h * tokens.head_stride;
  };
  const int64_t window_first_new = st.coded0 + st.recent0;  // window index of the first new window token

  if (part == 0) {
    // Old window tokens leaving the ring, encoded before any ring row is written.
    const int64_t evicted = min(st.coded1, window_first_new) - st.coded0;
    if (evicted > 0)
      encode(static_cast<int>(evicted), st.coded0,
             [&](int k) -> const T* { return ring_keys + (head_row * R + (st.coded0 + k) % R) * D64; },
             [&](int k) -> const T* { return ring_values + (head_row * R + (st.coded0 + k) % R) * D64; });
    __syncthreads();
    copy_rows<T, D>(static_cast<int>(st.to_sink), input_key,
                    [&](int k) { return static_cast<T*>(kv.sink_keys) + (head_row * kv.sink_capacity + st.sinks0 + k) * D64; });
    copy_rows<T, D>(static_cast<int>(st.to_sink), input_value,
                    [&](int k) { return static_cast<T*>(kv.sink_values) + (head_row * kv.sink_capacity + st.sinks0 + k) * D64; });
    // New tokens that stay in the window: j from max(c1, first new) to the window's end.
    const int64_t stay_first = max(st.coded1, window_first_new);
    const int64_t stay = st.coded1 + st.recent1 - stay_first;
    const int64_t input_offset = st.to_sink + (stay_first - window_first_new);
    if (stay > 0) {
      copy_rows<T, D>(static_cast<int>(stay), [&](int k) { return input_key(input_offset + k); },
                      [&](int k) { return ring_keys + (head_row * R + (stay_first + k) % R) * D64; });
      copy_rows<T, D>(static_cast<int>(stay), [&](int k) { return input_value(input_offset + k); },
                      [&](int k) { return ring_values + (head_row * R + (stay_first + k) % R) * D64; });
    }
    return;
  }
  // Parts 1..: new tokens coded straight from the input, kDirectRowsPerPart each.
  const int64_t direct = max(int64_t{0}, st.coded1 - window_first_new);
  const int64_t first = int64_t{part - 1} * kDirectRowsPerPart;
  if (first >= direct) return;
  const int count = static_cast<int>(min(int64_t{kDirectRowsPerPart}, direct - first));
  encode(count, window_first_new + first, [&](int k) { return input_key(st.to_sink + first + k); },
         [&](int k) { return input_value(st.to_sink + first + k); });
}

}  // namespace
}  // namespace cuda_detail

namespace cuda {

Status append_tokens(DType dtype, const AttentionShape& shape, const TokenBatch& tokens, const CompressedKV& kv,
                     int64_t max_new_tokens, int32_t* arrivals, void* stream) {
  using namespace cuda_detail;
  Status s = check_append(shape, tokens, kv);
  if (!s.ok()) return s;
  if (arrivals == nullptr) return invalid("arrivals: null pointer");
  if (max_new_tokens < 0) return invalid("max_new_tokens: must be >= 0");
  const bool aligned = aligned16(tokens.keys) && aligned16(tokens.values) && tokens.row_stride % 8 == 0 &&
                       tokens.head_stride % 8 == 0 && aligned16(kv.sink_keys) && aligned16(kv.sink_values) &&
                       aligned16(kv.recent_keys) && aligned16(kv.recent_values) &&
                       aligned16(kv.key_codebook.centroids) && aligned16(kv.value_codebook.centroids);
  if (!aligned)
    return invalid("keys/values/cache buffers: data pointers must be 16-byte aligned and strides multiples of 8");
  if (tokens.batch > 0x7fffffff || shape.num_kv_heads > 65535) return unsupported("batch or KV heads too large");
  const int64_t parts = 1 + (max_new_tokens + kDirectRowsPerPart - 1) / kDirectRowsPerPart;
  if (parts > 65535) return unsupported("max_new_tokens: too many tokens for one call; split the prompt");
  auto codebook_bytes = [&](const Codebook& cb) {
    const size_t rows = kAppendThreads / (shape.head_dim / 8), subs = 8 / cb.sub_dim;
    return static_cast<size_t>(cb.num_centroids()) * (cb.sub_dim + 1) * sizeof(float) +
           rows * (shape.head_dim / cb.sub_dim) * sizeof(uint16_t) +
           kAppendThreads * subs * (sizeof(float) + sizeof(int));
  };
  const size_t shared_bytes = std::max(codebook_bytes(kv.key_codebook), codebook_bytes(kv.value_codebook));
  return with_dtype(dtype, [&](auto type_tag) {
    return with_head_dim(shape.head_dim, [&](auto dim) {
      using T = decltype(type_tag);
      constexpr int D = decltype(dim)::value;
      auto kernel = append_kernel<T, D>;
      int sm_count = 0;
      Status ls = opt_in_shared_memory(kernel, shared_bytes, sm_count);
      if (!ls.ok()) return ls;
      const dim3 grid(static_cast<unsigned>(tokens.batch), static_cast<unsigned>(shape.num_kv_heads),
                      static_cast<unsigned>(parts));
      kernel<<<grid, kAppendThreads, shared_bytes, static_cast<cudaStream_t>(stream)>>>(tokens, kv, shape.num_kv_heads,
                                                                                        arrivals);
      return cuda_status(cudaGetLastError());
    });
  });
}

}  // namespace cuda
}  // namespace vecinfer
