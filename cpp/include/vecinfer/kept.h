// One decode step of a layer whose cache keeps some tokens in full precision, chosen by key novelty
// as they leave the recent window (the Python QuantizedKVCache with VQConfig.keep_fraction or
// keep_tokens; python/vecinfer/keeping.py has the whole rule). This is the step of a batch in
// which every sequence appends one token; the encoding itself is append_tokens' (paged.h), called
// after this with encode_lengths.
//
// Per sequence b, with (s, c, r) = lengths[b]: sink rows [0, sinks) hold the first tokens, rows
// [sinks, s) the kept = s - sinks kept tokens (any order; kept_scores / kept_positions say which),
// c tokens are coded, and the window (r tokens) is in order (row j = window token j, at position
// s + c + j). While a sequence fills (nothing has left its window: c = 0, nothing kept):
//   s < sinks: the new token becomes sink row s; next_lengths = (s + 1, 0, 0);
//   r < window: it becomes window row r, its score (below) against the last `window` of the sinks'
//               and window's keys (0 with none); next_lengths = (s, 0, r + 1);
// and encode row b is the new token, written to code c = 0 where nothing reads it. Once the sinks
// and the window are full (r = window, "steady"), the new token k (per KV head) arrives:
//   its score   = sum over KV heads of ||k - m||^2 / max(||k||^2, 1e-12), m the mean of the
//                 window's keys, in float32;
//   the budget  = min(E + 1, max(keep_tokens, floor(keep_fraction * (E + 1) + 0.5))), E = kept + c
//                 (VQConfig.kept_budget of the tokens that will have left the window);
//   the window's first token (position s + c, score window_scores[b][0]) leaves the window:
//     budget > kept (and a free kept row): it becomes kept row `kept` ("grows"); nothing is encoded;
//     otherwise, against the lowest-scoring kept token (the lowest row on ties; none when kept = 0):
//       a higher score: the two swap; it takes that row and that token is encoded;
//       else: it is encoded;
//   the window moves up one row and the new token (k, v, score) becomes its last row.
// Outputs: encode_keys / encode_values [batch, Hkv, D] the token to encode (a growing sequence's
// entry is the leaving token: append_tokens writes it to code c, past the sequence's codes, where
// nothing reads it; a paged cache holds the page of code c for it); code_positions[b][c] its
// position (not for a growing sequence; not recorded when code_positions is null); next_lengths
// = (s + grow, c + 1 - grow, r); encode_lengths = (0, c, 0), the lengths under which append_tokens
// (with no sinks and no window) writes encode row b to code c.
// Sequence b's per-sequence rows (sinks, window, scores, positions and the three lengths) are row
// seq_slots[b] of those buffers (a paged cache's slots), or row b when seq_slots is null; the
// buffers' other rows are neither read nor written.
#pragma once

#include <cstdint>

#include "vecinfer/status.h"
#include "vecinfer/types.h"

namespace vecinfer {

struct KeptStep {
  int64_t batch = 0, num_kv_heads = 0, head_dim = 0;
  int64_t sinks = 0;          // sink rows before the kept ones
  int64_t kept_capacity = 0;  // kept rows after them: the sink buffers hold sinks + kept_capacity rows
  int64_t window = 0;         // rows of the recent window (>= 1)
  int64_t code_capacity = 0;  // code rows of a sequence (columns of code_positions)
  // Rows of the per-sequence buffers: seq_slots null: batch (num_slots 0 or batch); else
  // seq_slots [batch] holds distinct rows in [0, num_slots).
  const int32_t* seq_slots = nullptr;
  int64_t num_slots = 0;
  double keep_fraction = 0;   // in [0, 1)
  int64_t keep_tokens = 0;    // >= 0
  // Element tensors in the cache's dtype, contiguous.
  const void* new_keys = nullptr;    // [batch, Hkv, D]
  const void* new_values = nullptr;
  // Per-sequence buffers, with R = num_slots (or batch) rows:
  void* sink_keys = nullptr;         // [R, Hkv, sinks + kept_capacity, D]
  void* sink_values = nullptr;
  void* window_keys = nullptr;       // [R, Hkv, window, D]
  void* window_values = nullptr;
  float* window_scores = nullptr;    // [R, window]
  float* kept_scores = nullptr;      // [R, kept_capacity]
  int32_t* kept_positions = nullptr; // [R, kept_capacity]
  int32_t* code_positions = nullptr; // [R, code_capacity], or null
  const int32_t* lengths = nullptr;  // [R, 3], read only
  int32_t* next_lengths = nullptr;   // [R, 3]
  int32_t* encode_lengths = nullptr; // [R, 3]
  // Per row of the batch:
  void* encode_keys = nullptr;       // [batch, Hkv, D]
  void* encode_values = nullptr;
};

// Checks shared by both implementations: sizes, the budget's parameters, pointers.
Status check_kept_step(const KeptStep& step);

namespace cpu {
// Checks every sequence's slot (in range, distinct) and lengths (a state above: filling with
// nothing kept or coded, or steady; a kept and a code row in range) before writing anything: an
// error leaves every buffer unchanged.
Status kept_step(DType dtype, const KeptStep& step);
}  // namespace cpu

namespace cuda {
// Two kernels (the step, one block per sequence; the window's shift, one block per sequence, KV head
// and keys or values), no host synchronisation: they can be captured in a CUDA graph.
// The lengths and slots live on the device, so the caller checks them on its host copy
// (QuantizedKVCache and PagedKVCache do); the kernel clamps them so that bad lengths or slots never
// write outside the buffers.
Status kept_step(DType dtype, const KeptStep& step, void* stream);
}  // namespace cuda

}  // namespace vecinfer
