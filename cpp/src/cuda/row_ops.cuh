// Device building blocks shared by the transform, encode and decode kernels.
//
// A row of D elements is held by D / 8 consecutive lanes of a warp, 8 elements per lane
// (one 16-byte access for 16-bit types, two for float32), lane t holding elements [8t, 8t+8).
// The Walsh-Hadamard transform then runs in registers: three butterfly stages inside each lane,
// log2(D / 8) stages across lanes with warp shuffles. A block of kThreads threads covers
// kThreads * 8 / D rows ("a tile").
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../common.h"
#include "vecinfer/types.h"

namespace vecinfer::cuda_detail {

constexpr int kThreads = 256;

template <int D>
struct RowTile {
  static constexpr int kThreadsPerRow = D / 8;
  static constexpr int kRows = kThreads / kThreadsPerRow;
  static_assert(D == 64 || D == 128 || D == 256, "head_dim must be 64, 128 or 256");
};

// Walks tiles of RowTile<D>::kRows consecutive rows. With per_head_tiles the rows of each head
// (tokens_per_head of them) are split into tiles of their own, so a per-tile table (a codebook of
// one head) is uniform over a tile; otherwise tiles run over all rows, and only per-row tables
// (scales, means: looked up with head_of) are used.
template <int D>
struct TileWalk {
  int64_t segment_rows;
  int64_t tiles_per_segment;
  int64_t num_tiles;

  __host__ TileWalk(const RowLayout& layout, bool per_head_tiles)
      : segment_rows(per_head_tiles ? layout.tokens_per_head : layout.num_rows),
        tiles_per_segment((segment_rows + RowTile<D>::kRows - 1) / RowTile<D>::kRows),
        num_tiles(layout.num_rows / segment_rows * tiles_per_segment) {}

  // For tile `tile`: its first row and how many of its rows exist.
  __device__ void locate(int64_t tile, int64_t& first_row, int& rows) const {
    const int64_t segment = tile / tiles_per_segment;
    const int64_t offset = (tile - segment * tiles_per_segment) * RowTile<D>::kRows;
    first_row = segment * segment_rows + offset;
    const int64_t left = segment_rows - offset;
    rows = left < RowTile<D>::kRows ? static_cast<int>(left) : RowTile<D>::kRows;
  }
};

__device__ __forceinline__ int64_t head_of(const RowLayout& layout, int64_t row) {
  if (layout.num_heads == 1) return 0;
  if (row <= INT32_MAX && layout.tokens_per_head <= INT32_MAX && layout.num_heads <= INT32_MAX)  // cheaper division
    return static_cast<uint32_t>(row) / static_cast<uint32_t>(layout.tokens_per_head) %
           static_cast<uint32_t>(layout.num_heads);
  return (row / layout.tokens_per_head) % layout.num_heads;
}

// Entry of the transform's per-head tables for `row` (0 when it has none: nothing is looked up).
__device__ __forceinline__ int64_t transform_table_row(const RowLayout& layout, const Transform& t, int64_t row) {
  if (t.scale == nullptr && t.mean == nullptr) return 0;
  return detail::table_row(head_of(layout, row), layout.num_heads, t.table_rows);
}

__device__ __forceinline__ void load8(const float* p, float (&v)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

__device__ __forceinline__ void load8(const __half* p, float (&v)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    v[2 * i] = f.x, v[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void load8(const __nv_bfloat16* p, float (&v)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    v[2 * i] = f.x, v[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void store8(float* p, const float (&v)[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

__device__ __forceinline__ void store8(__half* p, const float (&v)[8]) {
  uint4 raw;
  __half2* h = reinterpret_cast<__half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
  *reinterpret_cast<uint4*>(p) = raw;
}

__device__ __forceinline__ void store8(__nv_bfloat16* p, const float (&v)[8]) {
  uint4 raw;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
  *reinterpret_cast<uint4*>(p) = raw;
}

// Orthonormal Walsh-Hadamard transform of the row held by this lane's group (Sylvester order,
// the same butterfly order as the CPU reference). Every lane of the warp must call it.
template <int D>
__device__ __forceinline__ void hadamard_row(float (&v)[8]) {
#pragma unroll
  for (int h = 1; h < 8; h <<= 1)
#pragma unroll
    for (int i = 0; i < 8; ++i)
      if ((i & h) == 0) {
        const float a = v[i], b = v[i + h];
        v[i] = a + b;
        v[i + h] = a - b;
      }
  const int lane = threadIdx.x % RowTile<D>::kThreadsPerRow;
#pragma unroll
  for (int m = 1; m < RowTile<D>::kThreadsPerRow; m <<= 1) {
    const bool upper = (lane & m) != 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float other = __shfl_xor_sync(0xffffffffu, v[i], m);
      v[i] = upper ? other - v[i] : v[i] + other;
    }
  }
  constexpr float norm = detail::hadamard_norm(D);
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] *= norm;
}

// Applies `kind` (see TransformKind) to this lane's 8 elements at column col0 of a row whose
// per-head tables sit at entry `table_row`. Every lane of the warp must call it.
template <int D>
__device__ __forceinline__ void transform_row(float (&v)[8], const Transform& t, TransformKind kind,
                                              int64_t table_row, int col0) {
  float scale[8], mean[8];
  if (t.scale) load8(t.scale + table_row * D + col0, scale);
  if (t.mean) load8(t.mean + table_row * D + col0, mean);
  if (kind == TransformKind::kKey) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (t.mean) v[i] -= mean[i];
      if (t.scale) v[i] = __fdividef(v[i], scale[i]);  // scales are >= 1e-3, far from the fast path's limits
    }
    if (t.hadamard) hadamard_row<D>(v);
  } else if (kind == TransformKind::kQuery) {
    if (t.scale)
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] *= scale[i];
    if (t.hadamard) hadamard_row<D>(v);
  } else {
    if (t.hadamard) hadamard_row<D>(v);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (t.scale) v[i] *= scale[i];
      if (t.mean) v[i] += mean[i];
    }
  }
}

}  // namespace vecinfer::cuda_detail
