"""Where a prefill append with kept tokens spends its time: PagedKVCache (one layer, Llama-3.1-8B's 8
KV heads of 128 dims, 64 kept tokens and a 64-token window) takes a prompt in chunks of 8,192
tokens under torch.profiler; prints the wall time per chunk and the operators by GPU and by host
time, beside the same prompt without kept tokens.

    python bench/profile_kept_prefill.py [--batch B] [--tokens S]
"""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import vecinfer
from vecinfer.bench import random_quantizer


def prefill(keep_tokens: int, recent: int, batch: int, tokens: int, chunk: int = 8192, trace=None) -> float:
    quant = random_quantizer(8, 128, keep_tokens=keep_tokens, recent=recent)
    cache = vecinfer.PagedKVCache(quant, num_pages=batch * (tokens // 64 + 2), max_seqs=batch,
                                  max_tokens_per_seq=tokens, device="cuda", dtype=torch.float16)
    seqs = [cache.add_sequence() for _ in range(batch)]
    k = torch.randn((batch * chunk, 8, 128), device="cuda", dtype=torch.float16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for start in range(0, tokens, chunk):
        step = cache.plan_append(seqs, [chunk] * batch)
        cache.begin(step)
        cache.append(0, k, k, step)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (tokens // chunk)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=65536)
    args = parser.parse_args()
    for keep, recent in ((0, 128), (64, 64)):
        prefill(keep, recent, args.batch, 16384)  # warm-up: allocations, module loads
        ms = 1e3 * prefill(keep, recent, args.batch, args.tokens)
        print(f"keep_tokens {keep}, window {recent}: {ms:.2f} ms per chunk of 8,192 tokens x {args.batch} "
              f"({args.batch * 8192 / ms / 1e3:.2f} M tokens/s)")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        prefill(64, 64, args.batch, args.tokens)
    table = prof.key_averages()
    print(table.table(sort_by="self_cuda_time_total", row_limit=15))
    print(table.table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
