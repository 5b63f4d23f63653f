// Smoothing + Walsh-Hadamard transform kernel (op 1 and op 2): one read, one write per element.
#include "launch.cuh"
#include "row_ops.cuh"
#include "vecinfer/ops.h"

namespace vecinfer {
namespace cuda_detail {
namespace {

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) transform_kernel(const T* in, T* out,
                                                             RowLayout layout, Transform t, TransformKind kind,
                                                             TileWalk<D> walk) {
  const int local_row = threadIdx.x / RowTile<D>::kThreadsPerRow;
  const int col0 = threadIdx.x % RowTile<D>::kThreadsPerRow * 8;
  for (int64_t tile = blockIdx.x; tile < walk.num_tiles; tile += gridDim.x) {
    int64_t first_row;
    int rows;
    walk.locate(tile, first_row, rows);
    const bool valid = local_row < rows;
    const int64_t row = valid ? first_row + local_row : first_row;
    float v[8] = {};
    if (valid) load8(in + row * D + col0, v);
    transform_row<D>(v, t, kind, transform_table_row(layout, t, row), col0);
    if (valid) store8(out + row * D + col0, v);
  }
}

}  // namespace

Status check_elements_and_tables(const RowLayout& layout, const Transform& t, TransformKind kind,
                                 const void* elements) {
  Status s = check_layout(layout);
  if (s.ok()) s = check_transform(layout, t, kind);
  if (!s.ok()) return s;
  if (elements == nullptr) return invalid("input/output: null pointer");
  if (!aligned16(elements)) return invalid("input/output: the data pointer must be 16-byte aligned");
  if (!aligned16(t.scale) || !aligned16(t.mean))
    return invalid("scale/mean: the data pointer must be 16-byte aligned");
  return Status::Ok();
}

}  // namespace cuda_detail

namespace cuda {

Status transform(DType dtype, const void* in, void* out, const RowLayout& layout, const Transform& t,
                 TransformKind kind, void* stream) {
  using namespace cuda_detail;
  Status s = check_elements_and_tables(layout, t, kind, in);
  if (s.ok()) s = check_elements_and_tables(layout, t, kind, out);
  if (s.ok()) s = check_in_out(dtype, in, out, layout);
  if (!s.ok()) return s;
  return with_dtype(dtype, [&](auto type_tag) {
    using T = decltype(type_tag);
    return with_head_dim(layout.head_dim, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      const TileWalk<D> walk(layout, /*per_head_tiles=*/false);
      auto kernel = transform_kernel<T, D>;
      int grid = 0;
      Status ls = launch_grid(kernel, walk.num_tiles, kThreads, 0, grid);
      if (!ls.ok()) return ls;
      kernel<<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
          static_cast<const T*>(in), static_cast<T*>(out), layout, t, kind, walk);
      return cuda_status(cudaGetLastError());
    });
  });
}

}  // namespace cuda
}  // namespace vecinfer
