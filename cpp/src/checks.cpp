#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>

#include "common.h"
#include "vecinfer/attention.h"
#include "vecinfer/kept.h"
#include "vecinfer/ops.h"
#include "vecinfer/paged.h"

namespace vecinfer {
namespace {

// Whether the product of these non-negative sizes fits in int64 (so byte counts computed from
// them cannot wrap).
bool product_fits(std::initializer_list<int64_t> sizes) {
  int64_t product = 1;
  for (int64_t n : sizes) {
    if (n < 0) return false;
    if (n == 0) return true;
    if (product > std::numeric_limits<int64_t>::max() / n) return false;
    product *= n;
  }
  return true;
}

int64_t element_bytes(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

}  // namespace

int64_t code_row_bytes(int64_t head_dim, int64_t sub_dim, int64_t code_bits) {
  if (head_dim != 64 && head_dim != 128 && head_dim != 256) return 0;
  if (sub_dim != 2 && sub_dim != 4 && sub_dim != 8) return 0;
  if (code_bits < 4 || code_bits > 12) return 0;
  return head_dim / sub_dim * code_bits / 8;  // head_dim / sub_dim is a multiple of 8
}

int32_t code_bits_of(int64_t num_centroids) {
  for (int32_t bits = 1; bits <= 62; ++bits)
    if (num_centroids == int64_t{1} << bits) return bits;
  return -1;
}

Status check_layout(const RowLayout& layout) {
  if (layout.head_dim != 64 && layout.head_dim != 128 && layout.head_dim != 256)
    return unsupported("head_dim (the last dimension) must be 64, 128 or 256");
  if (layout.num_rows <= 0) return invalid("the tensor is empty: it needs at least one row");
  if (!product_fits({layout.num_rows, layout.head_dim, 4}))
    return invalid("the tensor is too large: its size in bytes overflows 64 bits");
  if (layout.num_heads <= 0 || layout.tokens_per_head <= 0)
    return invalid("num_heads and tokens_per_head must be positive");
  if (layout.num_heads > layout.num_rows / layout.tokens_per_head ||
      layout.num_rows % (layout.num_heads * layout.tokens_per_head) != 0)
    return invalid("num_rows must be a multiple of num_heads * tokens_per_head");
  return Status::Ok();
}

Status check_in_out(DType dtype, const void* in, const void* out, const RowLayout& layout) {
  if (in == nullptr || out == nullptr) return invalid("input/output: null pointer");
  const auto first = reinterpret_cast<uintptr_t>(in), second = reinterpret_cast<uintptr_t>(out);
  const auto bytes = static_cast<uintptr_t>(layout.num_rows * layout.head_dim * element_bytes(dtype));
  if (first != second && first < second + bytes && second < first + bytes)
    return invalid("out: overlaps the input partially; pass the input itself (in place) or a separate tensor");
  return Status::Ok();
}

Status check_transform_values(const RowLayout& layout, const Transform& transform) {
  const int64_t n = transform.table_rows * layout.head_dim;
  for (int64_t i = 0; transform.scale != nullptr && i < n; ++i)
    if (!(std::isfinite(transform.scale[i]) && transform.scale[i] > 0.f))
      return invalid("scale: every entry must be finite and > 0");
  for (int64_t i = 0; transform.mean != nullptr && i < n; ++i)
    if (!std::isfinite(transform.mean[i])) return invalid("mean: contains NaN or infinity");
  return Status::Ok();
}

Status check_codebook_values(const Codebook& codebook) {
  const int64_t n = codebook.num_codebooks * codebook.num_centroids() * codebook.sub_dim;
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(codebook.centroids[i])) return invalid("codebook: contains NaN or infinity");
  return Status::Ok();
}

Status check_transform(const RowLayout& layout, const Transform& transform, TransformKind kind) {
  if (kind != TransformKind::kKey && kind != TransformKind::kQuery &&
      kind != TransformKind::kKeyInverse)
    return invalid("kind must be kKey, kQuery or kKeyInverse");
  if (kind == TransformKind::kQuery && transform.mean != nullptr)
    return invalid("mean: the query transform takes no mean (it applies to keys only)");
  if (transform.scale == nullptr && transform.mean == nullptr) return Status::Ok();
  if (transform.table_rows <= 0 || layout.num_heads % transform.table_rows != 0)
    return invalid("scale/mean: the number of heads (third-from-last dimension) must be a "
                   "multiple of the table's rows (KV heads)");
  return Status::Ok();
}

Status check_codebook(const RowLayout& layout, const Codebook& codebook) {
  if (codebook.centroids == nullptr) return invalid("codebook: null pointer");
  if (codebook.sub_dim != 2 && codebook.sub_dim != 4 && codebook.sub_dim != 8)
    return unsupported("codebook: sub_dim (last dimension) must be 2, 4 or 8");
  if (codebook.code_bits < 4 || codebook.code_bits > 12)
    return unsupported("codebook: the number of centroids must be 2**code_bits with code_bits "
                       "from 4 to 12 (16 to 4096 centroids)");
  if (codebook.num_codebooks <= 0 || layout.num_heads % codebook.num_codebooks != 0 ||
      !product_fits({codebook.num_codebooks, codebook.num_centroids(), codebook.sub_dim, 4}))
    return invalid("codebook: the number of heads (third-from-last dimension) must be a "
                   "multiple of the number of codebooks (1 per layer, or 1 per KV head)");
  return Status::Ok();
}

Status check_attention(const AttentionShape& shape, const CompressedKV& kv) {
  if (shape.head_dim != 64 && shape.head_dim != 128 && shape.head_dim != 256)
    return unsupported("head_dim (the last dimension of q) must be 64, 128 or 256");
  if (shape.batch < 1 || shape.num_kv_heads < 1 || shape.num_q_heads < 1 || shape.num_queries < 1)
    return invalid("q: batch, heads and queries must all be at least 1");
  if (shape.num_q_heads % shape.num_kv_heads != 0)
    return invalid("q: the number of query heads must be a multiple of the number of KV heads");
  if (shape.query_indptr == nullptr ? shape.total_queries != 0 : shape.total_queries < 1)
    return invalid("query_indptr: ragged queries need total_queries >= 1 (the packed rows of q); without "
                   "query_indptr total_queries must be 0");
  if (kv.lengths == nullptr) return invalid("lengths: null pointer");
  if (kv.num_slots < 0 || (kv.seq_slots != nullptr && kv.num_slots < 1))
    return invalid("seq_slots: num_slots (rows of the per-sequence buffers) must be >= 1");
  if (kv.code_capacity < 0 || kv.sink_capacity < 0 || kv.recent_capacity < 0)
    return invalid("code/sink/recent capacities must be >= 0");
  if (kv.code_capacity > 0 && (kv.key_codes == nullptr || kv.value_codes == nullptr))
    return invalid("key_codes/value_codes: null pointer");
  if (kv.sink_capacity > 0 && (kv.sink_keys == nullptr || kv.sink_values == nullptr))
    return invalid("sink_keys/sink_values: null pointer");
  if (kv.recent_capacity > 0 && (kv.recent_keys == nullptr || kv.recent_values == nullptr))
    return invalid("recent_keys/recent_values: null pointer");
  const bool paged = kv.page_table != nullptr;
  if (!product_fits({shape.batch, shape.num_q_heads, shape.num_queries, shape.head_dim, 4}) ||
      !product_fits({shape.total_queries, shape.num_q_heads, shape.head_dim, 4}) ||
      !product_fits({shape.batch, shape.num_kv_heads, kv.sink_capacity, shape.head_dim, 4}) ||
      !product_fits({shape.batch, shape.num_kv_heads, kv.recent_capacity, shape.head_dim, 4}) ||
      !product_fits({paged ? kv.num_pages : shape.batch, shape.num_kv_heads,
                     paged ? int64_t{kv.page_size} : kv.code_capacity, shape.head_dim}))
    return invalid("q/codes/sink/recent: sizes whose byte counts overflow 64 bits");
  if (kv.max_coded < 0 || kv.max_coded > kv.code_capacity)
    return invalid("max_coded must be in [0, code_capacity]");
  if (kv.page_table != nullptr) {
    const int64_t size = kv.page_size;
    if (size < 16 || (size & (size - 1)) != 0)
      return invalid("page_size: must be a power of two >= 16");
    if (kv.num_pages < 1 || kv.max_pages < 1) return invalid("page pools and page tables must not be empty");
    if (kv.max_pages > (int64_t{1} << 40) / size || kv.code_capacity != kv.max_pages * size)
      return invalid("code_capacity: must be max_pages * page_size for a paged cache");
  }
  RowLayout heads;  // one row per KV head: the tables and codebooks are indexed by KV head
  heads.head_dim = shape.head_dim;
  heads.num_heads = shape.num_kv_heads;
  heads.num_rows = shape.num_kv_heads;
  heads.tokens_per_head = 1;
  Status s = check_codebook(heads, kv.key_codebook);
  if (!s.ok()) return {s.code, "key codebook: unsupported shape or count (need sub_dim 2/4/8, code_bits 4..12, "
                               "1 codebook or one per KV head)"};
  s = check_codebook(heads, kv.value_codebook);
  if (!s.ok()) return {s.code, "value codebook: unsupported shape or count (need sub_dim 2/4/8, code_bits "
                               "4..12, 1 codebook or one per KV head)"};
  s = check_transform(heads, kv.key_transform, TransformKind::kKey);
  if (!s.ok()) return s;
  if ((kv.key_transform.scale != nullptr || kv.key_transform.mean != nullptr) &&
      kv.key_transform.table_rows != 1 && kv.key_transform.table_rows != shape.num_kv_heads)
    return invalid("key scale/mean: expected 1 row or one per KV head");
  if (kv.value_mean != nullptr && kv.value_mean_rows != 1 && kv.value_mean_rows != shape.num_kv_heads)
    return invalid("value_mean: expected 1 row or one per KV head");
  return Status::Ok();
}

}  // namespace vecinfer

namespace vecinfer {

Status check_append(const AttentionShape& shape, const TokenBatch& tokens, const CompressedKV& kv) {
  AttentionShape one = shape;  // the layer's checks, for a batch of one query per sequence
  one.batch = tokens.batch;
  one.num_q_heads = shape.num_kv_heads;
  one.num_queries = 1;
  Status s = check_attention(one, kv);
  if (!s.ok()) return s;
  if (kv.page_table == nullptr || !kv.recent_ring)
    return invalid("append_tokens: the cache must be paged (page_table) with a ring recent window (recent_ring)");
  if (kv.num_slots < 1) return invalid("append_tokens: num_slots must be >= 1");
  if (tokens.batch < 1 || tokens.seq_slots == nullptr || tokens.indptr == nullptr)
    return invalid("append_tokens: a batch of at least one sequence with seq_slots and indptr");
  if (tokens.num_rows < 0 || tokens.row_stride < 0 || tokens.head_stride < 0)
    return invalid("append_tokens: negative row count or stride");
  if (tokens.num_rows > 0 && (tokens.keys == nullptr || tokens.values == nullptr))
    return invalid("keys/values: null pointer");
  return Status::Ok();
}

Status check_kept_step(const KeptStep& st) {
  if (st.batch < 1 || st.num_kv_heads < 1) return invalid("kept_step: batch and num_kv_heads must be >= 1");
  if (st.head_dim != 64 && st.head_dim != 128 && st.head_dim != 256)
    return unsupported("kept_step: head_dim must be 64, 128 or 256");
  if (st.sinks < 0 || st.kept_capacity < 0 || st.window < 1 || st.code_capacity < 1)
    return invalid("kept_step: sinks and kept_capacity must be >= 0, window and code_capacity >= 1");
  if (!(st.keep_fraction >= 0 && st.keep_fraction < 1) || st.keep_tokens < 0)
    return invalid("kept_step: keep_fraction must be in [0, 1) and keep_tokens >= 0");
  const int64_t int32_limit = int64_t{1} << 31;  // kept rows and code columns are indexed by int32 lengths
  if (st.seq_slots ? st.num_slots < st.batch : (st.num_slots != 0 && st.num_slots != st.batch))
    return invalid("kept_step: num_slots must be >= batch with seq_slots, 0 or the batch size without");
  const int64_t rows = st.seq_slots ? st.num_slots : st.batch;
  if (st.sinks + st.kept_capacity >= int32_limit || st.window >= int32_limit || st.code_capacity >= int32_limit ||
      !product_fits({rows, st.num_kv_heads, st.sinks + st.kept_capacity + st.window, st.head_dim, 4}) ||
      !product_fits({st.batch, st.num_kv_heads, st.head_dim, 4}) || !product_fits({rows, st.code_capacity, 4}))
    return invalid("kept_step: buffers too large");
  if (!st.new_keys || !st.new_values || !st.sink_keys || !st.sink_values || !st.window_keys || !st.window_values ||
      !st.encode_keys || !st.encode_values || !st.window_scores || !st.lengths ||
      !st.next_lengths || !st.encode_lengths || (st.kept_capacity > 0 && (!st.kept_scores || !st.kept_positions)))
    return invalid("kept_step: null pointer");
  return Status::Ok();
}

}  // namespace vecinfer
