// The fused dequant-attention kernel (vecinfer/attention.h says what it computes; bench/NOTES.md
// has the design, its predictions and measurements).
//
// Grid: x = part: 0..fp_parts-1 for the full-precision sink and recent tokens (fp_part_tokens each:
// one part for the usual few sinks and the window, more when many tokens are kept in full
// precision as sinks), then the splits of the coded tokens (split-KV); y = (KV head, tile of kRows
// query rows); z = sequence. When there are several parts and the coded blocks fit in one wave,
// the parts are folded into the coded blocks instead (Params::fp_folded): each block is an SM, and
// parts scheduled as blocks of their own would delay the later coded blocks. The query rows of a
// block are (query head, query) pairs of one KV head, so they share every code the block reads. A
// merge kernel combines the parts exactly and adds the value mean.
//
// A coded block has `warps` warps (chosen on the host from the device's shared memory). The
// split's stages of 64 (or, for wide code rows, 32) tokens go to the warps in turn; each warp has
// its own online softmax (per 32-token step), and the warps' states merge at the end. Code bytes
// reach shared memory by bulk copies completing on an mbarrier (sm_90) or by cp.async (sm_80),
// `stages` deep per warp, read through the page table when the cache is paged.
//
// Centroids live in shared memory as 8-bit integers u on an affine grid per (codebook, element
// position e): value = lo[e] + step[e] * u (KVQuantizer puts its codebooks on this grid; see
// snap_codebook). As fp16, [u0, 0, u1, 0] is the pair (u0, u1) * 2^-24 (subnormal, exact), so the
// tensor cores take the integers directly and lo and step are applied outside the products. Tables
// of 8-bit codes are replicated so that each lane reads its own slot (random gathers never share a
// bank) and start at a 64 KiB boundary of the shared window, so a gather is one PRMT (its whole
// address) and one shared load: key entries compact (a byte per element, turned into pairs by the
// PRMTs that also interleave two tokens into the mma operand), value entries stored as the pairs.
//
// Both products are mma.sync m16n8k16 (fp32 accumulate) with every operand built in registers:
//   scores:  S^T[16 tokens x 8 columns] = K''[16 x 16 dims] Q''^T. Tokens are M, dims K, and the
//            columns N are four query rows twice (column n: row n & 3; a block with more rows runs
//            a second set for rows 4-7). Lane (r, c) gathers tokens r and r + 8 at its 4 dims.
//   values:  O[16 dim pairs x (4 rows x 2)] += V''[16 pairs x (8 tokens x 2)] B(P). The K index
//            is (token, element of the pair), and B[(t, e)][(row, e')] = P[row][t] [e == e'], so
//            the A fragment of a lane is the two dims of one token's centroid, as gathered. P^T
//            comes from the score fragment by one 8x8 transpose (movmatrix) per 8 tokens, which
//            leaves lane (r, c) with row r & 3 at tokens 2c and 2c + 1: its own B fragment. Score
//            and output fragments give a lane the same two rows, so rescaling needs no shuffle.
//            One more mma with A = ones sums P exactly as rounded to fp16, which the grid's
//            offset needs.
// The dimension order inside the fragments is permuted so that a lane's dims are one contiguous
// run of the row (keys: lane column c holds dims [c D/4, (c+1) D/4); values: lane row r holds
// [r D/8, (r+1) D/8)), so its codes are one contiguous run of bits.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include <cute/arch/copy_sm90_tma.hpp>  // SM90_BULK_COPY_G2S: cp.async.bulk global -> shared
#include <cutlass/arch/barrier.h>       // ClusterTransactionBarrier: mbarrier with a byte count

#include "../common.h"
#include "element.cuh"
#include "vecinfer/attention.h"

// The block's dynamic shared memory (one symbol for the kernel and its helpers).
extern __shared__ __align__(128) uint8_t vecinfer_attention_smem[];

namespace vecinfer::cuda_detail::attn {

constexpr int kRows = 8;      // query rows per block
constexpr int kStep = 32;     // coded tokens per warp step: four groups of 8 (the score mma's N)
constexpr int kMaxStages = 4;
constexpr float kLog2e = 1.4426950408889634f;
constexpr uint32_t kOnes = 0x3C003C00u;  // fp16 pair (1, 1)
constexpr int kGridFloats = 24;          // a codebook's grid: lo[8], step[8], 1 / step[8]

constexpr int cmax(int a, int b) { return a > b ? a : b; }
constexpr int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Full-precision tokens per part, all in shared memory at once (see full_precision_block): at
// D <= 128 the usual few sinks and a 128-token window in one part, within an A100's shared memory
// above the byte-code tables.
template <int D>
constexpr int fp_part_tokens() { return D == 256 ? 64 : 144; }
static_assert(fp_part_tokens<64>() % 16 == 0 && fp_part_tokens<256>() % 16 == 0, "parts are whole 16-token slabs");

// Warps of a block, bounded by the coded loop's registers: with up to 4 query rows 16 warps at
// D <= 128 (<= 128 registers each) and 8 at D = 256; with 8 rows (twice the query fragments and
// accumulators) 12 and 6.
template <int D, bool kEight>
constexpr int max_warps() { return (D == 256 ? 8 : 16) * (kEight ? 3 : 4) / 4; }

// A codebook shape (sub-vector length S, code width B) as the kernel stores it. 8-bit codes index
// replicated tables, 128 B per code: each lane reads its own slot (at least 4 bytes) so that
// random gathers never share a bank. 12-bit codes index a single copy of 4096 entries (too large
// to replicate) of one byte per element.
template <int S, int B>
struct Codec {
  static constexpr int kSub = S;
  static constexpr int kBits = B;
  static constexpr int kEntries = 1 << B;
  static constexpr bool kByteCodes = B == 8;
  static constexpr int kWideBytes = kByteCodes ? 0 : kEntries * S;
  template <int D>
  static constexpr int row_bytes() { return D / S * B / 8; }
};

// Shared memory of a block: a fixed part laid out at compile time, then the warps' stages.
//
// The byte-code tables (code c at c * 256, key slots at +0, value slots at +128) start at a shared
// address that is a multiple of 64 KiB, so that one PRMT assembles a gather's whole address from
// the code (byte 1), the lane's slot (byte 0) and the table's base (bytes 2, 3). The block's dynamic
// memory starts kReservedSmem bytes into the shared window (the driver's reserved block; checked on
// the host against the device attribute and in the kernel), so the tables sit at 64 KiB -
// kReservedSmem. Below them: the 12-bit tables, grids, queries and barriers, then stages of the
// first `low_warps` warps; the other warps' stages follow the tables.
constexpr int kReservedSmem = 1024;

template <class C, bool kExpanded, int kOffset>
struct Table;

template <int D, class KC, class VC, bool kEight>
struct Layout {
  static constexpr int kKeyRowBytes = KC::template row_bytes<D>();
  static constexpr int kValueRowBytes = VC::template row_bytes<D>();
  // A stage holds the code rows of two steps when they are small (fewer waits and copies per
  // token), of one otherwise: key rows, then value rows.
  static constexpr int kStageTokens = kKeyRowBytes + kValueRowBytes <= 64 ? 2 * kStep : kStep;
  static constexpr int kStageBytes = kStageTokens * (kKeyRowBytes + kValueRowBytes);
  static constexpr bool kByteTable = KC::kByteCodes || VC::kByteCodes;
  static constexpr int kByteTableOffset = kByteTable ? 65536 - kReservedSmem : 0;
  static constexpr int kKeyWide = 0;
  static constexpr int kValueWide = kKeyWide + KC::kWideBytes;
  static constexpr int kAffine = kValueWide + VC::kWideBytes;  // float [2][kGridFloats]: key, value grids
  static constexpr int kQuery = kAffine + 2 * kGridFloats * 4;   // float [kRows][D]
  static constexpr int kRowConst = kQuery + kRows * D * 4;       // float [kRows][2]: score scale, shift
  static constexpr int kShift = kRowConst + kRows * 2 * 4;       // float [kRows]: q . mu * scale_log2
  static constexpr int kReduce = kShift + kRows * 4;             // float [max warps][2][16]
  static constexpr int kQueryMean = kReduce + max_warps<D, kEight>() * 2 * 16 * 4;  // float [kRows][D]: q * mu
  static constexpr int kBarriers = round_up(kQueryMean + kRows * D * 4, 8);  // uint64 [warps][stages]
  static constexpr int kLowEnd = round_up(kBarriers + max_warps<D, kEight>() * kMaxStages * 8, 128);
  static_assert(!kByteTable || kLowEnd <= kByteTableOffset, "fixed part overlaps the byte-code tables");
  static constexpr int kHigh = kByteTable ? kByteTableOffset + 256 * 256 : kLowEnd;
  // Overlays once the tables are dead or unused: the warps' final states (coded blocks, from 0)
  // and a full-precision part's key and value rows, then its warps' states (full-precision
  // blocks, in the tables' place; rows padded by 16 bytes).
  static constexpr int combine_bytes(int warps) { return warps * kRows * (D + 2) * 4; }
  static constexpr int kFpTiles = kByteTable ? kByteTableOffset : kLowEnd;
  static constexpr int kFpStride = D + 8;
  static constexpr int kFpStateWarps = fp_part_tokens<D>() / 16;  // at most one warp per 16-token slab
  static constexpr int kFpBytes =
      cmax(2 * fp_part_tokens<D>() * kFpStride * 2, kFpStateWarps * kRows * (D + 2) * 4);
  static_assert(kFpTiles + kFpBytes <= 163 * 1024, "a full-precision part must fit an A100's shared memory");
  // Warps whose stages fit below the tables.
  static int low_warps(int stages) { return kByteTable ? (kByteTableOffset - kLowEnd) / (stages * kStageBytes) : 0; }
  // (+16: Bits may read one word past a stage's last row.)
  static int shared_bytes(int warps, int stages) {
    const int high = warps > low_warps(stages) ? (warps - low_warps(stages)) * stages * kStageBytes : 0;
    return cmax(cmax(kHigh + high + 16, combine_bytes(warps)), kFpTiles + kFpBytes);
  }
  // Keys compact, values expanded where their codes are bytes (see Table).
  using KeyTable = Table<KC, false, kKeyWide>;
  using ValueTable = Table<VC, VC::kByteCodes, kValueWide>;
  static_assert(kStageBytes % 16 == 0, "stages must stay 16-byte aligned");
};

// Everything the kernels read, by value (kernel parameter space).
struct Params {
  const void* q;
  void* out;
  float* lse;
  float* partial_acc;  // [groups, parts, kRows, D] unnormalised sum of p * v' (dims in natural order)
  float* partial_ml;   // [groups, parts, kRows, 2] running max (log2 units) and sum of exp2
  CompressedKV kv;
  int64_t batch, num_q_heads, num_kv_heads, num_queries;
  int group;             // query heads per KV head
  int row_tiles;         // ceil(group * num_queries / kRows)
  int fp_parts;          // blocks over the full-precision tokens (blocks x = 0..fp_parts-1)
  int splits;            // blocks over the coded tokens (blocks x = fp_parts..fp_parts+splits-1)
  int fp_folded;         // 1: blocks x = 0..splits-1 only, block x running coded split x, then the
                         // full-precision parts x, x + splits, ... (AttentionPlan::fp_folded)
  int64_t split_tokens;  // coded tokens per split, a multiple of the stage tokens * warps
  float scale_log2;      // softmax scale * log2(e)
  int warps, stages;     // the shared-memory plan of a block
  int low_warps;         // warps whose stages lie below the byte-code tables (Layout)
  int page_shift;        // log2 of kv.page_size (paged caches)
};

// ---- small device helpers -----------------------------------------------------------------------

// A length from the device-side lengths table, clamped to its buffer (a bad length cannot make the
// kernel read outside the buffers).
__device__ __forceinline__ int64_t clamp_length(int32_t length, int64_t capacity) {
  return length < 0 ? 0 : (length > capacity ? capacity : length);
}

// The cache row of sequence b (seq_slots[b], clamped into the table, or b).
__device__ __forceinline__ int64_t sequence_slot(const Params& p, int64_t b) {
  if (p.kv.seq_slots == nullptr) return b;
  const int64_t slot = p.kv.seq_slots[b];
  return slot < 0 ? 0 : (slot >= p.kv.num_slots ? p.kv.num_slots - 1 : slot);
}

// fp16 operand pairs from bytes: [u0, 0, u1, 0] is the fp16 pair (u0, u1) * 2^-24 (subnormal, exact).
__device__ __forceinline__ uint32_t bytes01(uint32_t w) { return __byte_perm(w, 0, 0x4140); }
__device__ __forceinline__ uint32_t bytes23(uint32_t w) { return __byte_perm(w, 0, 0x4342); }

// An entry as fp16 pairs: elements (0, 1) in x, (2, 3) in y, (4, 5) in z, (6, 7) in w.
struct Pairs {
  uint32_t x, y, z, w;
};

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
  // Code u of width B (u and B compile-time, so the word indices are too).
  template <int B>
  __device__ __forceinline__ uint32_t code(int u) const {
    const int bit = u * B, word = bit >> 5, off = bit & 31;
    uint32_t v = w[word] >> off;
    if (off + B > 32) v = __funnelshift_r(w[word], w[word + 1], off);
    return v & ((1u << B) - 1u);
  }
};

// How a lane reads centroids of codec C. Byte codes: the replicated tables, each lane its own slot,
// entries either compact (one byte per element, turned into fp16 pairs after the load: the keys,
// whose pairs of two tokens interleave in the mma operand anyway) or expanded (stored as the fp16
// pairs themselves: the values, whose operand takes them as loaded). 12-bit codes: the single
// compact table at kOffset.
template <class C, bool kExpanded, int kOffset>
struct Table {
  using Codec = C;
  static constexpr bool kExpandedEntries = kExpanded;
  static constexpr int kEntryBytes = kExpanded ? 2 * C::kSub : C::kSub;
  static constexpr int kSlot = kEntryBytes < 4 ? 4 : kEntryBytes;
  static constexpr int kCopies = 128 / kSlot;
  static_assert(!kExpanded || C::kByteCodes, "only replicated tables are expanded");

  // Byte codes: the tables' shared address (a multiple of 64 KiB) plus this lane's slot (< 256).
  uint32_t lane_base;

  // The centroid of code u as fp16 pairs.
  template <int BITS>
  __device__ __forceinline__ Pairs entry(const Bits<BITS>& codes, int u) const {
    uint32_t v[4] = {0, 0, 0, 0};
    if constexpr (C::kByteCodes) {
      // the address in one PRMT: code byte u % 4 of word u / 4 into byte 1, lane_base's bytes 0, 2, 3
      const uint32_t address = __byte_perm(codes.w[u >> 2], lane_base, 0x7604 | ((u & 3) << 4));
      if constexpr (kEntryBytes == 16)
        asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v[0]), "=r"(v[1]), "=r"(v[2]), "=r"(v[3]) : "r"(address));
      else if constexpr (kEntryBytes == 8)
        asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];" : "=r"(v[0]), "=r"(v[1]) : "r"(address));
      else
        asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v[0]) : "r"(address));
    } else {
      const uint8_t* ptr = vecinfer_attention_smem + kOffset + codes.template code<C::kBits>(u) * C::kSub;
      if constexpr (C::kSub == 8) {
        const uint2 w = *reinterpret_cast<const uint2*>(ptr);
        v[0] = w.x, v[1] = w.y;
      } else if constexpr (C::kSub == 4) {
        v[0] = *reinterpret_cast<const uint32_t*>(ptr);
      } else {
        v[0] = *reinterpret_cast<const uint16_t*>(ptr);
      }
    }
    if constexpr (kExpanded) return {v[0], v[1], v[2], v[3]};
    return {bytes01(v[0]), bytes23(v[0]), bytes01(v[1]), bytes23(v[1])};
  }
};

// ---- code rows: contiguous or paged -------------------------------------------------------------

// Where the code rows of one (sequence, KV head) live: contiguous, or paged through the
// sequence's page table (pages of 2^page_shift rows; page ids clamped into the pool, so a bad id
// cannot read outside it).
template <int KRB, int VRB>
struct CodeSource {
  const uint8_t* keys;    // contiguous: row 0 of this head; paged: the pools, offset by the head
  const uint8_t* values;
  const int32_t* pages;   // this sequence's page table row, or null
  int64_t capacity;       // rows in the buffer (contiguous) or max_pages * page size
  int64_t page_rows;      // rows between pages of the pool: num_kv_heads * page size
  int64_t last_page;
  int page_shift;

  __device__ __forceinline__ CodeSource(const Params& p, int64_t slot, int64_t head) {
    const CompressedKV& kv = p.kv;
    capacity = kv.code_capacity;
    page_shift = p.page_shift;
    page_rows = p.num_kv_heads << page_shift;
    last_page = kv.num_pages - 1;
    const int64_t first_row = kv.page_table ? head << page_shift : (slot * p.num_kv_heads + head) * capacity;
    keys = kv.key_codes + first_row * KRB;
    values = kv.value_codes + first_row * VRB;
    pages = kv.page_table ? kv.page_table + slot * kv.max_pages : nullptr;
  }

  // The rows of `token` (a multiple of 16, below capacity): `run` tokens from there lie one after
  // another (the rest of the buffer or of the page; a multiple of 16).
  __device__ __forceinline__ void rows(int64_t token, const uint8_t*& k, const uint8_t*& v, int64_t& run) const {
    if (pages == nullptr) {
      k = keys + token * KRB, v = values + token * VRB, run = capacity - token;
      return;
    }
    const int64_t slot = token & ((int64_t{1} << page_shift) - 1);
    int64_t page = pages[token >> page_shift];
    page = page < 0 ? 0 : (page > last_page ? last_page : page);
    const int64_t row = page * page_rows + slot;
    k = keys + row * KRB, v = values + row * VRB, run = (int64_t{1} << page_shift) - slot;
  }
};

// Per warp, the staging of its code rows: stages of L::kStageTokens tokens (key rows, then value
// rows), `stages` of them in rotation. Tokens past the buffer's end are not copied (stale bytes
// are valid codes; those tokens are masked out of the softmax).
template <class L>
struct Stager {
  static constexpr int KRB = L::kKeyRowBytes, VRB = L::kValueRowBytes, kTokens = L::kStageTokens;
  uint8_t* buffers;    // this warp's stages
  uint64_t* barriers;  // this warp's stage barriers (sm_90)
  CodeSource<KRB, VRB> source;

  __device__ __forceinline__ uint8_t* stage(int s) const { return buffers + s * L::kStageBytes; }

  // Starts copying the stage of tokens from `first` into stage s.
  __device__ __forceinline__ void issue(int s, int64_t first, int lane) const {
    uint8_t* dst = stage(s);
#if __CUDA_ARCH__ >= 900
    if (lane == 0) {
      // The rows up to the buffer's end, in runs of consecutive rows (one, or one per page).
      const int total = static_cast<int>(min(int64_t{kTokens}, source.capacity - first));
      cutlass::arch::fence_view_async_shared();  // this warp's reads of the stage came first
      cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&barriers[s], total * (KRB + VRB));
      for (int t = 0; t < total;) {
        const uint8_t *k, *v;
        int64_t run;
        source.rows(first + t, k, v, run);
        const int n = static_cast<int>(min(run, int64_t{total - t}));
        cute::SM90_BULK_COPY_G2S::copy(k, &barriers[s], dst + t * KRB, n * KRB);
        cute::SM90_BULK_COPY_G2S::copy(v, &barriers[s], dst + kTokens * KRB + t * VRB, n * VRB);
        t += n;
      }
    }
#else
    // Quarters of 16 tokens (pages and capacities are multiples of 16), 16-byte chunks per lane.
    constexpr int kQuarters = kTokens / 16;
    const uint8_t* k[kQuarters];
    const uint8_t* v[kQuarters];
#pragma unroll
    for (int h = 0; h < kQuarters; ++h) {
      int64_t run;
      k[h] = v[h] = nullptr;
      if (first + 16 * h < source.capacity) source.rows(first + 16 * h, k[h], v[h], run);
    }
    constexpr int kKeyChunks = kTokens * KRB / 16, kChunks = kKeyChunks + kTokens * VRB / 16;
#pragma unroll
    for (int i = lane; i < kChunks; i += 32) {
      const bool key = i < kKeyChunks;
      const int offset = 16 * (key ? i : i - kKeyChunks), quarter_bytes = 16 * (key ? KRB : VRB);
      const int h = offset / quarter_bytes;
      const uint8_t* src = nullptr;  // k[h] or v[h], selected without a run-time array index (local memory)
#pragma unroll
      for (int q = 0; q < kQuarters; ++q)
        if (q == h) src = key ? k[q] : v[q];
      const uint32_t d = shared_address(dst + (key ? 0 : kTokens * KRB) + offset);
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d),
                   "l"(src ? src + offset - h * quarter_bytes : source.keys), "r"(src ? 16 : 0));
    }
    asm volatile("cp.async.commit_group;\n" ::);
#endif
  }

  // Waits until stage s (its `use`-th filling, counted from 0) has landed.
  __device__ __forceinline__ void wait(int s, int use, int pending) const {
#if __CUDA_ARCH__ >= 900
    (void)pending;
    cutlass::arch::ClusterTransactionBarrier::wait(&barriers[s], use & 1);
#else
    (void)s, (void)use;
    // cp.async groups complete in order: at most `pending` younger groups may still fly.
    switch (pending) {
      case 0: asm volatile("cp.async.wait_group 0;\n" ::); break;
      case 1: asm volatile("cp.async.wait_group 1;\n" ::); break;
      case 2: asm volatile("cp.async.wait_group 2;\n" ::); break;
      default: asm volatile("cp.async.wait_group 3;\n" ::); break;
    }
#endif
    __syncwarp();
  }
};

// ---- tables and queries -------------------------------------------------------------------------

// The grids of the key and value codebooks in one pass (one round trip to memory): min and max over
// the entries at each element position, reduced over the block. out[0..23] keys: lo[8], step[8]
// = (max - min) / 255, 1 / step[8] (0 if step is 0); out[24..47] values. `reduce` is
// [warps][2][16] scratch.
template <int KS, int VS>
__device__ void codebook_grids(const float* keys, int key_entries, const float* values, int value_entries,
                               float* reduce, float* out) {
  constexpr int S = KS + VS;  // key positions, then value positions
  float lo[S], hi[S];
#pragma unroll
  for (int e = 0; e < S; ++e) lo[e] = INFINITY, hi[e] = -INFINITY;
  const int entries = key_entries > value_entries ? key_entries : value_entries;
  for (int i = threadIdx.x; i < entries; i += blockDim.x) {
#pragma unroll
    for (int e = 0; e < S; ++e) {
      const bool key = e < KS;
      if (i < (key ? key_entries : value_entries)) {
        const float v = key ? keys[i * KS + e] : values[i * VS + e - KS];
        lo[e] = fminf(lo[e], v), hi[e] = fmaxf(hi[e], v);
      }
    }
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
#pragma unroll
  for (int e = 0; e < S; ++e) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      lo[e] = fminf(lo[e], __shfl_xor_sync(0xffffffffu, lo[e], o));
      hi[e] = fmaxf(hi[e], __shfl_xor_sync(0xffffffffu, hi[e], o));
    }
    if (lane == 0) reduce[(warp * 2) * 16 + e] = lo[e], reduce[(warp * 2 + 1) * 16 + e] = hi[e];
  }
  __syncthreads();
  if (threadIdx.x < S) {
    const int e = threadIdx.x;
    float l = INFINITY, h = -INFINITY;
    for (int w = 0; w < warps; ++w) l = fminf(l, reduce[(w * 2) * 16 + e]), h = fmaxf(h, reduce[(w * 2 + 1) * 16 + e]);
    const float step = (h - l) / 255.f;
    float* grid = e < KS ? out : out + kGridFloats;
    const int position = e < KS ? e : e - KS;
    grid[position] = l;
    grid[8 + position] = step;
    grid[16 + position] = step > 0.f ? 1.f / step : 0.f;
  }
  __syncthreads();
}

// The 8-bit grid value of a centroid element: round((v - lo) / step), 0 where the position is
// constant. grid = {lo[8], step[8], 1 / step[8]}.
__device__ __forceinline__ uint32_t grid_byte(float v, const float* grid, int e) {
  if (!(grid[8 + e] > 0.f)) return 0;
  const float u = rintf((v - grid[e]) * grid[16 + e]);
  return static_cast<uint32_t>(fminf(fmaxf(u, 0.f), 255.f));
}

// Fills the block's centroid tables for `kv_head` and the grid of each: affine[0..23] keys (lo,
// step, 1 / step), [24..47] values.
template <class L, class KC, class VC>
__device__ void load_tables(uint8_t* smem, const Params& p, int64_t kv_head) {
  float* affine = reinterpret_cast<float*>(smem + L::kAffine);
  float* reduce = reinterpret_cast<float*>(smem + L::kReduce);
  const float* key_src = p.kv.key_codebook.centroids +
                         detail::table_row(kv_head, p.num_kv_heads, p.kv.key_codebook.num_codebooks) * KC::kEntries * KC::kSub;
  const float* value_src = p.kv.value_codebook.centroids + detail::table_row(kv_head, p.num_kv_heads,
                                                                             p.kv.value_codebook.num_codebooks) *
                                                               VC::kEntries * VC::kSub;
  codebook_grids<KC::kSub, VC::kSub>(key_src, KC::kEntries, value_src, VC::kEntries, reduce, affine);
  auto fill = [&](auto table, const float* src, const float* grid, int wide_offset, int slot_base) {
    using Tb = decltype(table);
    using C = typename Tb::Codec;
    for (int i = threadIdx.x; i < C::kEntries; i += blockDim.x) {
      uint32_t u[C::kSub];
#pragma unroll
      for (int e = 0; e < C::kSub; ++e) u[e] = grid_byte(src[i * C::kSub + e], grid, e);
      if constexpr (C::kByteCodes) {  // replicated over the 128 bytes of the code's half
        uint32_t w[4] = {0, 0, 0, 0};  // the slot's words: fp16 pairs (expanded) or bytes (compact)
#pragma unroll
        for (int e = 0; e < C::kSub; ++e)
          w[Tb::kExpandedEntries ? e >> 1 : e >> 2] |= u[e] << (Tb::kExpandedEntries ? 16 * (e & 1) : 8 * (e & 3));
        const uint4 chunk = Tb::kSlot == 4   ? make_uint4(w[0], w[0], w[0], w[0])
                            : Tb::kSlot == 8 ? make_uint4(w[0], w[1], w[0], w[1])
                                             : make_uint4(w[0], w[1], w[2], w[3]);
        uint4* dst = reinterpret_cast<uint4*>(smem + L::kByteTableOffset + i * 256 + slot_base);
#pragma unroll
        for (int j = 0; j < 8; ++j) dst[j] = chunk;
      } else {  // one byte per element
        uint32_t w[2] = {0, 0};
#pragma unroll
        for (int e = 0; e < C::kSub; ++e) w[e >> 2] |= u[e] << (8 * (e & 3));
        uint8_t* dst = smem + wide_offset + i * C::kSub;
        if constexpr (C::kSub == 8) *reinterpret_cast<uint2*>(dst) = make_uint2(w[0], w[1]);
        else if constexpr (C::kSub == 4) *reinterpret_cast<uint32_t*>(dst) = w[0];
        else *reinterpret_cast<uint16_t*>(dst) = static_cast<uint16_t>(w[0]);
      }
    }
  };
  fill(typename L::KeyTable{}, key_src, affine, L::kKeyWide, 0);
  fill(typename L::ValueTable{}, value_src, affine + kGridFloats, L::kValueWide, 128);
}

// Writes the query rows of this block into shared memory as Q' = H(q * lambda) * hadamard_norm *
// scale_log2 (float), and each row's shift q . mu * scale_log2. Rows past `rows` are zero. q, lambda
// and mu are read in one pass (q * mu parked in `products`, [kRows][D]).
template <typename T, int D>
__device__ void prepare_queries(float* qs, float* shift, float* products, const Params& p, int64_t b, int64_t kv_head,
                                int first_row, int rows) {
  const int threads = blockDim.x, warps = threads >> 5;
  const Transform& t = p.kv.key_transform;
  const int64_t table = detail::table_row(kv_head, p.num_kv_heads, t.table_rows);
  const bool scale = t.scale, mean = t.mean;
  for (int i = threadIdx.x; i < kRows * D; i += threads) {
    const int row = i / D, d = i % D;
    float v = 0.f;
    if (row < rows) {
      const int global_row = first_row + row;
      const int64_t head = kv_head * p.group + global_row / p.num_queries;
      const int64_t tq = global_row % p.num_queries;
      v = Elem<T>::to_float(static_cast<const T*>(p.q)[((b * p.num_q_heads + head) * p.num_queries + tq) * D + d]);
    }
    if (mean) products[i] = v * t.mean[table * D + d];
    qs[i] = scale ? v * t.scale[table * D + d] : v;
  }
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int row = warp; row < kRows; row += warps) {  // no barrier after: the Hadamard reads qs only
    float dot = 0.f;
    if (mean)
      for (int d = lane; d < D; d += 32) dot += products[row * D + d];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    if (lane == 0) shift[row] = dot * p.scale_log2;
  }
  if (t.hadamard) {
    for (int h = 1; h < D; h <<= 1) {
      for (int i = threadIdx.x; i < kRows * D / 2; i += threads) {
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
  for (int i = threadIdx.x; i < kRows * D; i += threads) qs[i] *= norm;
  __syncthreads();
}

// Q'' for the score product on the key grid: row i's score (log2 units) is
//   sum_d Q'[i][d] (lo[e] + step[e] u[d]) + shift[i] = row_scale[i] * (Q''[i] . u 2^-24) + row_shift[i]
// with Q''[i][d] = Q'[i][d] step[e] 2^24 / row_scale[i], row_scale a power of two putting the row's
// largest |Q''| in [2^14, 2^15) (fp16 keeps 11 bits of every element). Rewrites qs in place.
template <int D, int S>
__device__ void prepare_key_grid(float* qs, const float* shift, const float* affine, float* row_const) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  for (int row = warp; row < kRows; row += warps) {
    float* q = qs + row * D;
    float big = 0.f, offset = 0.f;
    for (int d = lane; d < D; d += 32) {
      big = fmaxf(big, fabsf(q[d] * affine[8 + d % S]));
      offset += q[d] * affine[d % S];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      big = fmaxf(big, __shfl_xor_sync(0xffffffffu, big, o));
      offset += __shfl_xor_sync(0xffffffffu, offset, o);
    }
    // big = f 2^E, f in [0.5, 1): Q'' = Q' step 2^(15 - E) has |Q''| < 2^15, and the product
    // Q'' . (u 2^-24) = 2^(-9 - E) Q' . (step u), so row_scale = 2^(E + 9).
    int exponent = 0;
    frexpf(big, &exponent);
    const float to_half = big > 0.f ? ldexpf(1.f, 15 - exponent) : 0.f;
    for (int d = lane; d < D; d += 32) q[d] *= affine[8 + d % S] * to_half;
    if (lane == 0) {
      row_const[2 * row] = big > 0.f ? ldexpf(1.f, exponent + 9) : 0.f;
      row_const[2 * row + 1] = shift[row] + offset;
    }
  }
  __syncthreads();
}

// ---- the coded-token blocks --------------------------------------------------------------------

// 8x8 b16 transpose of an mma fragment (lane 4r + c: row r, columns 2c, 2c+1).
__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// Scale the accumulators of this lane's rows (rho0: a0, rho0 + 1: a1).
template <int kMB>
__device__ __forceinline__ void rescale(float (&o)[kMB][4], float (&l)[4], float a0, float a1) {
#pragma unroll
  for (int i = 0; i < kMB; ++i) o[i][0] *= a0, o[i][2] *= a0, o[i][1] *= a1, o[i][3] *= a1;
  l[0] *= a0, l[2] *= a0, l[1] *= a1, l[3] *= a1;
}

// One (row, dim) of the block's result from its warps' online-softmax states (ml [warps][kRows]
// [2]: maximum and sum; acc [warps][kRows][D]): the block's maximum m, sum and accumulator a.
template <int D>
__device__ __forceinline__ void merge_warps(const float* ml, const float* acc, int warps, int row, int d, float& m,
                                            float& sum, float& a) {
  m = -INFINITY;
  for (int w = 0; w < warps; ++w) m = fmaxf(m, ml[(w * kRows + row) * 2]);
  const float ref = softmax_ref(m);
  sum = 0.f, a = 0.f;
  for (int w = 0; w < warps; ++w) {
    const float f = exp2f(ml[(w * kRows + row) * 2] - ref);
    sum += ml[(w * kRows + row) * 2 + 1] * f;
    a += acc[(w * kRows + row) * D + d] * f;
  }
}

// The online-softmax state of one set of four query rows: this lane's rows rho0 and rho0 + 1.
struct RowPair {
  float scale[2], shift[2];  // scores (log2 units) = mma result * scale + shift
  int64_t bound[2];          // coded tokens visible to the row: [0, bound)
  float m[2];                // running maxima
};

// Scores of one step's two token tiles turned into P^T for the value products: S^T fragments in,
// per 8-token group the B fragments (pb0, pb1) of this lane's column r (row r & 3, element r >> 2)
// out, rescaling the accumulators first when a row's maximum grew.
template <int kMB>
__device__ __forceinline__ void softmax_step(float (&st)[2][4], RowPair& rp, int64_t first, bool masked, int r,
                                             uint32_t sel_lo, uint32_t sel_hi, float (&o)[kMB][4], float (&l)[4],
                                             uint32_t (&pb)[4][2]) {
  // [0], [1]: token 16t + r; [2], [3]: token 16t + r + 8; rows rho0, rho0 + 1
#pragma unroll
  for (int t = 0; t < 2; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) st[t][i] = fmaf(st[t][i], rp.scale[i & 1], rp.shift[i & 1]);
  if (masked) {  // a step reaching a row's bound (the split's end or the causal limit): warp-uniform
    const int limit[2] = {static_cast<int>(max(int64_t{-1}, min(int64_t{kStep}, rp.bound[0] - first))),
                          static_cast<int>(max(int64_t{-1}, min(int64_t{kStep}, rp.bound[1] - first)))};
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (16 * t + r + 8 * (i >> 1) >= limit[i & 1]) st[t][i] = -INFINITY;
  }
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int t = 0; t < 2; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) mx[i & 1] = fmaxf(mx[i & 1], st[t][i]);
#pragma unroll
  for (int off = 4; off <= 16; off <<= 1)
#pragma unroll
    for (int j = 0; j < 2; ++j) mx[j] = fmaxf(mx[j], __shfl_xor_sync(0xffffffffu, mx[j], off));
  if (__any_sync(0xffffffffu, mx[0] > rp.m[0] || mx[1] > rp.m[1])) {
    const float new0 = fmaxf(rp.m[0], mx[0]), new1 = fmaxf(rp.m[1], mx[1]);
    rescale(o, l, fast_exp2(rp.m[0] - softmax_ref(new0)), fast_exp2(rp.m[1] - softmax_ref(new1)));
    rp.m[0] = new0, rp.m[1] = new1;
  }
  const float ref0 = softmax_ref(rp.m[0]), ref1 = softmax_ref(rp.m[1]);
#pragma unroll
  for (int g = 0; g < 4; ++g) {  // group g: tile g / 2, tokens r (even g) or r + 8 (odd g)
    const float* s = st[g >> 1] + 2 * (g & 1);
    // P[token][column] with lane (r, c) at token r, columns 2c, 2c + 1; transposed: column r, tokens 2c, 2c + 1.
    const uint32_t h = transpose8x8(Elem<__half>::pack(fast_exp2(s[0] - ref0), fast_exp2(s[1] - ref1)));
    pb[g][0] = __byte_perm(h, 0, sel_lo), pb[g][1] = __byte_perm(h, 0, sel_hi);
  }
}

// Calls f(block, pa, pb) for each 4-dim block of a lane's dims, with the fp16 pairs (dims +{0,1}
// in x, +{2,3} in y) of the centroids that code rows a and b hold there.
template <class Table, int kBlocks, int BITS, class F>
__device__ __forceinline__ void for_each_block(const Table& table, const Bits<BITS>& a, const Bits<BITS>& b, F&& f) {
  constexpr int kSub = Table::Codec::kSub;
  if constexpr (kSub == 2) {  // two centroids per block
#pragma unroll
    for (int k = 0; k < kBlocks; ++k)
      f(k, Pairs{table.entry(a, 2 * k).x, table.entry(a, 2 * k + 1).x, 0, 0},
        Pairs{table.entry(b, 2 * k).x, table.entry(b, 2 * k + 1).x, 0, 0});
  } else if constexpr (kSub == 4) {  // one
#pragma unroll
    for (int k = 0; k < kBlocks; ++k) f(k, table.entry(a, k), table.entry(b, k));
  } else {  // half of one
#pragma unroll
    for (int k = 0; k < kBlocks; k += 2) {
      const Pairs ea = table.entry(a, k / 2), eb = table.entry(b, k / 2);
      f(k, ea, eb);
      f(k + 1, Pairs{ea.z, ea.w, 0, 0}, Pairs{eb.z, eb.w, 0, 0});
    }
  }
}

// The score tiles of one step: S^T of tile t (tokens 16t + m on M) for each set of query rows.
// Lane (r, c) gathers tokens 16t + r and 16t + r + 8 at its dims of each k-block kb: +{0,1} into a0
// (token r) / a1 (token r + 8), +{2,3} into a2 / a3. With one set of rows, even and odd k-blocks
// accumulate apart (two shorter mma chains) and are added at the end.
template <class KeyTable, int D, int kSets>
__device__ __forceinline__ void score_tiles(float (&st)[kSets][2][4], const uint8_t* keys, const KeyTable& table,
                                            const uint32_t (&qb)[kSets][D / 16][2], int r, int c) {
  using C = typename KeyTable::Codec;
  constexpr int kKB = D / 16, kRowBytes = C::template row_bytes<D>(), kBits = D / 4 / C::kSub * C::kBits;
  constexpr bool kChains = kSets == 1;
  float odd[2][4];
#pragma unroll
  for (int t = 0; t < 2; ++t) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      odd[t][j] = 0.f;
#pragma unroll
      for (int i = 0; i < kSets; ++i) st[i][t][j] = 0.f;
    }
    Bits<kBits> lo, hi;
    lo.load(keys + (16 * t + r) * kRowBytes, c * kBits);
    hi.load(keys + (16 * t + r + 8) * kRowBytes, c * kBits);
    for_each_block<KeyTable, kKB>(table, lo, hi, [&](int kb, const Pairs& pa, const Pairs& pb) {
      if constexpr (kChains) {
        mma(kb & 1 ? odd[t] : st[0][t], pa.x, pb.x, pa.y, pb.y, qb[0][kb][0], qb[0][kb][1]);
      } else {
#pragma unroll
        for (int i = 0; i < kSets; ++i) mma(st[i][t], pa.x, pb.x, pa.y, pb.y, qb[i][kb][0], qb[i][kb][1]);
      }
    });
  }
  if constexpr (kChains)
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
      for (int j = 0; j < 4; ++j) st[0][t][j] += odd[t][j];
}

// The value products of one step: per 8-token group g, the value rows of tokens 8g + 2c (a0, a1)
// and 8g + 2c + 1 (a2, a3) at this lane's dims of each m-block (+{0,1}: a0, a2; +{2,3}: a1, a3),
// times the B fragments of P; and the sums of P (A = ones).
template <class ValueTable, int D, int kSets>
__device__ __forceinline__ void value_products(float (&o)[kSets][D / 32][4], float (&l)[kSets][4], const uint8_t* values,
                                               const ValueTable& table, const uint32_t (&pb)[kSets][4][2], int r,
                                               int c) {
  using C = typename ValueTable::Codec;
  constexpr int kMB = D / 32, kRowBytes = C::template row_bytes<D>(), kBits = D / 8 / C::kSub * C::kBits;
#pragma unroll
  for (int g = 0; g < 4; ++g) {
    // Rows 8g + 2c and 8g + 2c + 1, read in the other order by lanes c >= 2: the four lane
    // columns then read four rows whose offsets differ by an odd number of rows (fewer shared
    // bank conflicts); the words are swapped back after.
    Bits<kBits> v0, v1;
    const int swap = c >> 1;
    v0.load(values + (8 * g + 2 * c + swap) * kRowBytes, r * kBits);
    v1.load(values + (8 * g + 2 * c + 1 - swap) * kRowBytes, r * kBits);
#pragma unroll
    for (int w = 0; w < Bits<kBits>::kWords; ++w) {
      const uint32_t a = v0.w[w], b = v1.w[w];
      v0.w[w] = swap ? b : a, v1.w[w] = swap ? a : b;
    }
    for_each_block<ValueTable, kMB>(table, v0, v1, [&](int mb, const Pairs& p0, const Pairs& p1) {
#pragma unroll
      for (int i = 0; i < kSets; ++i) mma(o[i][mb], p0.x, p0.y, p1.x, p1.y, pb[i][g][0], pb[i][g][1]);
    });
#pragma unroll
    for (int i = 0; i < kSets; ++i) mma(l[i], kOnes, kOnes, kOnes, kOnes, pb[i][g][0], pb[i][g][1]);
  }
}

// One block over the coded tokens [begin, end) of its split (see the file comment for the products).
// kEight: the block has more than 4 query rows (rows 4-7 get their own score and value products).
template <typename T, int D, class KC, class VC, bool kEight>
__device__ void coded_block(const Params& p, int64_t b, int64_t slot, int64_t kv_head, int first_row, int rows,
                            int split) {
  using L = Layout<D, KC, VC, kEight>;
  constexpr int KRB = L::kKeyRowBytes, VRB = L::kValueRowBytes;
  constexpr int kKB = D / 16;            // k-blocks of the score product
  constexpr int kMB = D / 32;            // m-blocks (16 dim pairs) of the value product
  constexpr int kSets = kEight ? 2 : 1;  // sets of four query rows
  uint8_t* smem = vecinfer_attention_smem;
  const int lane = threadIdx.x & 31, r = lane >> 2, c = lane & 3, warp = threadIdx.x >> 5;
  const int warps = p.warps, stages = p.stages;

  const int32_t* len = p.kv.lengths + 3 * slot;
  const int64_t sinks = clamp_length(len[0], p.kv.sink_capacity);
  const int64_t coded = clamp_length(len[1], p.kv.code_capacity);
  const int64_t recent = clamp_length(len[2], p.kv.recent_capacity);
  const int64_t n = sinks + coded + recent;
  const int64_t begin = split * p.split_tokens;
  const int64_t end = min(coded, begin + p.split_tokens);
  // The split's stages go to the warps in turn: this warp's k-th stage starts at stage_first(k).
  constexpr int kStageTokens = L::kStageTokens;
  const int64_t all_stages = begin < end ? (end - begin + kStageTokens - 1) / kStageTokens : 0;
  const int my_stages = all_stages > warp ? static_cast<int>((all_stages - warp + warps - 1) / warps) : 0;
  auto stage_first = [&](int k) { return begin + (int64_t{k} * warps + warp) * kStageTokens; };
  const int64_t part =
      ((b * p.num_kv_heads + kv_head) * p.row_tiles + first_row / kRows) * (p.fp_parts + p.splits) + p.fp_parts + split;
  if (L::kByteTable && (shared_address(smem + L::kByteTableOffset) & 0xFFFF) != 0) {
    // The driver placed this block's memory elsewhere than the host planned (kReservedSmem): the
    // table addresses would be wrong, so the result is NaN rather than a silent wrong answer.
    for (int i = threadIdx.x; i < rows * D; i += blockDim.x) p.partial_acc[part * kRows * D + i] = NAN;
    if (threadIdx.x < 2 * rows) p.partial_ml[part * kRows * 2 + threadIdx.x] = NAN;
    return;
  }

  // Start the first stages' copies, then build the tables and queries while they fly.
  uint8_t* stage_memory = warp < p.low_warps ? smem + L::kLowEnd + warp * stages * L::kStageBytes
                                             : smem + L::kHigh + (warp - p.low_warps) * stages * L::kStageBytes;
  const Stager<L> stager{stage_memory, reinterpret_cast<uint64_t*>(smem + L::kBarriers) + warp * stages,
                         {p, slot, kv_head}};
#if __CUDA_ARCH__ >= 900
  if (lane == 0) {
    for (int s = 0; s < stages; ++s) cutlass::arch::ClusterTransactionBarrier::init(&stager.barriers[s], 1);
    cutlass::arch::fence_barrier_init();
  }
  __syncwarp();
#endif
  for (int k = 0; k < stages - 1; ++k)
    if (k < my_stages) stager.issue(k, stage_first(k), lane);
#if __CUDA_ARCH__ < 900
    else asm volatile("cp.async.commit_group;\n" ::);  // empty groups keep the count uniform
#endif

  float* qs = reinterpret_cast<float*>(smem + L::kQuery);
  float* shift = reinterpret_cast<float*>(smem + L::kShift);
  float* row_const = reinterpret_cast<float*>(smem + L::kRowConst);
  const float* affine = reinterpret_cast<const float*>(smem + L::kAffine);
  load_tables<L, KC, VC>(smem, p, kv_head);
  prepare_queries<T, D>(qs, shift, reinterpret_cast<float*>(smem + L::kQueryMean), p, b, kv_head, first_row, rows);
  prepare_key_grid<D, KC::kSub>(qs, shift, affine, row_const);

  // Q''^T as B fragments, set i holding rows 4i..4i+3 in columns n (row 4i + (n & 3)): lane (r, c)
  // holds row 4i + (r & 3) at dims c D/4 + 4 kb + {0, 1} and + {2, 3}.
  uint32_t qb[kSets][kKB][2];
  // This lane's rows in the score fragments (columns 2c, 2c + 1) and the output: rho0, rho0 + 1.
  const int rho0 = (2 * c) & 3;
  RowPair rp[kSets];
#pragma unroll
  for (int i = 0; i < kSets; ++i) {
#pragma unroll
    for (int kb = 0; kb < kKB; ++kb) {
      const float* q = qs + (4 * i + (r & 3)) * D + c * (D / 4) + 4 * kb;
      qb[i][kb][0] = Elem<__half>::pack(q[0], q[1]);
      qb[i][kb][1] = Elem<__half>::pack(q[2], q[3]);
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int row = 4 * i + rho0 + j;
      rp[i].scale[j] = row_const[2 * row], rp[i].shift[j] = row_const[2 * row + 1];
      // Causal limits: row (query t = row % Tq) sees positions <= n - Tq + t, i.e. coded tokens < bound.
      rp[i].bound[j] = min(end, n - p.num_queries + (first_row + row) % p.num_queries + 1 - sinks);
      rp[i].m[j] = -INFINITY;
    }
  }
  int64_t mask_from = end;  // steps reaching past this token need the mask
#pragma unroll
  for (int i = 0; i < kSets; ++i) mask_from = min(mask_from, min(rp[i].bound[0], rp[i].bound[1]));
#pragma unroll
  for (int o = 1; o < 4; o <<= 1) mask_from = min(mask_from, __shfl_xor_sync(0xffffffffu, mask_from, o));

  // Value B fragments from P: lane (r, c) is column n = r = (row r & 3, element r >> 2).
  const uint32_t sel_lo = r < 4 ? 0x4410u : 0x1044u, sel_hi = r < 4 ? 0x4432u : 0x3244u;

  float o[kSets][kMB][4], l[kSets][4];
#pragma unroll
  for (int i = 0; i < kSets; ++i) {
#pragma unroll
    for (int mb = 0; mb < kMB; ++mb) o[i][mb][0] = o[i][mb][1] = o[i][mb][2] = o[i][mb][3] = 0.f;
    l[i][0] = l[i][1] = l[i][2] = l[i][3] = 0.f;
  }
  using KeyTable = typename L::KeyTable;
  using ValueTable = typename L::ValueTable;
  const uint32_t tables = shared_address(smem + L::kByteTableOffset);
  const KeyTable key_table{tables + (lane % KeyTable::kCopies) * KeyTable::kSlot};
  const ValueTable value_table{tables + 128 + (lane % ValueTable::kCopies) * ValueTable::kSlot};
  __syncthreads();  // tables and query constants are ready

  int s = 0, next = stages - 1, phase = 0;  // this stage, the stage to fill next, s's fill parity
  for (int k = 0; k < my_stages; ++k) {
    if (k + stages - 1 < my_stages) stager.issue(next, stage_first(k + stages - 1), lane);
#if __CUDA_ARCH__ < 900
    else asm volatile("cp.async.commit_group;\n" ::);
#endif
    stager.wait(s, phase, stages - 1);
#pragma unroll 1
    for (int step = 0; step < kStageTokens / kStep; ++step) {
      const int64_t first = stage_first(k) + step * kStep;
      float st[kSets][2][4];
      score_tiles<KeyTable, D, kSets>(st, stager.stage(s) + step * kStep * KRB, key_table, qb, r, c);
      uint32_t pb[kSets][4][2];
#pragma unroll
      for (int i = 0; i < kSets; ++i)
        softmax_step(st[i], rp[i], first, first + kStep > mask_from, r, sel_lo, sel_hi, o[i], l[i], pb[i]);
      value_products<ValueTable, D, kSets>(o, l, stager.stage(s) + kStageTokens * KRB + step * kStep * VRB,
                                           value_table, pb, r, c);
    }
    __syncwarp();  // every lane is done with this stage before it is refilled
    next = s;
    if (++s == stages) s = 0, phase ^= 1;
  }
#if __CUDA_ARCH__ >= 900
  if (lane == 0)  // every copy has landed; the barriers' memory is reused below
    for (int s = 0; s < stages; ++s) cutlass::arch::ClusterBarrier::invalidate(&stager.barriers[s]);
#else
  asm volatile("cp.async.wait_group 0;\n" ::);
#endif

  // The value grid of this thread's element position (blockDim.x is a multiple of the sub-vector
  // length, so every output dim this thread writes below has the same one): the merge below
  // overwrites the grids.
  const float* value_grid = affine + kGridFloats;
  const int e = threadIdx.x % VC::kSub;
  const float value_lo = value_grid[e], value_step = value_grid[8 + e] * 16777216.f;  // step * 2^24

  // Merge the warps' states through shared memory (the tables and stages are dead now).
  __syncthreads();
  float* cm = reinterpret_cast<float*>(smem);  // [warps][kRows][2]: max, sum
  float* cacc = cm + warps * kRows * 2;        // [warps][kRows][D] natural dim order
#pragma unroll
  for (int i = 0; i < kSets; ++i) {
    float* ml = cm + (warp * kRows + 4 * i + rho0) * 2;
    if (r == 0 && c < 2)  // lanes (0, 0) and (0, 1) hold rows 0, 1 and 2, 3
      ml[0] = rp[i].m[0], ml[1] = l[i][0], ml[2] = rp[i].m[1], ml[3] = l[i][1];
    // Output fragment: o[mb][0] = row rho0, dim r D/8 + 4 mb + (c >> 1); [1] row rho0 + 1; [2], [3] dim + 2.
    float* acc = cacc + (warp * kRows + 4 * i + rho0) * D;
#pragma unroll
    for (int mb = 0; mb < kMB; ++mb) {
      const int d = r * (D / 8) + 4 * mb + (c >> 1);
      acc[d] = o[i][mb][0], acc[D + d] = o[i][mb][1];
      acc[d + 2] = o[i][mb][2], acc[D + d + 2] = o[i][mb][3];
    }
  }
  __syncthreads();
  // On the value grid: sum_t p v = step 2^24 (sum_t p u 2^-24) + lo sum_t p.
  for (int i = threadIdx.x; i < rows * D; i += blockDim.x) {
    const int row = i / D, d = i % D;
    float m, sum, a;
    merge_warps<D>(cm, cacc, warps, row, d, m, sum, a);
    p.partial_acc[(part * kRows + row) * D + d] = value_step * a + value_lo * sum;
    if (d == 0) p.partial_ml[(part * kRows + row) * 2] = m, p.partial_ml[(part * kRows + row) * 2 + 1] = sum;
  }
}

// ---- the full-precision block (sink and recent tokens, original coordinates) --------------------
//
// A part's tokens (up to fp_part_tokens) arrive in shared memory by cp.async, keys and values as
// rows padded by 16 bytes (ldmatrix's eight rows then fall in distinct banks); rows past the part's
// last token are zero-filled. Each warp takes slabs of 16 tokens in turn, with the coded path's
// orientation and its own online softmax, on the tensor cores (fp32 accumulate):
//   scores:  S^T[16 tokens x 8 rows] = K[16 x 16 dims] Q^T, K by ldmatrix, Q^T fragments held in
//            registers for the whole part;
//   values:  O^T[16 dims x 8 rows] += V^T[16 dims x 16 tokens] P^T, V^T by ldmatrix.trans and P^T
//            from the score fragment by one 8x8 transpose per 8 tokens, which leaves a lane the two
//            rows it already held, so rescaling needs no shuffle.
// The warps' states merge in shared memory into the part's partial result.

template <typename T, int D, class L>
__device__ void full_precision_block(uint8_t* smem, const Params& p, int64_t b, int64_t slot, int64_t kv_head,
                                     int first_row, int rows, int fp_part) {
  constexpr int kTokens = fp_part_tokens<D>();
  constexpr int kStride = L::kFpStride;  // elements per shared row
  constexpr int kKT = D / 16;            // 16-wide tiles along the head dimension
  T* tile_k = reinterpret_cast<T*>(smem + L::kFpTiles);
  T* tile_v = tile_k + kTokens * kStride;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const int r = lane >> 2, c = lane & 3;  // fragment row (token or dim) and column pair (rows 2c, 2c + 1)
  const int32_t* len = p.kv.lengths + 3 * slot;
  const int64_t sinks = clamp_length(len[0], p.kv.sink_capacity);
  const int64_t coded = clamp_length(len[1], p.kv.code_capacity);
  const int64_t recent = clamp_length(len[2], p.kv.recent_capacity);
  const int64_t n = sinks + coded + recent;
  const int64_t head_index = slot * p.num_kv_heads + kv_head;
  // Recent token i is ring row (ring_first + i) mod recent_capacity (row i without a ring).
  const int64_t ring_first = p.kv.recent_ring && p.kv.recent_capacity > 0 ? coded % p.kv.recent_capacity : 0;
  const T* sk = static_cast<const T*>(p.kv.sink_keys) + head_index * p.kv.sink_capacity * D;
  const T* sv = static_cast<const T*>(p.kv.sink_values) + head_index * p.kv.sink_capacity * D;
  const T* rk = static_cast<const T*>(p.kv.recent_keys) + head_index * p.kv.recent_capacity * D;
  const T* rv = static_cast<const T*>(p.kv.recent_values) + head_index * p.kv.recent_capacity * D;

  // this part's tokens of the sinks-then-recent stream: [first, first + count)
  const int64_t first = int64_t{fp_part} * kTokens;
  const int count = static_cast<int>(max(int64_t{0}, min(int64_t{kTokens}, sinks + recent - first)));
  const int slabs = (count + 15) / 16;
  for (int i = threadIdx.x; i < slabs * 16 * (D / 8); i += blockDim.x) {
    const int t = i / (D / 8), d = (i % (D / 8)) * 8;
    const int64_t j = first + t;
    int64_t i_recent = j - sinks + ring_first;  // ring_first < ring_size: one subtraction wraps
    if (i_recent >= p.kv.recent_capacity) i_recent -= p.kv.recent_capacity;
    const int64_t row = j < sinks ? j : i_recent;
    const bool valid = t < count;
    cp_async16_or_zero(tile_k + t * kStride + d, valid ? (j < sinks ? sk : rk) + row * D + d : sk, valid);
    cp_async16_or_zero(tile_v + t * kStride + d, valid ? (j < sinks ? sv : rv) + row * D + d : sv, valid);
  }
  cp_async_commit();

  // Q^T fragments: lane (r, c) holds row r's dims 16k + 2c, 2c + 1 and 16k + 8 + 2c, 2c + 1.
  uint32_t qb[kKT][2];
  {
    const int global_row = first_row + r;
    const int64_t head = kv_head * p.group + global_row / p.num_queries;
    const int64_t tq = global_row % p.num_queries;
    const uint16_t* q = static_cast<const uint16_t*>(p.q) + ((b * p.num_q_heads + head) * p.num_queries + tq) * D;
#pragma unroll
    for (int k = 0; k < kKT; ++k)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int d = 16 * k + 8 * h + 2 * c;
        qb[k][h] = r < rows ? uint32_t{q[d]} | uint32_t{q[d + 1]} << 16 : 0u;
      }
  }
  // positions visible to this lane's rows 2c, 2c + 1: [0, visible)
  int64_t visible[2];
#pragma unroll
  for (int e = 0; e < 2; ++e) visible[e] = n - p.num_queries + (first_row + 2 * c + e) % p.num_queries + 1;

  float o[kKT][4];  // O^T: [0], [1] dim 16k + r, rows 2c, 2c + 1; [2], [3] dim 16k + r + 8
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // l: this lane's tokens only
#pragma unroll
  for (int k = 0; k < kKT; ++k) o[k][0] = o[k][1] = o[k][2] = o[k][3] = 0.f;
  cp_async_wait_all();
  __syncthreads();

  // ldmatrix rows of this lane: keys (token r + 8 (lane >> 3 & 1), dims + 8 (lane >> 4)),
  // values transposed (token r + 8 (lane >> 4), dims + 8 (lane >> 3 & 1))
  const int i8 = lane & 7;
  const uint32_t k_lane = shared_address(tile_k + (i8 + 8 * (lane >> 3 & 1)) * kStride + 8 * (lane >> 4));
  const uint32_t v_lane = shared_address(tile_v + (i8 + 8 * (lane >> 4)) * kStride + 8 * (lane >> 3 & 1));
  for (int s = warp; s < slabs; s += warps) {
    float st[4] = {0.f, 0.f, 0.f, 0.f};  // S^T: [0], [1] token 16s + r, rows 2c, 2c + 1; [2], [3] token + 8
#pragma unroll
    for (int k = 0; k < kKT; ++k) {
      uint32_t a[4];
      ldmatrix_x4(a, k_lane + (16 * s * kStride + 16 * k) * 2);
      mma<T>(st, a[0], a[1], a[2], a[3], qb[k][0], qb[k][1]);
    }
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int t = 16 * s + r + 8 * (i >> 1);
      const int64_t j = first + t;
      const int64_t pos = j < sinks ? j : j + coded;
      st[i] = t < count && pos < visible[i & 1] ? st[i] * p.scale_log2 : -INFINITY;
      mx[i & 1] = fmaxf(mx[i & 1], st[i]);
    }
#pragma unroll
    for (int off = 4; off <= 16; off <<= 1)
#pragma unroll
      for (int e = 0; e < 2; ++e) mx[e] = fmaxf(mx[e], __shfl_xor_sync(0xffffffffu, mx[e], off));
    float ref[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const float new_m = fmaxf(m[e], mx[e]);
      ref[e] = softmax_ref(new_m);
      const float alpha = fast_exp2(m[e] - ref[e]);
      m[e] = new_m;
      l[e] *= alpha;
#pragma unroll
      for (int k = 0; k < kKT; ++k) o[k][e] *= alpha, o[k][e + 2] *= alpha;
    }
    float pr[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      pr[i] = fast_exp2(st[i] - ref[i & 1]);
      l[i & 1] += pr[i];
    }
    // P^T B fragments: lane (r, c) gets row r at tokens 2c, 2c + 1 (pb0) and 8 + 2c, 9 + 2c (pb1)
    const uint32_t pb0 = transpose8x8(Elem<T>::pack(pr[0], pr[1]));
    const uint32_t pb1 = transpose8x8(Elem<T>::pack(pr[2], pr[3]));
#pragma unroll
    for (int k = 0; k < kKT; ++k) {
      uint32_t a[4];
      ldmatrix_x4_trans(a, v_lane + (16 * s * kStride + 16 * k) * 2);
      mma<T>(o[k], a[0], a[1], a[2], a[3], pb0, pb1);
    }
  }

  // Merge the warps' states: each working warp writes O (rows x D, natural order), m and l.
  const int used = min(warps, slabs);
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    l[e] += __shfl_xor_sync(0xffffffffu, l[e], 4);
    l[e] += __shfl_xor_sync(0xffffffffu, l[e], 8);
    l[e] += __shfl_xor_sync(0xffffffffu, l[e], 16);
  }
  __syncthreads();  // the tiles are dead: their space holds the warps' states
  float* state_o = reinterpret_cast<float*>(smem + L::kFpTiles);  // [used][kRows][D]
  float* state_ml = state_o + L::kFpStateWarps * kRows * D;        // [used][kRows][2]
  if (warp < used) {
#pragma unroll
    for (int k = 0; k < kKT; ++k)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        state_o[(warp * kRows + 2 * c + (i & 1)) * D + 16 * k + r + 8 * (i >> 1)] = o[k][i];
    if (r == 0)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        state_ml[(warp * kRows + 2 * c + e) * 2] = m[e];
        state_ml[(warp * kRows + 2 * c + e) * 2 + 1] = l[e];
      }
  }
  __syncthreads();
  const int64_t group_index = (b * p.num_kv_heads + kv_head) * p.row_tiles + first_row / kRows;
  const int64_t part = group_index * (p.fp_parts + p.splits) + fp_part;
  for (int i = threadIdx.x; i < rows * D; i += blockDim.x) {
    const int row = i / D, d = i % D;
    float m_part, sum, acc;
    merge_warps<D>(state_ml, state_o, used, row, d, m_part, sum, acc);
    p.partial_acc[(part * kRows + row) * D + d] = acc;
    if (d == 0) p.partial_ml[(part * kRows + row) * 2] = m_part, p.partial_ml[(part * kRows + row) * 2 + 1] = sum;
  }
}

template <typename T, int D, class KC, class VC, bool kEight>
__global__ void __launch_bounds__(32 * max_warps<D, kEight>(), 1) attention_kernel(Params p) {
  const int64_t b = blockIdx.z;
  const int64_t slot = sequence_slot(p, b);
  const int64_t kv_head = blockIdx.y / p.row_tiles;
  const int first_row = (blockIdx.y % p.row_tiles) * kRows;
  const int rows = min(kRows, p.group * static_cast<int>(p.num_queries) - first_row);
  const int x = static_cast<int>(blockIdx.x);
  // Unfolded, the first blocks (scheduled first) take one part each, the others a coded split;
  // folded, block x takes coded split x, then parts x, x + splits, ... (each function appears
  // once in the kernel: inlined twice, it would double the kernel's code).
  const bool coded = p.fp_folded || x >= p.fp_parts;
  if (coded)
    coded_block<T, D, KC, VC, kEight>(p, b, slot, kv_head, first_row, rows, p.fp_folded ? x : x - p.fp_parts);
  const int step = p.fp_folded ? p.splits : p.fp_parts;
  for (int part = coded && !p.fp_folded ? p.fp_parts : x; part < p.fp_parts; part += step) {
    if (coded) __syncthreads();  // the coded split's shared memory is dead
    full_precision_block<T, D, Layout<D, KC, VC, kEight>>(vecinfer_attention_smem, p, b, slot, kv_head, first_row,
                                                          rows, part);
  }
}

// Merges the parts of one (sequence, KV head, row tile): parts 0..fp_parts-1 the full-precision
// tokens, the others the coded splits. out = (sum_s acc_s 2^(m_s - M) + value_mean * W_coded) / L,
// where W_coded is the softmax weight of the coded tokens (the value mean was taken out of them only).
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
  const int parts = p.fp_parts + p.splits;
  const float* ml = p.partial_ml + group_index * parts * kRows * 2;
  const float* accs = p.partial_acc + group_index * parts * kRows * D;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int row = warp; row < rows; row += kWarps) {  // a warp per row: max and sums over the parts
    float m = -INFINITY;
    for (int s = lane; s < parts; s += 32) m = fmaxf(m, ml[(s * kRows + row) * 2]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    const float ref = softmax_ref(m);
    float l = 0.f, coded = 0.f;
    for (int s = lane; s < parts; s += 32) {
      const float f = exp2f(ml[(s * kRows + row) * 2] - ref);
      weights[s * kRows + row] = f;
      l += ml[(s * kRows + row) * 2 + 1] * f;
      if (s >= p.fp_parts) coded += ml[(s * kRows + row) * 2 + 1] * f;
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
    static_cast<T*>(p.out)[out_row * D + d] = Elem<T>::from_float(a * row_scale[row]);
    if (p.lse && d == 0) p.lse[out_row] = row_lse[row];
  }
}

}  // namespace vecinfer::cuda_detail::attn
