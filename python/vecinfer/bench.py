"""`vecinfer bench`: decode attention on the compressed cache against torch SDPA on fp16 K/V (GPU).

    vecinfer bench [--quick] [--json out.json] [--plot out.png]     (or python -m vecinfer bench)
    vecinfer bench --e2e [...]      end-to-end generation with a Llama-3.1-8B-shaped model (bench_e2e.py)
    vecinfer bench --serving        the serving API: paged appends, paged decode through a plan, run's host time
                                    (with --keep-tokens N --recent R: a cache keeping N tokens)
    vecinfer bench --prefill        long query blocks (chunked prefill, second turns) against SDPA
    vecinfer bench --keep-fraction F --keep-tokens N --recent R   decode with kept tokens (VQConfig's
                                    budget, read as sinks) and an R-token recent window

For each shape (Llama-3.1-8B attention by default: 32 query heads, 8 KV heads, D = 128; 2-bit keys
and values; 4 sink tokens and an R = 128 fp16 recent window), in one run: the fused kernel's time,
SDPA's time on fp16 K/V of the same length (best of its cuDNN and flash backends), the ratio, the
bytes the kernel must read (codes + fp16 window + queries) and the achieved GB/s, a device-to-device
copy's GB/s as the ceiling, and the cache's memory against fp16 (codes, codebooks, scales, means,
sinks and window). Both sides are captured in CUDA graphs and replayed, so the figures are GPU time
(the eager per-call time of vecinfer.attention, Python included, is printed too). Medians of many
replays; every shape's data exceeds the 50 MB L2 cache. --plot draws the latency of both against
the number of cached tokens (batch x context) with matplotlib, if it is installed.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys

import torch
import torch.nn.functional as F

import vecinfer
from vecinfer.config import PRESETS, VQConfig

GiB = 1 << 30
SINKS, RECENT = 4, 128

# (label, batch, tokens, q heads, kv heads, head_dim, Tq, key bits, value bits, bar): the shapes of
# the kernel issue (Llama-3.1-8B attention unless said), each with its speedup bar over SDPA.
SHAPES = [
    ("B=1 S=128k", 1, 131072, 32, 8, 128, 1, 2, 2, 3.5),
    ("B=8 S=32k", 8, 32768, 32, 8, 128, 1, 2, 2, 4.0),
    ("B=32 S=32k", 32, 32768, 32, 8, 128, 1, 2, 2, 4.0),
    ("B=64 S=16k", 64, 16384, 32, 8, 128, 1, 2, 2, 4.0),
    ("B=128 S=8k", 128, 8192, 32, 8, 128, 1, 2, 2, 4.0),
    ("B=1 S=1M", 1, 1048576, 32, 8, 128, 1, 2, 2, 5.0),
    ("B=32 S=32k 1.5-bit", 32, 32768, 32, 8, 128, 1, 1.5, 1.5, 2.0),
    ("B=32 S=32k 4-bit", 32, 32768, 32, 8, 128, 1, 4, 4, 2.0),
    ("B=32 S=32k Qwen 28/4", 32, 32768, 28, 4, 128, 1, 2, 2, 2.0),
    ("B=64 S=32k D=64 9/3", 64, 32768, 9, 3, 64, 1, 2, 2, 2.0),
    ("B=16 S=32k D=256 16/8", 16, 32768, 16, 8, 256, 1, 2, 2, 2.0),
    ("B=32 S=32k Tq=4", 32, 32768, 32, 8, 128, 4, 2, 2, 2.0),
    ("B=1 S=32k", 1, 32768, 32, 8, 128, 1, 2, 2, None),
]
QUICK = {"B=1 S=128k", "B=32 S=32k"}
# Inputs are rotated so that every replay reads at least this many bytes of codes (over 4x the L2).
ROTATE_BYTES = 256 << 20


def graph_time_ms(fns, replays=20, iters=10):
    """Median over `iters` of the time of `replays` replays of a graph that calls each of `fns` once,
    divided by replays * len(fns): the time of one call."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            for fn in fns:
                fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in fns:
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / replays / len(fns))
    return statistics.median(times)


def eager_time_ms(fn, iters=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def copy_bandwidth():
    """Device-to-device copy of 1 GiB, bytes read + written per second (eager: a copy captured in a
    CUDA graph measured ~20% slower on the H100)."""
    src = torch.empty(GiB, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = eager_time_ms(lambda: dst.copy_(src), iters=10)
    return 2 * GiB / ms / 1e6


def sdpa_ms(b, s, hq, hkv, d, tq):
    """Best of SDPA's cuDNN and flash backends on fp16 K/V [B, Hkv, S, D] (GQA)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn((b, hq, tq, d), device="cuda", dtype=torch.float16)
    k = torch.randn((b, hkv, s, d), device="cuda", dtype=torch.float16)
    v = torch.randn_like(k)
    best = {}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                def fn():
                    return F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=True)
                fn()
                best[name] = graph_time_ms([fn])
        except RuntimeError as e:  # a backend that does not take this shape
            best[name] = float("nan")
            print(f"    (SDPA {name}: {str(e).splitlines()[0][:80]})")
    del q, k, v
    torch.cuda.empty_cache()
    return best


def kept_count(s, keep_fraction=0.0, keep_tokens=0, recent=RECENT):
    """Full-precision kept tokens of an s-token sequence (VQConfig.kept_budget of its compressed part)."""
    cfg = VQConfig(keep_fraction=keep_fraction, keep_tokens=keep_tokens, residual=recent, sink_tokens=SINKS)
    return cfg.kept_budget(s - SINKS - recent)


def vecinfer_inputs(b, s, hq, hkv, d, tq, key_bits, value_bits, seed=0, keep_fraction=0.0, keep_tokens=0,
                    recent=RECENT):
    """The decode inputs of one shape; kept tokens are read as sinks (QuantizedKVCache's layout)."""
    ks, kb = PRESETS[key_bits]
    vs, vb = PRESETS[value_bits]
    sinks = SINKS + kept_count(s, keep_fraction, keep_tokens, recent)
    coded = s - sinks - recent
    cap = (coded + 15) // 16 * 16
    gen = torch.Generator(device="cuda").manual_seed(seed)
    codes = lambda bytes_: torch.randint(0, 256, (b, hkv, cap, bytes_), device="cuda", dtype=torch.uint8,  # noqa: E731
                                         generator=gen)
    inp = dict(
        q=torch.randn((b, hq, tq, d), device="cuda", dtype=torch.float16),
        key_codes=codes(d // ks * kb // 8), value_codes=codes(d // vs * vb // 8),
        lengths=torch.tensor([[sinks, coded, recent]] * b, dtype=torch.int32, device="cuda"),
        key_codebook=vecinfer.snap_codebook(torch.randn((1, 1 << kb, ks), device="cuda")),
        value_codebook=vecinfer.snap_codebook(torch.randn((1, 1 << vb, vs), device="cuda")),
        sink_keys=torch.randn((b, hkv, sinks, d), device="cuda", dtype=torch.float16),
        sink_values=torch.randn((b, hkv, sinks, d), device="cuda", dtype=torch.float16),
        recent_keys=torch.randn((b, hkv, recent, d), device="cuda", dtype=torch.float16),
        recent_values=torch.randn((b, hkv, recent, d), device="cuda", dtype=torch.float16),
        key_scale=torch.rand((hkv, d), device="cuda") + 0.5, key_mean=torch.randn((hkv, d), device="cuda"),
        max_coded=coded)
    return inp


def random_quantizer(hkv, d, key_bits=2, value_bits=2, seed=0, keep_tokens=0, recent=RECENT):
    """A one-layer quantizer with random codebooks and tables (speed does not depend on their values)."""
    from vecinfer.config import VQConfig

    cfg = VQConfig(key_bits=key_bits, value_bits=value_bits, sink_tokens=SINKS, residual=recent,
                   keep_tokens=keep_tokens)
    gen = torch.Generator().manual_seed(seed)
    layer = {"key_codebook": vecinfer.snap_codebook(torch.randn((1, 1 << cfg.key_code_bits, cfg.key_sub_dim), generator=gen)),
             "value_codebook": vecinfer.snap_codebook(torch.randn((1, 1 << cfg.value_code_bits, cfg.value_sub_dim),
                                                                  generator=gen)),
             "key_scale": torch.rand((hkv, d), generator=gen) + 0.5, "key_mean": torch.randn((hkv, d), generator=gen),
             "value_mean": torch.randn((hkv, d), generator=gen)}
    return vecinfer.KVQuantizer(cfg, [layer], hkv, d).to("cuda")


def serving(copy_gbs, json_path=None, keep_tokens=0, recent=RECENT) -> int:
    """The serving API (PagedKVCache), Llama-3.1-8B attention, 2-bit: prefill appends (tokens/s,
    GB/s of fp16 K/V in and codes out), the one-token decode append (graph replays, and the eager
    call), paged decode attention through a plan against the contiguous kernel on the same shape
    (graph replays) for pages of 16 and 64 tokens, and the host time of AttentionPlan.run. With
    keep_tokens, the cache keeps that many tokens (and a `recent`-token window): the decode append
    is then the kept-token step and its encoding, the prefill the per-sequence rule from Python."""
    import time

    hq, hkv, d = 32, 8, 128
    steps = 256  # decode appends timed below; their pages are taken before
    rows = []
    if keep_tokens:
        print(f"kept tokens: {keep_tokens}, recent window {recent}")
    print(f"{'shape':11s} {'page':>4s} {'prefill Mtok/s':>14s} {'GB/s':>5s} {'append us':>9s} {'eager us':>8s} "
          f"{'paged us':>8s} {'contiguous us':>13s} {'paging':>7s} {'run host us':>11s}")
    for label, b, s in (("B=1 S=128k", 1, 131072), ("B=32 S=32k", 32, 32768)):
        dense = vecinfer_inputs(b, s + steps, hq, hkv, d, 1, 2, 2, keep_tokens=keep_tokens, recent=recent)
        dense_ms = graph_time_ms([lambda: vecinfer.attention(**dense)])
        del dense
        for page in (16, 64):
            quant = random_quantizer(hkv, d, keep_tokens=keep_tokens, recent=recent)
            cache = vecinfer.PagedKVCache(quant, num_pages=b * ((s + steps) // page + 2), max_seqs=b,
                                          max_tokens_per_seq=s + steps, page_size=page, device="cuda",
                                          dtype=torch.float16)
            seqs = [cache.add_sequence() for _ in range(b)]
            chunk, prefill_ms = 8192, 0.0
            for _ in range(0, s, chunk):  # the prompts, in chunks, all sequences at once
                step = cache.plan_append(seqs, [chunk] * b)
                cache.begin(step)
                k = torch.randn((step.num_rows, hkv, d), device="cuda", dtype=torch.float16)
                v = torch.randn_like(k)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                cache.append(0, k, v, step)
                end.record()
                torch.cuda.synchronize()
                prefill_ms += start.elapsed_time(end)
                del k, v
            tokens = b * s
            moved = tokens * hkv * (2 * d * 2 + 2 * (d // 4))  # fp16 K/V read, 2-bit key and value codes written
            step = cache.plan_append(seqs, [1] * b)
            k = torch.randn((b, hkv, d), device="cuda", dtype=torch.float16)
            v = torch.randn_like(k)
            for _ in range(steps - 40):
                cache.begin(step)  # the pages of every append below (graph replays run no Python)
            def append_once():  # its pages were taken by the begin calls above
                step.pending = frozenset([0])
                cache.append(0, k, v, step)

            append_us = 1e3 * graph_time_ms([append_once], replays=10, iters=10)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                cache.begin(step)
                cache.append(0, k, v, step)
            eager_us = (time.perf_counter() - t0) / 20 * 1e6
            plan = cache.plan_attention(seqs, hq)
            q = torch.randn((b, hq, 1, d), device="cuda", dtype=torch.float16)
            out = torch.empty_like(q)
            paged_ms = graph_time_ms([lambda: plan.run(0, q, out=out)])
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                plan.run(0, q, out=out)
            host_us = (time.perf_counter() - t0) / 200 * 1e6
            torch.cuda.synchronize()
            row = {"shape": label, "batch": b, "tokens": s, "page_size": page, "keep_tokens": keep_tokens,
                   "recent": recent,
                   "prefill_tokens_per_s": tokens / prefill_ms * 1e3, "prefill_GB/s": moved / prefill_ms / 1e6,
                   "copy_GB/s": copy_gbs, "step_append_us": append_us, "step_append_eager_host_us": eager_us,
                   "paged_us": 1e3 * paged_ms, "contiguous_us": 1e3 * dense_ms,
                   "paging_cost": paged_ms / dense_ms - 1, "run_host_us": host_us}
            rows.append(row)
            print(f"{label:11s} {page:4d} {row['prefill_tokens_per_s'] / 1e6:14.2f} {row['prefill_GB/s']:5.0f} "
                  f"{append_us:9.1f} {eager_us:8.1f} {1e3 * paged_ms:8.1f} {1e3 * dense_ms:13.1f} "
                  f"{100 * row['paging_cost']:6.1f}% {host_us:11.1f}", flush=True)
            del cache, plan
            torch.cuda.empty_cache()
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "copy_GB/s": copy_gbs, "rows": rows}, f, indent=1)
    return 0


# (label, new tokens Tq, cached tokens S, bar: speedup over SDPA's flash backend)
PREFILL_SHAPES = [("Tq=2048 S=128k", 2048, 131072, 1.0), ("Tq=512 S=128k", 512, 131072, 1.0),
                  ("Tq=2048 S=32k", 2048, 32768, None), ("Tq=64 S=32k", 64, 32768, None)]


# Ragged batches of 8 sequences of 32k tokens: query counts per sequence
RAGGED_BATCHES = [("1 chunk of 512 + 7 decodes", [512] + [1] * 7), ("8 decodes", [1] * 8),
                  ("8 chunks of 128", [128] * 8)]


def ragged() -> list:
    """A batch whose sequences have different numbers of queries, as one ragged call (q packed,
    query_indptr: the long-query kernel) against one dense call per run of equal counts (the decode
    kernel for single queries), both as CUDA-graph replays of the whole batch."""
    hq, hkv, d, s = 32, 8, 128, 32768
    inp = vecinfer_inputs(8, s, hq, hkv, d, 1, 2, 2)
    per_seq = ("key_codes", "value_codes", "lengths", "sink_keys", "sink_values", "recent_keys", "recent_values")
    cache = {k: v for k, v in inp.items() if k != "q"}
    rows = []
    for label, counts in RAGGED_BATCHES:
        q = torch.randn((sum(counts), hq, d), device="cuda", dtype=torch.float16)
        indptr = torch.tensor([0] + list(itertools.accumulate(counts)), dtype=torch.int32, device="cuda")
        one = graph_time_ms([lambda: vecinfer.attention(q, **cache, query_indptr=indptr, max_queries=max(counts))],
                            replays=5, iters=5)
        calls, start = [], 0
        for count, run in itertools.groupby(counts):
            n = len(list(run))
            part = {k: (v[start:start + n] if k in per_seq else v) for k, v in cache.items()}
            qd = torch.randn((n, hq, count, d), device="cuda", dtype=torch.float16)
            calls.append(lambda qd=qd, part=part: vecinfer.attention(qd, **part))
            start += n
        separate = graph_time_ms(calls, replays=5, iters=5) * len(calls)
        rows.append({"batch": label, "counts": counts, "tokens": s, "ragged_us": 1e3 * one,
                     "dense_calls": len(calls), "dense_us": 1e3 * separate})
        print(f"{label:28s} {1e3 * one:10.1f} {1e3 * separate:12.1f} ({len(calls)} call{'s' if len(calls) > 1 else ''})",
              flush=True)
    return rows


def prefill(json_path=None) -> int:
    """Long query blocks on the compressed cache (Llama-3.1-8B attention, 2-bit, B = 1): the
    long-query kernel over S tokens (the last Tq of them the queries, causal among themselves)
    against SDPA on fp16 K/V of the same S tokens (all of them visible to every query: SDPA's
    causal flag aligns queries to the first keys), both as CUDA-graph replays; TFLOP/s counts
    4 Tq S D flops per query head. Then the GPU memory a 2,048-token block over a 1M-token cache
    adds to the cache (peak allocated during the call, minus before)."""
    hq, hkv, d = 32, 8, 128
    rows = []
    print(f"{'shape':15s} {'vecinfer us':>11s} {'eager us':>9s} {'flash us':>9s} {'cudnn us':>9s} {'vs flash':>8s} "
          f"{'bar':>4s} {'TFLOP/s':>7s} {'flash TFLOP/s':>13s}")
    for label, tq, s, bar in PREFILL_SHAPES:
        base = sdpa_ms(1, s, hq, hkv, d, tq)
        inp = vecinfer_inputs(1, s, hq, hkv, d, tq, 2, 2)
        ms = graph_time_ms([lambda: vecinfer.attention(**inp)], replays=5, iters=5)
        eager = eager_time_ms(lambda: vecinfer.attention(**inp), iters=5)
        flops = 4 * hq * tq * s * d
        row = {"shape": label, "tq": tq, "tokens": s, "q_heads": hq, "kv_heads": hkv, "head_dim": d,
               "vecinfer_us": 1e3 * ms, "eager_us": 1e3 * eager, "sdpa_us": {k: 1e3 * v for k, v in base.items()},
               "speedup_vs_flash": base["flash"] / ms, "bar": bar, "tflops": flops / ms / 1e9,
               "flash_tflops": flops / base["flash"] / 1e9}
        rows.append(row)
        print(f"{label:15s} {1e3 * ms:11.1f} {1e3 * eager:9.1f} {1e3 * base['flash']:9.1f} {1e3 * base['cudnn']:9.1f} "
              f"{row['speedup_vs_flash']:7.2f}x {(f'{bar:.1f}x' if bar else '-'):>4s} {row['tflops']:7.0f} "
              f"{row['flash_tflops']:13.0f}", flush=True)
        del inp
        torch.cuda.empty_cache()
    inp = vecinfer_inputs(1, 1 << 20, hq, hkv, d, 2048, 2, 2)
    out = torch.empty_like(inp["q"])
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    vecinfer.attention(**inp, out=out)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    cache = sum(t.numel() * t.element_size() for t in inp.values() if isinstance(t, torch.Tensor)) - inp["q"].numel() * 2
    memory = {"tokens": 1 << 20, "tq": 2048, "cache_bytes": cache, "extra_bytes_during_call": extra,
              "q_bytes": inp["q"].numel() * 2}
    print(f"\n2,048 queries over 1M tokens: cache {cache / 2**20:.0f} MiB, the call allocates {extra / 2**20:.1f} MiB "
          f"more (q and out are {memory['q_bytes'] / 2**20:.0f} MiB each)")
    del inp, out
    torch.cuda.empty_cache()
    print(f"\nragged batches (8 sequences of 32k tokens)\n{'batch':28s} {'ragged us':>10s} {'dense us':>12s}")
    ragged_rows = ragged()
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows, "memory": memory, "ragged": ragged_rows},
                      f, indent=1)
    return 0


def plot(rows, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(--plot {path}: matplotlib is not installed; pip install matplotlib)")
        return
    base = [r for r in rows if r["head_dim"] == 128 and r["tq"] == 1 and r["key_bits"] == 2 and r["q_heads"] == 32]
    base.sort(key=lambda r: r["batch"] * r["tokens"])
    x = [r["batch"] * r["tokens"] / 1024 for r in base]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(x, [r["sdpa_us"] for r in base], "o-", label="torch SDPA, fp16 K/V")
    ax.plot(x, [r["vecinfer_us"] for r in base], "o-", label="vecinfer, 2-bit K/V")
    for r, xi in zip(base, x):
        ax.annotate(f"B={r['batch']} S={r['tokens'] // 1024}k\n{r['speedup']:.1f}x", (xi, r["vecinfer_us"]),
                    textcoords="offset points", xytext=(4, -18), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cached tokens per layer (batch x context, thousands)")
    ax.set_ylabel("decode attention, one layer (us)")
    ax.set_title(f"Llama-3.1-8B attention shapes on {torch.cuda.get_device_name()}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vecinfer bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two shapes only")
    parser.add_argument("--shapes", default=None, help="comma-separated shape labels to run (default: all)")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    parser.add_argument("--plot", default=None, help="write a latency plot to this PNG file (needs matplotlib)")
    parser.add_argument("--serving", action="store_true", help="the serving API instead: paged cache appends, "
                        "paged decode through a plan against the contiguous kernel, host time of run")
    parser.add_argument("--prefill", action="store_true", help="long query blocks instead: the long-query kernel "
                        "against SDPA on fp16 K/V, TFLOP/s, GPU memory over a 1M-token cache")
    parser.add_argument("--keep-fraction", type=float, default=0.0, help="decode shapes with this fraction of "
                        "the compressed tokens kept in full precision (read as sinks), e.g. 0.01")
    parser.add_argument("--keep-tokens", type=int, default=0, help="decode shapes with at least this many "
                        "compressed tokens kept in full precision, e.g. 64")
    parser.add_argument("--recent", type=int, default=RECENT, help="full-precision recent window (tokens)")
    parser.add_argument("--e2e", action="store_true", help="the end-to-end generation benchmark instead "
                        "(`vecinfer bench --e2e --help`)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--e2e" in argv:
        from .bench_e2e import main as e2e_main

        return e2e_main([a for a in argv if a != "--e2e"])
    args = parser.parse_args(argv)
    if args.serving and args.keep_fraction:
        parser.error("--serving keeps a fixed budget: --keep-tokens N, not --keep-fraction")
    if not vecinfer.cuda_available():
        print("vecinfer bench needs a CUDA GPU (sm_80+) and a CUDA build of vecinfer")
        return 1
    torch.manual_seed(0)
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    copy_gbs = copy_bandwidth()
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + written), the ceiling\n")
    if args.serving:
        return serving(copy_gbs, args.json, keep_tokens=args.keep_tokens, recent=args.recent)
    if args.prefill:
        return prefill(args.json)
    header = (f"{'shape':24s} {'bits k/v':>8s} {'vecinfer us':>11s} {'eager us':>9s} {'SDPA us':>8s} "
              f"{'(backend)':>9s} {'speedup':>7s} {'bar':>5s} {'GB/s':>6s} {'% copy':>6s} {'mem vs fp16':>11s}")
    print(header)
    rows = []
    shapes = [sh for sh in SHAPES if not args.quick or sh[0] in QUICK]
    if args.shapes:
        wanted = set(args.shapes.split(","))
        shapes = [sh for sh in SHAPES if sh[0] in wanted]
    for label, b, s, hq, hkv, d, tq, kbits, vbits, bar in shapes:
        base = sdpa_ms(b, s, hq, hkv, d, tq)
        backend = min(base, key=lambda k: base[k] if base[k] == base[k] else float("inf"))
        keep = dict(keep_fraction=args.keep_fraction, keep_tokens=args.keep_tokens, recent=args.recent)
        first = vecinfer_inputs(b, s, hq, hkv, d, tq, kbits, vbits, **keep)
        sinks = SINKS + kept_count(s, **keep)
        code_bytes = sum(first[n][:, :, : s - sinks - args.recent].numel() for n in ("key_codes", "value_codes"))
        # several input sets when one would sit in the L2 cache between replays
        sets = [first] + [vecinfer_inputs(b, s, hq, hkv, d, tq, kbits, vbits, seed=i, **keep)
                          for i in range(1, min(8, -(-ROTATE_BYTES // code_bytes)))]
        calls = [lambda inp=inp: vecinfer.attention(**inp) for inp in sets]
        ms = graph_time_ms(calls)
        eager = eager_time_ms(calls[0])
        # Bytes the kernel must read: codes of every coded token, the fp16 sinks, kept tokens and
        # window, q; + out.
        fp_bytes = 2 * b * hkv * (sinks + args.recent) * d * 2
        moved = code_bytes + fp_bytes + 2 * first["q"].numel() * 2
        gbs = moved / ms / 1e6
        tables = sum(first[n].numel() * 4 for n in ("key_codebook", "value_codebook", "key_scale", "key_mean"))
        cache_bytes = code_bytes + fp_bytes + tables
        fp16_bytes = 2 * b * hkv * s * d * 2
        row = {"shape": label, "batch": b, "tokens": s, "q_heads": hq, "kv_heads": hkv, "head_dim": d, "tq": tq,
               "key_bits": kbits, "value_bits": vbits, "kept_tokens": sinks - SINKS, "recent": args.recent,
               "vecinfer_us": 1e3 * ms,
               "eager_us": 1e3 * eager, "input_sets": len(sets), "sdpa_us": 1e3 * base[backend], "sdpa_backend": backend,
               "sdpa_all_us": {k: 1e3 * v for k, v in base.items()}, "speedup": base[backend] / ms, "bar": bar,
               "bytes": moved, "GB/s": gbs, "copy_GB/s": copy_gbs, "pct_of_copy": 100 * gbs / copy_gbs,
               "cache_bytes": cache_bytes, "fp16_bytes": fp16_bytes, "memory_ratio": fp16_bytes / cache_bytes}
        rows.append(row)
        bar_text = f"{bar:.1f}x" if bar else "-"
        print(f"{label:24s} {kbits:>4}/{vbits:<3} {1e3 * ms:11.1f} {1e3 * eager:9.1f} {1e3 * base[backend]:8.1f} "
              f"{backend:>9s} {row['speedup']:6.2f}x {bar_text:>5s} {gbs:6.0f} {row['pct_of_copy']:5.1f}% "
              f"{row['memory_ratio']:10.2f}x", flush=True)
        del first, sets, calls
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "copy_GB/s": copy_gbs, "rows": rows}, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
