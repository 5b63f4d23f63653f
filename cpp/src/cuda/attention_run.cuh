// Planning (shared memory, split-KV) and launching of the attention kernel for one template
// instance. Included by the generated per-(dtype, head_dim) translation units (see CMakeLists.txt),
// so the 25 codec pairs of each (dtype, head_dim) compile in parallel with the other five.
#pragma once

#include "attention_kernel.cuh"
#include "launch.cuh"
#include "../split_plan.h"

namespace vecinfer::cuda_detail::attn {

constexpr int kMaxDevices = 64;
constexpr int kMinWarps = 4;

// One call: the kernel parameters, and either a request for a plan (plan_only: fill `plan`) or a
// launch (with `plan` given when `planned`, made here otherwise).
struct Request {
  Params params;
  int key_sub, key_bits, value_sub, value_bits;
  void* workspace;
  size_t workspace_bytes;
  cudaStream_t stream;
  bool plan_only;
  bool planned;
  // the schedule fields: fp_parts, splits, split_tokens, warps, stages, low_warps, workspace_bytes
  cuda::AttentionPlan plan;
};

// The codec shapes the kernel is built for: the bit presets of VQConfig (4, 3, 2, 1.5, 1 bits).
template <class F>
Status with_codec(int sub, int bits, F&& f) {
  if (sub == 2 && bits == 8) return f(Codec<2, 8>{});
  if (sub == 4 && bits == 8) return f(Codec<4, 8>{});
  if (sub == 4 && bits == 12) return f(Codec<4, 12>{});
  if (sub == 8 && bits == 8) return f(Codec<8, 8>{});
  if (sub == 8 && bits == 12) return f(Codec<8, 12>{});
  return unsupported("codebook: the fused attention kernel supports the bit presets only (sub_dim/code_bits "
                     "2/8, 4/8, 4/12, 8/8, 8/12); other shapes run on the reference path");
}

// A block's shared-memory plan on one device: the most warps (up to max_warps) whose stages fit
// with 2 stages each, then as many stages (up to 4) as still fit. 0 warps: nothing fits.
struct SmemPlan {
  int warps = 0, stages = 0, low_warps = 0, bytes = 0, blocks_per_sm = 0;
};

template <int D, class KC, class VC, bool kEight>
SmemPlan plan_shared(int budget) {
  using L = Layout<D, KC, VC, kEight>;
  SmemPlan plan;
  for (int w = max_warps<D, kEight>(); w >= kMinWarps && plan.warps == 0; --w)
    if (L::shared_bytes(w, 2) <= budget) plan.warps = w;
  if (plan.warps == 0) return plan;
  plan.stages = 2;
  while (plan.stages < kMaxStages && L::shared_bytes(plan.warps, plan.stages + 1) <= budget) ++plan.stages;
  plan.bytes = L::shared_bytes(plan.warps, plan.stages);
  plan.low_warps = L::low_warps(plan.stages);
  return plan;
}

// The shared-memory plan and split-KV schedule of a request, into r.plan.
template <typename T, int D, class KC, class VC, bool kEight>
Status make_plan(Request& r) {
  const Params& p = r.params;
  auto kernel = attention_kernel<T, D, KC, VC, kEight>;
  int sm_count = 0, max_shared = 0, device = 0;
  Status s = current_device(sm_count, max_shared);
  if (s.ok()) s = cuda_status(cudaGetDevice(&device));
  if (!s.ok()) return s;
  if (device >= kMaxDevices) return unsupported("more than 64 CUDA devices");
  // The plan, the shared-memory opt-in and the occupancy query are per kernel and device: once each.
  static SmemPlan plans[kMaxDevices];
  SmemPlan& plan = plans[device];
  if (plan.blocks_per_sm == 0) {
    // The layout puts the byte-code tables at a 64 KiB boundary of the shared window, counting on
    // the block's dynamic memory to start right after the driver's reserved block.
    int reserved = 0;
    cudaFuncAttributes attributes{};
    s = cuda_status(cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, device));
    if (s.ok()) s = cuda_status(cudaFuncGetAttributes(&attributes, kernel));
    if (!s.ok()) return s;
    if (reserved != kReservedSmem || attributes.sharedSizeBytes != 0)
      return unsupported("this GPU reserves an unexpected amount of shared memory per block; the attention "
                         "kernel's table layout needs 1024 bytes (Ampere and Hopper)");
    SmemPlan fresh = plan_shared<D, KC, VC, kEight>(max_shared);
    if (fresh.warps == 0)
      return unsupported("codebooks too large for this GPU's shared memory (use fewer code bits)");
    s = cuda_status(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, fresh.bytes));
    int blocks = 0;
    if (s.ok())
      s = cuda_status(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, 32 * fresh.warps, fresh.bytes));
    if (!s.ok()) return s;
    fresh.blocks_per_sm = blocks > 0 ? blocks : 1;
    plan = fresh;
  }
  cuda::AttentionPlan& out = r.plan;
  out.device = device;
  out.warps = plan.warps;
  out.stages = plan.stages;
  out.low_warps = plan.low_warps;

  // Split the coded tokens over blocks (split_plan.h): a block's fixed cost counts as 2 stages.
  using L = Layout<D, KC, VC, kEight>;
  const int64_t groups = p.batch * p.num_kv_heads * p.row_tiles;
  const int64_t quantum = int64_t{L::kStageTokens} * plan.warps;  // one stage for each warp
  const detail::SplitPlan split = detail::plan_splits(groups, p.kv.max_coded, quantum,
                                                      int64_t{sm_count} * plan.blocks_per_sm);
  const int64_t splits = split.splits;
  out.split_tokens = split.split_tokens;
  if (splits > 65535) return unsupported("too many coded tokens for one launch");
  out.splits = static_cast<int>(splits);
  // full-precision tokens per sequence: at most the sink and window capacities (kept tokens are sinks)
  const int64_t fp_parts = std::max<int64_t>(
      1, (p.kv.sink_capacity + p.kv.recent_capacity + fp_part_tokens<D>() - 1) / fp_part_tokens<D>());
  if (fp_parts + splits > 65535) return unsupported("too many full-precision and coded tokens for one launch");
  out.fp_parts = static_cast<int>(fp_parts);
  // Several parts (kept tokens) and coded blocks within one wave: the coded blocks run the parts.
  out.fp_folded = fp_parts > 1 && splits > 0 && groups * splits <= int64_t{sm_count} * plan.blocks_per_sm;
  const size_t partial_floats = static_cast<size_t>(groups) * (fp_parts + splits) * kRows;
  out.workspace_bytes = partial_floats * (D + 2) * sizeof(float);
  return Status::Ok();
}

template <typename T, int D, class KC, class VC, bool kEight>
Status run(Request& r) {
  if (!r.planned) {
    Status s = make_plan<T, D, KC, VC, kEight>(r);
    if (!s.ok() || r.plan_only) return s;
  }
  const cuda::AttentionPlan& plan = r.plan;
  Params& p = r.params;
  p.warps = plan.warps;
  p.stages = plan.stages;
  p.low_warps = plan.low_warps;
  p.fp_parts = plan.fp_parts;
  p.splits = plan.splits;
  p.fp_folded = plan.fp_folded ? 1 : 0;
  p.split_tokens = plan.split_tokens;
  const int64_t groups = p.batch * p.num_kv_heads * p.row_tiles;
  const int64_t parts = int64_t{plan.fp_parts} + plan.splits;
  if (r.workspace == nullptr || r.workspace_bytes < plan.workspace_bytes || !aligned16(r.workspace))
    return invalid("workspace: too small or not 16-byte aligned (see attention_workspace_bytes)");
  const size_t acc_bytes = static_cast<size_t>(groups) * parts * kRows * D * sizeof(float);
  p.partial_acc = static_cast<float*>(r.workspace);
  p.partial_ml = reinterpret_cast<float*>(static_cast<uint8_t*>(r.workspace) + acc_bytes);
  auto kernel = attention_kernel<T, D, KC, VC, kEight>;
  using L = Layout<D, KC, VC, kEight>;
  const int bytes = L::shared_bytes(plan.warps, plan.stages);
  Status s = Status::Ok();

  const dim3 grid(static_cast<unsigned>(plan.fp_folded ? plan.splits : parts),
                  static_cast<unsigned>(p.num_kv_heads * p.row_tiles),
                  static_cast<unsigned>(p.batch));
  kernel<<<grid, 32 * plan.warps, bytes, r.stream>>>(p);
  s = cuda_status(cudaGetLastError());
  if (!s.ok()) return s;
  const size_t merge_shared = static_cast<size_t>(parts) * kRows * sizeof(float);
  if (merge_shared > 48 * 1024) {
    s = cuda_status(cudaFuncSetAttribute(merge_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(merge_shared)));
    if (!s.ok()) return s;
  }
  merge_kernel<T, D><<<static_cast<unsigned>(groups), 32 * kMergeWarps, merge_shared, r.stream>>>(p);
  return cuda_status(cudaGetLastError());
}

}  // namespace vecinfer::cuda_detail::attn
