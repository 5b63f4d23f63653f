// CPU reference of attention on the compressed cache: dequantize each (sequence, KV head) with the
// decode op, then softmax attention accumulated in double. Simple on purpose: it is the function
// the CUDA kernel must compute.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../common.h"
#include "decode.h"
#include "half_float.h"
#include "head_tables.h"
#include "vecinfer/attention.h"
#include "vecinfer/ops.h"

namespace vecinfer::cpu {
namespace {

float load(DType dtype, const void* base, int64_t i) {
  switch (dtype) {
    case DType::kFloat16: return half_to_float(static_cast<const uint16_t*>(base)[i]);
    case DType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

void store(DType dtype, void* base, int64_t i, float v) {
  switch (dtype) {
    case DType::kFloat16: static_cast<uint16_t*>(base)[i] = float_to_half(v); break;
    case DType::kBFloat16: static_cast<uint16_t*>(base)[i] = float_to_bf16(v); break;
    default: static_cast<float*>(base)[i] = v; break;
  }
}

}  // namespace

Status attention(DType dtype, const void* q, void* out, float* lse, const AttentionShape& shape,
                 const CompressedKV& kv, float softmax_scale) {
  Status s = check_attention(shape, kv);
  if (!s.ok()) return s;
  if (dtype != DType::kFloat32 && dtype != DType::kFloat16 && dtype != DType::kBFloat16)
    return invalid("dtype must be float32, float16 or bfloat16");
  if (q == nullptr || out == nullptr) return invalid("q/out: null pointer");
  if (!std::isfinite(softmax_scale)) return invalid("scale: must be finite");
  const int64_t num_slots = kv.slots(shape.batch);
  RowLayout heads;  // one row per KV head, as check_attention reads the tables
  heads.head_dim = shape.head_dim;
  Transform value_means;
  value_means.mean = kv.value_mean;
  value_means.table_rows = kv.value_mean_rows;
  s = check_transform_values(heads, kv.key_transform);
  if (s.ok()) s = check_transform_values(heads, value_means);
  if (s.ok()) s = check_codebook_values(kv.key_codebook);
  if (s.ok()) s = check_codebook_values(kv.value_codebook);
  if (!s.ok()) return s;
  const int32_t* indptr = shape.query_indptr;
  if (indptr != nullptr && (indptr[0] != 0 || indptr[shape.batch] != shape.total_queries))
    return invalid("query_indptr: must start at 0 and end at total_queries (the rows of q)");
  for (int64_t b = 0; b < shape.batch; ++b) {
    const int64_t queries = indptr ? int64_t{indptr[b + 1]} - indptr[b] : shape.num_queries;
    if (queries < 0 || queries > shape.num_queries)
      return invalid("query_indptr: a sequence's query count is negative or above num_queries");
    const int64_t slot = kv.seq_slots ? kv.seq_slots[b] : b;
    if (slot < 0 || slot >= num_slots) return invalid("seq_slots: a slot outside [0, num_slots)");
    const int32_t* len = kv.lengths + 3 * slot;
    if (len[0] < 0 || len[1] < 0 || len[2] < 0) return invalid("lengths: negative length");
    if (len[0] > kv.sink_capacity || len[1] > kv.code_capacity || len[2] > kv.recent_capacity)
      return invalid("lengths: a sequence holds more tokens than its buffers' capacity");
    if (int64_t{len[0]} + len[1] + len[2] < queries)
      return invalid("lengths: a sequence holds fewer tokens than the number of queries");
    if (kv.page_table != nullptr)
      for (int64_t i = 0; i < (int64_t{len[1]} + kv.page_size - 1) / kv.page_size; ++i) {
        const int32_t page = kv.page_table[slot * kv.max_pages + i];
        if (page < 0 || page >= kv.num_pages) return invalid("page_table: a page id outside the page pools");
      }
  }
  const int d = shape.head_dim;
  const int64_t hkv = shape.num_kv_heads, group = shape.num_q_heads / hkv, hq = shape.num_q_heads;
  const int64_t key_bytes = code_row_bytes(d, kv.key_codebook.sub_dim, kv.key_codebook.code_bits);
  const int64_t value_bytes = code_row_bytes(d, kv.value_codebook.sub_dim, kv.value_codebook.code_bits);
#pragma omp parallel for collapse(2) schedule(dynamic)
  for (int64_t b = 0; b < shape.batch; ++b) {
    for (int64_t h = 0; h < hkv; ++h) {
      const int64_t slot = kv.seq_slots ? kv.seq_slots[b] : b;
      const int32_t sinks = kv.lengths[3 * slot], coded = kv.lengths[3 * slot + 1], recent = kv.lengths[3 * slot + 2];
      const int64_t n = int64_t{sinks} + coded + recent;
      // Keys and values of every position, in original coordinates, float32.
      std::vector<float> keys(n * d), values(n * d);
      const int64_t head = slot * hkv + h;
      for (int64_t i = 0; i < int64_t{sinks} * d; ++i) {
        keys[i] = load(dtype, kv.sink_keys, head * kv.sink_capacity * d + i);
        values[i] = load(dtype, kv.sink_values, head * kv.sink_capacity * d + i);
      }
      const Transform values_back = value_transform(kv.value_mean, kv.value_mean_rows, h, hkv, d);
      // The coded tokens in runs of consecutive rows: the whole sequence, or one page at a time.
      const int64_t run = kv.page_table != nullptr ? kv.page_size : std::max<int64_t>(coded, 1);
      for (int64_t first = 0; first < coded; first += run) {
        const int64_t count = std::min<int64_t>(run, coded - first);
        const int64_t row = kv.page_table != nullptr
                                ? (int64_t{kv.page_table[slot * kv.max_pages + first / run]} * hkv + h) * run
                                : head * kv.code_capacity;
        RowLayout rows;
        rows.num_rows = count;
        rows.head_dim = d;
        rows.tokens_per_head = count;
        decode_rows(DType::kFloat32, kv.key_codes + row * key_bytes, keys.data() + (int64_t{sinks} + first) * d, rows,
                    head_codebook(kv.key_codebook, h, hkv), head_transform(kv.key_transform, h, hkv, d));
        decode_rows(DType::kFloat32, kv.value_codes + row * value_bytes,
                    values.data() + (int64_t{sinks} + first) * d, rows, head_codebook(kv.value_codebook, h, hkv),
                    values_back);
      }
      const int64_t recent_first = (int64_t{sinks} + coded) * d;
      for (int64_t i = 0; i < recent; ++i) {
        const int64_t ring_row = kv.recent_ring ? (coded + i) % kv.recent_capacity : i;
        for (int e = 0; e < d; ++e) {
          keys[recent_first + i * d + e] = load(dtype, kv.recent_keys, (head * kv.recent_capacity + ring_row) * d + e);
          values[recent_first + i * d + e] =
              load(dtype, kv.recent_values, (head * kv.recent_capacity + ring_row) * d + e);
        }
      }
      std::vector<double> scores(n), acc(d), query(d);
      const int64_t tq = indptr ? int64_t{indptr[b + 1]} - indptr[b] : shape.num_queries;
      for (int64_t g = 0; g < group; ++g) {
        for (int64_t t = 0; t < tq; ++t) {
          // dense [B, Hq, Tq, D] or packed [total_queries, Hq, D]
          const int64_t row = indptr ? (indptr[b] + t) * hq + h * group + g : (b * hq + h * group + g) * tq + t;
          const int64_t visible = n - tq + t + 1;  // causal among the Tq queries
          for (int i = 0; i < d; ++i) query[i] = load(dtype, q, row * d + i);
          double max_score = -std::numeric_limits<double>::infinity();
          for (int64_t j = 0; j < visible; ++j) {
            double dot = 0;
            for (int i = 0; i < d; ++i) dot += query[i] * keys[j * d + i];
            scores[j] = dot * softmax_scale;
            max_score = scores[j] > max_score ? scores[j] : max_score;
          }
          double sum = 0;
          for (int i = 0; i < d; ++i) acc[i] = 0;
          for (int64_t j = 0; j < visible; ++j) {
            const double p = std::exp(scores[j] - max_score);
            sum += p;
            for (int i = 0; i < d; ++i) acc[i] += p * values[j * d + i];
          }
          for (int i = 0; i < d; ++i) store(dtype, out, row * d + i, static_cast<float>(acc[i] / sum));
          if (lse) lse[row] = static_cast<float>(max_score + std::log(sum));
        }
      }
    }
  }
  return Status::Ok();
}

}  // namespace vecinfer::cpu
