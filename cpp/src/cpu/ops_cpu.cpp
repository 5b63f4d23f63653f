// CPU reference implementations: plain loops in float32, one row at a time.
#include <cmath>
#include <limits>
#include <vector>

#include "../common.h"
#include "decode.h"
#include "half_float.h"
#include "vecinfer/ops.h"

namespace vecinfer::cpu {
namespace {

void load_row(DType dtype, const void* base, int64_t row, int d, float* out) {
  const int64_t offset = row * d;
  switch (dtype) {
    case DType::kFloat32:
      for (int i = 0; i < d; ++i) out[i] = static_cast<const float*>(base)[offset + i];
      break;
    case DType::kFloat16:
      for (int i = 0; i < d; ++i) out[i] = half_to_float(static_cast<const uint16_t*>(base)[offset + i]);
      break;
    case DType::kBFloat16:
      for (int i = 0; i < d; ++i) out[i] = bf16_to_float(static_cast<const uint16_t*>(base)[offset + i]);
      break;
  }
}

void store_row(DType dtype, void* base, int64_t row, int d, const float* in) {
  const int64_t offset = row * d;
  switch (dtype) {
    case DType::kFloat32:
      for (int i = 0; i < d; ++i) static_cast<float*>(base)[offset + i] = in[i];
      break;
    case DType::kFloat16:
      for (int i = 0; i < d; ++i) static_cast<uint16_t*>(base)[offset + i] = float_to_half(in[i]);
      break;
    case DType::kBFloat16:
      for (int i = 0; i < d; ++i) static_cast<uint16_t*>(base)[offset + i] = float_to_bf16(in[i]);
      break;
  }
}

Status check_dtype(DType dtype) {
  if (dtype != DType::kFloat32 && dtype != DType::kFloat16 && dtype != DType::kBFloat16)
    return invalid("dtype must be float32, float16 or bfloat16");
  return Status::Ok();
}

// In-place orthonormal Walsh-Hadamard transform (Sylvester order).
void hadamard(float* v, int d) {
  for (int h = 1; h < d; h <<= 1)
    for (int i = 0; i < d; i += 2 * h)
      for (int j = i; j < i + h; ++j) {
        const float a = v[j], b = v[j + h];
        v[j] = a + b;
        v[j + h] = a - b;
      }
  const float norm = detail::hadamard_norm(d);
  for (int i = 0; i < d; ++i) v[i] *= norm;
}

void apply_transform(float* v, int d, const Transform& t, TransformKind kind, int64_t table_row) {
  const float* scale = t.scale ? t.scale + table_row * d : nullptr;
  const float* mean = t.mean ? t.mean + table_row * d : nullptr;
  switch (kind) {
    case TransformKind::kKey:
      for (int i = 0; i < d; ++i) {
        if (mean) v[i] -= mean[i];
        if (scale) v[i] /= scale[i];
      }
      if (t.hadamard) hadamard(v, d);
      break;
    case TransformKind::kQuery:
      if (scale)
        for (int i = 0; i < d; ++i) v[i] *= scale[i];
      if (t.hadamard) hadamard(v, d);
      break;
    case TransformKind::kKeyInverse:
      if (t.hadamard) hadamard(v, d);
      for (int i = 0; i < d; ++i) {
        if (scale) v[i] *= scale[i];
        if (mean) v[i] += mean[i];
      }
      break;
  }
}

int64_t head_of(const RowLayout& layout, int64_t row) {
  return (row / layout.tokens_per_head) % layout.num_heads;
}

}  // namespace

Status transform(DType dtype, const void* in, void* out, const RowLayout& layout,
                 const Transform& t, TransformKind kind) {
  Status s = check_dtype(dtype);
  if (s.ok()) s = check_layout(layout);
  if (s.ok()) s = check_transform(layout, t, kind);
  if (s.ok()) s = check_in_out(dtype, in, out, layout);
  if (s.ok()) s = check_transform_values(layout, t);
  if (!s.ok()) return s;
  const int d = layout.head_dim;
#pragma omp parallel
  {
    std::vector<float> v(d);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < layout.num_rows; ++row) {
      load_row(dtype, in, row, d, v.data());
      apply_transform(v.data(), d, t, kind, detail::table_row(head_of(layout, row), layout.num_heads, t.table_rows));
      store_row(dtype, out, row, d, v.data());
    }
  }
  return Status::Ok();
}

Status vq_encode(DType dtype, const void* x, uint8_t* codes, const RowLayout& layout,
                 const Codebook& cb, const Transform& t) {
  Status s = check_dtype(dtype);
  if (s.ok()) s = check_layout(layout);
  if (s.ok()) s = check_codebook(layout, cb);
  if (s.ok()) s = check_transform(layout, t, TransformKind::kKey);
  if (s.ok() && (x == nullptr || codes == nullptr)) s = invalid("x/codes: null pointer");
  if (s.ok()) s = check_transform_values(layout, t);  // the values last: every pointer is valid now
  if (s.ok()) s = check_codebook_values(cb);
  if (!s.ok()) return s;
  const int d = layout.head_dim, sub = cb.sub_dim;
  const int num_sub = d / sub;
  const int64_t num_centroids = cb.num_centroids();
  const int64_t row_bytes = code_row_bytes(d, sub, cb.code_bits);
  // dist(x, c) = |x|^2 - 2 x.c + |c|^2, and |x|^2 is the same for all candidates of a sub-vector.
  // In double: products of floats are exact there and no finite input overflows.
  std::vector<double> centroids(cb.centroids, cb.centroids + cb.num_codebooks * num_centroids * sub);
  std::vector<double> norms(cb.num_codebooks * num_centroids);
  for (int64_t c = 0; c < static_cast<int64_t>(norms.size()); ++c) {
    double n = 0;
    for (int e = 0; e < sub; ++e) n += centroids[c * sub + e] * centroids[c * sub + e];
    norms[c] = n;
  }
  bool finite = true;
#pragma omp parallel reduction(&& : finite)
  {
    std::vector<float> v(d);
    std::vector<uint16_t> row_codes(num_sub);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < layout.num_rows; ++row) {
      const int64_t head = head_of(layout, row);
      load_row(dtype, x, row, d, v.data());
      apply_transform(v.data(), d, t, TransformKind::kKey, detail::table_row(head, layout.num_heads, t.table_rows));
      for (int i = 0; i < d; ++i) finite = finite && std::isfinite(v[i]);
      const int64_t book = detail::table_row(head, layout.num_heads, cb.num_codebooks);
      const double* book_centroids = centroids.data() + book * num_centroids * sub;
      const double* book_norms = norms.data() + book * num_centroids;
      for (int j = 0; j < num_sub; ++j) {
        const float* xs = v.data() + j * sub;
        double best = std::numeric_limits<double>::infinity();
        int64_t best_index = 0;
        for (int64_t c = 0; c < num_centroids; ++c) {
          double dot = 0;
          for (int e = 0; e < sub; ++e) dot += double{xs[e]} * book_centroids[c * sub + e];
          const double dist = book_norms[c] - 2 * dot;
          if (dist < best) {
            best = dist;
            best_index = c;
          }
        }
        row_codes[j] = static_cast<uint16_t>(best_index);
      }
      for (int64_t b = 0; b < row_bytes; ++b)
        codes[row * row_bytes + b] = detail::pack_byte(row_codes.data(), static_cast<int>(b), cb.code_bits);
    }
  }
  if (!finite) return invalid("x: contains NaN or infinity (or its transform overflows); codes are not valid");
  return Status::Ok();
}

Status vq_decode(DType dtype, const uint8_t* codes, void* out, const RowLayout& layout,
                 const Codebook& cb, const Transform& t) {
  Status s = check_dtype(dtype);
  if (s.ok()) s = check_layout(layout);
  if (s.ok()) s = check_codebook(layout, cb);
  if (s.ok()) s = check_transform(layout, t, TransformKind::kKeyInverse);
  if (s.ok() && (codes == nullptr || out == nullptr)) s = invalid("codes/out: null pointer");
  if (s.ok()) s = check_transform_values(layout, t);  // the values last: every pointer is valid now
  if (s.ok()) s = check_codebook_values(cb);
  if (!s.ok()) return s;
  decode_rows(dtype, codes, out, layout, cb, t);
  return Status::Ok();
}

void decode_rows(DType dtype, const uint8_t* codes, void* out, const RowLayout& layout, const Codebook& cb,
                 const Transform& t) {
  const int d = layout.head_dim, sub = cb.sub_dim;
  const int64_t num_centroids = cb.num_centroids();
  const int64_t row_bytes = code_row_bytes(d, sub, cb.code_bits);
#pragma omp parallel
  {
    std::vector<float> v(d);
#pragma omp for schedule(static)
    for (int64_t row = 0; row < layout.num_rows; ++row) {
      const int64_t head = head_of(layout, row);
      const float* centroids =
          cb.centroids + detail::table_row(head, layout.num_heads, cb.num_codebooks) * num_centroids * sub;
      for (int j = 0; j < d / sub; ++j) {
        const uint32_t code = detail::read_code(codes + row * row_bytes, j, cb.code_bits);
        for (int e = 0; e < sub; ++e) v[j * sub + e] = centroids[code * sub + e];
      }
      apply_transform(v.data(), d, t, TransformKind::kKeyInverse,
                      detail::table_row(head, layout.num_heads, t.table_rows));
      store_row(dtype, out, row, d, v.data());
    }
  }
}

}  // namespace vecinfer::cpu
