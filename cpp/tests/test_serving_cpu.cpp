// The serving pieces on the CPU: the split-KV planner (a pure host function), append_tokens
// (paged.h), whose result must not depend on how the tokens are grouped into calls, and the
// kept-token decode step (kept.h).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

#include "split_plan.h"
#include "vecinfer/kept.h"
#include "vecinfer/paged.h"

namespace {

using vecinfer::detail::plan_splits;

TEST(SplitPlan, CoversEveryCodedTokenWithWholeQuanta) {
  std::mt19937 rng(7);
  for (int i = 0; i < 2000; ++i) {
    const int64_t groups = 1 + rng() % 600, coded = rng() % 300000, quantum = 64 * (4 + rng() % 13),
                  slots = 1 + rng() % 400;
    const auto plan = plan_splits(groups, coded, quantum, slots);
    ASSERT_EQ(plan.split_tokens % quantum, 0);
    if (coded == 0) {
      EXPECT_EQ(plan.splits, 0);
      continue;
    }
    ASSERT_GE(plan.splits, 1);
    EXPECT_GE(plan.splits * plan.split_tokens, coded);               // every token has a split
    EXPECT_LT((plan.splits - 1) * plan.split_tokens, coded);         // and no split is empty
    EXPECT_LE(plan.splits, 2 * ((slots + groups - 1) / groups));     // at most two waves' worth
  }
}

TEST(SplitPlan, SplitsLongSequencesOnlyWhenTheGridIsNotFull) {
  // one sequence, 8 KV heads, 128k tokens, 132 SMs: the grid needs many splits
  EXPECT_GT(plan_splits(8, 131072, 1024, 132).splits, 8);
  // 32 x 8 groups already fill 132 slots: one or two splits, no more
  EXPECT_LE(plan_splits(256, 32768, 1024, 132).splits, 2);
}

// A tiny cache: 1 KV head, D = 64, 2 sinks, a ring of 4, pages of 16; keys and values float32.
struct TinyCache {
  static constexpr int kD = 64, kSinks = 2, kRing = 4, kPage = 16, kPages = 8, kSlots = 2;
  std::vector<float> centroids;  // one codebook, 16 centroids of 4
  std::vector<uint8_t> keys, values;
  std::vector<float> sink_k, sink_v, ring_k, ring_v;
  std::vector<int32_t> lengths, table;
  vecinfer::CompressedKV kv;

  TinyCache() : centroids(16 * 4), keys(kPages * kPage * 8), values(kPages * kPage * 8),
                sink_k(kSlots * kSinks * kD), sink_v(kSlots * kSinks * kD), ring_k(kSlots * kRing * kD),
                ring_v(kSlots * kRing * kD), lengths(kSlots * 3, 0), table(kSlots * 4) {
    std::mt19937 rng(3);
    std::normal_distribution<float> normal;
    for (float& c : centroids) c = normal(rng);
    for (int i = 0; i < kSlots * 4; ++i) table[i] = (i * 5) % kPages;  // shuffled pages
    kv.num_slots = kSlots;
    kv.lengths = lengths.data();
    kv.key_codes = keys.data();
    kv.value_codes = values.data();
    kv.page_table = table.data();
    kv.max_pages = 4;
    kv.num_pages = kPages;
    kv.page_size = kPage;
    kv.code_capacity = 4 * kPage;
    kv.max_coded = kv.code_capacity;
    kv.sink_keys = sink_k.data();
    kv.sink_values = sink_v.data();
    kv.sink_capacity = kSinks;
    kv.recent_keys = ring_k.data();
    kv.recent_values = ring_v.data();
    kv.recent_capacity = kRing;
    kv.recent_ring = true;
    kv.key_codebook.centroids = centroids.data();
    kv.key_codebook.sub_dim = 4;
    kv.key_codebook.code_bits = 4;
    kv.value_codebook = kv.key_codebook;
  }
};

vecinfer::Status append(TinyCache& cache, const std::vector<float>& rows, const std::vector<int32_t>& slots,
                        const std::vector<int32_t>& indptr) {
  vecinfer::TokenBatch tokens;
  tokens.batch = static_cast<int64_t>(slots.size());
  tokens.seq_slots = slots.data();
  tokens.indptr = indptr.data();
  tokens.keys = rows.data();
  tokens.values = rows.data();
  tokens.num_rows = static_cast<int64_t>(rows.size()) / TinyCache::kD;
  tokens.row_stride = TinyCache::kD;
  tokens.head_stride = TinyCache::kD;
  vecinfer::AttentionShape shape;
  shape.batch = tokens.batch;
  shape.num_q_heads = shape.num_kv_heads = 1;
  shape.num_queries = 1;
  shape.head_dim = TinyCache::kD;
  return vecinfer::cpu::append_tokens(vecinfer::DType::kFloat32, shape, tokens, cache.kv);
}

TEST(AppendTokens, OneCallEqualsOneTokenAtATime) {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  const int n = 37;  // through the sinks, the ring and several pages
  std::vector<float> rows(n * TinyCache::kD);
  for (float& x : rows) x = normal(rng);
  TinyCache whole, single;
  ASSERT_TRUE(append(whole, rows, {1}, {0, n}).ok());
  for (int t = 0; t < n; ++t) {
    std::vector<float> row(rows.begin() + t * TinyCache::kD, rows.begin() + (t + 1) * TinyCache::kD);
    ASSERT_TRUE(append(single, row, {1}, {0, 1}).ok());
  }
  EXPECT_EQ(whole.lengths, single.lengths);
  EXPECT_EQ(whole.lengths[3], 2);                   // slot 1: sinks
  EXPECT_EQ(whole.lengths[4], n - 2 - 4);           // coded
  EXPECT_EQ(whole.lengths[5], 4);                   // recent
  EXPECT_EQ(whole.keys, single.keys);
  EXPECT_EQ(whole.values, single.values);
  EXPECT_EQ(whole.sink_k, single.sink_k);
  EXPECT_EQ(whole.ring_k, single.ring_k);
  EXPECT_EQ(whole.lengths[0], 0);                   // slot 0 untouched
}

TEST(AppendTokens, BadCallsChangeNothing) {
  TinyCache cache;
  std::vector<float> rows(3 * TinyCache::kD, 1.f);
  const auto before = cache.lengths;
  EXPECT_FALSE(append(cache, rows, {2}, {0, 3}).ok());          // slot outside the table
  EXPECT_FALSE(append(cache, rows, {0, 0}, {0, 1, 3}).ok());    // a slot twice
  EXPECT_FALSE(append(cache, rows, {0, 1}, {0, 2, 1}).ok());    // indptr decreasing
  EXPECT_FALSE(append(cache, rows, {0}, {0, 4}).ok());          // beyond the rows
  std::vector<float> many(80 * TinyCache::kD, 1.f);
  EXPECT_FALSE(append(cache, many, {0}, {0, 80}).ok());         // more codes than the pages hold
  std::vector<float> long_rows(20 * TinyCache::kD, 1.f);
  long_rows[10 * TinyCache::kD] = NAN;                          // a token that is encoded
  EXPECT_FALSE(append(cache, long_rows, {0}, {0, 20}).ok());
  EXPECT_EQ(cache.lengths, before);
}

// One sequence of the kept-token step: 2 KV heads, D = 64, 1 sink, 2 kept rows, a window of 3,
// 8 code columns, keep_tokens = 2; float32. Window token j of head h holds the value 10 * h + j
// in every element; its row's position is 1 + kept + coded + j.
struct KeptSequence {
  static constexpr int kHeads = 2, kD = 64, kSinks = 1, kKept = 2, kWindow = 3, kCodes = 8;
  std::vector<float> new_k, new_v, sink_k, sink_v, window_k, window_v, encode_k, encode_v;
  std::vector<float> window_scores{0.5f, 0.25f, 0.75f}, kept_scores{0.f, 0.f};
  std::vector<int32_t> kept_positions{-1, -1}, code_positions = std::vector<int32_t>(kCodes, -1);
  std::vector<int32_t> lengths, next_lengths{-1, -1, -1}, encode_lengths{-1, -1, -1};

  explicit KeptSequence(std::vector<int32_t> lens)
      : new_k(kHeads * kD), new_v(kHeads * kD), sink_k(kHeads * (kSinks + kKept) * kD, -1.f),
        sink_v(kHeads * (kSinks + kKept) * kD, -1.f), window_k(kHeads * kWindow * kD),
        window_v(kHeads * kWindow * kD), encode_k(kHeads * kD, -7.f), encode_v(kHeads * kD, -7.f),
        lengths(std::move(lens)) {
    for (int h = 0; h < kHeads; ++h)
      for (int j = 0; j < kWindow; ++j)
        for (int i = 0; i < kD; ++i) {
          window_k[(h * kWindow + j) * kD + i] = 10.f * h + j;
          window_v[(h * kWindow + j) * kD + i] = -(10.f * h + j);
        }
  }

  vecinfer::Status step() {
    vecinfer::KeptStep st;
    st.batch = 1, st.num_kv_heads = kHeads, st.head_dim = kD, st.sinks = kSinks, st.kept_capacity = kKept;
    st.window = kWindow, st.code_capacity = kCodes, st.keep_tokens = 2;
    st.new_keys = new_k.data(), st.new_values = new_v.data(), st.sink_keys = sink_k.data();
    st.sink_values = sink_v.data(), st.window_keys = window_k.data(), st.window_values = window_v.data();
    st.encode_keys = encode_k.data(), st.encode_values = encode_v.data(), st.window_scores = window_scores.data();
    st.kept_scores = kept_scores.data(), st.kept_positions = kept_positions.data();
    st.code_positions = code_positions.data(), st.lengths = lengths.data(), st.next_lengths = next_lengths.data();
    st.encode_lengths = encode_lengths.data();
    return vecinfer::cpu::kept_step(vecinfer::DType::kFloat32, st);
  }
  float window_key(int h, int j) const { return window_k[(h * kWindow + j) * kD]; }
  float kept_key(int h, int r) const { return sink_k[(h * (kSinks + kKept) + kSinks + r) * kD]; }
};

TEST(KeptStep, ScoresTheNewKeyAndKeepsTheLeavingTokenWhileTheBudgetGrows) {
  KeptSequence seq({1, 0, 3});  // nothing kept or coded yet: the budget min(1, max(2, 0)) = 1 takes it
  for (int i = 0; i < KeptSequence::kD; ++i) seq.new_k[i] = 3.f, seq.new_k[KeptSequence::kD + i] = 11.f;
  ASSERT_TRUE(seq.step().ok());
  EXPECT_EQ(seq.next_lengths, (std::vector<int32_t>{2, 0, 3}));
  EXPECT_EQ(seq.encode_lengths, (std::vector<int32_t>{0, 0, 0}));
  EXPECT_EQ(seq.kept_key(0, 0), 0.f);  // window token 0 of head 0 is now kept row 0
  EXPECT_EQ(seq.kept_key(1, 0), 10.f);
  EXPECT_EQ(seq.kept_scores[0], 0.5f);
  EXPECT_EQ(seq.kept_positions[0], 1);
  EXPECT_EQ(seq.code_positions[0], -1);  // nothing coded
  EXPECT_EQ(seq.window_key(0, 0), 1.f);  // the window moved up one row; the new key is its last
  EXPECT_EQ(seq.window_key(1, 2), 11.f);
  EXPECT_EQ(seq.window_v[KeptSequence::kD], -2.f);
  // the window means are 1 (head 0) and 11 (head 1): (3 - 1)^2 / 3^2 + 0 / 11^2
  EXPECT_NEAR(seq.window_scores[2], 4.f / 9.f, 1e-6f);
  EXPECT_EQ(seq.window_scores[0], 0.25f);
}

TEST(KeptStep, AFullBudgetSwapsWithTheLowestKeptTokenOrEncodesTheLeavingOne) {
  for (float leaving_score : {0.9f, 0.1f}) {
    KeptSequence seq({3, 4, 3});  // 2 kept (the budget max(2, 0) = 2 is full), 4 coded
    seq.window_scores[0] = leaving_score;
    seq.kept_scores = {0.3f, 0.2f};
    seq.kept_positions = {2, 5};
    for (int h = 0; h < KeptSequence::kHeads; ++h)
      for (int r = 0; r < KeptSequence::kKept; ++r)
        for (int i = 0; i < KeptSequence::kD; ++i)
          seq.sink_k[(h * 3 + 1 + r) * KeptSequence::kD + i] = 100.f + r;
    ASSERT_TRUE(seq.step().ok());
    EXPECT_EQ(seq.next_lengths, (std::vector<int32_t>{3, 5, 3}));
    EXPECT_EQ(seq.encode_lengths, (std::vector<int32_t>{0, 4, 0}));
    if (leaving_score > 0.2f) {  // it beats kept row 1 (0.2): they swap, and row 1's token is encoded
      EXPECT_EQ(seq.encode_k[0], 101.f);
      EXPECT_EQ(seq.code_positions[4], 5);
      EXPECT_EQ(seq.kept_key(0, 1), 0.f);
      EXPECT_EQ(seq.kept_scores[1], leaving_score);
      EXPECT_EQ(seq.kept_positions[1], 1 + 2 + 4);
    } else {  // it is encoded, the kept tokens stay
      EXPECT_EQ(seq.encode_k[0], 0.f);
      EXPECT_EQ(seq.encode_v[KeptSequence::kD], -10.f);
      EXPECT_EQ(seq.code_positions[4], 1 + 2 + 4);
      EXPECT_EQ(seq.kept_key(0, 1), 101.f);
      EXPECT_EQ(seq.kept_positions, (std::vector<int32_t>{2, 5}));
    }
    EXPECT_EQ(seq.kept_key(1, 0), 100.f);  // row 0 is never touched
  }
}

TEST(KeptStep, BadLengthsChangeNothing) {
  for (std::vector<int32_t> lens : {std::vector<int32_t>{0, 0, 3},   // a window before the sinks are full
                                    std::vector<int32_t>{4, 0, 3},   // more kept than rows
                                    std::vector<int32_t>{1, 2, 2},   // codes before the window is full
                                    std::vector<int32_t>{2, 0, 2},   // a kept token before the window is full
                                    std::vector<int32_t>{1, 8, 3}}) {  // no free code column
    KeptSequence seq(lens), before(lens);
    EXPECT_FALSE(seq.step().ok());
    EXPECT_EQ(seq.window_k, before.window_k);
    EXPECT_EQ(seq.window_scores, before.window_scores);
    EXPECT_EQ(seq.sink_k, before.sink_k);
    EXPECT_EQ(seq.next_lengths, before.next_lengths);
  }
}

// Filling: the first token becomes the sink; the next ones window rows, each scored against the
// last `window` (3) of the sink's and window's keys; nothing is kept or coded.
TEST(KeptStep, AFillingSequenceTakesTheTokenAsASinkThenAWindowRow) {
  using K = KeptSequence;
  KeptSequence seq({0, 0, 0});
  std::vector<float> keys;  // head 0's key of each token, in order (head 1: the same + 10)
  for (float key : {2.f, 4.f, 6.f, 8.f}) {
    for (int i = 0; i < K::kD; ++i) seq.new_k[i] = key, seq.new_k[K::kD + i] = key + 10.f, seq.new_v[i] = -key;
    const std::vector<int32_t> before = seq.lengths;
    ASSERT_TRUE(seq.step().ok());
    EXPECT_EQ(seq.encode_lengths, (std::vector<int32_t>{0, 0, 0}));
    EXPECT_EQ(seq.encode_k[0], key);  // the token itself, written to code 0 where nothing reads it
    seq.lengths = seq.next_lengths;
    keys.push_back(key);
    if (keys.size() == 1) {
      EXPECT_EQ(seq.next_lengths, (std::vector<int32_t>{1, 0, 0}));
      EXPECT_EQ(seq.sink_k[0], 2.f);
      EXPECT_EQ(seq.sink_v[0], -2.f);
      continue;
    }
    const int r = before[2];  // its window row
    EXPECT_EQ(seq.next_lengths, (std::vector<int32_t>{1, 0, r + 1}));
    EXPECT_EQ(seq.window_key(0, r), key);
    EXPECT_EQ(seq.window_key(1, r), key + 10.f);
    // predecessors: the last min(3, tokens before) keys; per head ||k - m||^2 / ||k||^2 over 64 equal dims
    const size_t n = keys.size() - 1, count = std::min<size_t>(3, n);
    float m0 = 0;
    for (size_t j = n - count; j < n; ++j) m0 += keys[j] / float(count);
    const float expected = (key - m0) * (key - m0) / (key * key) +
                           (key - m0) * (key - m0) / ((key + 10.f) * (key + 10.f));
    EXPECT_NEAR(seq.window_scores[r], expected, 1e-5f);
  }
  EXPECT_EQ(seq.kept_positions, (std::vector<int32_t>{-1, -1}));  // nothing kept
  EXPECT_EQ(seq.code_positions[0], -1);                         // nothing coded
}

// A paged cache's step: the batch's one sequence is row 1 of two-row buffers (seq_slots), with no
// code positions recorded. Row 1 changes as the lone sequence of the first test did; row 0 not.
TEST(KeptStep, SlotsNameRowsOfLargerBuffers) {
  using K = KeptSequence;
  KeptSequence other({1, 0, 3}), seq({1, 0, 3});
  for (int i = 0; i < K::kD; ++i) seq.new_k[i] = 3.f, seq.new_k[K::kD + i] = 11.f;
  auto two_rows = [](const auto& row0, const auto& row1) {
    auto both = row0;
    both.insert(both.end(), row1.begin(), row1.end());
    return both;
  };
  auto sink_k = two_rows(other.sink_k, seq.sink_k), sink_v = two_rows(other.sink_v, seq.sink_v);
  auto window_k = two_rows(other.window_k, seq.window_k), window_v = two_rows(other.window_v, seq.window_v);
  auto window_scores = two_rows(other.window_scores, seq.window_scores);
  auto kept_scores = two_rows(other.kept_scores, seq.kept_scores);
  auto kept_positions = two_rows(other.kept_positions, seq.kept_positions);
  auto lengths = two_rows(other.lengths, seq.lengths);
  std::vector<int32_t> next(6, -1), encode(6, -1);
  for (std::vector<int32_t> slots : {std::vector<int32_t>{2}, std::vector<int32_t>{1, 1}, std::vector<int32_t>{1}}) {
    vecinfer::KeptStep st;
    st.batch = int64_t(slots.size()), st.num_kv_heads = K::kHeads, st.head_dim = K::kD, st.sinks = K::kSinks;
    st.kept_capacity = K::kKept, st.window = K::kWindow, st.code_capacity = K::kCodes, st.keep_tokens = 2;
    st.seq_slots = slots.data(), st.num_slots = 2;
    std::vector<float> new_k = two_rows(seq.new_k, seq.new_k), encode_k(st.batch * K::kHeads * K::kD, -7.f);
    std::vector<float> encode_v = encode_k;
    st.new_keys = new_k.data(), st.new_values = new_k.data(), st.sink_keys = sink_k.data();
    st.sink_values = sink_v.data(), st.window_keys = window_k.data(), st.window_values = window_v.data();
    st.encode_keys = encode_k.data(), st.encode_values = encode_v.data(), st.window_scores = window_scores.data();
    st.kept_scores = kept_scores.data(), st.kept_positions = kept_positions.data();
    st.lengths = lengths.data(), st.next_lengths = next.data(), st.encode_lengths = encode.data();
    const bool valid = slots.size() == 1 && slots[0] == 1;  // out of range, then twice the same slot
    EXPECT_EQ(vecinfer::cpu::kept_step(vecinfer::DType::kFloat32, st).ok(), valid);
    if (!valid) EXPECT_EQ(window_k, two_rows(other.window_k, seq.window_k));
  }
  EXPECT_EQ(next, (std::vector<int32_t>{-1, -1, -1, 2, 0, 3}));
  EXPECT_EQ(encode, (std::vector<int32_t>{-1, -1, -1, 0, 0, 0}));
  const int64_t row = K::kHeads * (K::kSinks + K::kKept) * K::kD;  // sink elements per row
  EXPECT_EQ(sink_k[row + K::kSinks * K::kD], 0.f);  // row 1: window token 0 of head 0 is kept row 0
  EXPECT_EQ(kept_positions, (std::vector<int32_t>{-1, -1, 1, -1}));
  EXPECT_NEAR(window_scores[K::kWindow + 2], 4.f / 9.f, 1e-6f);
  EXPECT_EQ(std::vector<float>(sink_k.begin(), sink_k.begin() + row), other.sink_k);  // row 0 untouched
  EXPECT_EQ(std::vector<float>(window_k.begin(), window_k.begin() + K::kHeads * K::kWindow * K::kD), other.window_k);
  EXPECT_EQ(std::vector<float>(window_scores.begin(), window_scores.begin() + K::kWindow), other.window_scores);
}

}  // namespace
