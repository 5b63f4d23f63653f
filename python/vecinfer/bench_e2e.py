"""`vecinfer bench --e2e`: end-to-end greedy generation with a Llama-3.1-8B-shaped model.

    vecinfer bench --e2e [--runs "1x32768,1x131072,16x32768"] [--new-tokens 128] [--json out.json]
                         [--keep-tokens N --recent R --no-longest]

The model is transformers' LlamaForCausalLM with Llama-3.1-8B's configuration and random bf16
weights (speed does not depend on the weight values). For each run (batch x prompt tokens):
  1. the prompt (random token ids) is prefilled in chunks into transformers' default cache
     (DynamicCache, SDPA attention);
  2. `VecInferCache.from_cache` encodes those keys and values once (2-bit default VQConfig,
     calibrated on the first run's prompt: 4 sink tokens and a 128-token window kept in bf16;
     `--keep-tokens` / `--recent` set VQConfig.keep_tokens and residual on that calibration);
  3. `--new-tokens` tokens are generated greedily, one forward pass per token (a manual loop of
     `model(input_ids=token, past_key_values=cache)`, what `generate` does per step), with
       - the default cache (the baseline),
       - the VecInferCache, eager,
       - the VecInferCache through `CUDAGraphDecoder` (each step one CUDA graph replay);
     each reports milliseconds per output token and the peak GPU memory allocated while decoding.
Then the longest context that fits in the GPU's memory at batch 1 is computed for both caches from
their bytes per token and the memory the model needs besides its cache, and a VecInferCache of
80% of that length (synthetic codes: decoding reads every code the same way whatever its value) is
allocated and decoded through CUDAGraphDecoder, to show that it fits and how fast it runs.

The default cache runs eagerly, as `generate` runs it; since a step of an eager transformers model
costs tens of milliseconds of Python on the host, the default cache's prompt is also moved into
transformers' StaticCache and decoded through the same CUDAGraphDecoder: that row compares the
caches with neither side paying host overhead.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional, Tuple

import torch

GiB = 1 << 30

LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                   rope_theta=500000.0, max_position_embeddings=1 << 22, tie_word_embeddings=False)
# a small model of the same family, for a CPU check of the benchmark itself (tests)
TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, max_position_embeddings=1 << 16, tie_word_embeddings=False)
RUNS = [(1, 32768), (1, 131072), (16, 32768)]


def _log(msg: str) -> None:
    print(f"[e2e] {msg}", file=sys.stderr, flush=True)


def build_model(spec: dict, device: torch.device, dtype: torch.dtype):
    """A random-weight LlamaForCausalLM made directly on `device` in `dtype` (SDPA attention)."""
    import transformers

    config = transformers.LlamaConfig(**spec)
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


@torch.no_grad()
def prefill(model, ids: torch.Tensor, cache, chunk_tokens: int = 4096) -> None:
    """Runs the prompt through the model into `cache` in chunks of about chunk_tokens tokens over
    the batch (a 128k prompt does not fit one forward pass)."""
    chunk = max(chunk_tokens // ids.shape[0], 1)
    for start in range(0, ids.shape[1], chunk):
        model(input_ids=ids[:, start:start + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)


@torch.no_grad()
def decode(step, token: torch.Tensor, steps: int) -> Tuple[torch.Tensor, float]:
    """`steps` greedy tokens, `step(token) -> logits [B, vocab]` each; returns (last token, seconds).
    Raises if the last logits are not finite."""
    device = token.device
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = step(token)
        token = logits.argmax(-1)
    _sync(device)
    seconds = time.perf_counter() - t0
    if not bool(torch.isfinite(logits).all()):
        raise RuntimeError("non-finite logits while decoding")
    return token, seconds


def eager_step(model, cache):
    """One forward pass of the newest tokens [B] over `cache`: what `generate` runs per token."""
    return lambda token: model(input_ids=token[:, None], past_key_values=cache, use_cache=True,
                               logits_to_keep=1).logits[:, -1]


def static_cache_graph(model, fp_cache, prompt_tokens: int, first: torch.Tensor, new_tokens: int) -> dict:
    """The full-precision cache at its fastest: transformers' StaticCache holding the same prompt
    (moved out of fp_cache, which is emptied) and decoded through CUDAGraphDecoder, so that neither
    side pays Python or launch overhead. Returns its ms per token and peak memory, or the error."""
    from transformers.cache_utils import StaticCache

    from .hf import _cache_layer_kv, _num_cache_layers, _release_cache_layer
    from .hf_cache import CUDAGraphDecoder

    device = first.device
    _log(f"{new_tokens} tokens with a StaticCache through CUDAGraphDecoder")
    try:
        static = StaticCache(config=model.config, max_cache_len=prompt_tokens + new_tokens + 2)
        for i in range(_num_cache_layers(fp_cache)):
            k, v = _cache_layer_kv(fp_cache, i)
            static.update(k[:, :, :prompt_tokens], v[:, :, :prompt_tokens], i)
            _release_cache_layer(fp_cache, i)
        decoder = CUDAGraphDecoder(model, static, max_new_tokens=new_tokens + 2)
        token, _ = decode(decoder, first, 2)
        _reset_peak(device)
        _, seconds = decode(decoder, token, new_tokens)
        return dict(static_graph_ms_per_token=1e3 * seconds / new_tokens, static_graph_peak_bytes=_peak(device))
    except Exception as e:  # a transformers version whose StaticCache cannot be captured: report it
        _log(f"StaticCache + CUDA graph failed: {type(e).__name__}: {e}")
        return dict(static_graph_error=f"{type(e).__name__}: {str(e)[:300]}")


def full_cache_bytes(cache) -> int:
    from .hf import _cache_layer_kv, _num_cache_layers

    total = 0
    for i in range(_num_cache_layers(cache)):
        for t in _cache_layer_kv(cache, i):
            total += t.numel() * t.element_size()
    return total


def calibrate_on_cache(model, cache, tokens: int = 8192):
    """A 2-bit default quantizer calibrated on the first `tokens` keys/values of sequence 0 of
    `model`'s cache (under tensor parallelism, of all ranks' heads: every rank gets the same one)."""
    from .config import VQConfig
    from .hf import _cache_layer_kv, _gather_heads, _num_cache_layers, calibrate_samples
    from .hf_cache import tensor_parallel_shard

    kv = [_cache_layer_kv(cache, i) for i in range(_num_cache_layers(cache))]
    keys = [k[0, :, :tokens].float() for k, _ in kv]
    values = [v[0, :, :tokens].float() for _, v in kv]
    shard = tensor_parallel_shard(model)
    if shard is not None:
        keys, values = _gather_heads(keys, shard, keys[0].device), _gather_heads(values, shard, keys[0].device)
    return calibrate_samples(model, keys, values, VQConfig(), progress=False)


def run_one(model, batch: int, tokens: int, new_tokens: int, quantizer, seed: int = 0,
            settings: Optional[dict] = None) -> Tuple[dict, object]:
    """One (batch, prompt tokens) run: baseline, VecInferCache eager and graph. Returns (row, quantizer).
    `settings`: VQConfig fields that leave a calibration valid (KVQuantizer.replace), applied to
    the quantizer calibrated here when none is given."""
    from transformers import DynamicCache

    from .evaluate import _set_attn
    from .hf_cache import CUDAGraphDecoder, VecInferCache, use_vecinfer_attention

    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), generator=gen, device=device)
    _set_attn(model, "sdpa")
    try:
        fp_cache = DynamicCache(config=model.config)
    except TypeError:  # transformers 4.x
        fp_cache = DynamicCache()
    _log(f"B={batch} S={tokens}: prefill of {tokens - 1} tokens in chunks (default cache, SDPA)")
    t0 = time.perf_counter()
    prefill(model, ids[:, :-1], fp_cache)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    if quantizer is None:
        _log("calibrating 2-bit codebooks on the prompt's keys and values")
        quantizer = calibrate_on_cache(model, fp_cache).replace(**(settings or {}))
    t0 = time.perf_counter()
    codes_cache = VecInferCache.from_cache(model, quantizer, fp_cache)
    _sync(device)
    encode_s = time.perf_counter() - t0
    first = ids[:, -1]

    _set_attn(model, "sdpa")
    fp_bytes = full_cache_bytes(fp_cache)
    _log(f"B={batch} S={tokens}: {new_tokens} tokens with the default cache")
    decode(eager_step(model, fp_cache), first, 2)  # warm-up
    _reset_peak(device)
    _, fp_s = decode(eager_step(model, fp_cache), first, new_tokens)
    fp_peak = _peak(device)
    static = static_cache_graph(model, fp_cache, tokens - 1, first, new_tokens) if device.type == "cuda" else {}
    del fp_cache
    if device.type == "cuda":
        torch.cuda.empty_cache()

    use_vecinfer_attention(model)
    codes_bytes = codes_cache.nbytes()
    _log(f"B={batch} S={tokens}: {new_tokens} tokens with the VecInferCache, eager")
    decode(eager_step(model, codes_cache), first, 2)
    _reset_peak(device)
    token, eager_s = decode(eager_step(model, codes_cache), first, new_tokens)
    eager_peak = _peak(device)
    row = dict(batch=batch, prompt_tokens=tokens, new_tokens=new_tokens, prefill_s=prefill_s, encode_s=encode_s,
               default_ms_per_token=1e3 * fp_s / new_tokens, default_peak_bytes=fp_peak, default_cache_bytes=fp_bytes,
               vecinfer_eager_ms_per_token=1e3 * eager_s / new_tokens, vecinfer_eager_peak_bytes=eager_peak,
               vecinfer_cache_bytes=codes_bytes, **static)
    if device.type == "cuda":
        _log(f"B={batch} S={tokens}: {new_tokens} tokens with the VecInferCache through CUDAGraphDecoder")
        try:
            decoder = CUDAGraphDecoder(model, codes_cache, max_new_tokens=new_tokens + 2)
            token, _ = decode(decoder, token, 2)  # the eager step + capture, and one replay
            _reset_peak(device)
            _, graph_s = decode(decoder, token, new_tokens)
            row.update(vecinfer_graph_ms_per_token=1e3 * graph_s / new_tokens,
                       vecinfer_graph_peak_bytes=_peak(device))
            del decoder
        except Exception as e:  # reported like the StaticCache's (a capture that fails, under tensor parallelism say)
            _log(f"VecInferCache + CUDA graph failed: {type(e).__name__}: {e}")
            row.update(vecinfer_graph_error=f"{type(e).__name__}: {str(e)[:300]}")
    del codes_cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row, quantizer


def longest_context(model, quantizer, rows: List[dict], new_tokens: int) -> Optional[dict]:
    """The longest batch-1 context each cache fits into this GPU's memory, and a decode run at 95%
    of vecinfer's (synthetic codes)."""
    from .hf_cache import CUDAGraphDecoder
    from .ops import code_row_bytes

    device = next(model.parameters()).device
    base = next((r for r in rows if r["batch"] == 1), None)
    if device.type != "cuda" or base is None:
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    # what the model needs besides its cache: weights, activations, allocator slack
    other = base["default_peak_bytes"] - base["default_cache_bytes"]
    # measured after the prefill; DynamicCache concatenates each step, so one layer's keys and
    # values exist twice for a moment
    layers = model.config.num_hidden_layers
    fp_per_token = base["default_cache_bytes"] / (base["prompt_tokens"] - 1) * (layers + 1) / layers
    cfg, q = model.config, quantizer.config
    codes_per_token = layers * cfg.num_key_value_heads * (
        code_row_bytes(cfg.head_dim, q.key_sub_dim, q.key_code_bits)
        + code_row_bytes(cfg.head_dim, q.value_sub_dim, q.value_code_bits))
    free = total - other - GiB  # 1 GiB kept back for the CUDA context and graphs
    fp_max, codes_max = int(free // fp_per_token), int(free // codes_per_token)
    # decoded at 80% of the limit: the allocator's fragmentation after the earlier runs takes
    # several GiB (95% ran out of memory on an H200)
    n = int(codes_max * 0.8) // 1024 * 1024
    torch.cuda.empty_cache()
    _log(f"longest context: default cache {fp_max} tokens, vecinfer {codes_max}; decoding at {n} tokens (synthetic codes)")
    cache = synthetic_cache(model, quantizer, tokens=n, max_tokens=n + new_tokens + 2)
    decoder = CUDAGraphDecoder(model, cache, max_new_tokens=new_tokens + 2)
    token = torch.zeros(1, dtype=torch.long, device=device)
    token, _ = decode(decoder, token, 2)
    _reset_peak(device)
    _, s = decode(decoder, token, new_tokens)
    out = dict(gpu_bytes=total, other_bytes=other, default_bytes_per_token=fp_per_token,
               vecinfer_code_bytes_per_token=codes_per_token, default_max_tokens=fp_max, vecinfer_max_tokens=codes_max,
               decoded_tokens=n, decoded_ms_per_token=1e3 * s / new_tokens, decoded_peak_bytes=_peak(device))
    del decoder, cache
    torch.cuda.empty_cache()
    return out


def synthetic_cache(model, quantizer, tokens: int, max_tokens: int):
    """A batch-1 VecInferCache holding `tokens` tokens: real sinks and recent window (random keys
    and values appended), random codes for the rest. For speed and memory only: the kernel reads
    every code the same way whatever its value, and no prefill of millions of tokens is needed."""
    from .hf_cache import VecInferCache

    cache = VecInferCache(model, quantizer, max_tokens=max_tokens)
    cfg, device = model.config, next(model.parameters()).device
    fp_tokens = quantizer.config.sink_tokens + quantizer.config.residual
    heads = cache.quantizer.num_kv_heads  # this rank's share under tensor parallelism
    for i in range(cfg.num_hidden_layers):
        k = torch.randn((1, heads, fp_tokens, cfg.head_dim), device=device, dtype=model.dtype)
        codes = cache._room(i, k)
        codes.append(i, k, torch.randn_like(k))
        coded = tokens - fp_tokens
        codes._key_codes[i].random_(0, 256)  # every page (the sequence's codes and the spare pages)
        codes._value_codes[i].random_(0, 256)
        lengths = codes._lengths[i].clone()
        lengths[:, 1] = coded
        codes._set_lengths(i, lengths)
        cache.layers[i].seen = tokens
    return cache


def _parse_runs(text: str) -> List[Tuple[int, int]]:
    runs = []
    for item in text.split(","):
        b, _, s = item.strip().partition("x")
        if not (b.isdigit() and s.isdigit()) or int(b) < 1 or int(s) < 2:
            raise argparse.ArgumentTypeError(f"--runs: expected BATCHxTOKENS items like 1x32768, got {item!r}")
        runs.append((int(b), int(s)))
    return runs


def _print_table(rows: List[dict]) -> None:
    def ms(r, key):
        return f"{r[key]:8.2f}" if key in r else f"{'-':>8s}"

    print(f"{'run':14s} | {'ms per output token':^46s} | {'speedup of vecinfer':^27s} | "
          f"{'peak GiB':^17s} | cache")
    print(f"{'':14s} | {'default':>8s} {'static+g':>8s}   {'vecinfer':>8s} {'vecinf+g':>8s}       | "
          f"{'eager':>6s} {'graph':>6s} {'g/static+g':>10s}   | {'default':>8s} {'vecinf':>7s}  | smaller")
    for r in rows:
        graph = r.get("vecinfer_graph_ms_per_token")
        peak = r.get("vecinfer_graph_peak_bytes", r["vecinfer_eager_peak_bytes"])
        speed = [r["default_ms_per_token"] / r["vecinfer_eager_ms_per_token"],
                 r["default_ms_per_token"] / graph if graph else float("nan"),
                 r["static_graph_ms_per_token"] / graph if graph and "static_graph_ms_per_token" in r else float("nan")]
        print(f"B={r['batch']} S={r['prompt_tokens']:<8d} | {ms(r, 'default_ms_per_token')} "
              f"{ms(r, 'static_graph_ms_per_token')}   {ms(r, 'vecinfer_eager_ms_per_token')} "
              f"{ms(r, 'vecinfer_graph_ms_per_token')}       | {speed[0]:5.2f}x {speed[1]:5.2f}x {speed[2]:9.2f}x   | "
              f"{r['default_peak_bytes'] / GiB:8.1f} {peak / GiB:7.1f}  | "
              f"{r['default_cache_bytes'] / r['vecinfer_cache_bytes']:5.1f}x", flush=True)


def main(argv=None, spec: Optional[dict] = None) -> int:
    parser = argparse.ArgumentParser(prog="vecinfer bench --e2e", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=_parse_runs, default=RUNS, help="BATCHxTOKENS list (default %(default)s)")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per run")
    parser.add_argument("--device", default=None, help="cuda (default when usable) or cpu (a small model)")
    parser.add_argument("--no-longest", action="store_true", help="skip the longest-context run")
    parser.add_argument("--json", default=None, help="write the figures to this JSON file")
    parser.add_argument("--keep-tokens", type=int, default=0, help="VQConfig.keep_tokens: compressed tokens kept "
                        "in full precision (needs --no-longest: the longest-context run's synthetic cache has none)")
    parser.add_argument("--recent", type=int, default=128, help="VQConfig.residual: the full-precision recent window")
    args = parser.parse_args(argv)
    if args.keep_tokens and not args.no_longest:
        parser.error("--keep-tokens needs --no-longest (the longest-context run builds a synthetic cache without "
                     "kept tokens)")
    settings = {"keep_tokens": args.keep_tokens, "residual": args.recent}
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if spec is None:
        spec = LLAMA_31_8B if device.type == "cuda" else TINY
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    _log(f"building a random-weight Llama ({spec['num_hidden_layers']} layers, hidden {spec['hidden_size']}) "
         f"on {device}")
    model = build_model(spec, device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"end-to-end greedy decoding, Llama model of {spec['num_hidden_layers']} layers, hidden "
          f"{spec['hidden_size']}, {spec['num_key_value_heads']} KV heads (random {dtype} weights) on {name}, "
          f"torch {torch.__version__}; {args.new_tokens} new tokens per run; vecinfer: recent window {args.recent}, "
          f"{args.keep_tokens} kept tokens")
    rows, quantizer = [], None
    for batch, tokens in args.runs:
        row, quantizer = run_one(model, batch, tokens, args.new_tokens, quantizer, settings=settings)
        rows.append(row)
    _print_table(rows)
    result = {"device": name, "torch": torch.__version__, "model": spec, "rows": rows, "longest_context": None,
              "quantizer": quantizer.config.to_dict()}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    save()  # the runs are kept whatever happens to the longest-context run
    if not args.no_longest:
        try:
            longest = result["longest_context"] = longest_context(model, quantizer, rows, args.new_tokens)
        except torch.OutOfMemoryError as e:
            result["longest_context"] = {"error": str(e)[:300]}
            print(f"longest-context run: out of memory ({str(e).splitlines()[0][:120]})")
            longest = None
        if longest:
            print(f"longest batch-1 context in {longest['gpu_bytes'] / GiB:.0f} GiB: default cache "
                  f"{longest['default_max_tokens']:,} tokens, vecinfer {longest['vecinfer_max_tokens']:,} tokens "
                  f"({longest['vecinfer_max_tokens'] / longest['default_max_tokens']:.1f}x); decoding at "
                  f"{longest['decoded_tokens']:,} tokens: {longest['decoded_ms_per_token']:.2f} ms/token, peak "
                  f"{longest['decoded_peak_bytes'] / GiB:.1f} GiB")
        save()
    return 0
