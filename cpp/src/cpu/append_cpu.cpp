// CPU reference of appending tokens to a paged cache with a ring window (paged.h): the rule of
// paged.h applied token by token, after every slot, length and page has been checked.
#include <array>
#include <cstring>
#include <vector>

#include "head_tables.h"
#include "vecinfer/ops.h"
#include "vecinfer/paged.h"

namespace vecinfer::cpu {
namespace {

int element_bytes(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// Where one token of a sequence goes.
struct Move {
  enum Kind { kSink, kRing, kCode } kind;
  const uint8_t* key;    // source rows (head 0): an input row, or a ring row for an evicted token
  const uint8_t* value;
  int64_t source_head_stride;  // bytes between heads of the source
  int64_t target;        // sink row, ring row, or code index
};

}  // namespace

Status append_tokens(DType dtype, const AttentionShape& shape, const TokenBatch& tokens, const CompressedKV& kv) {
  Status s = check_append(shape, tokens, kv);
  if (!s.ok()) return s;
  const int64_t hkv = shape.num_kv_heads;
  const int d = shape.head_dim;
  const int64_t esize = element_bytes(dtype);
  const int64_t sink_cap = kv.sink_capacity, ring = kv.recent_capacity;
  // Check everything first, and plan each sequence's moves from its lengths.
  if (tokens.indptr[0] != 0) return invalid("indptr: must start at 0");
  std::vector<char> seen(kv.num_slots, 0);
  std::vector<std::vector<Move>> moves(tokens.batch);
  std::vector<std::array<int32_t, 3>> after(tokens.batch);
  for (int64_t i = 0; i < tokens.batch; ++i) {
    const int32_t slot = tokens.seq_slots[i];
    if (slot < 0 || slot >= kv.num_slots) return invalid("seq_slots: a slot outside [0, num_slots)");
    if (seen[slot]) return invalid("seq_slots: a slot appears twice in one batch");
    seen[slot] = 1;
    const int64_t first = tokens.indptr[i], last = tokens.indptr[i + 1];
    if (last < first || last > tokens.num_rows)
      return invalid("indptr: must be non-decreasing and end within the rows of keys/values");
    const int32_t* len = kv.lengths + 3 * slot;
    if (len[0] < 0 || len[1] < 0 || len[2] < 0 || len[0] > sink_cap || len[2] > ring ||
        (len[0] < sink_cap && (len[1] > 0 || len[2] > 0)))
      return invalid("lengths: not a state the cache can hold (sinks fill first, recent <= its capacity)");
    int64_t sinks = len[0], coded = len[1], recent = len[2];
    // What each ring row holds while the sequence's tokens go through: its row in memory, or the
    // input row of a token that entered it during this append.
    const int64_t ring_heads = ring * d * esize;
    std::vector<Move> held(ring);
    for (int64_t x = 0; x < ring; ++x)
      held[x] = {Move::kRing, static_cast<const uint8_t*>(kv.recent_keys) + (slot * hkv * ring + x) * d * esize,
                 static_cast<const uint8_t*>(kv.recent_values) + (slot * hkv * ring + x) * d * esize, ring_heads, x};
    for (int64_t row = first; row < last; ++row) {
      const uint8_t* key = static_cast<const uint8_t*>(tokens.keys) + row * tokens.row_stride * esize;
      const uint8_t* value = static_cast<const uint8_t*>(tokens.values) + row * tokens.row_stride * esize;
      const int64_t input_heads = tokens.head_stride * esize;
      if (sinks < sink_cap) {
        moves[i].push_back({Move::kSink, key, value, input_heads, sinks++});
        continue;
      }
      if (ring == 0) {
        moves[i].push_back({Move::kCode, key, value, input_heads, coded++});
        continue;
      }
      if (recent == ring) {  // the oldest recent token leaves the window for the codes
        const Move& oldest = held[coded % ring];
        moves[i].push_back({Move::kCode, oldest.key, oldest.value, oldest.source_head_stride, coded++});
        --recent;
      }
      const int64_t x = (coded + recent++) % ring;
      held[x] = {Move::kRing, key, value, input_heads, x};
      moves[i].push_back(held[x]);
    }
    if (coded > kv.code_capacity) return invalid("page_table: the sequence's pages cannot hold its codes");
    for (int64_t page = len[1] / kv.page_size; page * kv.page_size < coded; ++page) {
      const int32_t id = kv.page_table[slot * kv.max_pages + page];
      if (id < 0 || id >= kv.num_pages) return invalid("page_table: a page id outside the page pools");
    }
    after[i] = {static_cast<int32_t>(sinks), static_cast<int32_t>(coded), static_cast<int32_t>(recent)};
  }

  // Encode every token bound for the codes before any ring row is overwritten: per KV head, the
  // rows of all sequences gathered into one block and encoded in one call.
  const int64_t key_bytes = code_row_bytes(d, kv.key_codebook.sub_dim, kv.key_codebook.code_bits);
  const int64_t value_bytes = code_row_bytes(d, kv.value_codebook.sub_dim, kv.value_codebook.code_bits);
  const int64_t row_bytes = d * esize;
  std::vector<const Move*> coded_moves;
  for (const auto& list : moves)
    for (const Move& m : list)
      if (m.kind == Move::kCode) coded_moves.push_back(&m);
  const int64_t n_codes = static_cast<int64_t>(coded_moves.size());
  // codes[h]: [n_codes, key_bytes] then [n_codes, value_bytes]
  std::vector<std::vector<uint8_t>> codes(hkv, std::vector<uint8_t>(n_codes * (key_bytes + value_bytes)));
  if (n_codes > 0) {
    RowLayout rows;
    rows.num_rows = n_codes;
    rows.head_dim = d;
    rows.tokens_per_head = n_codes;
    std::vector<uint8_t> keys(n_codes * row_bytes), values(n_codes * row_bytes);
    for (int64_t h = 0; h < hkv; ++h) {
      for (int64_t r = 0; r < n_codes; ++r) {
        const Move& m = *coded_moves[r];
        std::memcpy(keys.data() + r * row_bytes, m.key + h * m.source_head_stride, row_bytes);
        std::memcpy(values.data() + r * row_bytes, m.value + h * m.source_head_stride, row_bytes);
      }
      s = vq_encode(dtype, keys.data(), codes[h].data(), rows, head_codebook(kv.key_codebook, h, hkv),
                    head_transform(kv.key_transform, h, hkv, d));
      if (s.ok())
        s = vq_encode(dtype, values.data(), codes[h].data() + n_codes * key_bytes, rows,
                      head_codebook(kv.value_codebook, h, hkv),
                      value_transform(kv.value_mean, kv.value_mean_rows, h, hkv, d));
      if (!s.ok()) return s;
    }
  }

  // Commit: codes, then sinks and ring rows in order, then the lengths.
  int64_t code_index = 0;
  for (int64_t i = 0; i < tokens.batch; ++i) {
    const int64_t slot = tokens.seq_slots[i];
    for (const Move& m : moves[i]) {
      if (m.kind == Move::kCode) {
        const int64_t page = kv.page_table[slot * kv.max_pages + m.target / kv.page_size];
        for (int64_t h = 0; h < hkv; ++h) {
          const int64_t row = (page * hkv + h) * kv.page_size + m.target % kv.page_size;
          std::memcpy(kv.key_codes + row * key_bytes, codes[h].data() + code_index * key_bytes, key_bytes);
          std::memcpy(kv.value_codes + row * value_bytes,
                      codes[h].data() + (n_codes * key_bytes) + code_index * value_bytes, value_bytes);
        }
        ++code_index;
        continue;
      }
      const bool sink = m.kind == Move::kSink;
      const int64_t capacity = sink ? sink_cap : ring;
      uint8_t* keys = static_cast<uint8_t*>(sink ? kv.sink_keys : kv.recent_keys);
      uint8_t* values = static_cast<uint8_t*>(sink ? kv.sink_values : kv.recent_values);
      for (int64_t h = 0; h < hkv; ++h) {
        const int64_t row = (slot * hkv + h) * capacity + m.target;
        std::memcpy(keys + row * row_bytes, m.key + h * m.source_head_stride, row_bytes);
        std::memcpy(values + row * row_bytes, m.value + h * m.source_head_stride, row_bytes);
      }
    }
    std::memcpy(kv.lengths + 3 * slot, after[i].data(), sizeof(after[i]));
  }
  return Status::Ok();
}

}  // namespace vecinfer::cpu
