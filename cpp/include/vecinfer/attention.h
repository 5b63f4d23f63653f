// Decode attention directly on a compressed KV cache (see the code layout in types.h).
//
// Per sequence b of the batch, the cache holds n_b = sinks + coded + recent tokens, with
// lengths[b] = {sinks, coded, recent}:
//   positions [0, sinks)                    full precision: sink_keys/values[b, h, 0:sinks]
//   positions [sinks, sinks + coded)        codes: key_codes/value_codes rows 0..coded-1 of (b, h)
//   positions [sinks + coded, n_b)          full precision: recent_keys/values[b, h, 0:recent]
// The code rows are either contiguous, [batch, num_kv_heads, code_capacity, row_bytes], or paged:
// pools [num_pages, num_kv_heads, page_size, row_bytes] with a page table [batch, max_pages] of
// int32 page ids, coded token t of sequence b being row t % page_size of page
// page_table[b][t / page_size] (pages may be shared between sequences and appear in any order).
// Keys were encoded as codes of transform(k, kKey) (smoothing scale, key mean, Hadamard); values as
// codes of v - value_mean. The op computes, for the queries q [B, Hq, Tq, D] (raw post-RoPE, query
// head h reading KV head h / (Hq / Hkv)), softmax attention over the dequantized keys and values:
// the Tq queries are the last Tq positions of each sequence, causal among themselves, so query t
// sees positions [0, n_b - Tq + t]. Keys and values are never dequantized to memory: the CUDA kernel
// scores the transformed query against centroids (q . k = H(q * lambda) . c + q . mu) on tensor
// cores and adds the value mean once at the end.
#pragma once

#include <cstddef>
#include <cstdint>

#include "vecinfer/status.h"
#include "vecinfer/types.h"

namespace vecinfer {

struct AttentionShape {
  int64_t batch = 0;
  int64_t num_q_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t num_queries = 0;  // Tq: up to 16 run the decode kernel on CUDA, more the long-query kernel
  int32_t head_dim = 0;     // 64, 128 or 256
  // Ragged query blocks (a chunked prefill of several sequences with different chunk lengths).
  // null: every sequence has num_queries queries, q and out [batch, num_q_heads, num_queries,
  // head_dim], lse [batch, num_q_heads, num_queries]. Otherwise q and out are packed
  // [total_queries, num_q_heads, head_dim] and lse [total_queries, num_q_heads]: the queries of
  // sequence b are rows [query_indptr[b], query_indptr[b + 1]), the last positions of its sequence,
  // causal among themselves; num_queries is the most any sequence has (a sequence may have none).
  // query_indptr is int32 [batch + 1] on q's device, from 0 to total_queries, non-decreasing. On
  // CUDA every ragged call runs the long-query kernel, which clamps the counts to [0, num_queries]
  // and the rows to the packed tensor (no host synchronisation); the CPU reference rejects them.
  const int32_t* query_indptr = nullptr;
  int64_t total_queries = 0;
};

// One layer of a compressed cache: where its parts live and how they were encoded. The attention
// reads through it; append_tokens (paged.h) writes through it, hence the mutable pointers.
struct CompressedKV {
  // Sequence b of the batch is row seq_slots[b] of every per-sequence buffer below (lengths, page
  // table, sinks, recent window and contiguous codes); null: row b. num_slots is their row count.
  const int32_t* seq_slots = nullptr;  // [batch], on the data's device
  int64_t num_slots = 0;               // 0: the batch size (seq_slots must then be null)
  int32_t* lengths = nullptr;    // [num_slots, 3] {sinks, coded, recent}, on the data's device
  uint8_t* key_codes = nullptr;  // contiguous: [num_slots, num_kv_heads, code_capacity, key code_row_bytes]
  uint8_t* value_codes = nullptr;  // paged: [num_pages, num_kv_heads, page_size, row bytes]
  int64_t code_capacity = 0;       // code rows per sequence (paged: max_pages * page_size)
  // Paging (page_table null: contiguous). page_size is a power of two >= 16. The kernel clamps a
  // page id outside [0, num_pages) into the pool; the CPU reference rejects it.
  const int32_t* page_table = nullptr;  // [num_slots, max_pages], on the data's device
  int64_t max_pages = 0;
  int64_t num_pages = 0;
  int32_t page_size = 0;
  void* sink_keys = nullptr;  // [num_slots, num_kv_heads, sink_capacity, head_dim], q's dtype
  void* sink_values = nullptr;
  int64_t sink_capacity = 0;
  void* recent_keys = nullptr;  // [num_slots, num_kv_heads, recent_capacity, head_dim], q's dtype
  void* recent_values = nullptr;
  int64_t recent_capacity = 0;
  // The recent window as a ring: the tokens after the sinks form one stream, its token j (position
  // sinks + j) held in recent row j % recent_capacity while it is recent, so recent token i of a
  // sequence is row (coded + i) % recent_capacity. false: recent token i is row i.
  bool recent_ring = false;
  Codebook key_codebook;    // num_codebooks 1 or num_kv_heads
  Codebook value_codebook;
  Transform key_transform;  // scale, mean, hadamard of the keys; table_rows 1 or num_kv_heads
  const float* value_mean = nullptr;  // [value_mean_rows, head_dim] or null
  int64_t value_mean_rows = 1;        // 1 or num_kv_heads
  // Host-side upper bound of every lengths[b][1]; sizes the split-KV plan (use code_capacity
  // when unknown). The lengths themselves are clamped to the capacities on the device.
  int64_t max_coded = 0;

  int64_t slots(int64_t batch) const { return num_slots > 0 ? num_slots : batch; }
};

// Argument checks shared by both implementations (shapes, capacities, paging, codebooks, tables).
Status check_attention(const AttentionShape& shape, const CompressedKV& kv);

// Rounds float32 centroids [num_codebooks, 2^code_bits, sub_dim] (in place) onto the 8-bit affine
// grid of each (codebook, element position) that the CUDA kernel stores: with lo and hi the
// smallest and largest entry at the position and step = (hi - lo) / 255, every entry becomes
// lo + step * round((x - lo) / step). Idempotent; non-finite entries are an error.
Status snap_codebook(float* centroids, const Codebook& shape);

namespace cpu {
// out [B, Hq, Tq, D] in dtype (float32, float16 or bfloat16, the dtype of q and of the
// full-precision parts); lse [B, Hq, Tq] float32 natural-log sum of exp(scaled scores), or null.
// Accumulates in double: this is the reference the kernel is tested against.
Status attention(DType dtype, const void* q, void* out, float* lse, const AttentionShape& shape,
                 const CompressedKV& kv, float softmax_scale);
}  // namespace cpu

namespace cuda {
// Whether the fused kernel takes this element type, number of queries per sequence (Tq) and these
// codebook shapes (only sub_dim and code_bits are read): Ok, or kUnsupported saying why. The one
// place that says what the kernel supports; callers choosing a path ask it.
Status attention_supports(DType dtype, int64_t num_queries, const Codebook& key, const Codebook& value);
// Bytes of device workspace cuda::attention needs for these shapes (split-KV partial results).
// Reads only the shapes (no pointers): shape, the codebooks' sub_dim and code_bits, max_coded, and
// sink_capacity + recent_capacity (the full-precision tokens are split over blocks too).
// 0 for shapes the kernel does not take.
size_t attention_workspace_bytes(const AttentionShape& shape, const CompressedKV& kv);
// The fused kernel: float16 or bfloat16; key and value codebooks with code_bits 8 or 12 and any
// sub_dim (the 4, 3, 2, 1.5 and 1 bit presets); every pointer on the current device, element
// tensors and code tensors 16-byte aligned, code_capacity a multiple of 16.
// Up to 16 queries per sequence run the decode kernel (bandwidth-bound, described below). Longer
// query blocks (a chunked prefill, a second turn) run the long-query kernel, FlashAttention-style on
// tensor cores: it dequantizes tiles of 64 coded tokens into shared memory in the element type
// (centroids as given, not rounded to the grid below) and needs no workspace unless the blocks
// would not fill the GPU (then the tokens are split and merged).
// Centroids are held as 8 bits per element on the affine grid of each (codebook, element
// position): lo + step * u, lo and step = (max - min) / 255 taken over the codebook's entries at
// that position. A codebook already on its grid (snap_codebook; KVQuantizer's are) gives the
// reference's function; any other is rounded to its grid (error at most step / 2 per element).
Status attention(DType dtype, const void* q, void* out, float* lse, const AttentionShape& shape,
                 const CompressedKV& kv, float softmax_scale, void* workspace, size_t workspace_bytes,
                 void* stream);

// The same kernel in two steps, for callers that run many calls of one batch composition (the
// layers of a model, the decode steps between two changes of the batch): plan_attention checks
// the arguments (kv: any layer of the cache) and makes the split-KV schedule on the host once;
// run_attention launches with that
// schedule: no re-planning, no allocation, no host synchronisation, so it can be captured in a
// CUDA graph. kv of a run must have the plan's shapes (any layer of the cache: the pointers may
// differ); lengths may grow on the device up to max_coded coded tokens between runs. A ragged plan
// keeps the shape's query_indptr buffer: its contents may change between runs (within num_queries
// and total_queries).
struct AttentionPlan {
  DType dtype = DType::kFloat16;
  AttentionShape shape;
  int32_t key_sub_dim = 0, key_code_bits = 0, value_sub_dim = 0, value_code_bits = 0;
  int64_t code_capacity = 0, max_coded = 0, sink_capacity = 0, recent_capacity = 0;
  int32_t page_size = 0;  // 0: contiguous codes
  int device = -1;        // the CUDA device planned for
  // The schedule (filled by plan_attention).
  int fp_parts = 0;          // blocks over the full-precision tokens (sinks, window) per (sequence, KV head, row tile)
  int splits = 0;            // blocks over the coded tokens per (sequence, KV head, row tile)
  bool fp_folded = false;    // the full-precision parts run in the coded blocks, after their split
  int64_t split_tokens = 0;  // coded tokens per split
  int warps = 0, stages = 0, low_warps = 0;
  size_t workspace_bytes = 0;  // device workspace run_attention needs
};
Status plan_attention(DType dtype, const AttentionShape& shape, const CompressedKV& kv, AttentionPlan& plan);
Status run_attention(const AttentionPlan& plan, const void* q, void* out, float* lse, const CompressedKV& kv,
                     float softmax_scale, void* workspace, size_t workspace_bytes, void* stream);
}  // namespace cuda

}  // namespace vecinfer
