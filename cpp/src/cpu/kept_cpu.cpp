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
    const int64_t s_len = len[0], coded = len[1], recent = len[2];
    const bool filling_sinks = s_len < st.sinks, filling_window = !filling_sinks && recent < w;
    const bool valid = s_len >= 0 && s_len - st.sinks <= st.kept_capacity && coded >= 0 &&
                       coded < st.code_capacity && recent >= 0 && recent <= w &&
                       (!filling_sinks || (coded == 0 && recent == 0)) &&
                       (!filling_window || (coded == 0 && s_len == st.sinks));
    if (!valid)
      return invalid("kept_step: lengths: each sequence must be filling its sinks (nothing after them), filling its "
                     "window (nothing kept or coded) or hold its sinks and a full window, with at most "
                     "kept_capacity kept tokens and a free code row");
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
    const int64_t kept = int64_t{len[0]} - st.sinks, coded = len[1], recent = len[2];
    const bool to_sink = len[0] < st.sinks, steady = !to_sink && recent == w;
    // the new key's novelty against the mean of its predecessors: the window when steady; else the
    // last `window` of the sinks' and window's keys
    const int64_t before_sinks = steady ? 0 : std::min<int64_t>(len[0], st.sinks), before_rows = steady ? w : recent;
    const int64_t count = std::min(w, before_sinks + before_rows), first = before_sinks + before_rows - count;
    double score = 0;
    for (int64_t h = 0; count > 0 && h < hkv; ++h) {
      double diff2 = 0, norm2 = 0;
      for (int64_t i = 0; i < d; ++i) {
        double mean = 0;
        for (int64_t p = first; p < before_sinks + before_rows; ++p)
          mean += element_value(dtype, (p < before_sinks ? at(st.sink_keys, seq, h, sink_rows, p)
                                                          : at(st.window_keys, seq, h, w, p - before_sinks)) +
                                           i * esize);
        mean /= double(count);
        const double k = element_value(dtype, at(st.new_keys, b, h, 1, 0) + i * esize);
        diff2 += (k - mean) * (k - mean);
        norm2 += k * k;
      }
      score += diff2 / std::max(norm2, 1e-12);
    }
    float* window_scores = st.window_scores + seq * w;
    int32_t* next = st.next_lengths + 3 * seq;
    int32_t* encode_lengths = st.encode_lengths + 3 * seq;
    encode_lengths[0] = 0, encode_lengths[1] = len[1], encode_lengths[2] = 0;
    if (!steady) {  // filling: the token takes the next sink or window row; encode row b (unread) is the token
      for (int64_t h = 0; h < hkv; ++h)
        for (auto [sink, window, encode_row, fresh] :
             {std::tuple{st.sink_keys, st.window_keys, st.encode_keys, st.new_keys},
              std::tuple{st.sink_values, st.window_values, st.encode_values, st.new_values}}) {
          std::memcpy(at_mut(encode_row, b, h, 1, 0), at(fresh, b, h, 1, 0), row);
          std::memcpy(to_sink ? at_mut(sink, seq, h, sink_rows, len[0]) : at_mut(window, seq, h, w, recent),
                      at(fresh, b, h, 1, 0), row);
        }
      if (!to_sink) window_scores[recent] = static_cast<float>(score);
      next[0] = len[0] + (to_sink ? 1 : 0), next[1] = len[1], next[2] = len[2] + (to_sink ? 0 : 1);
      continue;
    }
    const int64_t left = kept + coded + 1;
    const int64_t fraction = static_cast<int64_t>(st.keep_fraction * double(left) + 0.5);
    const int64_t budget = std::min(left, std::max(st.keep_tokens, fraction));
    const bool grow = budget > kept && kept < st.kept_capacity;
    float* kept_scores = st.kept_scores + seq * st.kept_capacity;
    int32_t* kept_positions = st.kept_positions + seq * st.kept_capacity;
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
    next[0] = len[0] + (grow ? 1 : 0), next[1] = len[1] + (grow ? 0 : 1), next[2] = len[2];
  }
  return Status::Ok();
}

}  // namespace vecinfer::cpu
