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
int64_t code_row_bytes(int32_t head_dim, int32_t sub_dim, int32_t code_bits);

// Argument checks shared by both implementations; the ops call them first.
Status check_layout(const RowLayout& layout);
Status check_transform(const RowLayout& layout, const Transform& transform, TransformKind kind);
Status check_codebook(const RowLayout& layout, const Codebook& codebook);

namespace cpu {

// out = transform(in) as described by TransformKind; in and out may alias.
Status transform(DType dtype, const void* in, void* out, const RowLayout& layout,
                 const Transform& transform, TransformKind kind);

// codes = encode(transform(x)) with transform kind kKey (pass an identity Transform to encode x
// as it is). Each sub-vector gets the index of its nearest centroid in squared L2 distance, the
// lowest index among equals. codes: [num_rows, code_row_bytes] bytes.
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
