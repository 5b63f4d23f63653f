// Helpers shared by the CPU reference implementations and the CUDA kernels.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define VECINFER_HD __host__ __device__ __forceinline__
#else
#define VECINFER_HD inline
#endif

namespace vecinfer::detail {

// Entry of a per-head table for `head` (see "Per-head tables" in types.h).
VECINFER_HD int64_t table_row(int64_t head, int64_t num_heads, int64_t table_rows) {
  if (table_rows == 1) return 0;  // the common cases skip a 64-bit division
  if (table_rows == num_heads) return head;
  return head / (num_heads / table_rows);
}

// Code j of a packed row (see "Code layout" in types.h). Reads only the bytes that hold the code.
VECINFER_HD uint32_t read_code(const uint8_t* row, int j, int code_bits) {
  const int bit = j * code_bits;
  const int first = bit >> 3;
  const int last = (bit + code_bits - 1) >> 3;
  uint32_t window = 0;
  for (int b = first; b <= last; ++b) window |= uint32_t{row[b]} << (8 * (b - first));
  return (window >> (bit & 7)) & ((1u << code_bits) - 1u);
}

// Byte `byte_index` of a packed row, assembled from the codes that overlap it.
VECINFER_HD uint8_t pack_byte(const uint16_t* codes, int byte_index, int code_bits) {
  uint32_t out = 0;
  int filled = 0;
  while (filled < 8) {
    const int bit = 8 * byte_index + filled;
    const int j = bit / code_bits;
    const int offset = bit - j * code_bits;
    const int take = (code_bits - offset) < (8 - filled) ? (code_bits - offset) : (8 - filled);
    out |= ((uint32_t{codes[j]} >> offset) & ((1u << take) - 1u)) << filled;
    filled += take;
  }
  return static_cast<uint8_t>(out);
}

// 1 / sqrt(D) for the orthonormal Walsh-Hadamard transform.
VECINFER_HD constexpr float hadamard_norm(int head_dim) {
  return head_dim == 64 ? 0.125f : head_dim == 128 ? 0.08838834764831845f : 0.0625f;
}

}  // namespace vecinfer::detail
