// Public entry points of the fused attention: argument checks, then dispatch to the generated
// (element type, head_dim) slices (attention_instance.cuh).
#include "attention_run.cuh"
#include "prefill.h"
#include "vecinfer/attention.h"
#include "vecinfer/ops.h"

namespace vecinfer {
namespace cuda_detail::attn {

Status run_f16_d64(Request& r);
Status run_f16_d128(Request& r);
Status run_f16_d256(Request& r);
Status run_bf16_d64(Request& r);
Status run_bf16_d128(Request& r);
Status run_bf16_d256(Request& r);

namespace {

// What the kernel is built for: element type, queries per sequence, codebook shapes.
Status check_supported(DType dtype, int64_t num_queries, const Codebook& key, const Codebook& value) {
  if (dtype != DType::kFloat16 && dtype != DType::kBFloat16)
    return unsupported("q: the CUDA kernel takes float16 or bfloat16 (float32 runs on the CPU path)");
  if (num_queries < 1) return invalid("q: at least one query per sequence");
  if (num_queries > prefill::kMaxDecodeQueries) return prefill::supports(key, value);
  auto built = [](auto) { return Status::Ok(); };
  Status s = with_codec(key.sub_dim, key.code_bits, built);
  return s.ok() ? with_codec(value.sub_dim, value.code_bits, built) : s;
}

// Everything but q, out and the scale (which plan_attention does not see yet).
Status check_cuda_cache(DType dtype, const AttentionShape& shape, const CompressedKV& kv) {
  Status s = check_attention(shape, kv);
  if (s.ok()) s = check_supported(dtype, shape.num_queries, kv.key_codebook, kv.value_codebook);
  if (s.ok() && prefill::runs(shape)) s = prefill::supports(kv.key_codebook, kv.value_codebook);
  if (!s.ok()) return s;
  if (kv.seq_slots != nullptr && reinterpret_cast<uintptr_t>(kv.seq_slots) % 4 != 0)
    return invalid("seq_slots: data pointer must be 4-byte aligned");
  if (!prefill::runs(shape) &&
      (shape.batch > 65535 ||
       shape.num_kv_heads * ((shape.num_q_heads / shape.num_kv_heads * shape.num_queries + kRows - 1) / kRows) > 65535))
    return unsupported("q: batch or heads beyond the kernel's grid limits (65535)");
  if (kv.code_capacity % 16 != 0)
    return invalid("key_codes/value_codes: the code capacity must be a multiple of 16 tokens (the kernel "
                   "copies code rows 16 at a time)");
  const bool sinks_aligned = kv.sink_capacity == 0 || (aligned16(kv.sink_keys) && aligned16(kv.sink_values));
  const bool recent_aligned =
      kv.recent_capacity == 0 || (aligned16(kv.recent_keys) && aligned16(kv.recent_values));
  const bool codes_aligned = kv.code_capacity == 0 || (aligned16(kv.key_codes) && aligned16(kv.value_codes));
  if (!codes_aligned || !sinks_aligned || !recent_aligned || !aligned16(kv.key_codebook.centroids) ||
      !aligned16(kv.value_codebook.centroids) || reinterpret_cast<uintptr_t>(kv.lengths) % 4 != 0 ||
      reinterpret_cast<uintptr_t>(kv.page_table) % 4 != 0)
    return invalid("codes/codebooks/sink and recent tensors: data pointers must be 16-byte aligned");
  return Status::Ok();
}

Status check_call(const void* q, const void* out, float softmax_scale) {
  if (q == nullptr || out == nullptr) return invalid("q/out: null pointer");
  if (!(softmax_scale == softmax_scale) || softmax_scale == INFINITY || softmax_scale == -INFINITY)
    return invalid("scale: must be finite");
  return Status::Ok();
}

Status dispatch(DType dtype, int head_dim, Request& r) {
  const bool half = dtype == DType::kFloat16;
  switch (head_dim) {
    case 64: return half ? run_f16_d64(r) : run_bf16_d64(r);
    case 128: return half ? run_f16_d128(r) : run_bf16_d128(r);
    case 256: return half ? run_f16_d256(r) : run_bf16_d256(r);
  }
  return unsupported("head_dim must be 64, 128 or 256");
}

Request make_request(const void* q, void* out, float* lse, const AttentionShape& shape, const CompressedKV& kv,
                     float softmax_scale) {
  Request r{};
  Params& p = r.params;
  p.q = q;
  p.out = out;
  p.lse = lse;
  p.kv = kv;
  p.batch = shape.batch;
  p.num_q_heads = shape.num_q_heads;
  p.num_kv_heads = shape.num_kv_heads;
  p.num_queries = shape.num_queries;
  p.group = static_cast<int>(shape.num_q_heads / shape.num_kv_heads);
  p.row_tiles = static_cast<int>((p.group * shape.num_queries + kRows - 1) / kRows);
  p.scale_log2 = softmax_scale * kLog2e;
  p.page_shift = page_shift(kv.page_table != nullptr, kv.page_size);
  r.key_sub = kv.key_codebook.sub_dim;
  r.key_bits = kv.key_codebook.code_bits;
  r.value_sub = kv.value_codebook.sub_dim;
  r.value_bits = kv.value_codebook.code_bits;
  return r;
}

}  // namespace
}  // namespace cuda_detail::attn

namespace cuda {

Status attention_supports(DType dtype, int64_t num_queries, const Codebook& key, const Codebook& value) {
  return cuda_detail::attn::check_supported(dtype, num_queries, key, value);
}

size_t attention_workspace_bytes(const AttentionShape& shape, const CompressedKV& kv) {
  using namespace cuda_detail::attn;
  // Only shapes matter here (no pointers are read): the batch, heads, queries, head_dim, the two
  // codebooks' sub_dim and code_bits, max_coded, and the sink and recent capacities.
  if (shape.batch < 1 || shape.num_kv_heads < 1 || shape.num_q_heads % shape.num_kv_heads != 0 ||
      shape.num_queries < 1 || kv.max_coded < 0)
    return 0;
  if (cuda_detail::prefill::runs(shape)) {
    cuda::AttentionPlan plan;
    return cuda_detail::prefill::plan(DType::kFloat16, shape, kv, plan).ok() ? plan.workspace_bytes : 0;
  }
  Request r = make_request(nullptr, nullptr, nullptr, shape, kv, 1.f);
  r.plan_only = true;
  // The plan does not depend on the element type beyond occupancy; float16 and bfloat16 match.
  return dispatch(DType::kFloat16, shape.head_dim, r).ok() ? r.plan.workspace_bytes : 0;
}

Status plan_attention(DType dtype, const AttentionShape& shape, const CompressedKV& kv, AttentionPlan& plan) {
  using namespace cuda_detail::attn;
  Status s = check_cuda_cache(dtype, shape, kv);
  if (!s.ok()) return s;
  if (cuda_detail::prefill::runs(shape)) {
    s = cuda_detail::prefill::plan(dtype, shape, kv, plan);
  } else {
    Request r = make_request(nullptr, nullptr, nullptr, shape, kv, 1.f);
    r.plan_only = true;
    s = dispatch(dtype, shape.head_dim, r);
    plan = r.plan;
  }
  if (!s.ok()) return s;
  plan.dtype = dtype;
  plan.shape = shape;
  plan.key_sub_dim = kv.key_codebook.sub_dim;
  plan.key_code_bits = kv.key_codebook.code_bits;
  plan.value_sub_dim = kv.value_codebook.sub_dim;
  plan.value_code_bits = kv.value_codebook.code_bits;
  plan.code_capacity = kv.code_capacity;
  plan.max_coded = kv.max_coded;
  plan.sink_capacity = kv.sink_capacity;
  plan.recent_capacity = kv.recent_capacity;
  plan.page_size = kv.page_table ? kv.page_size : 0;
  return Status::Ok();
}

Status run_attention(const AttentionPlan& plan, const void* q, void* out, float* lse, const CompressedKV& kv,
                     float softmax_scale, void* workspace, size_t workspace_bytes, void* stream) {
  using namespace cuda_detail::attn;
  if (plan.device < 0 || plan.warps == 0) return invalid("plan: not made by plan_attention");
  if (kv.key_codebook.sub_dim != plan.key_sub_dim || kv.key_codebook.code_bits != plan.key_code_bits ||
      kv.value_codebook.sub_dim != plan.value_sub_dim || kv.value_codebook.code_bits != plan.value_code_bits ||
      kv.code_capacity != plan.code_capacity || kv.max_coded != plan.max_coded ||
      kv.sink_capacity != plan.sink_capacity || kv.recent_capacity != plan.recent_capacity ||
      (kv.page_table ? kv.page_size : 0) != plan.page_size)
    return invalid("kv: shapes differ from the plan's (plan again for this cache)");
  int device = -1;
  Status s = cuda_detail::cuda_status(cudaGetDevice(&device));
  if (!s.ok()) return s;
  if (device != plan.device) return invalid("plan: made for another CUDA device than the current one");
  s = check_cuda_cache(plan.dtype, plan.shape, kv);
  if (s.ok()) s = check_call(q, out, softmax_scale);
  if (!s.ok()) return s;
  if (cuda_detail::prefill::runs(plan.shape))
    return cuda_detail::prefill::launch(plan, q, out, lse, kv, softmax_scale, workspace, workspace_bytes, stream);
  Request r = make_request(q, out, lse, plan.shape, kv, softmax_scale);
  r.planned = true;
  r.plan = plan;
  r.workspace = workspace;
  r.workspace_bytes = workspace_bytes;
  r.stream = static_cast<cudaStream_t>(stream);
  return dispatch(plan.dtype, plan.shape.head_dim, r);
}

Status attention(DType dtype, const void* q, void* out, float* lse, const AttentionShape& shape,
                 const CompressedKV& kv, float softmax_scale, void* workspace, size_t workspace_bytes,
                 void* stream) {
  using namespace cuda_detail::attn;
  Status s = check_cuda_cache(dtype, shape, kv);
  if (s.ok()) s = check_call(q, out, softmax_scale);
  if (!s.ok()) return s;
  if (cuda_detail::prefill::runs(shape)) {
    AttentionPlan plan;
    s = plan_attention(dtype, shape, kv, plan);
    return s.ok() ? cuda_detail::prefill::launch(plan, q, out, lse, kv, softmax_scale, workspace, workspace_bytes, stream) : s;
  }
  Request r = make_request(q, out, lse, shape, kv, softmax_scale);
  r.workspace = workspace;
  r.workspace_bytes = workspace_bytes;
  r.stream = static_cast<cudaStream_t>(stream);
  return dispatch(dtype, shape.head_dim, r);
}

}  // namespace cuda
}  // namespace vecinfer
