"""Peak memory of a long query block on the CPU: a 64-token block over a 32k-token cache (8 KV
heads, D = 128, 2-bit), through QuantizedKVCache.attend, against the float32 layer (keys and values
of every token), which the earlier whole-layer dequantization held three times over.

    python bench/cpu_prefill_memory.py [--tokens 32768] [--queries 64]

Peak resident memory (ru_maxrss) is read before and after the call; the cache is filled in chunks
first, so that filling it peaks lower than the call would with a whole-layer dequantization.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch

import vecinfer
from vecinfer.config import VQConfig


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--queries", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    hkv, hq, d = 8, 32, 128
    gen = torch.Generator().manual_seed(0)
    cfg = VQConfig(key_bits=2, value_bits=2)
    layer = {"key_codebook": vecinfer.snap_codebook(torch.randn((1, 256, 4), generator=gen)),
             "value_codebook": vecinfer.snap_codebook(torch.randn((1, 256, 4), generator=gen)),
             "key_scale": torch.rand((hkv, d), generator=gen) + 0.5, "key_mean": torch.randn((hkv, d), generator=gen),
             "value_mean": torch.randn((hkv, d), generator=gen)}
    quant = vecinfer.KVQuantizer(cfg, [layer], hkv, d)
    cache = vecinfer.QuantizedKVCache(quant, 1, hkv, d, args.tokens + args.queries, dtype=torch.float32)
    for _ in range(0, args.tokens, 1024):
        k = torch.randn((1, hkv, 1024, d), generator=gen)
        cache.append(0, k, torch.randn_like(k))
    k = torch.randn((1, hkv, args.queries, d), generator=gen)
    cache.append(0, k, torch.randn_like(k))
    q = torch.randn((1, hq, args.queries, d), generator=gen)
    before = peak_mib()
    t0 = time.perf_counter()
    out = cache.attend(0, q)
    seconds = time.perf_counter() - t0
    after = peak_mib()
    layer_mib = 2 * hkv * (args.tokens + args.queries) * d * 4 / 2**20
    result = {"tokens": args.tokens, "queries": args.queries, "fp32_layer_MiB": layer_mib,
              "peak_before_MiB": before, "peak_after_MiB": after, "growth_MiB": after - before,
              "growth_vs_layer": (after - before) / layer_mib, "seconds": seconds,
              "finite": bool(torch.isfinite(out).all())}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
