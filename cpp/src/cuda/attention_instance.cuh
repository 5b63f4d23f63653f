// One (element type, head_dim) slice of the attention kernels: all codec pairs. Compiled once per
// slice from a file CMake generates, which defines VECINFER_ATTN_T, VECINFER_ATTN_D and
// VECINFER_ATTN_NAME before including this one.
#include "attention_run.cuh"

namespace vecinfer::cuda_detail::attn {

Status VECINFER_ATTN_NAME(Request& r) {
  return with_codec(r.key_sub, r.key_bits, [&](auto key_codec) {
    return with_codec(r.value_sub, r.value_bits, [&](auto value_codec) {
      return run<VECINFER_ATTN_T, VECINFER_ATTN_D, decltype(key_codec), decltype(value_codec)>(r);
    });
  });
}

}  // namespace vecinfer::cuda_detail::attn
