// The fused dequant-attention kernel (see vecinfer/attention.h for the function it computes and
// bench/NOTES.md for the design, predictions and measurements).
//
// Grid: x = part: 0 for the full-precision sink and recent tokens, 1.. for the splits of the coded
// tokens (split-KV); y = (KV head, tile of 8 query rows); z = sequence. The query rows of a block are
// (query head, query) pairs of one KV head: they share every code loaded. A merge kernel combines
// the parts exactly (max, sum of exponentials, accumulators) and adds the value mean.
//
// A coded block has kWarps warps; each walks its own steps of kStep tokens (block step k goes to
// warp k % kWarps), staging code bytes with cp.async (kStages deep, per warp, so warps never wait
// on each other) and keeping its own online-softmax state; the warps' states merge at the end.
// Tokens sit on the M dimension of mma.sync m16n8k16 (fp32 accumulate), the query rows on N:
//   S^T[16 tokens x 8 rows] = K'[16 x D] Q'^T: Q' = H(q * lambda) in registers (B fragments), K'
//       gathered centroid by centroid from the key codebook in shared memory into A fragments;
//   softmax online, in registers (exp2: log2(e) and the softmax scale are folded into Q');
//   O^T[D x 8 rows] += V'^T[D x 16] P^T: P^T from the score accumulators by an 8x8 register
//       transpose (movmatrix), V'^T gathered from the value codebook into A fragments.
// The dimension order inside the fragments is permuted so that each thread's fragment values are
// whole centroids (see key_dim / value_dim): one gather of 2*sub_dim bytes per code. Each codebook
// is replicated in shared memory so that the lanes of one shared-memory phase read distinct banks
// (copy = lane % kCopies), which keeps random gathers conflict-free.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../common.h"
#include "vecinfer/attention.h"

namespace vecinfer::cuda_detail::attn {

constexpr int kRows = 8;     // query rows per block: the N of mma m16n8k16
constexpr int kStep = 32;    // tokens per warp step: two m16 token tiles
constexpr int kStages = 3;   // cp.async stages per warp
constexpr float kLog2e = 1.4426950408889634f;

constexpr int cmin(int a, int b) { return a < b ? a : b; }
constexpr int cmax(int a, int b) { return a > b ? a : b; }

// Full-precision tokens are attended to in chunks of this many (see full_precision_block).
template <int D>
constexpr int chunk_tokens() { return D == 256 ? 32 : 64; }

// A codebook shape (sub-vector length S, code width B) as the kernel stores it in shared memory.
template <int S, int B>
struct Codec {
  static constexpr int kSub = S;
  static constexpr int kBits = B;
  static constexpr int kEntryBytes = 2 * S;  // one fp16/bf16 centroid
  static constexpr int kEntries = 1 << B;
  static constexpr int kTableBytes = kEntries * kEntryBytes;
  // Lanes served by one shared-memory phase for loads of kEntryBytes; that many copies (at most
  // 32 KB in all) give every lane of a phase its own banks.
  static constexpr int kCopies = cmin(128 / kEntryBytes, cmax(1, 32768 / kTableBytes));
  static constexpr int kSharedBytes = kTableBytes * kCopies;
  template <int D>
  static constexpr int row_bytes() { return D / S * B / 8; }
};

// The mma operand types for an element type.
template <typename T>
struct Mma;
template <>
struct Mma<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// Everything the kernel reads, by value (kernel parameter space).
struct Params {
  const void* q;
  void* out;
  float* lse;
  float* partial_acc;  // [groups, parts, kRows, D] unnormalised sum of p * v' (dims in natural order)
  float* partial_ml;   // [groups, parts, kRows, 2] running max (log2 units) and sum of exp2
  CompressedKV kv;
  int64_t batch, num_q_heads, num_kv_heads, num_queries;
  int group;           // query heads per KV head
  int row_tiles;       // ceil(group * num_queries / kRows)
  int splits;          // blocks over the coded tokens (blocks x = 1..splits; x = 0: full precision)
  int64_t split_tokens;  // coded tokens per split, a multiple of kStep * kWarps
  float scale_log2;    // softmax scale * log2(e)
};

// ---- small device helpers -----------------------------------------------------------------------

// Two consecutive elements (4-byte aligned) as floats.
__device__ __forceinline__ float2 pair_to_float2(const __half* x) {
  return __half22float2(*reinterpret_cast<const __half2*>(x));
}
__device__ __forceinline__ float2 pair_to_float2(const __nv_bfloat16* x) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(x));
}

// A length from the device-side lengths table, clamped to its buffer (a bad length cannot make the
// kernel read outside the buffers).
__device__ __forceinline__ int64_t clamp_length(int32_t length, int64_t capacity) {
  return length < 0 ? 0 : (length > capacity ? capacity : length);
}

__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  const uint32_t d = static_cast<uint32_t>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// BITS consecutive bits of a row of codes in shared memory (row 4-byte aligned), starting at bit
// `first`, as little-endian words.
template <int BITS>
struct Bits {
  static constexpr int kWords = (BITS + 31) / 32;
  uint32_t w[kWords];

  __device__ __forceinline__ void load(const uint8_t* row, int first) {
    const uint32_t* words = reinterpret_cast<const uint32_t*>(row) + (first >> 5);
    if constexpr (BITS % 32 == 0) {  // then `first` is a multiple of 32 too
      if constexpr (kWords == 2) {
        const uint2 v = *reinterpret_cast<const uint2*>(words);  // 8-byte aligned: rows are
        w[0] = v.x, w[1] = v.y;
      } else {
#pragma unroll
        for (int i = 0; i < kWords; ++i) w[i] = words[i];
      }
    } else {
      const int shift = first & 31;
      uint32_t raw[kWords + 1];
#pragma unroll
      for (int i = 0; i <= kWords; ++i) raw[i] = words[i];  // may read one word past: padded
#pragma unroll
      for (int i = 0; i < kWords; ++i) w[i] = __funnelshift_r(raw[i], raw[i + 1], shift);
    }
  }
  // Code u of width B (u, B compile-time so the word indices are too).
  template <int B>
  __device__ __forceinline__ uint32_t code(int u) const {
    if constexpr (B == 8) return __byte_perm(w[u >> 2], 0, 0x4440 | (u & 3));  // one PRMT
    const int bit = u * B, word = bit >> 5, off = bit & 31;
    uint32_t v = w[word] >> off;
    if (off + B > 32) v = __funnelshift_r(w[word], w[word + 1], off);
    return v & ((1u << B) - 1u);
  }
};

// Entry e of a replicated table, `copy` being this lane's copy: table + copy * kEntryBytes.
// (Entry-major layout, so the address is one shift-add of the code.)
template <class C>
__device__ __forceinline__ const uint8_t* entry_ptr(const uint8_t* copy, uint32_t e) {
  return copy + e * (C::kCopies * C::kEntryBytes);
}

// ---- the coded-token blocks --------------------------------------------------------------------

template <int D, class KC, class VC>
struct Layout {
  static constexpr int kKeyRowBytes = KC::template row_bytes<D>();
  static constexpr int kValueRowBytes = VC::template row_bytes<D>();
  static constexpr int kStageBytes = kStep * (kKeyRowBytes + kValueRowBytes);
  static constexpr int kKeyTable = 0;
  static constexpr int kValueTable = KC::kSharedBytes;
  static constexpr int kQuery = kValueTable + VC::kSharedBytes;   // float [kRows][D]
  static constexpr int kQueryShift = kQuery + kRows * D * 4;      // float [kRows]
  static constexpr int kStaging = kQueryShift + kRows * 4;        // [kWarps][kStages][stage]
  // One block per SM with as many warps as the registers (<= 128 each at 16 warps; D = 256 needs
  // more, so 8 warps) and the shared memory left after the tables allow: more warps hide more of
  // the gathers' latency, and every warp shares the block's tables.
  static constexpr int kSharedLimit = 227 * 1024;
  static constexpr int kWarps =
      cmin(D == 256 ? 8 : 16, (kSharedLimit - kStaging - 16) / (kStages * kStageBytes));
  static constexpr int kThreads = 32 * kWarps;
  // The scratch region after the queries holds the staged codes (+16: Bits may read one word
  // past), then the warps' final states for their merge; in a full-precision block, the chunks.
  static constexpr int kStagingBytes = kWarps * kStages * kStageBytes + 16;
  static constexpr int kCombineBytes = kWarps * kRows * (D + 2) * 4;
  static constexpr int kChunkBytes = 2 * chunk_tokens<D>() * (D + 2) * 2;
  static constexpr int kSharedBytes = kStaging + cmax(kStagingBytes, cmax(kCombineBytes, kChunkBytes));
  static_assert(kStageBytes % 16 == 0, "stages must stay 16-byte aligned");
  static_assert(kSharedBytes <= kSharedLimit, "shared memory layout too large");
};

// Per-lane mma fragment geometry: lane = 4 * r + c.
struct Lane {
  int lane, r, c;
  __device__ __forceinline__ Lane() : lane(threadIdx.x & 31), r((threadIdx.x & 31) >> 2), c(threadIdx.x & 3) {}
};

// Dimension (natural order) of value index i of the key fragments of quad lane c: k-block i / 4,
// slot (2c, 2c+1, 2c+8, 2c+9)[i % 4]. Each lane's dims are one contiguous run of D/4, so its codes
// are one contiguous run of bits of the row.
template <int D>
__device__ __forceinline__ int key_dim(int c, int i) { return c * (D / 4) + i; }
// Dimension of output row rho (0..15) of value m-block mb for lane group r = rho % 8: lane group r
// holds dims [r*D/8, (r+1)*D/8), block mb its dims 2mb (rho = r) and 2mb + 1 (rho = r + 8).
template <int D>
__device__ __forceinline__ int value_dim(int r, int mb, int high) { return r * (D / 8) + 2 * mb + high; }

template <typename T, int D, class KC, class VC>
__device__ void load_tables(uint8_t* smem, const Params& p, int64_t kv_head) {
  using L = Layout<D, KC, VC>;
  auto fill = [&](uint8_t* table, const Codebook& cb, auto codec) {
    using C = decltype(codec);
    const float* src = cb.centroids +
                       detail::table_row(kv_head, p.num_kv_heads, cb.num_codebooks) * C::kEntries * C::kSub;
    for (int i = threadIdx.x; i < C::kEntries * C::kSub / 2; i += L::kThreads) {
      const float2 v = reinterpret_cast<const float2*>(src)[i];
      const uint32_t packed = Mma<T>::pack(v.x, v.y);
      const int e = 2 * i / C::kSub, within = (2 * i % C::kSub) * 2;  // byte offset in the entry
#pragma unroll 4
      for (int copy = 0; copy < C::kCopies; ++copy)
        *reinterpret_cast<uint32_t*>(table + (e * C::kCopies + copy) * C::kEntryBytes + within) = packed;
    }
  };
  fill(smem + L::kKeyTable, p.kv.key_codebook, KC{});
  fill(smem + L::kValueTable, p.kv.value_codebook, VC{});
}

// Writes the query rows of this block into shared memory as Q' = H(q * lambda) * hadamard_norm *
// scale_log2 (float), and each row's shift q . mu * scale_log2. Rows past `rows` are zero.
template <typename T, int D, int kWarps>
__device__ void prepare_queries(float* qs, float* shift, const Params& p, int64_t b, int64_t kv_head,
                                int first_row, int rows, bool transformed) {
  constexpr int kThreads = 32 * kWarps;
  const Transform& t = p.kv.key_transform;
  const int64_t table = detail::table_row(kv_head, p.num_kv_heads, t.table_rows);
  for (int i = threadIdx.x; i < kRows * D; i += kThreads) {
    const int row = i / D, d = i % D;
    float v = 0.f;
    if (row < rows) {
      const int global_row = first_row + row;
      const int64_t head = kv_head * p.group + global_row / p.num_queries;
      const int64_t tq = global_row % p.num_queries;
      v = Mma<T>::to_float(static_cast<const T*>(p.q)[((b * p.num_q_heads + head) * p.num_queries + tq) * D + d]);
    }
    qs[i] = v;
  }
  __syncthreads();
  if (!transformed) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int row = warp; row < kRows; row += kWarps) {
    float dot = 0.f;
    if (t.mean)
      for (int d = lane; d < D; d += 32) dot += qs[row * D + d] * t.mean[table * D + d];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    if (lane == 0) shift[row] = dot * p.scale_log2;
  }
  __syncthreads();  // the shifts read qs before it is scaled in place
  if (t.scale)
    for (int i = threadIdx.x; i < kRows * D; i += kThreads) qs[i] *= t.scale[table * D + i % D];
  __syncthreads();
  if (t.hadamard) {
    for (int h = 1; h < D; h <<= 1) {
      for (int i = threadIdx.x; i < kRows * D / 2; i += kThreads) {
        const int row = i / (D / 2), k = i % (D / 2);
        const int j = row * D + (k / h) * 2 * h + k % h;
        const float a = qs[j], c = qs[j + h];
        qs[j] = a + c;
        qs[j + h] = a - c;
      }
      __syncthreads();
    }
  }
  const float norm = (t.hadamard ? detail::hadamard_norm(D) : 1.f) * p.scale_log2;
  for (int i = threadIdx.x; i < kRows * D; i += kThreads) qs[i] *= norm;
  __syncthreads();
}

// Per warp, the cp.async staging of its steps' code bytes: the key and value bytes of kStep
// tokens, lane-strided 16-byte chunks, kStages buffers in rotation. Bytes past the split's last
// token are zero-filled (those tokens are masked out of the softmax).
template <int D, class KC, class VC>
struct Stager {
  using L = Layout<D, KC, VC>;
  static constexpr int kKeyChunks = kStep * L::kKeyRowBytes / 16;
  static constexpr int kChunks = kKeyChunks + kStep * L::kValueRowBytes / 16;
  static constexpr int kPerLane = (kChunks + 31) / 32;
  static constexpr int64_t kStride = int64_t{L::kWarps} * kStep;  // tokens between a warp's steps

  uint8_t* buffers;       // this warp's kStages buffers
  const uint8_t* keys;    // code bytes of the next step to issue
  const uint8_t* values;
  int64_t first, end;     // next step's first token; the split's end
  int stage = 0;
  int lane;

  // Issues the next step (or an empty group past the end, so group counting stays uniform).
  __device__ __forceinline__ void issue() {
    if (first < end) {
      uint8_t* dst = buffers + stage * L::kStageBytes;
      const bool full = end - first >= kStep;  // all but a split's last step
      const int valid = full ? kStep : static_cast<int>(end - first);
#pragma unroll
      for (int q = 0; q < kPerLane; ++q) {
        const int i = lane + 32 * q;
        if (kChunks % 32 != 0 && i >= kChunks) break;
        const bool is_key = kKeyChunks % 32 == 0 ? q < kKeyChunks / 32 : i < kKeyChunks;
        const int offset = 16 * (is_key ? i : i - kKeyChunks);
        int bytes = 16;
        if (!full) {
          const int have = valid * (is_key ? L::kKeyRowBytes : L::kValueRowBytes) - offset;
          bytes = have < 0 ? 0 : have > 16 ? 16 : have;
        }
        const uint8_t* src = (is_key ? keys : values) + offset;
        cp_async16(dst + (is_key ? 0 : kStep * L::kKeyRowBytes) + offset, bytes ? src : keys, bytes);
      }
    }
    cp_async_commit();
    first += kStride;
    keys += kStride * L::kKeyRowBytes;
    values += kStride * L::kValueRowBytes;
    stage = stage + 1 == kStages ? 0 : stage + 1;
  }
};

// 8x8 b16 transpose of an mma fragment (lane 4r + c: row r, columns 2c, 2c+1).
__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

__device__ __forceinline__ float fast_exp2(float x) {  // 2^x; -inf -> 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// One block over the coded tokens [begin, end) of its split. Tokens sit on the M dimension of
// mma.sync m16n8k16 and the block's (up to 8) query rows on N:
//   S^T[16 tokens x 8 rows]  = K'[16 x D] Q'^T      (K' gathered from the codebook into A fragments)
//   O^T[D x 8 rows]         += V'^T[D x 16] P^T     (P^T from S^T by an 8x8 register transpose)
template <typename T, int D, class KC, class VC>
__device__ void coded_block(uint8_t* smem, const Params& p, int64_t b, int64_t kv_head, int first_row, int rows,
                            int split) {
  using L = Layout<D, KC, VC>;
  constexpr int kKB = D / 16;                                // k-blocks of the score product
  constexpr int kMB = D / 16;                                // m-blocks (16 dims) of the output
  constexpr int kTiles = kStep / 16;                         // m16 token tiles per step
  constexpr int kKeyBits = D / KC::kSub / 4 * KC::kBits;     // codes of one lane in a key row
  constexpr int kValueBits = D / VC::kSub / 8 * VC::kBits;   // codes of one lane in a value row
  const Lane ln;
  const int warp = threadIdx.x >> 5;

  const int32_t* len = p.kv.lengths + 3 * b;
  const int64_t sinks = clamp_length(len[0], p.kv.sink_capacity);
  const int64_t coded = clamp_length(len[1], p.kv.code_capacity);
  const int64_t recent = clamp_length(len[2], p.kv.recent_capacity);
  const int64_t n = sinks + coded + recent;
  const int64_t begin = split * p.split_tokens;
  const int64_t end = min(coded, begin + p.split_tokens);

  float* qs = reinterpret_cast<float*>(smem + L::kQuery);
  float* shift = reinterpret_cast<float*>(smem + L::kQueryShift);
  uint8_t* staging = smem + L::kStaging + warp * kStages * L::kStageBytes;
  const int64_t head_index = b * p.num_kv_heads + kv_head;
  const uint8_t* key_src = p.kv.key_codes + head_index * p.kv.code_capacity * L::kKeyRowBytes;
  const uint8_t* value_src = p.kv.value_codes + head_index * p.kv.code_capacity * L::kValueRowBytes;

  // Start the first stages' copies, then build the tables and queries while they fly.
  const int64_t steps = begin < end ? (end - begin + kStep - 1) / kStep : 0;
  const int64_t warp_first = begin + int64_t{warp} * kStep;
  Stager<D, KC, VC> stager{staging, key_src + warp_first * L::kKeyRowBytes,
                           value_src + warp_first * L::kValueRowBytes, warp_first, end, 0, ln.lane};
#pragma unroll
  for (int k = 0; k < kStages - 1; ++k) stager.issue();
  load_tables<T, D, KC, VC>(smem, p, kv_head);
  prepare_queries<T, D, L::kWarps>(qs, shift, p, b, kv_head, first_row, rows, true);

  // Q'^T as B fragments: lane (r, c) holds row r's dims key_dim(c, 4kb + {0,1}) and {2,3}.
  uint32_t qb[kKB][2];
#pragma unroll
  for (int kb = 0; kb < kKB; ++kb) {
    const float* q = qs + ln.r * D + key_dim<D>(ln.c, kb * 4);
    qb[kb][0] = Mma<T>::pack(q[0], q[1]);
    qb[kb][1] = Mma<T>::pack(q[2], q[3]);
  }
  // This lane's score columns are rows 2c and 2c + 1.
  const float shift0 = shift[2 * ln.c], shift1 = shift[2 * ln.c + 1];
  // Causal limits: row i (query t = i % Tq) sees positions <= n - Tq + t, i.e. coded tokens < bound.
  auto bound_of = [&](int row) {
    const int64_t t = (first_row + row) % p.num_queries;
    return min(end, n - p.num_queries + t + 1 - sinks);
  };
  const int64_t bound0 = bound_of(2 * ln.c), bound1 = bound_of(2 * ln.c + 1);

  float acc[kMB][4];  // O^T fragments: dims (r, r+8) x rows (2c, 2c+1) of each m-block
#pragma unroll
  for (int i = 0; i < kMB; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

  const uint8_t* key_table = smem + L::kKeyTable + (ln.lane % KC::kCopies) * KC::kEntryBytes;
  const uint8_t* value_table = smem + L::kValueTable + (ln.lane % VC::kCopies) * VC::kEntryBytes;
  const int my_steps = steps > warp ? static_cast<int>((steps - warp + L::kWarps - 1) / L::kWarps) : 0;

  int stage = 0;
  int64_t first = warp_first;
  for (int k = 0; k < my_steps; ++k, first += Stager<D, KC, VC>::kStride) {
    stager.issue();
    cp_async_wait<kStages - 1>();
    __syncwarp();
    const uint8_t* keys = staging + stage * L::kStageBytes;
    const uint8_t* values = keys + kStep * L::kKeyRowBytes;
    stage = stage + 1 == kStages ? 0 : stage + 1;

    // Scores S^T: per token tile, lane (r, c) gathers tokens r and r + 8 for its dims.
    float s[kTiles][4];
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.f;
      Bits<kKeyBits> lo, hi;
      lo.load(keys + (16 * t + ln.r) * L::kKeyRowBytes, ln.c * kKeyBits);
      hi.load(keys + (16 * t + ln.r + 8) * L::kKeyRowBytes, ln.c * kKeyBits);
      if constexpr (KC::kSub == 2) {
#pragma unroll
        for (int kb = 0; kb < kKB; ++kb) {
          auto at = [&](const Bits<kKeyBits>& c, int u) {
            return *reinterpret_cast<const uint32_t*>(entry_ptr<KC>(key_table, c.template code<KC::kBits>(u)));
          };
          const uint32_t a[4] = {at(lo, 2 * kb), at(hi, 2 * kb), at(lo, 2 * kb + 1), at(hi, 2 * kb + 1)};
          Mma<T>::run(s[t], a, qb[kb][0], qb[kb][1]);
        }
      } else if constexpr (KC::kSub == 4) {
#pragma unroll
        for (int kb = 0; kb < kKB; ++kb) {
          const uint2 e = *reinterpret_cast<const uint2*>(
              entry_ptr<KC>(key_table, lo.template code<KC::kBits>(kb)));
          const uint2 f = *reinterpret_cast<const uint2*>(
              entry_ptr<KC>(key_table, hi.template code<KC::kBits>(kb)));
          const uint32_t a[4] = {e.x, f.x, e.y, f.y};
          Mma<T>::run(s[t], a, qb[kb][0], qb[kb][1]);
        }
      } else {
#pragma unroll
        for (int kb = 0; kb < kKB; kb += 2) {
          const uint4 e = *reinterpret_cast<const uint4*>(
              entry_ptr<KC>(key_table, lo.template code<KC::kBits>(kb / 2)));
          const uint4 f = *reinterpret_cast<const uint4*>(
              entry_ptr<KC>(key_table, hi.template code<KC::kBits>(kb / 2)));
          const uint32_t a0[4] = {e.x, f.x, e.y, f.y};
          const uint32_t a1[4] = {e.z, f.z, e.w, f.w};
          Mma<T>::run(s[t], a0, qb[kb][0], qb[kb][1]);
          Mma<T>::run(s[t], a1, qb[kb + 1][0], qb[kb + 1][1]);
        }
      }
    }

    // Online softmax. Lane (r, c) holds tokens 16t + r (s[t][0..1]) and 16t + r + 8 (s[t][2..3]) for
    // rows 2c (s[t][0], s[t][2]) and 2c + 1 (s[t][1], s[t][3]); a row spans the 8 lanes of one c.
    const int limit0 = static_cast<int>(max(int64_t{-1}, min(int64_t{kStep}, bound0 - first)));
    const int limit1 = static_cast<int>(max(int64_t{-1}, min(int64_t{kStep}, bound1 - first)));
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int tok = 16 * t + ln.r + 8 * h;
        s[t][2 * h] = tok < limit0 ? s[t][2 * h] + shift0 : -INFINITY;
        s[t][2 * h + 1] = tok < limit1 ? s[t][2 * h + 1] + shift1 : -INFINITY;
        mx0 = fmaxf(mx0, s[t][2 * h]);
        mx1 = fmaxf(mx1, s[t][2 * h + 1]);
      }
    }
#pragma unroll
    for (int o = 4; o <= 16; o <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, o));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, o));
    }
    const float new0 = fmaxf(m0, mx0), new1 = fmaxf(m1, mx1);
    const float ref0 = new0 == -INFINITY ? 0.f : new0, ref1 = new1 == -INFINITY ? 0.f : new1;
    const float alpha0 = fast_exp2(m0 - ref0), alpha1 = fast_exp2(m1 - ref1);
    m0 = new0, m1 = new1;
    float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        s[t][2 * h] = fast_exp2(s[t][2 * h] - ref0);
        s[t][2 * h + 1] = fast_exp2(s[t][2 * h + 1] - ref1);
        sum0 += s[t][2 * h];
        sum1 += s[t][2 * h + 1];
      }
    }
    l0 = l0 * alpha0 + sum0;
    l1 = l1 * alpha1 + sum1;
    if (__any_sync(0xffffffffu, alpha0 != 1.f || alpha1 != 1.f)) {
#pragma unroll
      for (int i = 0; i < kMB; ++i) {
        acc[i][0] *= alpha0, acc[i][2] *= alpha0;
        acc[i][1] *= alpha1, acc[i][3] *= alpha1;
      }
    }

#pragma unroll
    for (int t = 0; t < kTiles; ++t) {
      // P^T as the B fragment of the value product: tokens (2c, 2c+1) and (2c+8, 2c+9) of row r.
      const uint32_t pb0 = transpose8x8(Mma<T>::pack(s[t][0], s[t][1]));
      const uint32_t pb1 = transpose8x8(Mma<T>::pack(s[t][2], s[t][3]));
      // V'^T as A fragments: lane (r, c) gathers tokens 2c, 2c+1, 2c+8, 2c+9 for its dims.
      Bits<kValueBits> vcodes[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int tok = 16 * t + 2 * ln.c + (j & 1) + 8 * (j >> 1);
        vcodes[j].load(values + tok * L::kValueRowBytes, ln.r * kValueBits);
      }
#pragma unroll
      for (int u = 0; u < D / VC::kSub / 8; ++u) {
        uint32_t e[4][VC::kSub / 2];  // centroid of sub-vector u for the 4 tokens, as element pairs
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint8_t* ptr = entry_ptr<VC>(value_table, vcodes[j].template code<VC::kBits>(u));
          if constexpr (VC::kSub == 2) {
            e[j][0] = *reinterpret_cast<const uint32_t*>(ptr);
          } else if constexpr (VC::kSub == 4) {
            const uint2 v = *reinterpret_cast<const uint2*>(ptr);
            e[j][0] = v.x, e[j][1] = v.y;
          } else {
            const uint4 v = *reinterpret_cast<const uint4*>(ptr);
            e[j][0] = v.x, e[j][1] = v.y, e[j][2] = v.z, e[j][3] = v.w;
          }
        }
#pragma unroll
        for (int w = 0; w < VC::kSub / 2; ++w) {
          // Elements 2w (low halves: dim row r) and 2w + 1 (high halves: dim row r + 8) of
          // m-block u * S/2 + w; tokens (2c, 2c+1) in a0/a1, (2c+8, 2c+9) in a2/a3.
          const uint32_t a[4] = {__byte_perm(e[0][w], e[1][w], 0x5410), __byte_perm(e[0][w], e[1][w], 0x7632),
                                 __byte_perm(e[2][w], e[3][w], 0x5410), __byte_perm(e[2][w], e[3][w], 0x7632)};
          Mma<T>::run(acc[u * VC::kSub / 2 + w], a, pb0, pb1);
        }
      }
    }
    __syncwarp();  // the next issue() overwrites this stage
  }
  cp_async_wait<0>();

  // Row sums over the 8 lanes of a row, then merge the warps' states through shared memory.
#pragma unroll
  for (int o = 4; o <= 16; o <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, o);
    l1 += __shfl_xor_sync(0xffffffffu, l1, o);
  }
  __syncthreads();  // every warp is done with its staged codes
  constexpr int kWarps = L::kWarps, kThreads = L::kThreads;
  float* cm = reinterpret_cast<float*>(smem + L::kStaging);  // [kWarps][kRows][2]
  float* cacc = cm + kWarps * kRows * 2;               // [kWarps][kRows][D] natural dim order
  if (ln.r == 0) {
    cm[(warp * kRows + 2 * ln.c) * 2] = m0, cm[(warp * kRows + 2 * ln.c) * 2 + 1] = l0;
    cm[(warp * kRows + 2 * ln.c + 1) * 2] = m1, cm[(warp * kRows + 2 * ln.c + 1) * 2 + 1] = l1;
  }
#pragma unroll
  for (int mb = 0; mb < kMB; ++mb) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int d = value_dim<D>(ln.r, mb, h);
      cacc[(warp * kRows + 2 * ln.c) * D + d] = acc[mb][2 * h];
      cacc[(warp * kRows + 2 * ln.c + 1) * D + d] = acc[mb][2 * h + 1];
    }
  }
  __syncthreads();
  const int64_t group_index = (b * p.num_kv_heads + kv_head) * p.row_tiles + first_row / kRows;
  const int64_t part = group_index * (p.splits + 1) + 1 + split;  // part 0: full precision
  for (int i = threadIdx.x; i < rows * D; i += kThreads) {
    const int row = i / D, d = i % D;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, cm[(w * kRows + row) * 2]);
    const float ref = m == -INFINITY ? 0.f : m;
    float l = 0.f, a = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float f = exp2f(cm[(w * kRows + row) * 2] - ref);
      l += cm[(w * kRows + row) * 2 + 1] * f;
      a += cacc[(w * kRows + row) * D + d] * f;
    }
    p.partial_acc[(part * kRows + row) * D + d] = a;
    if (d == 0) p.partial_ml[(part * kRows + row) * 2] = m, p.partial_ml[(part * kRows + row) * 2 + 1] = l;
  }
}

// ---- the full-precision block (sink and recent tokens, original coordinates) --------------------

// Chunks of kChunk full-precision tokens are copied into shared memory with 16-byte loads (rows
// padded by 4 bytes so that lanes reading different rows hit different banks); then each warp
// scores its rows lane-per-token and accumulates values lane-per-dimension.
template <typename T, int D, int kThreads>
__device__ __forceinline__ void load_fp_chunk(T* dst, const T* sink, const T* recent, int64_t sinks, int64_t first,
                                              int count) {
  constexpr int kVec = 8;  // elements per 16-byte load
  constexpr int kStride = D + 2;
  for (int i = threadIdx.x; i < count * D / kVec; i += kThreads) {
    const int t = i / (D / kVec), d = (i % (D / kVec)) * kVec;
    const int64_t j = first + t;
    const T* src = j < sinks ? sink + j * D + d : recent + (j - sinks) * D + d;
    const uint4 v = *reinterpret_cast<const uint4*>(src);
    const uint32_t* w = reinterpret_cast<const uint32_t*>(&v);
    uint32_t* out = reinterpret_cast<uint32_t*>(dst + t * kStride + d);  // 4-byte aligned (padded rows)
#pragma unroll
    for (int k = 0; k < 4; ++k) out[k] = w[k];
  }
}

template <typename T, int D, class KC, class VC>
__device__ void full_precision_block(uint8_t* smem, const Params& p, int64_t b, int64_t kv_head, int first_row,
                                     int rows) {
  using L = Layout<D, KC, VC>;
  constexpr int kPerLane = D / 32;
  constexpr int kStride = D + 2;
  constexpr int kChunk = chunk_tokens<D>();
  float* qs = reinterpret_cast<float*>(smem + L::kQuery);
  T* chunk_k = reinterpret_cast<T*>(smem + L::kStaging);
  T* chunk_v = chunk_k + kChunk * kStride;
  prepare_queries<T, D, L::kWarps>(qs, nullptr, p, b, kv_head, first_row, rows, false);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int32_t* len = p.kv.lengths + 3 * b;
  const int64_t sinks = clamp_length(len[0], p.kv.sink_capacity);
  const int64_t coded = clamp_length(len[1], p.kv.code_capacity);
  const int64_t recent = clamp_length(len[2], p.kv.recent_capacity);
  const int64_t n = sinks + coded + recent;
  const int64_t head_index = b * p.num_kv_heads + kv_head;
  const T* sk = static_cast<const T*>(p.kv.sink_keys) + head_index * p.kv.sink_capacity * D;
  const T* sv = static_cast<const T*>(p.kv.sink_values) + head_index * p.kv.sink_capacity * D;
  const T* rk = static_cast<const T*>(p.kv.recent_keys) + head_index * p.kv.recent_capacity * D;
  const T* rv = static_cast<const T*>(p.kv.recent_values) + head_index * p.kv.recent_capacity * D;

  // Per warp, up to kRows / kWarps rows: m, l and the accumulators live in registers.
  constexpr int kWarps = L::kWarps;
  constexpr int kRowsPerWarp = (kRows + kWarps - 1) / kWarps;
  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kPerLane];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m[r] = -INFINITY, l[r] = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) acc[r][i] = 0.f;
  }
  const int64_t total = sinks + recent;
  for (int64_t first = 0; first < total; first += kChunk) {
    const int count = static_cast<int>(min(int64_t{kChunk}, total - first));
    __syncthreads();  // the previous chunk is consumed
    load_fp_chunk<T, D, L::kThreads>(chunk_k, sk, rk, sinks, first, count);
    load_fp_chunk<T, D, L::kThreads>(chunk_v, sv, rv, sinks, first, count);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = warp + r * kWarps;
      if (row >= rows) break;
      const float* qrow = qs + row * D;
      const int64_t visible = n - p.num_queries + (first_row + row) % p.num_queries + 1;  // positions < visible
      float score[kChunk / 32];
      float mx = -INFINITY;
#pragma unroll
      for (int h = 0; h < kChunk / 32; ++h) {
        const int t = h * 32 + lane;
        const int64_t j = first + t;
        const int64_t pos = j < sinks ? j : j + coded;
        score[h] = -INFINITY;
        if (t < count && pos < visible) {
          const T* k = chunk_k + t * kStride;
          float dot = 0.f;
#pragma unroll 16
          for (int d = 0; d < D; d += 2) {
            const float2 kv2 = pair_to_float2(k + d);
            dot += qrow[d] * kv2.x + qrow[d + 1] * kv2.y;
          }
          score[h] = dot * p.scale_log2;
        }
        mx = fmaxf(mx, score[h]);
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float new_m = fmaxf(m[r], mx);
      const float ref = new_m == -INFINITY ? 0.f : new_m;
      const float alpha = exp2f(m[r] - ref);
      float sum = 0.f;
#pragma unroll
      for (int h = 0; h < kChunk / 32; ++h) {
        score[h] = exp2f(score[h] - ref);
        sum += score[h];
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      l[r] = l[r] * alpha + sum;
      m[r] = new_m;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) acc[r][i] *= alpha;
#pragma unroll
      for (int h = 0; h < kChunk / 32; ++h) {
        const int valid = min(32, count - h * 32);  // rows past it hold stale shared memory
#pragma unroll 8
        for (int t = 0; t < valid; ++t) {
          const float pt = __shfl_sync(0xffffffffu, score[h], t);
          const T* v = chunk_v + (h * 32 + t) * kStride + lane * kPerLane;
#pragma unroll
          for (int i = 0; i < kPerLane; i += 2) {
            const float2 vv = pair_to_float2(v + i);
            acc[r][i] += pt * vv.x;
            acc[r][i + 1] += pt * vv.y;
          }
        }
      }
    }
  }
  const int64_t group_index = (b * p.num_kv_heads + kv_head) * p.row_tiles + first_row / kRows;
  const int64_t part = group_index * (p.splits + 1);  // part 0: the full-precision tokens
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = warp + r * kWarps;
    if (row >= rows) break;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) p.partial_acc[(part * kRows + row) * D + lane * kPerLane + i] = acc[r][i];
    if (lane == 0) p.partial_ml[(part * kRows + row) * 2] = m[r], p.partial_ml[(part * kRows + row) * 2 + 1] = l[r];
  }
}

template <typename T, int D, class KC, class VC>
__global__ void __launch_bounds__(Layout<D, KC, VC>::kThreads, 1) attention_kernel(Params p) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int64_t b = blockIdx.z;
  const int64_t kv_head = blockIdx.y / p.row_tiles;
  const int first_row = (blockIdx.y % p.row_tiles) * kRows;
  const int rows = min(kRows, p.group * static_cast<int>(p.num_queries) - first_row);
  // Block 0 (scheduled first) takes the few full-precision tokens; blocks 1.. the coded splits.
  if (blockIdx.x == 0)
    full_precision_block<T, D, KC, VC>(smem, p, b, kv_head, first_row, rows);
  else
    coded_block<T, D, KC, VC>(smem, p, b, kv_head, first_row, rows, static_cast<int>(blockIdx.x) - 1);
}

// Merges the parts of one (sequence, KV head, row tile): part 0 the full-precision tokens, parts
// 1..splits the coded splits. out = (sum_s acc_s 2^(m_s - M) + value_mean * W_coded) / L, where
// W_coded is the softmax weight of the coded tokens (the value mean was taken out of them only).
constexpr int kMergeWarps = 4;

template <typename T, int D>
__global__ void __launch_bounds__(32 * kMergeWarps) merge_kernel(Params p) {
  constexpr int kWarps = kMergeWarps, kThreads = 32 * kMergeWarps;
  extern __shared__ float weights[];  // [parts][kRows]: 2^(m_s - M) of each part and row
  __shared__ float row_scale[kRows], coded_weight[kRows], row_lse[kRows];
  const int64_t group_index = blockIdx.x;
  const int64_t b = group_index / (p.num_kv_heads * p.row_tiles);
  const int64_t kv_head = group_index / p.row_tiles % p.num_kv_heads;
  const int first_row = group_index % p.row_tiles * kRows;
  const int rows = min(kRows, p.group * static_cast<int>(p.num_queries) - first_row);
  const int parts = p.splits + 1;
  const float* ml = p.partial_ml + group_index * parts * kRows * 2;
  const float* accs = p.partial_acc + group_index * parts * kRows * D;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int row = warp; row < rows; row += kWarps) {  // a warp per row: max and sums over the parts
    float m = -INFINITY;
    for (int s = lane; s < parts; s += 32) m = fmaxf(m, ml[(s * kRows + row) * 2]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    const float ref = m == -INFINITY ? 0.f : m;
    float l = 0.f, coded = 0.f;
    for (int s = lane; s < parts; s += 32) {
      const float f = exp2f(ml[(s * kRows + row) * 2] - ref);
      weights[s * kRows + row] = f;
      l += ml[(s * kRows + row) * 2 + 1] * f;
      if (s > 0) coded += ml[(s * kRows + row) * 2 + 1] * f;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      l += __shfl_xor_sync(0xffffffffu, l, o);
      coded += __shfl_xor_sync(0xffffffffu, coded, o);
    }
    if (lane == 0) {
      row_scale[row] = l > 0.f ? 1.f / l : 0.f;
      coded_weight[row] = coded;
      row_lse[row] = l > 0.f ? (m + log2f(l)) * 0.6931471805599453f : -INFINITY;
    }
  }
  __syncthreads();
  const float* mean = p.kv.value_mean
                          ? p.kv.value_mean + detail::table_row(kv_head, p.num_kv_heads, p.kv.value_mean_rows) * D
                          : nullptr;
  for (int i = threadIdx.x; i < rows * D; i += kThreads) {
    const int row = i / D, d = i % D;
    float a = 0.f;
#pragma unroll 8
    for (int s = 0; s < parts; ++s) a += accs[(s * kRows + row) * D + d] * weights[s * kRows + row];
    if (mean) a += mean[d] * coded_weight[row];
    const int global_row = first_row + row;
    const int64_t head = kv_head * p.group + global_row / p.num_queries;
    const int64_t tq = global_row % p.num_queries;
    const int64_t out_row = (b * p.num_q_heads + head) * p.num_queries + tq;
    static_cast<T*>(p.out)[out_row * D + d] = Mma<T>::from_float(a * row_scale[row]);
    if (p.lse && d == 0) p.lse[out_row] = row_lse[row];
  }
}

}  // namespace vecinfer::cuda_detail::attn
