// VQ decode, optionally fused with the inverse key transform: packed codes in, vectors out.
// Not on the attention hot path (the fused attention kernel reads codes directly); used to
// dequantize a cache and as the kernel-side check of the code layout.
#include "launch.cuh"
#include "row_ops.cuh"
#include "vecinfer/ops.h"

namespace vecinfer {
namespace cuda_detail {
namespace {

// Shared memory: the centroids [C][S] floats of the codebook the current tile uses.
template <typename T, int D, int S>
__global__ void __launch_bounds__(kThreads) decode_kernel(const uint8_t* __restrict__ codes, T* __restrict__ out,
                                                          RowLayout layout, Codebook cb, Transform t,
                                                          TileWalk<D> walk, int row_bytes) {
  constexpr int kSubs = 8 / S;
  extern __shared__ float4 shared[];
  float* centroids = reinterpret_cast<float*>(shared);
  const int num_centroids = 1 << cb.code_bits;
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
    if (book != loaded) {  // uniform over the block
      __syncthreads();
      const float* src = cb.centroids + book * num_centroids * S;
      for (int i = threadIdx.x; i < num_centroids * S; i += kThreads) centroids[i] = src[i];
      loaded = book;
      __syncthreads();
    }
    const bool valid = local_row < rows;
    const int64_t row = valid ? first_row + local_row : first_row;
    float v[8] = {};
    if (valid) {
      const uint8_t* row_codes = codes + row * row_bytes;
#pragma unroll
      for (int k = 0; k < kSubs; ++k) {
        const uint32_t code = detail::read_code(row_codes, lane * kSubs + k, cb.code_bits);
#pragma unroll
        for (int e = 0; e < S; ++e) v[k * S + e] = centroids[code * S + e];
      }
    }
    transform_row<D>(v, t, TransformKind::kKeyInverse,
                     transform_table_row(layout, t, row), lane * 8);
    if (valid) store8(out + row * D + lane * 8, v);
  }
}

}  // namespace
}  // namespace cuda_detail

namespace cuda {

Status vq_decode(DType dtype, const uint8_t* codes, void* out, const RowLayout& layout, const Codebook& cb,
                 const Transform& t, void* stream) {
  using namespace cuda_detail;
  Status s = check_elements_and_tables(layout, t, TransformKind::kKeyInverse, out);
  if (s.ok()) s = check_codebook(layout, cb);
  if (!s.ok()) return s;
  if (codes == nullptr) return invalid("codes: null pointer");
  const int row_bytes = static_cast<int>(code_row_bytes(layout.head_dim, cb.sub_dim, cb.code_bits));
  return with_codec_shape(dtype, layout.head_dim, cb.sub_dim, [&](auto type_tag, auto dim, auto sub) {
    using T = decltype(type_tag);
    constexpr int D = decltype(dim)::value;
    constexpr int S = decltype(sub)::value;
    const TileWalk<D> walk(layout, /*per_head_tiles=*/cb.num_codebooks > 1);
    const size_t shared_bytes = cb.num_centroids() * S * sizeof(float);
    auto kernel = decode_kernel<T, D, S>;
    int grid = 0;
    Status ls = launch_grid(kernel, walk.num_tiles, kThreads, shared_bytes, grid);
    if (!ls.ok()) return ls;
    kernel<<<grid, kThreads, shared_bytes, static_cast<cudaStream_t>(stream)>>>(
        codes, static_cast<T*>(out), layout, cb, t, walk, row_bytes);
    return cuda_status(cudaGetLastError());
  });
}

}  // namespace cuda
}  // namespace vecinfer
