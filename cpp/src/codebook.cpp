// The 8-bit affine grid of codebooks (see snap_codebook in vecinfer/attention.h). The CUDA kernel
// derives the same grid from the centroids it is given (load_tables in attention_kernel.cuh).
#include <cmath>

#include "vecinfer/attention.h"

namespace vecinfer {

Status snap_codebook(float* centroids, const Codebook& shape) {
  if (centroids == nullptr) return invalid("codebook: null pointer");
  if (shape.sub_dim < 1 || shape.sub_dim > 8 || shape.code_bits < 1 || shape.code_bits > 12 || shape.num_codebooks < 1)
    return invalid("codebook: expected [num_codebooks >= 1, 2**code_bits (code_bits 1..12), sub_dim 1..8]");
  const int64_t entries = shape.num_centroids(), sub = shape.sub_dim;
  for (int64_t g = 0; g < shape.num_codebooks; ++g) {
    float* book = centroids + g * entries * sub;
    for (int64_t e = 0; e < sub; ++e) {
      float lo = INFINITY, hi = -INFINITY;
      for (int64_t i = 0; i < entries; ++i) {
        const float v = book[i * sub + e];
        if (!std::isfinite(v)) return invalid("codebook: contains NaN or infinity");
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
      }
      const float step = (hi - lo) / 255.f;
      if (!(step > 0.f)) {  // one value at this position (or a range below float resolution)
        for (int64_t i = 0; i < entries; ++i) book[i * sub + e] = lo;
        continue;
      }
      for (int64_t i = 0; i < entries; ++i) {
        float u = std::nearbyint((book[i * sub + e] - lo) / step);
        u = u < 0.f ? 0.f : (u > 255.f ? 255.f : u);
        book[i * sub + e] = lo + step * u;
      }
    }
  }
  return Status::Ok();
}

}  // namespace vecinfer
