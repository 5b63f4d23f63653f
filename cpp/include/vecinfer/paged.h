// Appending tokens to a compressed cache in the layout serving engines use: codes in page pools
// addressed through a page table, the recent window as a ring (CompressedKV with page_table set and
// recent_ring = true; see attention.h). Appending and attention read and write the same layout.
#pragma once

#include <cstdint>

#include "vecinfer/attention.h"
#include "vecinfer/status.h"

namespace vecinfer {

// The new tokens of a batch of sequences: sequence i appends rows [indptr[i], indptr[i + 1]) of
// keys and values, in order. KV head h of row r is at keys + r * row_stride + h * head_stride
// (in elements; its head_dim elements contiguous). Keys are raw post-RoPE, in the cache's dtype.
struct TokenBatch {
  int64_t batch = 0;
  const int32_t* seq_slots = nullptr;  // [batch] the sequences' cache slots, distinct
  const int32_t* indptr = nullptr;     // [batch + 1], indptr[0] = 0, non-decreasing
  const void* keys = nullptr;
  const void* values = nullptr;
  int64_t num_rows = 0;  // rows of keys and values: indptr[batch] <= num_rows
  int64_t row_stride = 0;
  int64_t head_stride = 0;
};

// Checks shared by both implementations: the cache layout (paged, ring), the tables, the strides.
Status check_append(const AttentionShape& shape, const TokenBatch& tokens, const CompressedKV& kv);

// Appends the tokens of each sequence to the layer `kv` describes (shape: num_kv_heads, head_dim;
// batch and num_queries are not used), one token after the other, with (s, c, r) = lengths[slot]
// and R = kv.recent_capacity:
//   s < sink_capacity:  the token becomes sink row s; s += 1
//   else if R == 0:     the token is encoded to code c; c += 1
//   else:               if r == R, the oldest recent token (ring row c % R) is encoded to code c,
//                       c += 1, r -= 1; then the token becomes ring row (c + r) % R; r += 1
// Code c of a slot is row c % page_size of page page_table[slot][c / page_size]. Keys are encoded
// after kv.key_transform, values after subtracting kv.value_mean, to the nearest centroid as
// vq_encode picks it.
namespace cpu {
// Checks every slot, length and page before writing: an error leaves the cache unchanged.
Status append_tokens(DType dtype, const AttentionShape& shape, const TokenBatch& tokens, const CompressedKV& kv);
}  // namespace cpu

namespace cuda {
// One kernel, no host synchronisation (it can be captured in a CUDA graph). What only the device
// sees is the caller's to have checked on its host copies (PagedKVCache does): slots distinct and
// in range, indptr as above, every code landing on a page of the pool. The kernel clamps slots and
// drops a code whose page id lies outside the pool, so bad tables never write outside the buffers.
// max_new_tokens bounds indptr[i + 1] - indptr[i] (it sizes the grid). `arrivals`: [num_slots]
// int32 zeros, left zero; the kernel's blocks count themselves there so that the last block of a
// sequence writes its new lengths.
Status append_tokens(DType dtype, const AttentionShape& shape, const TokenBatch& tokens, const CompressedKV& kv,
                     int64_t max_new_tokens, int32_t* arrivals, void* stream);
}  // namespace cuda

}  // namespace vecinfer
