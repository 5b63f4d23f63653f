"""`vecinfer demo`: the fallback when the model cannot be loaded, and the memory accounting."""
from __future__ import annotations

import pytest
import torch

import vecinfer
from vecinfer import demo


def test_demo_falls_back_to_shipped_kv_when_the_model_cannot_load(monkeypatch, capsys):
    hf = pytest.importorskip("vecinfer.hf")

    def fail(*args, **kwargs):
        raise ImportError("no gguf here")

    monkeypatch.setattr(hf, "load_gguf_model", fail)
    threads = torch.get_num_threads()
    try:
        assert demo.run_demo(device="cpu") == 0
    finally:
        torch.set_num_threads(threads)  # the demo sets its own
    out = capsys.readouterr().out
    assert "ImportError: no gguf here" in out and "Falling back" in out
    assert "real post-RoPE K/V of" in out and "bytes per token per layer" in out


def test_held_bytes_counts_codes_windows_and_parameters():
    pytest.importorskip("transformers")
    from test_hf_cache import _quantizer, _tiny

    from vecinfer.hf import VecInferCache

    model = _tiny("llama")
    q = _quantizer(model, bits=2, residual=8, sink_tokens=2)
    cache = VecInferCache(model, q)
    with torch.no_grad():
        model(torch.randint(3, 96, (1, 30)), past_key_values=cache, use_cache=True)
    # per layer: 20 tokens of codes (16 + 16 bytes per KV head at 2 bits, head_dim 64), 10 tokens
    # of keys and values at 2 bytes per element
    per_layer = 2 * (20 * 32 + 10 * 2 * 64 * 2)
    assert demo._held_bytes(cache) == 2 * per_layer + q.parameter_bytes()
    assert vecinfer.code_row_bytes(64, 4, 8) == 16
