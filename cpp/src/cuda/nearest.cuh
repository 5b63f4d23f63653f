// Nearest-centroid search shared by the encode kernel and the append kernel: a codebook staged in
// shared memory with its squared norms, and the scan each lane runs for its 8 elements. The
// distance is ||c||^2 - 2 x.c (S FMAs per centroid and sub-vector); all lanes read the same
// centroid at the same time (a shared-memory broadcast).
#pragma once

#include <cstdint>

namespace vecinfer::cuda_detail {

template <int S>
__device__ __forceinline__ void load_centroid(const float* p, float (&c)[S]) {
  if constexpr (S == 2) {
    const float2 a = *reinterpret_cast<const float2*>(p);
    c[0] = a.x, c[1] = a.y;
  } else {
#pragma unroll
    for (int i = 0; i < S; i += 4) {
      const float4 a = *reinterpret_cast<const float4*>(p + i);
      c[i] = a.x, c[i + 1] = a.y, c[i + 2] = a.z, c[i + 3] = a.w;
    }
  }
}

// Copies `count` centroids of S floats from `src` to shared `centroids`, their squared norms to
// `norms`, with the block's `threads` threads (the caller synchronises before and after).
template <int S>
__device__ __forceinline__ void stage_codebook(float* centroids, float* norms, const float* src, int count,
                                               int threads) {
  for (int c = threadIdx.x; c < count; c += threads) {
    float norm = 0.f;
#pragma unroll
    for (int e = 0; e < S; ++e) {
      const float value = src[c * S + e];
      centroids[c * S + e] = value;
      norm = fmaf(value, value, norm);
    }
    norms[c] = norm;
  }
}

// The nearest centroid among centroids [first, last) of each of this lane's 8 / S sub-vectors of v
// (the lowest index among equals), and its distance up to the common ||x||^2.
template <int S>
__device__ __forceinline__ void nearest_centroids(const float (&v)[8], const float* centroids, const float* norms,
                                                  int first, int last, int (&best_index)[8 / S],
                                                  float (&best)[8 / S]) {
  constexpr int kSubs = 8 / S;
  float minus2v[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) minus2v[i] = -2.f * v[i];
#pragma unroll
  for (int k = 0; k < kSubs; ++k) best[k] = INFINITY, best_index[k] = first;
#pragma unroll 4
  for (int c = first; c < last; ++c) {
    float centroid[S];
    load_centroid<S>(centroids + c * S, centroid);
    const float norm = norms[c];
#pragma unroll
    for (int k = 0; k < kSubs; ++k) {
      float dist = norm;
#pragma unroll
      for (int e = 0; e < S; ++e) dist = fmaf(minus2v[k * S + e], centroid[e], dist);
      if (dist < best[k]) best[k] = dist, best_index[k] = c;
    }
  }
}

}  // namespace vecinfer::cuda_detail
