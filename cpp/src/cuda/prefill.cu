// Planning and launching of the long-query attention kernel (prefill_kernel.cuh). attention.cu
// sends every call with more queries per sequence than the decode kernel takes here.
#include <algorithm>

#include "launch.cuh"
#include "prefill.h"
#include "prefill_kernel.cuh"
#include "vecinfer/ops.h"

namespace vecinfer::cuda_detail::prefill {
namespace {

int code_bytes(int head_dim, const Codebook& book) {
  return static_cast<int>(code_row_bytes(head_dim, book.sub_dim, book.code_bits));
}

// The block's shared memory on the current device and where the codebooks go (Tables): spread
// when both are 8-bit and it fits (Hopper: one block per multiprocessor), else in shared memory
// when they fit, else global.
template <int D, bool kHopper>
Status shared_layout(const CompressedKV& kv, int& bytes, Tables& tables) {
  int sm_count = 0, max_shared = 0;
  Status s = current_device(sm_count, max_shared);
  if (!s.ok()) return s;
  const Codebook& key = kv.key_codebook;
  const Codebook& value = kv.value_codebook;
  const int key_entries = 1 << key.code_bits, value_entries = 1 << value.code_bits;
  auto size = [&](Tables t) { return Smem<D, kHopper>::bytes(key_entries, key.sub_dim, value_entries, value.sub_dim, t); };
  const bool spreadable = kHopper && key.code_bits == 8 && value.code_bits == 8;
  if (spreadable && size(Tables::kSpread) <= max_shared) {
    tables = Tables::kSpread;
  } else {
    tables = size(Tables::kShared) <= max_shared ? Tables::kShared : Tables::kGlobal;
  }
  bytes = size(tables);
  return Status::Ok();
}

template <typename T, int D, bool kHopper>
Status plan_for(const AttentionShape& shape, const CompressedKV& kv, cuda::AttentionPlan& plan) {
  using S = Shape<D, kHopper>;
  auto kernel = prefill_kernel<T, D, kHopper>;
  int bytes = 0, sm_count = 0, device = 0, blocks_per_sm = 0;
  Tables tables = Tables::kGlobal;
  Status s = shared_layout<D, kHopper>(kv, bytes, tables);
  if (s.ok()) s = opt_in_shared_memory(kernel, bytes, sm_count);
  if (s.ok()) s = cuda_status(cudaGetDevice(&device));
  if (s.ok()) s = cuda_status(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, S::kThreads, bytes));
  if (!s.ok()) return s;
  const int64_t group = shape.num_q_heads / shape.num_kv_heads;
  const int64_t row_tiles = (group * shape.num_queries + S::kRows - 1) / S::kRows;
  // Row indices and token positions are 32-bit in the kernel.
  if (group * shape.num_queries > INT32_MAX || shape.num_kv_heads > 65535)
    return unsupported("q: more query rows (query heads per KV head x queries) or KV heads than the kernel takes");
  if (kv.sink_capacity + kv.code_capacity + kv.recent_capacity > INT32_MAX)
    return unsupported("kv: more than 2^31 - 1 tokens per sequence");
  // When the blocks would not fill the GPU, split the tokens over more of them: the split count
  // (up to twice the GPU's width, at least 8 tiles each; tiles counted over the coded tokens only,
  // all that attention_workspace_bytes sees) with the fewest waves per unit of work.
  const int64_t blocks = shape.batch * shape.num_kv_heads * row_tiles;
  const int64_t slots = int64_t{sm_count} * (blocks_per_sm > 0 ? blocks_per_sm : 1);
  const int64_t tiles = (kv.max_coded + S::kN - 1) / S::kN;
  int64_t splits = 1;
  if (blocks < slots) {
    const int64_t most = std::min((2 * slots + blocks - 1) / blocks, std::max<int64_t>(tiles / 8, 1));
    double best = 1.0;  // waves per unit of work with one split: a single partial wave
    for (int64_t s = 2; s <= most; ++s) {
      const double cost = static_cast<double>((blocks * s + slots - 1) / slots) / s;
      if (cost < best - 1e-9) best = cost, splits = s;
    }
  }
  if (shape.batch * splits > 65535) return unsupported("q: batch beyond the kernel's grid limits (65535)");
  plan.device = device;
  plan.warps = S::kWarps;
  plan.stages = 2;
  plan.low_warps = 0;
  plan.splits = static_cast<int>(splits);
  plan.split_tokens = 0;
  plan.workspace_bytes =
      splits > 1 ? static_cast<size_t>(blocks * splits * S::kRows) * (D + 2) * sizeof(float) : 0;
  return Status::Ok();
}

template <typename T, int D, bool kHopper>
Status launch_for(const cuda::AttentionPlan& plan, const void* q, void* out, float* lse, const CompressedKV& kv,
                  float softmax_scale, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  using S = Shape<D, kHopper>;
  const AttentionShape& shape = plan.shape;
  if (plan.splits > 1 && (workspace == nullptr || workspace_bytes < plan.workspace_bytes || !aligned16(workspace)))
    return invalid("workspace: too small or not 16-byte aligned (see attention_workspace_bytes)");
  Params p{};
  p.q = q;
  p.out = out;
  p.lse = lse;
  p.partial = static_cast<float*>(workspace);
  p.kv = kv;
  p.batch = shape.batch;
  p.num_q_heads = shape.num_q_heads;
  p.num_kv_heads = shape.num_kv_heads;
  p.num_queries = shape.num_queries;
  p.query_indptr = shape.query_indptr;
  p.total_queries = shape.total_queries;
  p.group = static_cast<int>(shape.num_q_heads / shape.num_kv_heads);
  p.row_tiles = static_cast<int>((p.group * shape.num_queries + S::kRows - 1) / S::kRows);
  p.splits = plan.splits;
  p.scale_log2 = softmax_scale * kLog2e;
  p.page_shift = page_shift(kv.page_table != nullptr, kv.page_size);
  p.key_row_bytes = code_bytes(D, kv.key_codebook);
  p.value_row_bytes = code_bytes(D, kv.value_codebook);
  auto kernel = prefill_kernel<T, D, kHopper>;
  int bytes = 0, sm_count = 0;
  Tables tables = Tables::kGlobal;
  Status s = shared_layout<D, kHopper>(kv, bytes, tables);
  if (s.ok()) s = opt_in_shared_memory(kernel, bytes, sm_count);
  if (!s.ok()) return s;
  p.tables = tables;
  const dim3 grid(static_cast<unsigned>(p.row_tiles), static_cast<unsigned>(p.num_kv_heads),
                  static_cast<unsigned>(p.batch * p.splits));
  kernel<<<grid, S::kThreads, bytes, stream>>>(p);
  s = cuda_status(cudaGetLastError());
  if (!s.ok() || plan.splits == 1) return s;
  const int64_t rows = p.batch * p.num_kv_heads * p.row_tiles * S::kRows;
  prefill_merge_kernel<T, D, kHopper><<<static_cast<unsigned>((rows + 7) / 8), 256, 0, stream>>>(p);
  return cuda_status(cudaGetLastError());
}

// Whether the current device runs the Hopper variant: the code it loaded for the kernel was built
// for sm_90a (an sm_80-only build on a Hopper GPU runs its sm_80 PTX, compiled at load: ptxVersion 80).
template <typename T, int D>
Status hopper_variant(bool& hopper) {
  cudaFuncAttributes attributes{};
  Status s = cuda_status(cudaFuncGetAttributes(&attributes, prefill_kernel<T, D, true>));
  hopper = s.ok() && attributes.ptxVersion >= 90 && attributes.binaryVersion >= 90;
  return s;
}

template <class F>
Status with_type_and_dim(DType dtype, int head_dim, F&& f) {
  if (dtype != DType::kFloat16 && dtype != DType::kBFloat16)
    return unsupported("q: the CUDA kernel takes float16 or bfloat16 (float32 runs on the CPU path)");
  return with_dtype(dtype, [&](auto type_tag) {
    using T = decltype(type_tag);
    if constexpr (std::is_same_v<T, float>) {
      return unsupported("q: float32");
    } else {
      return with_head_dim(head_dim, [&](auto dim) { return f(T{}, dim); });
    }
  });
}

// Calls f(T{}, integral_constant<int, D>, bool_constant<kHopper>) for the dtype, head_dim and the
// variant the device runs.
template <class F>
Status with_variant(DType dtype, int head_dim, F&& f) {
  return with_type_and_dim(dtype, head_dim, [&](auto type_tag, auto dim) {
    bool hopper = false;
    Status s = hopper_variant<decltype(type_tag), decltype(dim)::value>(hopper);
    if (!s.ok()) return s;
    return hopper ? f(type_tag, dim, std::true_type{}) : f(type_tag, dim, std::false_type{});
  });
}

}  // namespace

Status supports(const Codebook& key, const Codebook& value) {
  const bool shapes = (key.sub_dim == 2 || key.sub_dim == 4 || key.sub_dim == 8) &&
                      (value.sub_dim == 2 || value.sub_dim == 4 || value.sub_dim == 8) &&
                      (key.code_bits == 8 || key.code_bits == 12) && (value.code_bits == 8 || value.code_bits == 12);
  if (!shapes)
    return unsupported("codebook: the long-query attention kernel supports the bit presets only (sub_dim 2, 4 "
                       "or 8 with 8- or 12-bit codes); other shapes run on the reference path");
  return Status::Ok();
}

Status plan(DType dtype, const AttentionShape& shape, const CompressedKV& kv, cuda::AttentionPlan& plan) {
  return with_variant(dtype, shape.head_dim, [&](auto type_tag, auto dim, auto hopper) {
    return plan_for<decltype(type_tag), decltype(dim)::value, decltype(hopper)::value>(shape, kv, plan);
  });
}

Status launch(const cuda::AttentionPlan& plan, const void* q, void* out, float* lse, const CompressedKV& kv,
              float softmax_scale, void* workspace, size_t workspace_bytes, void* stream) {
  if (!aligned16(q) || !aligned16(out)) return invalid("q/out: data pointers must be 16-byte aligned");
  return with_variant(plan.dtype, plan.shape.head_dim, [&](auto type_tag, auto dim, auto hopper) {
    return launch_for<decltype(type_tag), decltype(dim)::value, decltype(hopper)::value>(
        plan, q, out, lse, kv, softmax_scale, workspace, workspace_bytes, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace vecinfer::cuda_detail::prefill
