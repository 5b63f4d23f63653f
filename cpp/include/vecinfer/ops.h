// The transform and codec ops, as CPU reference implementations (namespace cpu) and CUDA kernels
// (namespace cuda). Both check every argument before touching memory and return a Status.
//
// Supported everywhere: head_dim 64, 128, 256; element types float32, float16, bfloat16 (DType);
// sub_dim 2, 4, 8; code_bits 4 to 12. The CUDA versions need compute capability 8.0 or newer,
// device pointers aligned to 16 bytes for the element tensors, and run on `stream` (a
// cudaStream_t passed as void*, so this header needs no CUDA include; null is the default stream).
// In a build without CUDA they return StatusCode::kNotBuiltWithCuda.
#pragma once

#include <cstdint>

#include "vecinfer/status.h"
#include "vecinfer/types.h"

namespace vecinfer {

// Bytes one row of codes occupies (see the code layout in types.h); 0 if the shape is unsupported.
int64_t code_row_bytes(int64_t head_dim, int64_t sub_dim, int64_t code_bits);

// code_bits of a codebook with num_centroids entries: log2(num_centroids) when it is a power of
// two from 2 to 2^62, else -1 (computed without a shift by 64 or more, whatever the count).
int32_t code_bits_of(int64_t num_centroids);

// Argument checks shared by both implementations; the ops call them first. They read only sizes
// and pointers, never the data, and reject sizes whose byte counts overflow 64 bits.
Status check_layout(const RowLayout& layout);
Status check_transform(const RowLayout& layout, const Transform& transform, TransformKind kind);
Status check_codebook(const RowLayout& layout, const Codebook& codebook);

// in and out of a transform: the same buffer (in place) or disjoint; a partial overlap would read
// rows already overwritten.
Status check_in_out(DType dtype, const void* in, const void* out, const RowLayout& layout);

// Value checks, on host memory: scale tables finite and > 0, mean tables finite, centroids finite.
// The CPU implementations run them (one pass over the small tables); the CUDA entry points do not
// (reading device memory would synchronise), so tables given to them must be valid (KVQuantizer
// checks its own when it calibrates and loads).
Status check_transform_values(const RowLayout& layout, const Transform& transform);
Status check_codebook_values(const Codebook& codebook);

namespace cpu {

// out = transform(in) as described by TransformKind; in and out may be the same buffer, not overlap partially.
Status transform(DType dtype, const void* in, void* out, const RowLayout& layout,
                 const Transform& transform, TransformKind kind);

// codes = encode(transform(x)) with transform kind kKey (pass an identity Transform to encode x
// as it is). Each sub-vector gets the index of its nearest centroid in squared L2 distance, the
// lowest index among equals; distances are computed in double, so no finite input overflows them.
// A NaN or infinity in x, or produced by its transform, is an error (checked as rows are read).
// codes: [num_rows, code_row_bytes] bytes.
Status vq_encode(DType dtype, const void* x, uint8_t* codes, const RowLayout& layout,
                 const Codebook& codebook, const Transform& transform);

// out = inverse_transform(decode(codes)) with transform kind kKeyInverse.
Status vq_decode(DType dtype, const uint8_t* codes, void* out, const RowLayout& layout,
                 const Codebook& codebook, const Transform& transform);

}  // namespace cpu

namespace cuda {

bool built();  // whether this library was compiled with CUDA kernels

// Whether the current device can run the kernels (compute capability >= 8.0).
Status check_device();

Status transform(DType dtype, const void* in, void* out, const RowLayout& layout,
                 const Transform& transform, TransformKind kind, void* stream);

Status vq_encode(DType dtype, const void* x, uint8_t* codes, const RowLayout& layout,
                 const Codebook& codebook, const Transform& transform, void* stream);

Status vq_decode(DType dtype, const uint8_t* codes, void* out, const RowLayout& layout,
                 const Codebook& codebook, const Transform& transform, void* stream);

}  // namespace cuda
}  // namespace vecinfer
