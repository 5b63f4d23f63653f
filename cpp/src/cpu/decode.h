// Decoding shared by cpu::vq_decode and cpu::attention, which check the arguments (and the
// codebook's and tables' values) once, then decode in many small runs.
#pragma once

#include <cstdint>

#include "vecinfer/types.h"

namespace vecinfer::cpu {

// out = inverse_transform(decode(codes)), kind kKeyInverse; the arguments must be valid.
void decode_rows(DType dtype, const uint8_t* codes, void* out, const RowLayout& layout, const Codebook& codebook,
                 const Transform& transform);

}  // namespace vecinfer::cpu
