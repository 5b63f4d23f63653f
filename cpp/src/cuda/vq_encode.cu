// VQ encode, optionally fused behind the key transform: one read of the keys, codes out.
//
// Each lane holds 8 transformed elements, i.e. 8 / S sub-vectors, and scans the whole codebook
// for each of them. All lanes read the same centroid at the same time (a shared-memory
// broadcast); the distance is ||c||^2 - 2 x.c with ||c||^2 precomputed, S FMAs per centroid and
// sub-vector. The codes of a tile are collected in shared memory and written as packed bytes.
#include "launch.cuh"
#include "nearest.cuh"
#include "row_ops.cuh"
#include "vecinfer/ops.h"

namespace vecinfer {
namespace cuda_detail {
namespace {

// Shared memory: centroids [C][S] floats, norms [C] floats, then the tile's codes [rows][D / S].
template <typename T, int D, int S>
__global__ void __launch_bounds__(kThreads) encode_kernel(const T* __restrict__ x, uint8_t* __restrict__ codes,
                                                          RowLayout layout, Codebook cb, Transform t,
                                                          TileWalk<D> walk, int row_bytes) {
  constexpr int kSubs = 8 / S;
  constexpr int kCodesPerRow = D / S;
  extern __shared__ float4 shared[];
  const int num_centroids = 1 << cb.code_bits;
  float* centroids = reinterpret_cast<float*>(shared);
  float* norms = centroids + num_centroids * S;
  uint16_t* tile_codes = reinterpret_cast<uint16_t*>(norms + num_centroids);

  const int local_row = threadIdx.x / RowTile<D>::kThreadsPerRow;
  const int lane = threadIdx.x % RowTile<D>::kThreadsPerRow;
  int64_t loaded = -1;
  for (int64_t tile = blockIdx.x; tile < walk.num_tiles; tile += gridDim.x) {
    int64_t first_row;
    int rows;
    walk.locate(tile, first_row, rows);
    // With several codebooks the walk keeps each tile inside one head.
    const int64_t book =
        cb.num_codebooks == 1 ? 0 : detail::table_row(head_of(layout, first_row), layout.num_heads, cb.num_codebooks);
    if (book != loaded) {  // uniform over the block: every thread sees the same tile
      __syncthreads();
      stage_codebook<S>(centroids, norms, cb.centroids + book * num_centroids * S, num_centroids, kThreads);
      loaded = book;
      __syncthreads();
    }

    const bool valid = local_row < rows;
    const int64_t row = valid ? first_row + local_row : first_row;
    float v[8] = {};
    if (valid) load8(x + row * D + lane * 8, v);
    transform_row<D>(v, t, TransformKind::kKey,
                     transform_table_row(layout, t, row), lane * 8);
    int best_index[kSubs];
    float best[kSubs];
    nearest_centroids<S>(v, centroids, norms, 0, num_centroids, best_index, best);
#pragma unroll
    for (int k = 0; k < kSubs; ++k)
      tile_codes[local_row * kCodesPerRow + lane * kSubs + k] = static_cast<uint16_t>(best_index[k]);
    __syncthreads();
    // The tile's rows are consecutive in memory, so its packed bytes are one contiguous range.
    uint8_t* out = codes + first_row * row_bytes;
    for (int i = threadIdx.x; i < rows * row_bytes; i += kThreads) {
      const int r = i / row_bytes;
      out[i] = detail::pack_byte(tile_codes + r * kCodesPerRow, i - r * row_bytes, cb.code_bits);
    }
    __syncthreads();
  }
}

}  // namespace
}  // namespace cuda_detail

namespace cuda {

Status vq_encode(DType dtype, const void* x, uint8_t* codes, const RowLayout& layout, const Codebook& cb,
                 const Transform& t, void* stream) {
  using namespace cuda_detail;
  Status s = check_elements_and_tables(layout, t, TransformKind::kKey, x);
  if (s.ok()) s = check_codebook(layout, cb);
  if (!s.ok()) return s;
  if (codes == nullptr) return invalid("codes: null pointer");
  const int row_bytes = static_cast<int>(code_row_bytes(layout.head_dim, cb.sub_dim, cb.code_bits));
  return with_codec_shape(dtype, layout.head_dim, cb.sub_dim, [&](auto type_tag, auto dim, auto sub) {
    using T = decltype(type_tag);
    constexpr int D = decltype(dim)::value;
    constexpr int S = decltype(sub)::value;
    const TileWalk<D> walk(layout, /*per_head_tiles=*/cb.num_codebooks > 1);
    const size_t shared_bytes = cb.num_centroids() * (S + 1) * sizeof(float) +
                                RowTile<D>::kRows * (D / S) * sizeof(uint16_t);
    auto kernel = encode_kernel<T, D, S>;
    int grid = 0;
    Status ls = launch_grid(kernel, walk.num_tiles, kThreads, shared_bytes, grid);
    if (!ls.ok()) return ls;
    kernel<<<grid, kThreads, shared_bytes, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(x), codes, layout, cb, t, walk, row_bytes);
    return cuda_status(cudaGetLastError());
  });
}

}  // namespace cuda
}  // namespace vecinfer
