// Plain descriptions of the data the ops read and write. No CUDA or Python types appear here, so
// C++ users and other frameworks can include these headers directly.
//
// Rows. Every op works on rows of `head_dim` contiguous elements laid out as a tensor
// [..., num_heads, tokens_per_head, head_dim] (row-major, contiguous). Row r belongs to head
// (r / tokens_per_head) % num_heads. A tensor of fewer than three dimensions has num_heads = 1.
//
// Per-head tables. Smoothing scales, means and codebooks are tables with `table_rows` entries,
// where num_heads is a multiple of table_rows; head h reads entry h / (num_heads / table_rows).
// So a [num_kv_heads, head_dim] scale table serves keys (num_heads = num_kv_heads) and queries
// (num_heads = num_kv_heads * group, query head h uses KV head h / group, as in GQA), and a
// codebook table of one entry is shared by all heads of a layer.
//
// Code layout (what the fused attention kernel reads). A row of head_dim elements is split into
// head_dim / sub_dim sub-vectors; sub-vector j (elements [j*sub_dim, (j+1)*sub_dim)) is replaced by
// the index of a centroid, a code of code_bits bits. The codes of a row form one little-endian bit
// stream: code j occupies bits [j*code_bits, (j+1)*code_bits) of the row, bit i of the stream
// being bit (i % 8) of byte i / 8. A row therefore takes exactly
//   code_row_bytes = head_dim / sub_dim * code_bits / 8
// bytes (a whole number for every supported shape) and rows follow each other with no padding:
// codes of a [..., H, T, D] tensor are a uint8 tensor [..., H, T, code_row_bytes]. With
// code_bits = 8 each byte is one code; with 12 bits two codes share three bytes.
//
// Codebooks are float32 tables [num_codebooks, 2^code_bits, sub_dim] (centroid c of codebook g
// at offset (g * 2^code_bits + c) * sub_dim), num_codebooks being 1 (per layer) or the number of
// KV heads (per head). The same codebook serves every sub-vector position of a row.
#pragma once

#include <cstdint>

namespace vecinfer {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct RowLayout {
  int64_t num_rows = 0;
  int32_t head_dim = 0;
  int64_t num_heads = 1;
  int64_t tokens_per_head = 0;
};

// Smoothing and rotation, with lambda = scale and mu = mean, H the orthonormal Walsh-Hadamard matrix:
//   kKey:        y = H((x - mu) / lambda)
//   kQuery:      y = H(x * lambda)              (mean must be null)
//   kKeyInverse: x = lambda * H(y) + mu         (undoes kKey; H is its own inverse)
// so that  transform(q, kQuery) . transform(k, kKey) = q . k - q . mu  for every key: the shift
// is the same for all keys of a query, and softmax ignores it. A null scale means lambda = 1, a
// null mean mu = 0, hadamard = false skips H.
enum class TransformKind : int { kKey = 0, kQuery = 1, kKeyInverse = 2 };

struct Transform {
  const float* scale = nullptr;  // [table_rows, head_dim], finite and > 0
  const float* mean = nullptr;   // [table_rows, head_dim]
  int64_t table_rows = 1;
  bool hadamard = false;

  bool is_identity() const { return scale == nullptr && mean == nullptr && !hadamard; }
};

struct Codebook {
  const float* centroids = nullptr;  // [num_codebooks, 2^code_bits, sub_dim]
  int64_t num_codebooks = 1;
  int32_t sub_dim = 0;    // 2, 4 or 8
  int32_t code_bits = 0;  // 4 to 12

  int64_t num_centroids() const { return int64_t{1} << code_bits; }
};

}  // namespace vecinfer
