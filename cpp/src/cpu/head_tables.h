// One KV head's entries of per-head tables, as one-row tables, so one head's rows can go through
// the row ops on their own (CPU implementations).
#pragma once

#include "../common.h"
#include "vecinfer/types.h"

namespace vecinfer::cpu {

inline Codebook head_codebook(const Codebook& cb, int64_t h, int64_t num_kv_heads) {
  Codebook one = cb;
  one.centroids += detail::table_row(h, num_kv_heads, cb.num_codebooks) * cb.num_centroids() * cb.sub_dim;
  one.num_codebooks = 1;
  return one;
}

inline Transform head_transform(const Transform& t, int64_t h, int64_t num_kv_heads, int d) {
  Transform one = t;
  const int64_t row = detail::table_row(h, num_kv_heads, t.table_rows);
  if (one.scale) one.scale += row * d;
  if (one.mean) one.mean += row * d;
  one.table_rows = 1;
  return one;
}

// The value transform of head h: subtract the value mean (null: identity).
inline Transform value_transform(const float* value_mean, int64_t value_mean_rows, int64_t h, int64_t num_kv_heads,
                                 int d) {
  Transform t;
  if (value_mean) t.mean = value_mean + detail::table_row(h, num_kv_heads, value_mean_rows) * d;
  return t;
}

}  // namespace vecinfer::cpu
