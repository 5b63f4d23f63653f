"""GPU benchmark of the transform and codec ops against a device-to-device copy of the same bytes.

    python bench/bench_ops.py [--json out.json]

Times with CUDA events after warm-up, median of many runs, rotating between input buffers that
together exceed the L2 cache. Prints, per op: time, bytes moved (read + written), achieved GB/s,
and the copy bandwidth measured in the same run as the ceiling.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

import vecinfer

GiB = 1 << 30


def time_ms(fn, iters=30, warmup=5):
    for _ in range(warmup):
        fn(0)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        fn(i)
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def rand(shape, dtype, n_buffers):
    return [torch.randn(shape, device="cuda", dtype=torch.float32).to(dtype) for _ in range(n_buffers)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []

    def record(name, ms, bytes_moved, copy_gbs):
        gbs = bytes_moved / ms / 1e6
        rows.append({"op": name, "ms": ms, "bytes": bytes_moved, "GB/s": gbs, "copy GB/s": copy_gbs,
                     "pct_of_copy": 100 * gbs / copy_gbs})

    # Ceiling: device-to-device copy of 1 GiB (bytes read + written).
    src, dst = torch.empty(GiB, dtype=torch.uint8, device="cuda"), torch.empty(GiB, dtype=torch.uint8, device="cuda")
    src.random_(0, 255)
    copy_ms = time_ms(lambda i: dst.copy_(src))
    copy_gbs = 2 * GiB / copy_ms / 1e6
    rows.append({"op": "copy 1 GiB (d2d)", "ms": copy_ms, "bytes": 2 * GiB, "GB/s": copy_gbs, "copy GB/s": copy_gbs,
                 "pct_of_copy": 100.0})
    del src, dst

    # Hadamard on 1 GiB of bf16 (rows of 128), two rotating inputs.
    n_rows = GiB // (128 * 2)
    xs = rand((n_rows // 8, 8, 128), torch.bfloat16, 2)
    out = torch.empty_like(xs[0])
    ms = time_ms(lambda i: vecinfer.hadamard(xs[i % 2], out=out))
    record("hadamard bf16 D=128, 1 GiB", ms, 2 * GiB, copy_gbs)

    kv_heads = 8
    scale = torch.rand((kv_heads, 128), device="cuda") + 0.5
    mean = torch.randn((kv_heads, 128), device="cuda")
    ms = time_ms(lambda i: vecinfer.transform_keys(xs[i % 2], scale, mean, out=out))
    record("smooth+mean+hadamard keys bf16 D=128, 1 GiB", ms, 2 * GiB, copy_gbs)
    del xs, out

    # Fused transform + encode of keys [B, Hkv, T, D] bf16.
    for d, sub, bits, tokens in [(128, 4, 8, 32768), (64, 4, 8, 32768), (256, 4, 8, 16384), (128, 8, 12, 8192),
                                 (128, 2, 8, 16384)]:
        ks = rand((4, kv_heads, tokens, d), torch.bfloat16, 2)
        sc = torch.rand((kv_heads, d), device="cuda") + 0.5
        mu = torch.randn((kv_heads, d), device="cuda")
        codebook = torch.randn((1, 1 << bits, sub), device="cuda")
        codes = vecinfer.vq_encode(ks[0], codebook, scale=sc, mean=mu, hadamard=True)
        ms = time_ms(lambda i: vecinfer.vq_encode(ks[i % 2], codebook, scale=sc, mean=mu, hadamard=True, out=codes),
                     iters=10, warmup=2)
        moved = ks[0].numel() * 2 + codes.numel()
        record(f"fused transform+encode bf16 D={d} s={sub} b={bits} ({bits / sub:g} bit)", ms, moved, copy_gbs)
        if (d, sub, bits) == (128, 4, 8):
            dec = torch.empty_like(ks[0])
            ms = time_ms(lambda i: vecinfer.vq_decode(codes, codebook, head_dim=d, dtype=torch.bfloat16, scale=sc,
                                                      mean=mu, hadamard=True, out=dec))
            record(f"decode+inverse transform bf16 D={d} s={sub} b={bits}", ms, moved, copy_gbs)
        del ks, codes

    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'op':58s} {'ms':>9s} {'GB moved':>9s} {'GB/s':>8s} {'% of copy':>9s}")
    for r in rows:
        print(f"{r['op']:58s} {r['ms']:9.3f} {r['bytes'] / 1e9:9.3f} {r['GB/s']:8.0f} {r['pct_of_copy']:8.1f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
