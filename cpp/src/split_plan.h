// The split-KV schedule of the decode kernel, as a pure host function (tested without a GPU).
#pragma once

#include <cstdint>

namespace vecinfer::detail {

struct SplitPlan {
  int64_t splits = 0;        // blocks over the coded tokens of each (sequence, head, row tile)
  int64_t split_tokens = 0;  // coded tokens per split: a multiple of `quantum`
};

// `groups` (sequence, KV head, row tile) triples share `slots` concurrent blocks; each holds at most
// max_coded coded tokens, which a block reads `quantum` tokens per step (one stage per warp). The
// estimated time of c splits is the waves of blocks times a block's time: its fixed cost (tables,
// queries, merging its warps), counted as setup_steps steps, plus its steps. The cheapest c wins
// (at most twice the splits that fill one wave); on ties the fewer splits. No coded tokens: no
// splits (the kernel's full-precision block alone), split_tokens = quantum.
inline SplitPlan plan_splits(int64_t groups, int64_t max_coded, int64_t quantum, int64_t slots,
                             int64_t setup_steps = 2) {
  SplitPlan plan;
  plan.split_tokens = quantum;
  if (max_coded <= 0 || groups <= 0 || quantum <= 0 || slots <= 0) return plan;
  const int64_t most = (max_coded + quantum - 1) / quantum;
  const int64_t limit = 2 * ((slots + groups - 1) / groups);
  int64_t best_cost = -1;
  for (int64_t c = 1; c <= limit && c <= most; ++c) {
    const int64_t per_split = ((max_coded + c - 1) / c + quantum - 1) / quantum * quantum;
    const int64_t used = (max_coded + per_split - 1) / per_split;
    const int64_t cost = (groups * used + slots - 1) / slots * (setup_steps + per_split / quantum);
    if (best_cost < 0 || cost < best_cost) best_cost = cost, plan.splits = used, plan.split_tokens = per_split;
  }
  return plan;
}

}  // namespace vecinfer::detail
