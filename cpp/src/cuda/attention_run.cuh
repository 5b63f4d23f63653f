// Planning (split-KV) and launching of the attention kernels for one template instance. Included
// by the generated per-(dtype, head_dim) translation units (see CMakeLists.txt), so the 25 codec
// pairs of each (dtype, head_dim) compile in parallel with the other five.
#pragma once

#include "attention_kernel.cuh"
#include "launch.cuh"

namespace vecinfer::cuda_detail::attn {

constexpr int kMaxDevices = 64;

struct Request {
  Params params;
  int key_sub, key_bits, value_sub, value_bits;
  void* workspace;
  size_t workspace_bytes;
  cudaStream_t stream;
  bool plan_only;         // only compute `needed` (workspace bytes)
  size_t needed;
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

template <typename T, int D, class KC, class VC>
Status run(Request& r) {
  using L = Layout<D, KC, VC>;
  Params& p = r.params;
  auto kernel = attention_kernel<T, D, KC, VC>;
  int sm_count = 0, max_shared = 0;
  Status s = current_device(sm_count, max_shared);
  if (!s.ok()) return s;
  if (L::kSharedBytes > max_shared)
    return unsupported("codebooks too large for this GPU's shared memory (use fewer code bits)");
  // The shared-memory opt-in and the occupancy query are per kernel and device: done once each.
  static int cached_blocks_per_sm[kMaxDevices] = {};
  int device = 0;
  s = cuda_status(cudaGetDevice(&device));
  if (!s.ok()) return s;
  if (device >= kMaxDevices) return unsupported("more than 64 CUDA devices");
  int& blocks_per_sm = cached_blocks_per_sm[device];
  if (blocks_per_sm == 0) {
    s = cuda_status(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kSharedBytes));
    int blocks = 0;
    if (s.ok())
      s = cuda_status(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, L::kThreads, L::kSharedBytes));
    if (!s.ok()) return s;
    blocks_per_sm = blocks > 0 ? blocks : 1;
  }

  // Split the coded tokens so that the coded blocks fill the GPU's block slots in whole waves:
  // the split count minimising waves / splits (the time in units of one unsplit block); on ties
  // the larger while splits keep >= 4096 tokens (finer pieces balance better, but each block
  // pays for loading its tables); each split holds at least 4 steps per warp.
  const int64_t groups = p.batch * p.num_kv_heads * p.row_tiles;
  const int64_t max_coded = p.kv.max_coded;
  constexpr int64_t kQuantum = kStep * L::kWarps;
  const int64_t slots = int64_t{sm_count} * blocks_per_sm;
  int64_t splits = 0;
  if (max_coded > 0) {
    const int64_t most = (max_coded + 4 * kQuantum - 1) / (4 * kQuantum);
    const int64_t limit = 2 * ((slots + groups - 1) / groups);
    splits = 1;
    for (int64_t c = 2; c <= limit && c <= most; ++c) {
      const int64_t waves = (groups * c + slots - 1) / slots, best = (groups * splits + slots - 1) / slots;
      const bool better = waves * splits < best * c, tie = waves * splits == best * c;
      if (better || (tie && max_coded / c >= 4096)) splits = c;
    }
    int64_t per_split = (max_coded + splits - 1) / splits;
    per_split = (per_split + kQuantum - 1) / kQuantum * kQuantum;
    p.split_tokens = per_split;
    splits = (max_coded + per_split - 1) / per_split;
  } else {  // only the full-precision block
    p.split_tokens = kQuantum;
  }
  if (splits > 65535) return unsupported("too many coded tokens for one launch");
  p.splits = static_cast<int>(splits);
  const size_t partial_floats = static_cast<size_t>(groups) * (splits + 1) * kRows;
  const size_t acc_bytes = partial_floats * D * sizeof(float);
  r.needed = acc_bytes + partial_floats * 2 * sizeof(float);
  if (r.plan_only) return Status::Ok();
  if (r.workspace == nullptr || r.workspace_bytes < r.needed || !aligned16(r.workspace))
    return invalid("workspace: too small or not 16-byte aligned (see attention_workspace_bytes)");
  p.partial_acc = static_cast<float*>(r.workspace);
  p.partial_ml = reinterpret_cast<float*>(static_cast<uint8_t*>(r.workspace) + acc_bytes);

  const dim3 grid(static_cast<unsigned>(splits + 1), static_cast<unsigned>(p.num_kv_heads * p.row_tiles),
                  static_cast<unsigned>(p.batch));
  kernel<<<grid, L::kThreads, L::kSharedBytes, r.stream>>>(p);
  s = cuda_status(cudaGetLastError());
  if (!s.ok()) return s;
  const size_t merge_shared = static_cast<size_t>(splits + 1) * kRows * sizeof(float);
  if (merge_shared > 48 * 1024) {
    s = cuda_status(cudaFuncSetAttribute(merge_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(merge_shared)));
    if (!s.ok()) return s;
  }
  merge_kernel<T, D><<<static_cast<unsigned>(groups), 32 * kMergeWarps, merge_shared, r.stream>>>(p);
  return cuda_status(cudaGetLastError());
}

}  // namespace vecinfer::cuda_detail::attn
