"""`vecinfer demo`: compress real keys and values of SmolLM2-135M and report size and quality.

The package ships post-RoPE keys and values of three layers of SmolLM2-135M-Instruct captured
on a Paul Graham essay (python/vecinfer/data/smollm2_kv.npz, written by tests/data/capture_kv.py).
The demo calibrates 2-bit codebooks on the first part of the tokens, compresses the rest with
three methods (plain VQ, the paper's smoothing + Hadamard, vecinfer's default), and reports the
cache's size against fp16 and the error of attention computed on the compressed cache. On a GPU
it also times the fused transform + encode kernel against a device-to-device copy.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

DATA = os.path.join(os.path.dirname(__file__), "data", "smollm2_kv.npz")


def load_real_kv():
    """(layers, keys, values, provenance): keys[l], values[l] float32 [num_kv_heads, tokens, head_dim]."""
    with np.load(DATA) as f:
        layers = [int(x) for x in f["layers"]]
        keys = [torch.from_numpy(f[f"k_layer{l}"].astype(np.float32)) for l in layers]
        values = [torch.from_numpy(f[f"v_layer{l}"].astype(np.float32)) for l in layers]
        provenance = f"{f['model']} on {f['text']}"
    return layers, keys, values, provenance


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def run_demo(device=None) -> int:
    import vecinfer
    from vecinfer.cache import reference_attention
    from vecinfer.quantizer import build_quantizer

    device = device or ("cuda" if vecinfer.cuda_available() else "cpu")
    t0 = time.time()
    layers, keys, values, provenance = load_real_kv()
    heads, tokens, dim = keys[0].shape
    calib = tokens * 3 // 5
    print(f"vecinfer demo: real post-RoPE K/V of {provenance}")
    print(f"  layers {layers}, {heads} KV heads, head_dim {dim}; calibrate on tokens [0, {calib}), "
          f"evaluate on [{calib}, {tokens}); device {device}\n")
    cal_k = [k[:, :calib].to(device) for k in keys]
    cal_v = [v[:, :calib].to(device) for v in values]

    print(f"{'method':10s} {'bits/elem':>9s} {'key err':>8s} {'value err':>9s} {'attention-output err (per layer)':>34s}")
    results = {}
    for method, label in (("vq", "plain VQ"), ("paper", "paper"), ("vecinfer", "vecinfer")):
        q = build_quantizer(method, cal_k, cal_v, bits=2, residual=0, progress=False)
        k_err, v_err, att = [], [], []
        for i in range(len(layers)):
            k = keys[i][None, :, calib:].to(device)
            v = values[i][None, :, calib:].to(device)
            k_hat, v_hat = q.fake_quantize(i, k, v)
            k_err.append(_rel(k_hat, k))
            v_err.append(_rel(v_hat, v))
            # Queries: the layer's own keys stand in for queries (no queries were captured);
            # every later token attends over all evaluation tokens before it.
            qry = keys[i][None, :, -16:].to(device)
            exact = reference_attention(qry, k, v)
            approx = reference_attention(qry, k_hat, v_hat)
            att.append(_rel(approx, exact))
        results[method] = q
        per_layer = " ".join(f"{e:.3f}" for e in att)
        print(f"{label:10s} {q.bits_per_element():9.2f} {np.mean(k_err):8.3f} {np.mean(v_err):9.3f} {per_layer:>34s}")

    q = results["vecinfer"]
    context = 32768
    cache = vecinfer.QuantizedKVCache(q, batch_size=1, num_kv_heads=heads, head_dim=dim, max_tokens=context,
                                      device=device, dtype=torch.float16)
    fp16 = 2 * len(layers) * heads * context * dim * 2
    print(f"\ncache for one {context}-token sequence, {len(layers)} layers: fp16 {fp16 / 2**20:.1f} MiB, "
          f"vecinfer {cache.nbytes() / 2**20:.2f} MiB ({fp16 / cache.nbytes():.1f}x smaller; counts codes, "
          f"the {q.config.residual}-token fp16 window, codebooks, scales and means)")
    per_token = 2 * heads * dim * 2
    coded = heads * (vecinfer.code_row_bytes(dim, q.config.key_sub_dim, q.config.key_code_bits)
                     + vecinfer.code_row_bytes(dim, q.config.value_sub_dim, q.config.value_code_bits))
    print(f"bytes per token per layer: fp16 {per_token}, codes {coded} ({per_token / coded:.0f}x)")

    if device == "cuda":
        _gpu_speed(q, heads, dim)
    print(f"\ndone in {time.time() - t0:.1f} s")
    return 0


def _gpu_speed(q, heads, dim):
    import vecinfer

    p = q.layers[0]
    k = torch.randn((16, heads, 16384, dim), device="cuda", dtype=torch.float16)
    codes = q.encode_keys(0, k)
    dst = torch.empty_like(k)

    def timed(fn, reps=20):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / reps

    copy_ms = timed(lambda: dst.copy_(k))
    enc_ms = timed(lambda: vecinfer.vq_encode(k, p["key_codebook"], scale=p["key_scale"], mean=p["key_mean"],
                                              hadamard=True, out=codes))
    moved = k.numel() * 2 + codes.numel()
    print(f"GPU fused transform+encode of {k.numel() * 2 / 2**20:.0f} MiB fp16 keys: {enc_ms:.3f} ms, "
          f"{moved / enc_ms / 1e6:.0f} GB/s (copy of the keys: {2 * k.numel() * 2 / copy_ms / 1e6:.0f} GB/s)")
