"""Time KVQuantizer.calibrate for a 30-layer model's worth of samples (256-entry codebooks).

    python bench/bench_calibration.py [--device cuda] [--layers 30] [--heads 3] [--head-dim 64] [--tokens 8192]

Samples are random with per-channel offsets (timing does not depend on the values).
"""
from __future__ import annotations

import argparse
import time

import torch

import vecinfer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--tokens", type=int, default=8192)
    a = p.parse_args()
    g = torch.Generator().manual_seed(0)
    shape = (a.heads, a.tokens, a.head_dim)
    keys = [(torch.randn(shape, generator=g) + 4 * torch.randn((a.heads, 1, a.head_dim), generator=g)).to(a.device)
            for _ in range(a.layers)]
    values = [torch.randn(shape, generator=g).to(a.device) for _ in range(a.layers)]
    cfg = vecinfer.VQConfig(key_bits=2, value_bits=2)
    t = time.time()
    q = vecinfer.KVQuantizer.calibrate(keys, values, cfg, progress=False)
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.time() - t
    print(f"calibrate: {a.layers} layers x 2 codebooks of 256 x 4 ({cfg.kmeans_iters} k-means iterations, "
          f"<= {cfg.max_samples} sub-vectors each) from {a.tokens} tokens x {a.heads} KV heads x {a.head_dim} "
          f"on {a.device}: {dt:.1f} s; {q.parameter_bytes() / 1024:.0f} KiB of parameters")


if __name__ == "__main__":
    main()
