// CPU reference of the kept-token decode step (kept.h): every sequence's lengths checked first,
// then each sequence's step in turn, the score accumulated in double precision.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "half_float.h"
#include "vecinfer/kept.h"

namespace vecinfer::cpu {
namespace {

float element_value(DType dtype, const uint8_t* p) {
  uint16_t h;
  switch (dtype) {
    case DType::kFloat32: {
      float f;
      std::memcpy(&f, p, 4);
      return f;
    }
    case DType::kFloat16: std::memcpy(&h, p, 2); return half_to_float(h);
    case DType::kBFloat16: std::memcpy(&h, p, 2); return bf16_to_float(h);
  }
  return 0.f;
}

}  // namespace

Status kept_step(DType dtype, const KeptStep& st) {
  Status s = check_kept_step(st);
  if (!s.ok()) return s;
  const int64_t hkv = st.num_kv_heads, d = st.head_dim, w = st.window, sink_rows = st.sinks + st.kept_capacity;
  const int64_t esize = dtype == DType::kFloat32 ? 4 : 2, row = d * esize;
  auto slot_of = [&](int64_t b) -> int64_t { return st.seq_slots ? st.seq_slots[b] : b; };
  if (st.seq_slots) {
    std::vector<bool> seen(static_cast<size_t>(st.num_slots), false);
    for (int64_t b = 0; b < st.batch; ++b) {
      const int64_t slot = slot_of(b);
      if (slot < 0 || slot >= st.num_slots || seen[slot])
        return invalid("kept_step: seq_slots: expected distinct slots in [0, num_slots)");
      seen[slot] = true;
    }
  }
  for (int64_t b = 0; b < st.batch; ++b) {
    const int32_t* len = st.lengths + 3 * slot_of(b);
    const int64_t kept = int64_t{len[0]} - st.sinks, coded = len[1];
    if (kept < 0 || kept > st.kept_capacity || len[2] != w || coded < 0 || coded >= st.code_capacity)
      return invalid("kept_step: lengths: every sequence needs its sinks, at most kept_capacity kept tokens, a full "
                     "window and a free code row");
  }
  auto at = [&](const void* base, int64_t b, int64_t h, int64_t rows, int64_t r) {
    return static_cast<const uint8_t*>(base) + ((b * hkv + h) * rows + r) * row;
  };
  auto at_mut = [&](void* base, int64_t b, int64_t h, int64_t rows, int64_t r) {
    return static_cast<uint8_t*>(base) + ((b * hkv + h) * rows + r) * row;
  };
  for (int64_t b = 0; b < st.batch; ++b) {
    const int64_t seq = slot_of(b);  // the sequence's row of the per-sequence buffers
    const int32_t* len = st.lengths + 3 * seq;
    const int64_t kept = int64_t{len[0]} - st.sinks, coded = len[1];
    // the new key's novelty against the window's mean key
    double score = 0;
    for (int64_t h = 0; h < hkv; ++h) {
      double diff2 = 0, norm2 = 0;
      for (int64_t i = 0; i < d; ++i) {
        double mean = 0;
        for (int64_t r = 0; r < w; ++r) mean += element_value(dtype, at(st.window_keys, seq, h, w, r) + i * esize);
        mean /= double(w);
        const double k = element_value(dtype, at(st.new_keys, b, h, 1, 0) + i * esize);
        diff2 += (k - mean) * (k - mean);
        norm2 += k * k;
      }
      score += diff2 / std::max(norm2, 1e-12);
    }
    const int64_t left = kept + coded + 1;
    const int64_t fraction = static_cast<int64_t>(st.keep_fraction * double(left) + 0.5);
    const int64_t budget = std::min(left, std::max(st.keep_tokens, fraction));
    const bool grow = budget > kept && kept < st.kept_capacity;
    float* kept_scores = st.kept_scores + seq * st.kept_capacity;
    int32_t* kept_positions = st.kept_positions + seq * st.kept_capacity;
    float* window_scores = st.window_scores + seq * w;
    const float out_score = window_scores[0];
    const int32_t out_position = len[0] + len[1];
    int64_t low = -1;  // the lowest-scoring kept token, the lowest row on ties
    for (int64_t r = 0; r < kept; ++r)
      if (low < 0 || kept_scores[r] < kept_scores[low]) low = r;
    const bool swap = !grow && low >= 0 && out_score > kept_scores[low];
    const int64_t slot = grow ? kept : low;
    for (int64_t h = 0; h < hkv; ++h) {
      for (auto [window, sink, encode, fresh] :
           {std::tuple{st.window_keys, st.sink_keys, st.encode_keys, st.new_keys},
            std::tuple{st.window_values, st.sink_values, st.encode_values, st.new_values}}) {
        uint8_t* out_row = at_mut(window, seq, h, w, 0);
        std::memcpy(at_mut(encode, b, h, 1, 0), swap ? at(sink, seq, h, sink_rows, st.sinks + low) : out_row, row);
        if (grow || swap) std::memcpy(at_mut(sink, seq, h, sink_rows, st.sinks + slot), out_row, row);
        std::memmove(out_row, out_row + row, (w - 1) * row);
        std::memcpy(at_mut(window, seq, h, w, w - 1), at(fresh, b, h, 1, 0), row);
      }
    }
    if (!grow && st.code_positions)
      st.code_positions[seq * st.code_capacity + coded] = swap ? kept_positions[low] : out_position;
    if (grow || swap) kept_scores[slot] = out_score, kept_positions[slot] = out_position;
    std::memmove(window_scores, window_scores + 1, (w - 1) * sizeof(float));
    window_scores[w - 1] = static_cast<float>(score);
    int32_t* next = st.next_lengths + 3 * seq;
    next[0] = len[0] + (grow ? 1 : 0), next[1] = len[1] + (grow ? 0 : 1), next[2] = len[2];
    int32_t* encode = st.encode_lengths + 3 * seq;
    encode[0] = 0, encode[1] = len[1], encode[2] = 0;
  }
  return Status::Ok();
}

}  // namespace vecinfer::cpu
