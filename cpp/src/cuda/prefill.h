// The long-query attention kernel's host side (prefill.cu), called by the public entry points in
// attention.cu for calls with more than kMaxDecodeQueries queries per sequence.
#pragma once

#include "vecinfer/attention.h"

namespace vecinfer::cuda_detail::prefill {

// Queries per sequence up to which the decode kernel runs; longer blocks run the prefill kernel.
constexpr int64_t kMaxDecodeQueries = 16;

// Whether a call runs this kernel: long query blocks, and every ragged call (attention.h).
inline bool runs(const AttentionShape& shape) {
  return shape.num_queries > kMaxDecodeQueries || shape.query_indptr != nullptr || shape.total_queries > 0;
}

// Whether the kernel takes these codebook shapes.
Status supports(const Codebook& key, const Codebook& value);
// Fills the schedule fields of `plan` (device, warps, splits, workspace_bytes) for these shapes;
// the arguments have been checked.
Status plan(DType dtype, const AttentionShape& shape, const CompressedKV& kv, cuda::AttentionPlan& plan);
// Launches with a plan made by `plan` (plan.dtype and plan.shape set).
Status launch(const cuda::AttentionPlan& plan, const void* q, void* out, float* lse, const CompressedKV& kv,
              float softmax_scale, void* workspace, size_t workspace_bytes, void* stream);

}  // namespace vecinfer::cuda_detail::prefill
