// Attention of long query blocks (more than the decode kernel's 16 queries per sequence: a chunked
// prefill, a second turn, a long draft) on the compressed cache: the same function as the decode
// kernel (vecinfer/attention.h), computed the way FlashAttention computes a forward pass, since
// with many query rows it is bound by tensor-core work rather than by bytes.
//
// Grid: x = tile of kRows query rows (of the longest sequence's; with ragged queries a sequence's
// blocks past its own rows return at once), y = KV head, z = sequence x split. The rows of a tile are
// (query, query head) pairs of one KV head, row r = t * group + g, so every row of the block reads
// the same keys and values. The block walks its share of the sequence's token tiles (kN tokens):
// first the full-precision tokens (sinks, then the recent window), then the coded tokens. A coded
// tile's code rows arrive in shared memory by cp.async (issued one tile ahead); the block then
// dequantizes them into the same [kN][D] key and value tiles that full-precision tokens are copied
// into, and each warp (kM tiles of 16 query rows, so that every key and value fragment read from
// shared memory feeds kM products) runs S = Q K^T and O += P V on mma.sync m16n8k16 with operands
// read by ldmatrix, under an online softmax. Tiles past the block's last query position
// (causality) are not visited; tiles holding later positions are masked.
//
// Coded keys are centroids of the transformed key H((k - mu) / lambda); the block scores them
// against the transformed query q' = H(q * lambda) and adds q . mu, so the scores of every part
// are q . k (attention.h). Coded values are centroids; the value mean is added once at the end,
// weighted by the coded tokens' share of each row's softmax. Centroids are used in the element
// type (not on the decode kernel's 8-bit grid).
//
// Two variants, one source. Ampere (kHopper false): 4 warps, each kM x 16 rows, mma.sync on
// operands read by ldmatrix from row-padded tiles, two blocks per multiprocessor. Hopper (kHopper
// true, sm_90a): two warpgroups, each holding kM row tiles of 64 (wgmma's M), S = Q K^T by wgmma
// with both operands in shared memory and O += P V by wgmma with P in registers, the tiles in
// wgmma's 128-byte-swizzled layout, one block per multiprocessor; the next tile's keys are
// dequantized while this tile's P V products run. The host runs the Hopper variant where its sm_90a
// code is what the device loads (prefill.cu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include <cute/arch/mma_sm90_gmma.hpp>  // wgmma (sm_90a), fp16 and bf16
#include <utility>

#include "../common.h"
#include "element.cuh"
#include "row_ops.cuh"
#include "vecinfer/attention.h"

namespace vecinfer::cuda_detail::prefill {

constexpr float kLog2e = 1.4426950408889634f;

// Per head_dim and variant: warps, row tiles per warp (each dequantized key and value tile serves
// all of them; Ampere: 4 warps, kM tiles of 16 rows per warp, each fragment read by ldmatrix
// feeding kM products; Hopper: 2 warpgroups, kM tiles of 64 rows per warpgroup, the warp holding
// 16 rows of each), tokens per tile, blocks per multiprocessor asked of the register allocator.
template <int D, bool kHopper>
struct Shape {
  static constexpr int kWarpgroups = kHopper ? 2 : 1;  // Hopper: two warpgroups share every dequantized tile
  static constexpr int kWarps = 4 * kWarpgroups;
  // D = 256: the accumulators of one row tile fill the registers
  static constexpr int kM = D == 256 ? 1 : 2;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRows = 16 * kM * kWarps;  // Hopper: kM tiles of 64 rows per warpgroup, one per wgmma
  static constexpr int kN = D == 256 ? 32 : 64;
  static constexpr int kMinBlocks = kHopper ? 1 : 2;
  static constexpr int kMaxRowBytes = D / 2;  // code row bytes of the widest preset (sub_dim 2, 8 bits)
  static constexpr int kStageBytes = kN * 2 * kMaxRowBytes + 16;  // key then value code rows (+ read slack)
};

// Element offset of (row, col) in a [kTileRows][D] tile of 16-bit elements. Ampere: rows padded
// by 8 elements, so that ldmatrix's eight rows fall in distinct banks. Hopper: wgmma's 128-byte
// swizzle: panels of 64 columns ([kTileRows][64], 128-byte rows, panel after panel), and in row r
// the 16-byte chunk c of a panel row sits at chunk c ^ (r % 8). In both, 8 columns from a multiple
// of 8 are contiguous (one 16-byte store).
template <int D, int kTileRows, bool kHopper>
struct TileLayout {
  static constexpr int kElems = kHopper ? kTileRows * D : kTileRows * (D + 8);
  static constexpr int kPanelBytes = kTileRows * 128;  // Hopper: bytes between 64-column panels
  __device__ static int at(int row, int col) {
    if constexpr (kHopper) {
      return col / 64 * (kTileRows * 64) + row * 64 + ((col / 8 ^ row) % 8) * 8 + col % 8;
    } else {
      return row * (D + 8) + col;
    }
  }
};

// Where the kernel reads the codebooks: in global memory (float32, when they do not fit in shared
// memory), in shared memory in the element type, or there spread: entry e of an 8-bit codebook
// fills a 128-byte row with 128 / (2 sub_dim) copies, and a thread reads the copy of its lane, so
// that the random entries a warp reads fall in distinct banks (Hopper, where the memory allows).
enum class Tables : int { kGlobal, kShared, kSpread };
constexpr int kSpreadRowElems = 64;  // 128 bytes of 16-bit elements

// Shared memory of a block: query rows, one key and one value tile, two code stages, then the two
// codebooks (Tables). The tiles start 1024-byte aligned (Hopper: the swizzle's period;
// dynamic shared memory starts at the window's 1024-aligned base when the kernel has no static
// shared memory).
template <int D, bool kHopper>
struct Smem {
  using S = Shape<D, kHopper>;
  using QueryTile = TileLayout<D, S::kRows, kHopper>;
  using KVTile = TileLayout<D, S::kN, kHopper>;
  static constexpr int kQuery = 0;                                 // T QueryTile
  static constexpr int kKeys = kQuery + QueryTile::kElems * 2;     // T KVTile
  static constexpr int kValues = kKeys + KVTile::kElems * 2;       // T KVTile
  static constexpr int kShift = kValues + KVTile::kElems * 2;      // float [kRows]: q . mu * scale_log2
  static constexpr int kValueMean = kShift + S::kRows * 4;         // float [D]
  static constexpr int kStages = kValueMean + D * 4;               // uint8 [2][kStageBytes]
  static constexpr int kTables = kStages + 2 * S::kStageBytes;     // T key table, then value table
  static_assert(kStages % 16 == 0 && S::kStageBytes % 16 == 0 && kTables % 16 == 0, "16-byte alignment");
  static_assert(!kHopper || (kKeys % 1024 == 0 && kValues % 1024 == 0), "swizzled tiles 1024-byte aligned");
  static int bytes(int key_entries, int key_sub, int value_entries, int value_sub, Tables tables) {
    if (tables == Tables::kSpread) return kTables + 2 * kSpreadRowElems * (key_entries + value_entries);
    return kTables + (tables == Tables::kShared ? 2 * (key_entries * key_sub + value_entries * value_sub) : 0);
  }
};

struct Params {
  const void* q;  // [batch, num_q_heads, num_queries, D], or packed [total_queries, num_q_heads, D]
  void* out;
  float* lse;       // [batch, num_q_heads, num_queries] or [total_queries, num_q_heads], or null
  float* partial;   // splits > 1: [batch, kv heads, row tiles, splits, kRows, D + 2] (acc, then max, sum)
  CompressedKV kv;
  int64_t batch, num_q_heads, num_kv_heads, num_queries;  // num_queries: the most of any sequence
  const int32_t* query_indptr;  // ragged queries: [batch + 1] (attention.h), or null
  int64_t total_queries;
  int group;
  int row_tiles;
  int splits;
  float scale_log2;
  int page_shift;
  int key_row_bytes, value_row_bytes;
  Tables tables;
};

// ---- device helpers ------------------------------------------------------------------------------

// The A fragment of tokens [16 kt, 16 kt + 16) from the score accumulators (n8 groups 2 kt, 2 kt + 1).
template <typename T, int R>
__device__ __forceinline__ void pack_probabilities(uint32_t (&a)[4], const float (&s)[R][4], int kt) {
  a[0] = Elem<T>::pack(s[2 * kt][0], s[2 * kt][1]);
  a[1] = Elem<T>::pack(s[2 * kt][2], s[2 * kt][3]);
  a[2] = Elem<T>::pack(s[2 * kt + 1][0], s[2 * kt + 1][1]);
  a[3] = Elem<T>::pack(s[2 * kt + 1][2], s[2 * kt + 1][3]);
}


// f(integral_constant<int, i>) for i = 0 .. N - 1, so that register arrays are indexed by constants.
template <class F, int... I>
__device__ __forceinline__ void unrolled_each(F& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, class F>
__device__ __forceinline__ void unrolled(F&& f) {
  unrolled_each(f, std::make_integer_sequence<int, N>{});
}

// ---- wgmma (Hopper) ------------------------------------------------------------------------------

namespace gmma = cute::SM90::GMMA;

// S = Q K^T over 16 elements of D: m64 nN k16, A (Q) and B (K) both K-major in shared memory.
template <typename T, int N>
using GmmaScores = std::conditional_t<
    std::is_same_v<T, __half>,
    std::conditional_t<N == 32, gmma::MMA_64x32x16_F32F16F16_SS<gmma::Major::K, gmma::Major::K>,
                       gmma::MMA_64x64x16_F32F16F16_SS<gmma::Major::K, gmma::Major::K>>,
    std::conditional_t<N == 32, gmma::MMA_64x32x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::K>,
                       gmma::MMA_64x64x16_F32BF16BF16_SS<gmma::Major::K, gmma::Major::K>>>;
// O += P V over 16 tokens: m64 nD k16, A (P) in registers, B (V, [token][D]) N-major in shared memory.
template <typename T, int D>
using GmmaValues = std::conditional_t<
    std::is_same_v<T, __half>,
    std::conditional_t<D == 64, gmma::MMA_64x64x16_F32F16F16_RS<gmma::Major::K, gmma::Major::MN>,
                       std::conditional_t<D == 128, gmma::MMA_64x128x16_F32F16F16_RS<gmma::Major::K, gmma::Major::MN>,
                                          gmma::MMA_64x256x16_F32F16F16_RS<gmma::Major::K, gmma::Major::MN>>>,
    std::conditional_t<D == 64, gmma::MMA_64x64x16_F32BF16BF16_RS<gmma::Major::K, gmma::Major::MN>,
                       std::conditional_t<D == 128, gmma::MMA_64x128x16_F32BF16BF16_RS<gmma::Major::K, gmma::Major::MN>,
                                          gmma::MMA_64x256x16_F32BF16BF16_RS<gmma::Major::K, gmma::Major::MN>>>>;

// The accumulator fragment of an m64nN wgmma is the mma.sync m16n8 fragment of the thread's warp,
// repeated over N / 8: register 4 j + e of [N / 8][4].
template <class Op, int R, size_t... I>
__device__ __forceinline__ void gmma_ss(uint64_t a, uint64_t b, float (&d)[R][4], gmma::ScaleOut scale,
                                        std::index_sequence<I...>) {
  Op::fma(a, b, d[I / 4][I % 4]..., scale);
}
template <class Op, int R, size_t... I>
__device__ __forceinline__ void gmma_rs(const uint32_t (&a)[4], uint64_t b, float (&d)[R][4], std::index_sequence<I...>) {
  Op::fma(a[0], a[1], a[2], a[3], b, d[I / 4][I % 4]...);
}

// The descriptor of the operand `bytes` further on: a 32-bit add to the start field (shared
// addresses stay below 2^18, so the 14-bit field does not carry).
__device__ __forceinline__ uint64_t advance(uint64_t descriptor, uint32_t bytes) {
  const uint32_t low = static_cast<uint32_t>(descriptor) + (bytes >> 4);
  return (descriptor & 0xffffffff00000000ull) | low;
}

// Keeps the compiler from moving register accesses across an asynchronous wgmma.
template <int R>
__device__ __forceinline__ void fence_registers(float (&d)[R][4]) {
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) cute::warpgroup_fence_operand(d[i][e]);
}

// Shared-memory matrix descriptor of a 128-byte-swizzled operand starting at `address`: 8-row
// groups 1024 bytes apart; `leading`: bytes between 64-column panels along N (N-major operands;
// K-major operands take 16, unused).
__device__ __forceinline__ uint64_t smem_descriptor(uint32_t address, uint32_t leading) {
  return uint64_t{(address & 0x3FFFFu) >> 4} | uint64_t{leading >> 4} << 16 | uint64_t{1024 >> 4} << 32 |
         uint64_t{1} << 62;
}

// The lengths of sequence b's slot, clamped to the buffers' capacities.
struct SeqLengths {
  int64_t slot;
  int sinks, coded, recent;
  __device__ SeqLengths(const Params& p, int64_t b) {
    slot = p.kv.seq_slots ? p.kv.seq_slots[b] : b;
    const int32_t* len = p.kv.lengths + 3 * slot;
    sinks = max(0, min(len[0], static_cast<int>(p.kv.sink_capacity)));
    coded = max(0, static_cast<int>(min(static_cast<int64_t>(len[1]), p.kv.code_capacity)));
    recent = max(0, min(len[2], static_cast<int>(p.kv.recent_capacity)));
  }
  __device__ int total() const { return sinks + coded + recent; }
};

// Sequence b's queries (attention.h): the packed row of its first query (ragged), and how many it
// has. Ragged counts are clamped to [0, num_queries] and to the packed rows. Recomputed where
// needed (two cached loads) rather than kept in registers through the main loop.
__device__ __forceinline__ int64_t first_query(const Params& p, int64_t b) {
  return min(max(static_cast<int64_t>(p.query_indptr[b]), int64_t{0}), p.total_queries);
}
__device__ __forceinline__ int query_count(const Params& p, int64_t b) {
  if (p.query_indptr == nullptr) return static_cast<int>(p.num_queries);
  const int64_t first = first_query(p, b);
  const int64_t end = min(max(static_cast<int64_t>(p.query_indptr[b + 1]), first), p.total_queries);
  return static_cast<int>(min(end - first, p.num_queries));
}
// The row (of D elements in q and out; the element of lse) of query t of query head `head`.
__device__ __forceinline__ int64_t query_row(const Params& p, int64_t b, int64_t head, int64_t t) {
  return p.query_indptr ? (first_query(p, b) + t) * p.num_q_heads + head
                        : (b * p.num_q_heads + head) * p.num_queries + t;
}

// Copies code rows [first, first + kN) of (slot, kv head) into a stage: key rows, then value rows.
// Rows go 16 at a time (a page holds whole groups of 16); groups past `coded` are not read.
template <class S>
__device__ void stage_codes(const Params& p, uint8_t* stage, int64_t slot, int64_t kv_head, int first, int coded) {
  const CompressedKV& kv = p.kv;
  const int kb = p.key_row_bytes, vb = p.value_row_bytes;
  // 16 rows of kb bytes are kb 16-byte pieces; key pieces first, then value pieces
  const int pieces = S::kN / 16 * (kb + vb);
  // j / rb as a multiply-high: exact for j < 2^16 and rb < 2^8 (code rows are at most 128 bytes)
  const uint32_t key_inverse = 0xffffffffu / kb + 1, value_inverse = 0xffffffffu / vb + 1;
  for (int i = threadIdx.x; i < pieces; i += S::kThreads) {
    const bool key = i < S::kN / 16 * kb;
    const int rb = key ? kb : vb;
    const int j = key ? i : i - S::kN / 16 * kb;
    const int group = static_cast<int>(__umulhi(static_cast<uint32_t>(j), key ? key_inverse : value_inverse));
    const int piece = j - group * rb;
    const int row = first + 16 * group;
    if (row >= coded) continue;
    int64_t base_row;  // the row's index in the code tensor's [.., rows, rb] layout
    if (kv.page_table != nullptr) {
      int64_t page = kv.page_table[slot * kv.max_pages + (row >> p.page_shift)];
      page = page < 0 ? 0 : (page >= kv.num_pages ? kv.num_pages - 1 : page);
      base_row = (page * p.num_kv_heads + kv_head) * kv.page_size + (row & (kv.page_size - 1));
    } else {
      base_row = (slot * p.num_kv_heads + kv_head) * kv.code_capacity + row;
    }
    const uint8_t* src = (key ? kv.key_codes : kv.value_codes) + base_row * rb + 16 * piece;
    uint8_t* dst = stage + (key ? 0 : S::kN * kb) + 16 * group * rb + 16 * piece;
    cp_async16(dst, src);
  }
}

// Centroid of `code` (kSub elements) into `dst`: copied from a shared table in the element type,
// or converted from the float32 codebook in global memory.
template <typename T, int kSub>
__device__ __forceinline__ void put_centroid(T* dst, const T* table, uint32_t code) {
  const T* c = table + code * kSub;
  if constexpr (kSub == 2) *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<const uint32_t*>(c);
  if constexpr (kSub == 4) *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(c);
  if constexpr (kSub == 8) *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(c);
}
template <typename T, int kSub>
__device__ __forceinline__ void put_centroid(T* dst, const float* table, uint32_t code) {
  const float* c = table + code * kSub;
#pragma unroll
  for (int e = 0; e < kSub; e += 2) {
    const float2 x = __ldg(reinterpret_cast<const float2*>(c + e));
    dst[e] = Elem<T>::from_float(x.x);
    dst[e + 1] = Elem<T>::from_float(x.y);
  }
}

// Four centroids of 8-bit codes (packed in `codes`) from a shared table (entry e at e * kStride)
// into columns [col, col + 4 * kSub) of a tile's row, in 16-byte stores. With more than one
// store, their order starts at the store whose index is the column's 64-column panel and wraps:
// in the swizzled layout the threads of a row then store to distinct bank groups at each step,
// instead of two panels' threads sharing them.
template <typename T, int kSub, int kStride, class Layout>
__device__ __forceinline__ void put_four(T* tile, int row, int col, const T* table, uint32_t codes) {
  auto chunk = [&](int e) { return reinterpret_cast<uint4*>(tile + Layout::at(row, col + 8 * e)); };
  const int rotation = col / 64;
  if constexpr (kSub == 2) {
    uint4 out;
    out.x = *reinterpret_cast<const uint32_t*>(table + (codes & 0xff) * kStride);
    out.y = *reinterpret_cast<const uint32_t*>(table + (codes >> 8 & 0xff) * kStride);
    out.z = *reinterpret_cast<const uint32_t*>(table + (codes >> 16 & 0xff) * kStride);
    out.w = *reinterpret_cast<const uint32_t*>(table + (codes >> 24) * kStride);
    *chunk(0) = out;
  } else if constexpr (kSub == 4) {
#pragma unroll
    for (int step = 0; step < 2; ++step) {
      const int e = (step + rotation) & 1;  // chunk e: codes 2 e and 2 e + 1
      const uint2 lo = *reinterpret_cast<const uint2*>(table + (codes >> (16 * e) & 0xff) * kStride);
      const uint2 hi = *reinterpret_cast<const uint2*>(table + (codes >> (16 * e + 8) & 0xff) * kStride);
      *chunk(e) = make_uint4(lo.x, lo.y, hi.x, hi.y);
    }
  } else {
#pragma unroll
    for (int step = 0; step < 4; ++step) {
      const int e = (step + rotation) & 3;
      *chunk(e) = *reinterpret_cast<const uint4*>(table + (codes >> (8 * e) & 0xff) * kStride);
    }
  }
}

// Dequantizes the kN code rows of a stage into a [kN][D] tile laid out by Layout.
template <typename T, int D, class S, class Layout, int kSub, typename Table>
__device__ void dequantize_sub(T* tile, const uint8_t* rows, int row_bytes, int code_bits, const Table* table,
                               Tables tables) {
  constexpr int kPerRow = D / kSub;
  if constexpr (std::is_same_v<Table, T>) {
    if (code_bits == 8) {  // four codes a thread: one 4-byte read, 16-byte stores (rows are whole words)
      constexpr int kQuads = kPerRow / 4;
      static_assert(S::kThreads % kQuads == 0, "a thread's quad is the same in every pass");
      const int quad = threadIdx.x % kQuads;
      auto passes = [&](auto stride, const T* entries) {
#pragma unroll
        for (int pass = 0; pass < (S::kN * kQuads + S::kThreads - 1) / S::kThreads; ++pass) {
          const int token = threadIdx.x / kQuads + pass * (S::kThreads / kQuads);
          if (S::kN * kQuads % S::kThreads != 0 && token >= S::kN) break;
          const uint32_t codes = *reinterpret_cast<const uint32_t*>(rows + token * row_bytes + 4 * quad);
          put_four<T, kSub, decltype(stride)::value, Layout>(tile, token, 4 * quad * kSub, entries, codes);
        }
      };
      if (tables == Tables::kSpread) {
        passes(std::integral_constant<int, kSpreadRowElems>{}, table + threadIdx.x % (kSpreadRowElems / kSub) * kSub);
      } else {
        passes(std::integral_constant<int, kSub>{}, table);
      }
      return;
    }
  }
  const uint32_t mask = (1u << code_bits) - 1u;
  for (int i = threadIdx.x; i < S::kN * kPerRow; i += S::kThreads) {
    const int token = i / kPerRow, j = i % kPerRow;
    const int bit = j * code_bits;
    const uint8_t* at = rows + token * row_bytes + (bit >> 3);
    const uint32_t window = code_bits == 8 ? at[0] : (uint32_t{at[0]} | uint32_t{at[1]} << 8);
    put_centroid<T, kSub>(tile + Layout::at(token, j * kSub), table, (window >> (bit & 7)) & mask);
  }
}

template <typename T, int D, class S, class Layout, typename Table>
__device__ void dequantize(T* tile, const uint8_t* rows, int row_bytes, const Codebook& book, const Table* table,
                           Tables tables) {
  if (book.sub_dim == 2) dequantize_sub<T, D, S, Layout, 2>(tile, rows, row_bytes, book.code_bits, table, tables);
  if (book.sub_dim == 4) dequantize_sub<T, D, S, Layout, 4>(tile, rows, row_bytes, book.code_bits, table, tables);
  if (book.sub_dim == 8) dequantize_sub<T, D, S, Layout, 8>(tile, rows, row_bytes, book.code_bits, table, tables);
}

// Copies full-precision tokens [first, first + kN) of the sequence's sinks-then-recent stream into
// the key and value tiles (either may be null: not filled); rows past `count` become zeros (a
// masked column must not carry NaN).
template <typename T, int D, class S, class Layout>
__device__ void load_full_precision(const Params& p, T* keys, T* values, const SeqLengths& len, int64_t kv_head,
                                    int first, int count) {
  const CompressedKV& kv = p.kv;
  constexpr int kPieces = D / 8;  // 16-byte pieces per row
  static_assert(S::kThreads % kPieces == 0, "a thread's piece is the same in every pass");
  const int piece = threadIdx.x % kPieces;
#pragma unroll
  for (int pass = 0; pass < (S::kN * kPieces + S::kThreads - 1) / S::kThreads; ++pass) {
    const int token = threadIdx.x / kPieces + pass * (S::kThreads / kPieces);
    if (S::kN * kPieces % S::kThreads != 0 && token >= S::kN) break;
    const int f = first + token;
    uint4 k = make_uint4(0, 0, 0, 0), v = k;
    if (f < count) {
      const T *ksrc, *vsrc;
      if (f < len.sinks) {
        const int64_t row = (len.slot * p.num_kv_heads + kv_head) * kv.sink_capacity + f;
        ksrc = static_cast<const T*>(kv.sink_keys) + row * D;
        vsrc = static_cast<const T*>(kv.sink_values) + row * D;
      } else {
        const int64_t i_recent = f - len.sinks;
        const int64_t ring = kv.recent_ring ? (len.coded + i_recent) % kv.recent_capacity : i_recent;
        const int64_t row = (len.slot * p.num_kv_heads + kv_head) * kv.recent_capacity + ring;
        ksrc = static_cast<const T*>(kv.recent_keys) + row * D;
        vsrc = static_cast<const T*>(kv.recent_values) + row * D;
      }
      if (keys) k = *reinterpret_cast<const uint4*>(ksrc + 8 * piece);
      if (values) v = *reinterpret_cast<const uint4*>(vsrc + 8 * piece);
    }
    if (keys) *reinterpret_cast<uint4*>(keys + Layout::at(token, 8 * piece)) = k;
    if (values) *reinterpret_cast<uint4*>(values + Layout::at(token, 8 * piece)) = v;
  }
}

// ---- the kernel ----------------------------------------------------------------------------------

template <typename T, int D, bool kHopper>
__device__ __forceinline__ void prefill_block(const Params& p) {
  using S = Shape<D, kHopper>;
  using L = Smem<D, kHopper>;
  using QueryLayout = typename L::QueryTile;
  using KVLayout = typename L::KVTile;
  constexpr int kM = S::kM;
  extern __shared__ __align__(1024) uint8_t smem[];
  T* q_tile = reinterpret_cast<T*>(smem + L::kQuery);
  T* keys = reinterpret_cast<T*>(smem + L::kKeys);
  T* values = reinterpret_cast<T*>(smem + L::kValues);
  float* shift = reinterpret_cast<float*>(smem + L::kShift);
  float* value_mean = reinterpret_cast<float*>(smem + L::kValueMean);
  uint8_t* stages = smem + L::kStages;
  const CompressedKV& kv = p.kv;
  const Codebook& key_book = kv.key_codebook;
  const Codebook& value_book = kv.value_codebook;
  const int key_entries = 1 << key_book.code_bits, value_entries = 1 << value_book.code_bits;

  const int row_tile = blockIdx.x;
  const int64_t kv_head = blockIdx.y;
  const int64_t b = blockIdx.z / p.splits;
  const int split = blockIdx.z % p.splits;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int queries = query_count(p, b);
  const int rows_total = p.group * queries;
  const int first_row = row_tile * S::kRows;
  if (first_row >= rows_total) return;  // a sequence with fewer queries than the longest (ragged)
  const SeqLengths len(p, b);
  const int n = len.total();
  // Query t sits at position n - Tq + t; the block's rows hold queries [t_lo, t_hi].
  const int t_lo = first_row / p.group;
  const int t_hi = (min(first_row + S::kRows, rows_total) - 1) / p.group;
  const int last_position = n - queries + t_hi;  // the block sees positions <= this
  const int first_position = n - queries + t_lo;

  // The tiles this block visits: full-precision tokens with positions <= last_position (sinks at
  // [0, sinks), recent at [sinks + coded, n)), then coded tokens (positions sinks + j).
  const int fp_total = len.sinks + len.recent;
  int fp_count = last_position < len.sinks + len.coded ? min(len.sinks, last_position + 1)
                                                         : min(fp_total, last_position + 1 - len.coded);
  fp_count = max(fp_count, 0);
  const int coded_count = max(0, min(len.coded, last_position + 1 - len.sinks));
  const int fp_tiles = (fp_count + S::kN - 1) / S::kN;
  const int coded_tiles = (coded_count + S::kN - 1) / S::kN;
  const int tiles = fp_tiles + coded_tiles;
  const int tile_begin = static_cast<int>(int64_t{tiles} * split / p.splits);
  const int tile_end = static_cast<int>(int64_t{tiles} * (split + 1) / p.splits);

  // Codebooks (this KV head's, or the layer's): in shared memory in the element type, or read
  // from global memory when they do not fit. The value mean is added once at the end.
  const float* key_src = key_book.centroids + (key_book.num_codebooks > 1 ? kv_head : 0) * int64_t{key_entries} * key_book.sub_dim;
  const float* value_src =
      value_book.centroids + (value_book.num_codebooks > 1 ? kv_head : 0) * int64_t{value_entries} * value_book.sub_dim;
  T* key_table = reinterpret_cast<T*>(smem + L::kTables);
  T* value_table = key_table + key_entries * (p.tables == Tables::kSpread ? kSpreadRowElems : key_book.sub_dim);
  if (p.tables == Tables::kSpread) {  // element j of row e: element j % sub_dim of entry e
    for (int i = threadIdx.x; i < key_entries * kSpreadRowElems; i += S::kThreads)
      key_table[i] = Elem<T>::from_float(key_src[i / kSpreadRowElems * key_book.sub_dim + i % key_book.sub_dim]);
    for (int i = threadIdx.x; i < value_entries * kSpreadRowElems; i += S::kThreads)
      value_table[i] = Elem<T>::from_float(value_src[i / kSpreadRowElems * value_book.sub_dim + i % value_book.sub_dim]);
  } else if (p.tables == Tables::kShared) {
    for (int i = threadIdx.x; i < key_entries * key_book.sub_dim; i += S::kThreads) key_table[i] = Elem<T>::from_float(key_src[i]);
    for (int i = threadIdx.x; i < value_entries * value_book.sub_dim; i += S::kThreads)
      value_table[i] = Elem<T>::from_float(value_src[i]);
  }
  {
    const float* vm = kv.value_mean ? kv.value_mean + detail::table_row(kv_head, p.num_kv_heads, kv.value_mean_rows) * D
                                    : nullptr;
    for (int i = threadIdx.x; i < D; i += S::kThreads) value_mean[i] = vm ? vm[i] : 0.f;
  }

  // Loads the block's query rows into q_tile: raw (full-precision tiles) or transformed (coded
  // tiles, with the shifts q . mu). A row's D / 8 lanes hold 8 elements each (row_ops.cuh).
  const int64_t table_row = detail::table_row(kv_head, p.num_kv_heads, kv.key_transform.table_rows);
  auto load_queries = [&](bool transformed) {
    constexpr int kLanes = D / 8;
    constexpr int kRowsPerPass = S::kThreads / kLanes;
    const int sub_row = threadIdx.x / kLanes, col0 = threadIdx.x % kLanes * 8;
    for (int r0 = 0; r0 < S::kRows; r0 += kRowsPerPass) {
      const int r = r0 + sub_row;
      const int global_row = min(first_row + r, rows_total - 1);
      const int64_t t = global_row / p.group, head = kv_head * p.group + global_row % p.group;
      const T* src = static_cast<const T*>(p.q) + query_row(p, b, head, t) * D + col0;
      float v[8];
      load8(src, v);
      if (transformed) {
        float dot = 0.f;
        if (kv.key_transform.mean) {
          float mean[8];
          load8(kv.key_transform.mean + table_row * D + col0, mean);
#pragma unroll
          for (int i = 0; i < 8; ++i) dot += v[i] * mean[i];
        }
#pragma unroll
        for (int m = 1; m < kLanes; m <<= 1) dot += __shfl_xor_sync(0xffffffffu, dot, m);
        if (col0 == 0) shift[r] = dot * p.scale_log2;
        Transform query = kv.key_transform;
        query.mean = nullptr;
        transform_row<D>(v, query, TransformKind::kQuery, table_row, col0);
      }
      store8(q_tile + QueryLayout::at(r, col0), v);
    }
  };

  // This warp's rows: 16 in each of the kM row tiles; in tile mi the lane holds rows g and g + 8 of
  // them (Ampere: the warp's tiles are consecutive; Hopper: warpgroup w's tile mi is rows
  // [64 (kM w + mi), + 64), the warp's 16 of them at 16 (warp % 4)).
  const int g = lane / 4, c = lane % 4;
  const int warp_row = warp * 16 * kM;
  const int warpgroup_row = warp / 4 * 64 * kM;
  auto local_row = [&](int mi, int h) {
    return (kHopper ? warpgroup_row + 64 * mi + 16 * (warp % 4) : warp_row + 16 * mi) + g + 8 * h;
  };
  int position[kM][2];
#pragma unroll
  for (int mi = 0; mi < kM; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int global_row = min(first_row + local_row(mi, h), rows_total - 1);
      position[mi][h] = n - queries + global_row / p.group;
    }

  float acc[kM][D / 8][4];
  float row_max[kM][2], row_sum[kM][2], coded_sum[kM][2];  // coded_sum: the part of row_sum over coded tokens
#pragma unroll
  for (int mi = 0; mi < kM; ++mi) {
#pragma unroll
    for (int i = 0; i < D / 8; ++i) acc[mi][i][0] = acc[mi][i][1] = acc[mi][i][2] = acc[mi][i][3] = 0.f;
    row_max[mi][0] = row_max[mi][1] = -INFINITY;
    row_sum[mi][0] = row_sum[mi][1] = coded_sum[mi][0] = coded_sum[mi][1] = 0.f;
  }

  // Code rows of a coded tile into its stage, one tile ahead of the dequantization.
  auto prefetch = [&](int tile) {
    if (tile < tile_end && tile >= fp_tiles)
      stage_codes<S>(p, stages + (tile & 1) * S::kStageBytes, len.slot, kv_head, (tile - fp_tiles) * S::kN, len.coded);
    cp_async_commit();
  };
  prefetch(max(tile_begin, fp_tiles));
  bool queries_transformed = tile_begin >= fp_tiles;
  __syncthreads();  // tables
  load_queries(queries_transformed);

  // Ampere: this lane's ldmatrix row addresses at the tiles' origins (rows of kStride elements).
  constexpr int kStride = D + 8;
  const uint32_t q_lane = shared_address(q_tile) + ((warp_row + lane % 8 + 8 * ((lane / 8) % 2)) * kStride + 8 * (lane / 16)) * 2;
  const uint32_t k_lane = shared_address(keys) + ((lane % 8 + 8 * (lane / 16)) * kStride + 8 * ((lane / 8) % 2)) * 2;
  const uint32_t v_lane = shared_address(values) + ((lane % 8 + 8 * ((lane / 8) % 2)) * kStride + 8 * (lane / 16)) * 2;

  // Hopper: the tiles' wgmma descriptors (K-major Q and K, N-major V), advanced by constants below.
  const uint64_t q_descriptor = smem_descriptor(shared_address(q_tile) + warpgroup_row * 128, 16);
  const uint64_t k_descriptor = smem_descriptor(shared_address(keys), 16);
  const uint64_t v_descriptor = smem_descriptor(shared_address(values), KVLayout::kPanelBytes);

  // The scores. Declared outside the loop: wgmma overwrites them (scale-out zero) and asks for no
  // zeroing before each tile.
  float s[kM][S::kN / 8][4] = {};

  // Makes tile t's inputs ready to fill: its code stage landed and seen by every thread (which have
  // all finished reading the tiles being refilled), the next stage requested, and at the first
  // coded tile the queries transformed.
  auto begin_tile = [&](int t) {
    cp_async_wait_all();
    __syncthreads();
    if (t >= fp_tiles) {
      if (!queries_transformed) {  // the full-precision tiles are done
        load_queries(true);
        queries_transformed = true;
      }
      prefetch(t + 1);
    }
  };
  // Fills the key tile, the value tile or both with tile t's tokens.
  auto fill = [&](int t, bool fill_keys, bool fill_values) {
    if (t >= fp_tiles) {
      const uint8_t* key_rows = stages + (t & 1) * S::kStageBytes;
      const uint8_t* value_rows = key_rows + S::kN * p.key_row_bytes;
      if (p.tables != Tables::kGlobal) {
        if (fill_keys) dequantize<T, D, S, KVLayout>(keys, key_rows, p.key_row_bytes, key_book, key_table, p.tables);
        if (fill_values)
          dequantize<T, D, S, KVLayout>(values, value_rows, p.value_row_bytes, value_book, value_table, p.tables);
      } else {
        if (fill_keys) dequantize<T, D, S, KVLayout>(keys, key_rows, p.key_row_bytes, key_book, key_src, p.tables);
        if (fill_values)
          dequantize<T, D, S, KVLayout>(values, value_rows, p.value_row_bytes, value_book, value_src, p.tables);
      }
    } else {
      load_full_precision<T, D, S, KVLayout>(p, fill_keys ? keys : nullptr, fill_values ? values : nullptr, len,
                                             kv_head, t * S::kN, fp_count);
    }
  };
  // Makes the filled tiles visible to every thread (Hopper: also to wgmma, which reads them through
  // the async proxy).
  auto publish = [&]() {
    if constexpr (kHopper) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
  };

  // Tile t + 1 is filled at the end of tile t's step. Hopper: its keys while tile t's P V products
  // run (the key tile is free once the S products completed), its values after them.
  if (tile_begin < tile_end) {
    begin_tile(tile_begin);
    fill(tile_begin, true, true);
    publish();
  }
  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const bool coded = tile >= fp_tiles;
    int first_pos, count;  // position of the tile's first token (coded tiles); valid tokens in the tile
    if (coded) {
      const int first = (tile - fp_tiles) * S::kN;
      first_pos = len.sinks + first;
      count = min(S::kN, coded_count - first);
    } else {
      const int first = tile * S::kN;
      count = min(S::kN, fp_count - first);
      first_pos = first;
    }
    // Scale, shift, mask, online softmax of row tile mi: its scores become probabilities, its
    // accumulators are rescaled.
    const bool needs_mask = !coded || count < S::kN || first_pos + S::kN - 1 > first_position;
    // A positive scale keeps the order of the scores: the maximum is taken over the raw products
    // and each probability is one fused multiply-add and one exp2, 2^(s scale + shift - max).
    auto softmax_tile = [&](auto mi_constant, auto masked, auto positive_scale) {
      constexpr int mi = decltype(mi_constant)::value;
      constexpr bool kRaw = decltype(positive_scale)::value;
      float shift_row[2];
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int h = 0; h < 2; ++h) shift_row[h] = coded ? shift[local_row(mi, h)] : 0.f;
#pragma unroll
      for (int j = 0; j < S::kN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h = e / 2;
          float x = kRaw ? s[mi][j][e] : fmaf(s[mi][j][e], p.scale_log2, shift_row[h]);
          if constexpr (decltype(masked)::value) {
            const int token = 8 * j + 2 * c + (e & 1);
            int pos;
            if (coded) {
              pos = first_pos + token;
            } else {
              const int f = tile * S::kN + token;
              pos = f < len.sinks ? f : f + len.coded;
            }
            if (token >= count || pos > position[mi][h]) x = -INFINITY;
          }
          s[mi][j][e] = x;
          tile_max[h] = fmaxf(tile_max[h], x);
        }
      float rescale[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
        tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
        if (kRaw && tile_max[h] != -INFINITY) tile_max[h] = fmaf(tile_max[h], p.scale_log2, shift_row[h]);
        const float new_max = fmaxf(row_max[mi][h], tile_max[h]);
        const float ref = softmax_ref(new_max);
        rescale[h] = fast_exp2(row_max[mi][h] - ref);
        row_max[mi][h] = new_max;
        float sum = 0.f;
        const float offset = kRaw ? shift_row[h] - ref : -ref;
#pragma unroll
        for (int j = 0; j < S::kN / 8; ++j)
#pragma unroll
          for (int e = 2 * h; e < 2 * h + 2; ++e) {
            s[mi][j][e] = fast_exp2(kRaw ? fmaf(s[mi][j][e], p.scale_log2, offset) : s[mi][j][e] + offset);
            sum += s[mi][j][e];
          }
        row_sum[mi][h] = row_sum[mi][h] * rescale[h] + sum;
        coded_sum[mi][h] = coded_sum[mi][h] * rescale[h] + (coded ? sum : 0.f);
      }
      // Once the running maxima settle, no row's grows and every rescale is 1: skip the products.
      if (__any_sync(0xffffffffu, rescale[0] != 1.f || rescale[1] != 1.f)) {
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
          acc[mi][i][0] *= rescale[0];
          acc[mi][i][1] *= rescale[0];
          acc[mi][i][2] *= rescale[1];
          acc[mi][i][3] *= rescale[1];
        }
      }
    };
    // Tiles that reach no mask (every token valid and before the block's first query) skip its tests.
    auto softmax = [&](auto mi) {
      if (p.scale_log2 > 0.f) {
        if (needs_mask) {
          softmax_tile(mi, std::true_type{}, std::true_type{});
        } else {
          softmax_tile(mi, std::false_type{}, std::true_type{});
        }
      } else {
        softmax_tile(mi, std::true_type{}, std::false_type{});
      }
    };

    if constexpr (kHopper) {
      // S = Q K^T of every row tile, each its own wgmma group; then per row tile: wait for its S
      // (the groups complete in order), softmax, O += P V as one more group. Row tile 0's softmax
      // runs while the tensor cores compute row tile 1's S, tile 1's while they compute tile 0's PV.
      unrolled<kM>([&](auto mi) {
        fence_registers(s[mi]);
        cute::warpgroup_arrive();
#pragma unroll
        for (int k = 0; k < D / 16; ++k) {  // 16 columns: a 32-byte step inside a 64-column panel
          const uint64_t a = advance(q_descriptor, mi * 64 * 128 + k / 4 * QueryLayout::kPanelBytes + k % 4 * 32);
          const uint64_t b = advance(k_descriptor, k / 4 * KVLayout::kPanelBytes + k % 4 * 32);
          gmma_ss<GmmaScores<T, S::kN>>(a, b, s[mi], k == 0 ? gmma::ScaleOut::Zero : gmma::ScaleOut::One,
                                        std::make_index_sequence<S::kN / 2>{});
        }
        cute::warpgroup_commit_batch();
      });
      unrolled<kM>([&](auto mi) {
        cute::warpgroup_wait<kM - 1>();
        fence_registers(s[mi]);
        softmax(mi);
        // P's fragments for 16 tokens (wgmma's A layout is mma.sync's): the score accumulators
        // of two adjacent token groups.
        uint32_t a[S::kN / 16][4];
#pragma unroll
        for (int kt = 0; kt < S::kN / 16; ++kt) pack_probabilities<T>(a[kt], s[mi], kt);
        fence_registers(acc[mi]);
        cute::warpgroup_arrive();
#pragma unroll
        for (int kt = 0; kt < S::kN / 16; ++kt)  // 16 tokens: two 8-row groups of every panel
          gmma_rs<GmmaValues<T, D>>(a[kt], advance(v_descriptor, kt * 2048), acc[mi],
                                    std::make_index_sequence<D / 2>{});
        cute::warpgroup_commit_batch();
      });
    } else {
      // Opaque to the compiler, so that the fragment addresses below (base + constant) are formed
      // in the loop instead of being hoisted out of it into dozens of live registers.
      uint32_t q_base = q_lane, k_base = k_lane, v_base = v_lane;
      asm volatile("" : "+r"(q_base), "+r"(k_base), "+r"(v_base));
      // S = Q K^T for the warp's kM x 16 rows and the tile's kN tokens.
#pragma unroll
      for (int mi = 0; mi < kM; ++mi)
#pragma unroll
        for (int j = 0; j < S::kN / 8; ++j) s[mi][j][0] = s[mi][j][1] = s[mi][j][2] = s[mi][j][3] = 0.f;
#pragma unroll
      for (int k = 0; k < D / 16; ++k) {
        uint32_t a[kM][4];
#pragma unroll
        for (int mi = 0; mi < kM; ++mi) ldmatrix_x4(a[mi], q_base + (16 * mi * kStride + 16 * k) * 2);
#pragma unroll
        for (int j = 0; j < S::kN / 16; ++j) {
          uint32_t bk[4];
          ldmatrix_x4(bk, k_base + (16 * j * kStride + 16 * k) * 2);
#pragma unroll
          for (int mi = 0; mi < kM; ++mi) {
            mma<T>(s[mi][2 * j], a[mi][0], a[mi][1], a[mi][2], a[mi][3], bk[0], bk[1]);
            mma<T>(s[mi][2 * j + 1], a[mi][0], a[mi][1], a[mi][2], a[mi][3], bk[2], bk[3]);
          }
        }
      }
      unrolled<kM>(softmax);
      // O += P V, P's fragments packed from the score accumulators as above.
#pragma unroll
      for (int kt = 0; kt < S::kN / 16; ++kt) {
        uint32_t a[kM][4];
#pragma unroll
        for (int mi = 0; mi < kM; ++mi) pack_probabilities<T>(a[mi], s[mi], kt);
#pragma unroll
        for (int dt = 0; dt < D / 16; ++dt) {
          uint32_t bv[4];
          ldmatrix_x4_trans(bv, v_base + (16 * kt * kStride + 16 * dt) * 2);
#pragma unroll
          for (int mi = 0; mi < kM; ++mi) {
            mma<T>(acc[mi][2 * dt], a[mi][0], a[mi][1], a[mi][2], a[mi][3], bv[0], bv[1]);
            mma<T>(acc[mi][2 * dt + 1], a[mi][0], a[mi][1], a[mi][2], a[mi][3], bv[2], bv[3]);
          }
        }
      }
    }

    const bool more = tile + 1 < tile_end;
    if (more) {
      begin_tile(tile + 1);
      fill(tile + 1, true, !kHopper);
    }
    if constexpr (kHopper) {
      cute::warpgroup_wait<0>();  // this tile's P V products
      unrolled<kM>([&](auto mi) { fence_registers(acc[mi]); });
      if (more) {
        __syncthreads();  // every warp's: the value tile is free
        fill(tile + 1, false, true);
      }
    }
    if (more) publish();
  }

  // The rows' sums over the four lanes that share them; the value mean weighted by the coded
  // tokens' share; then the output, or this split's part.
#pragma unroll
  for (int mi = 0; mi < kM; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float& l = row_sum[mi][h];
      float& lc = coded_sum[mi][h];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      lc += __shfl_xor_sync(0xffffffffu, lc, 1);
      lc += __shfl_xor_sync(0xffffffffu, lc, 2);
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {
        acc[mi][i][2 * h] += value_mean[8 * i + 2 * c] * lc;
        acc[mi][i][2 * h + 1] += value_mean[8 * i + 2 * c + 1] * lc;
      }
    }
#pragma unroll
  for (int mi = 0; mi < kM; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int local = local_row(mi, h);
      const int global_row = first_row + local;
      if (global_row >= rows_total) continue;
      if (p.splits == 1) {
        const int64_t t = global_row / p.group, head = kv_head * p.group + global_row % p.group;
        const int64_t out_row = query_row(p, b, head, t);
        const float inv = row_sum[mi][h] > 0.f ? 1.f / row_sum[mi][h] : 0.f;
        T* dst = static_cast<T*>(p.out) + out_row * D;
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
          const int d = 8 * i + 2 * c;
          dst[d] = Elem<T>::from_float(acc[mi][i][2 * h] * inv);
          dst[d + 1] = Elem<T>::from_float(acc[mi][i][2 * h + 1] * inv);
        }
        if (p.lse && c == 0)
          p.lse[out_row] = row_sum[mi][h] > 0.f ? (row_max[mi][h] + log2f(row_sum[mi][h])) / kLog2e : -INFINITY;
      } else {
        float* part = p.partial +
                      ((((b * p.num_kv_heads + kv_head) * p.row_tiles + row_tile) * p.splits + split) * S::kRows + local) *
                          (D + 2);
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
          const int d = 8 * i + 2 * c;
          part[d] = acc[mi][i][2 * h];
          part[d + 1] = acc[mi][i][2 * h + 1];
        }
        if (c == 0) {
          part[D] = row_max[mi][h];
          part[D + 1] = row_sum[mi][h];
        }
      }
    }
}

// Each variant is compiled only for the targets that run it: the Hopper one for sm_90a, the
// Ampere one for the others (prefill.cu picks by the code the device loaded).
template <typename T, int D, bool kHopper>
__global__ void __launch_bounds__(Shape<D, kHopper>::kThreads, Shape<D, kHopper>::kMinBlocks) prefill_kernel(Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if constexpr (kHopper) prefill_block<T, D, true>(p);
#elif defined(__CUDA_ARCH__)
  if constexpr (!kHopper) prefill_block<T, D, false>(p);
#endif
}

// Combines the splits' parts of each query row: one warp per row.
template <typename T, int D, bool kHopper>
__global__ void __launch_bounds__(256) prefill_merge_kernel(Params p) {
  using S = Shape<D, kHopper>;
  const int64_t rows = p.batch * p.num_kv_heads * p.row_tiles * S::kRows;
  const int64_t row = int64_t{blockIdx.x} * 8 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int local = static_cast<int>(row % S::kRows);
  const int64_t tile_index = row / S::kRows;  // (b, kv head, row tile)
  const int row_tile = static_cast<int>(tile_index % p.row_tiles);
  const int64_t kv_head = tile_index / p.row_tiles % p.num_kv_heads;
  const int64_t b = tile_index / (p.row_tiles * p.num_kv_heads);
  const int global_row = row_tile * S::kRows + local;
  if (global_row >= p.group * query_count(p, b)) return;
  const float* parts = p.partial + (tile_index * p.splits * S::kRows + local) * (D + 2);
  const int64_t part_stride = int64_t{S::kRows} * (D + 2);
  float m = -INFINITY;
  for (int s = 0; s < p.splits; ++s) m = fmaxf(m, parts[s * part_stride + D]);
  const float ref = softmax_ref(m);
  float l = 0.f;
  for (int s = 0; s < p.splits; ++s) l += parts[s * part_stride + D + 1] * exp2f(parts[s * part_stride + D] - ref);
  const float inv = l > 0.f ? 1.f / l : 0.f;
  const int64_t t = global_row / p.group, head = kv_head * p.group + global_row % p.group;
  const int64_t out_row = query_row(p, b, head, t);
  T* dst = static_cast<T*>(p.out) + out_row * D;
  for (int d = lane; d < D; d += 32) {
    float a = 0.f;
    for (int s = 0; s < p.splits; ++s) a += parts[s * part_stride + d] * exp2f(parts[s * part_stride + D] - ref);
    dst[d] = Elem<T>::from_float(a * inv);
  }
  if (p.lse && lane == 0) p.lse[out_row] = l > 0.f ? (ref + log2f(l)) / kLog2e : -INFINITY;
}

}  // namespace vecinfer::cuda_detail::prefill
