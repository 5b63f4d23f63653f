// The CUDA entry points of a build without CUDA: each reports that the kernels are not compiled in.
#include "vecinfer/attention.h"
#include "vecinfer/kept.h"
#include "vecinfer/ops.h"
#include "vecinfer/paged.h"

namespace vecinfer::cuda {
namespace {
Status not_built() {
  return {StatusCode::kNotBuiltWithCuda,
          "vecinfer was built without CUDA (nvcc was not found at build time); use CPU tensors "
          "or rebuild with the CUDA toolkit"};
}
}  // namespace

bool built() { return false; }
Status check_device() { return not_built(); }
Status transform(DType, const void*, void*, const RowLayout&, const Transform&, TransformKind, void*) {
  return not_built();
}
Status vq_encode(DType, const void*, uint8_t*, const RowLayout&, const Codebook&, const Transform&, void*) {
  return not_built();
}
Status vq_decode(DType, const uint8_t*, void*, const RowLayout&, const Codebook&, const Transform&, void*) {
  return not_built();
}

Status attention_supports(DType, int64_t, const Codebook&, const Codebook&) { return not_built(); }
size_t attention_workspace_bytes(const AttentionShape&, const CompressedKV&) { return 0; }
Status attention(DType, const void*, void*, float*, const AttentionShape&, const CompressedKV&, float, void*, size_t,
                 void*) {
  return not_built();
}
Status plan_attention(DType, const AttentionShape&, const CompressedKV&, AttentionPlan&) { return not_built(); }
Status run_attention(const AttentionPlan&, const void*, void*, float*, const CompressedKV&, float, void*, size_t,
                     void*) {
  return not_built();
}
Status append_tokens(DType, const AttentionShape&, const TokenBatch&, const CompressedKV&, int64_t, int32_t*, void*) {
  return not_built();
}
Status kept_step(DType, const KeptStep&, void*) { return not_built(); }

}  // namespace vecinfer::cuda
