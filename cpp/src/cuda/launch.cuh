// Dispatch from run-time values to template arguments, and launch plumbing, for the .cu files.
// Only parameters that change layout or unrolling are templates (element type, head_dim,
// sub_dim); everything else is passed at run time.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "vecinfer/status.h"
#include "vecinfer/types.h"

namespace vecinfer::cuda_detail {

// log2 of a paged cache's page size (a power of two: check_attention); 0 for contiguous codes.
inline int page_shift(bool paged, int64_t page_size) {
  int shift = 0;
  while (paged && (int64_t{1} << shift) < page_size) ++shift;
  return shift;
}

template <class F>
Status with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
  }
  return invalid("dtype must be float32, float16 or bfloat16");
}

template <class F>
Status with_head_dim(int head_dim, F&& f) {
  switch (head_dim) {
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
    case 256: return f(std::integral_constant<int, 256>{});
  }
  return unsupported("head_dim (the last dimension) must be 64, 128 or 256");
}

template <class F>
Status with_sub_dim(int sub_dim, F&& f) {
  switch (sub_dim) {
    case 2: return f(std::integral_constant<int, 2>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
  }
  return unsupported("codebook: sub_dim (last dimension) must be 2, 4 or 8");
}

// The codec kernels' three template parameters at once: f(element type tag, D, S).
template <class F>
Status with_codec_shape(DType dtype, int head_dim, int sub_dim, F&& f) {
  return with_dtype(dtype, [&](auto type_tag) {
    return with_head_dim(head_dim, [&](auto dim) {
      return with_sub_dim(sub_dim, [&](auto sub) { return f(type_tag, dim, sub); });
    });
  });
}

inline Status cuda_status(cudaError_t err) {
  if (err == cudaSuccess) return Status::Ok();
  return {StatusCode::kCudaError, cudaGetErrorString(err)};
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Checks shared by the CUDA entry points: layout, transform tables, 16-byte alignment of the
// element tensor and of the tables (they are read with 16-byte loads).
Status check_elements_and_tables(const RowLayout& layout, const Transform& t, TransformKind kind,
                                 const void* elements);

// Checks the current device's architecture; fills its multiprocessor count and the largest
// dynamic shared memory a block may opt into.
Status current_device(int& sm_count, int& max_shared_bytes);

// Checks that a block of `kernel` fits `shared_bytes` of dynamic shared memory on the current
// device and opts the kernel into it when it needs more than the default 48 KB; fills the
// device's multiprocessor count.
template <class Kernel>
Status opt_in_shared_memory(Kernel kernel, size_t shared_bytes, int& sm_count) {
  int max_shared = 0;
  Status s = current_device(sm_count, max_shared);
  if (!s.ok()) return s;
  if (shared_bytes > static_cast<size_t>(max_shared))
    return unsupported("codebook: too large for this GPU's shared memory (lower code_bits)");
  if (shared_bytes > 48 * 1024)
    return cuda_status(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(shared_bytes)));
  return Status::Ok();
}

// A grid that keeps every multiprocessor full (blocks walk tiles with a grid-stride loop),
// no larger than the number of tiles. Raises the kernel's dynamic shared memory limit when needed.
template <class Kernel>
Status launch_grid(Kernel kernel, int64_t num_tiles, int threads, size_t shared_bytes, int& grid) {
  int sm_count = 0;
  Status s = opt_in_shared_memory(kernel, shared_bytes, sm_count);
  if (!s.ok()) return s;
  int blocks_per_sm = 0;
  s = cuda_status(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, threads,
                                                                shared_bytes));
  if (!s.ok()) return s;
  const int64_t full = int64_t{sm_count} * (blocks_per_sm > 0 ? blocks_per_sm : 1);
  grid = static_cast<int>(num_tiles < full ? num_tiles : full);
  return Status::Ok();
}

}  // namespace vecinfer::cuda_detail
