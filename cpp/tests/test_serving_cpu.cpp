// The serving pieces on the CPU: the split-KV planner (a pure host function) and append_tokens
// (paged.h), whose result must not depend on how the tokens are grouped into calls.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "split_plan.h"
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

}  // namespace
