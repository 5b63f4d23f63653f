#include <cstdlib>

#include "launch.cuh"
#include "vecinfer/ops.h"

namespace vecinfer {
namespace cuda_detail {

Status current_device(int& sm_count, int& max_shared_bytes) {
  int device = 0, major = 0;
  Status s = cuda_status(cudaGetDevice(&device));
  if (s.ok()) s = cuda_status(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (!s.ok()) return s;
  if (major < 8)
    return {StatusCode::kDeviceUnsupported,
            "this GPU is older than compute capability 8.0 (Ampere); vecinfer's kernels need 8.0+"};
  s = cuda_status(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  if (s.ok())
    s = cuda_status(cudaDeviceGetAttribute(&max_shared_bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  // VECINFER_MAX_SHARED_BYTES lowers the budget, to run a smaller GPU's plan on a larger one (the
  // tests run the A100's 166,912 bytes on an H200).
  static const long cap = [] {
    const char* v = std::getenv("VECINFER_MAX_SHARED_BYTES");
    return v ? std::strtol(v, nullptr, 10) : 0L;
  }();
  if (cap > 0 && cap < max_shared_bytes) max_shared_bytes = static_cast<int>(cap);
  return s;
}

}  // namespace cuda_detail

namespace cuda {

bool built() { return true; }

Status check_device() {
  int sm_count = 0, max_shared = 0;
  return cuda_detail::current_device(sm_count, max_shared);
}

}  // namespace cuda
}  // namespace vecinfer
