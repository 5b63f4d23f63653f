// One (element type, head_dim) slice of the attention kernels: all codec pairs. Compiled once per
// slice from a file CMake generates, which defines VECINFER_ATTN_T, VECINFER_ATTN_D and
// VECINFER_ATTN_NAME before including this one.
#include "attention_run.cuh"

namespace vecinfer::cuda_detail::attn {

Status VECINFER_ATTN_NAME(Request& r) {
  return with_codec(r.key_sub, r.key_bits, [&](auto key_codec) {
    return with_codec(r.value_sub, r.value_bits, [&](auto value_codec) {
      // More than 4 query rows per block take the variant with rows 4-7 (see coded_block).
      if (r.params.group * r.params.num_queries > 4)
        return run<VECINFER_ATTN_T, VECINFER_ATTN_D, decltype(key_codec), decltype(value_codec), true>(r);
      return run<VECINFER_ATTN_T, VECINFER_ATTN_D, decltype(key_codec), decltype(value_codec), false>(r);
    });
  });
}

}  // namespace vecinfer::cuda_detail::attn
