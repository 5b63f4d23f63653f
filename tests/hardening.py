"""Helpers shared by the hardening tests (test_harden_*.py, test_properties.py)."""
from __future__ import annotations

import functools
import subprocess
import sys
import threading

import torch

import vecinfer


@functools.lru_cache(maxsize=None)
def small_quantizer(residual: int = 4, sink_tokens: int = 2) -> vecinfer.KVQuantizer:
    """A 2-layer, 2-KV-head, head_dim 64 quantizer calibrated on random samples (fast)."""
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn((2, 300, 64), generator=g) + 2 for _ in range(2)]
    values = [torch.randn((2, 300, 64), generator=g) for _ in range(2)]
    cfg = vecinfer.VQConfig(residual=residual, sink_tokens=sink_tokens, kmeans_iters=2, key_bits=4, value_bits=4)
    return vecinfer.KVQuantizer.calibrate(keys, values, cfg, progress=False)


def small_cache(max_tokens: int = 32, batch_size: int = 2, device="cpu", dtype=torch.float32, **quantizer_args):
    return vecinfer.QuantizedKVCache(small_quantizer(**quantizer_args), batch_size=batch_size, num_kv_heads=2,
                                     head_dim=64, max_tokens=max_tokens, device=device, dtype=dtype)


def kv(batch: int, tokens: int, seed: int = 0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn((batch, 2, tokens, 64), generator=g) + 2
    v = torch.randn((batch, 2, tokens, 64), generator=g)
    return k.to(device, dtype), v.to(device, dtype)


def _bytes(t):
    return None if t is None else t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).clone()


def cache_state(cache) -> dict:
    """Every byte the cache holds (buffers, lengths) and its sizes, for bit-identical comparisons
    (compared as bytes: unwritten buffer entries may hold NaN bit patterns)."""
    state = {"batch_size": cache.batch_size, "max_tokens": cache.max_tokens}
    for name in ("_key_codes", "_value_codes", "_sink_k", "_sink_v", "_recent_k", "_recent_v", "_lengths",
                 "_device_lengths"):
        group = getattr(cache, name)
        state[name] = None if group is None else [_bytes(t) for t in group]
    state["_page_table"] = [_bytes(cache._page_table)]
    return state


def assert_same_state(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key in before:
        a, b = before[key], after[key]
        if isinstance(a, list):
            assert len(a) == len(b), key
            for x, y in zip(a, b):
                assert (x is None and y is None) or torch.equal(x, y), f"{key} changed"
        else:
            assert a == b, key


def run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter; a hang fails the test at `timeout` instead of blocking it."""
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"hung: still running after {timeout} s:\n{code}") from e


def append_from_two_threads(cache, k, v, per_thread: int = 300):
    """Two threads each append (k, v) to layer 0 `per_thread` times, from a common start. Returns
    (appends that landed, appends refused with the cache's RuntimeError); anything else fails."""
    landed, refused = [0, 0], [0, 0]
    start = threading.Barrier(2)

    def worker(i):
        start.wait()
        for _ in range(per_thread):
            try:
                cache.append(0, k, v)
                landed[i] += 1
            except RuntimeError as e:
                assert "not thread-safe" in str(e)
                refused[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(landed), sum(refused)
