"""QuantizedKVCache: appending, windows, attend == attention over dequantize, bad input."""
from __future__ import annotations

import pytest
import torch

import vecinfer
from conftest import DEVICES
from vecinfer.cache import reference_attention


@pytest.fixture(scope="module")
def quantizer():
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn((2, 400, 64), generator=g) + 3 * torch.randn((2, 1, 64), generator=g) for _ in range(2)]
    values = [torch.randn((2, 400, 64), generator=g) for _ in range(2)]
    cfg = vecinfer.VQConfig(residual=16, sink_tokens=2, kmeans_iters=4)
    return vecinfer.KVQuantizer.calibrate(keys, values, cfg, progress=False)


def _kv(b, t, gen, dtype=torch.float32, device="cpu"):
    k = torch.randn((b, 2, t, 64), generator=gen) + 3
    v = torch.randn((b, 2, t, 64), generator=gen)
    return k.to(dtype).to(device), v.to(dtype).to(device)


def _attention64(q, k, v):
    """Independent float64 causal attention for the last Tq positions."""
    b, hq, tq, d = q.shape
    g = hq // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = q.double() @ k.transpose(-1, -2) / d ** 0.5
    n = k.shape[2]
    for i in range(tq):
        s[:, :, i, n - tq + i + 1:] = float("-inf")
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunks", [[1] * 40, [37], [5, 13, 1, 30], [2, 16, 1]])
def test_append_keeps_windows_and_never_requantizes(quantizer, device, chunks):
    gen = torch.Generator().manual_seed(1)
    cache = vecinfer.QuantizedKVCache(quantizer, batch_size=2, num_kv_heads=2, head_dim=64, max_tokens=64,
                                      device=device, dtype=torch.float32)
    ks, vs, snapshots = [], [], []
    for t in chunks:
        k, v = _kv(2, t, gen, device=device)
        cache.append(0, k, v)
        ks.append(k), vs.append(v)
        snapshots.append(cache.dequantize(0)[0].clone())
    k_all, v_all = torch.cat(ks, 2), torch.cat(vs, 2)
    n = k_all.shape[2]
    k_hat, v_hat = cache.dequantize(0)
    assert k_hat.shape == (2, 2, n, 64) and cache.length(0) == n and cache.length(1) == 0
    sinks, recent = min(2, n), min(n - min(2, n), 16)
    # sinks and the recent window are exact; the middle is the codec's output for those tokens
    assert torch.equal(k_hat[:, :, :sinks], k_all[:, :, :sinks])
    assert torch.equal(k_hat[:, :, n - recent:], k_all[:, :, n - recent:])
    assert torch.equal(v_hat[:, :, n - recent:], v_all[:, :, n - recent:])
    mid = slice(sinks, n - recent)
    exp_k, exp_v = cache.quantizer.fake_quantize(0, k_all[:, :, mid].contiguous(), v_all[:, :, mid].contiguous())
    torch.testing.assert_close(k_hat[:, :, mid], exp_k)
    torch.testing.assert_close(v_hat[:, :, mid], exp_v)
    # a token, once coded, never changes
    for snap in snapshots:
        m = snap.shape[2]
        coded_then = slice(sinks, max(m - 16, sinks))
        assert torch.equal(snap[:, :, coded_then], k_hat[:, :, coded_then])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tq,group", [(1, 1), (1, 4), (3, 2), (16, 3)])
def test_attend_equals_attention_over_dequantize(quantizer, device, dtype, tq, group):
    gen = torch.Generator().manual_seed(2)
    cache = vecinfer.QuantizedKVCache(quantizer, 1, 2, 64, 100, device=device, dtype=dtype)
    k, v = _kv(1, 57, gen, dtype, device)
    cache.append(1, k, v)
    q = torch.randn((1, 2 * group, tq, 64), generator=gen).to(dtype).to(device)
    out = torch.full_like(q, float("nan"))
    out.copy_(cache.attend(1, q))
    k_hat, v_hat = cache.dequantize(1)
    ref = _attention64(q, k_hat, v_hat)
    assert not torch.isnan(out).any()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double().cpu(), ref.cpu(), atol=tol, rtol=tol)


def test_reference_attention_is_causal_among_queries():
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn((1, 2, 4, 64), generator=g), torch.randn((1, 1, 10, 64), generator=g), torch.randn((1, 1, 10, 64), generator=g)
    out = reference_attention(q, k, v)
    # the first query (position 6) must ignore keys 7..9
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 7:] += 100
    v2[:, :, 7:] += 100
    assert torch.allclose(reference_attention(q, k2, v2)[:, :, 0], out[:, :, 0], atol=1e-5)
    torch.testing.assert_close(out.double(), _attention64(q, k, v), atol=1e-5, rtol=1e-5)


def test_append_past_max_tokens_raises_and_keeps_cache(quantizer):
    gen = torch.Generator().manual_seed(4)
    cache = vecinfer.QuantizedKVCache(quantizer, 1, 2, 64, 40, dtype=torch.float32)
    k, v = _kv(1, 30, gen)
    cache.append(0, k, v)
    before = [t.clone() for t in cache.dequantize(0)]
    with pytest.raises(ValueError, match="exceed max_tokens=40"):
        cache.append(0, *_kv(1, 11, gen))
    assert cache.length(0) == 30
    after = cache.dequantize(0)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    cache.append(0, *_kv(1, 10, gen))  # exactly full is fine
    assert cache.length(0) == 40


def test_nbytes_is_far_below_fp16():
    g = torch.Generator().manual_seed(5)
    keys = [torch.randn((8, 300, 128), generator=g)]
    q = vecinfer.KVQuantizer.calibrate(keys, [torch.randn((8, 300, 128), generator=g)],
                                       vecinfer.VQConfig(kmeans_iters=1), progress=False)
    cache = vecinfer.QuantizedKVCache(q, batch_size=1, num_kv_heads=8, head_dim=128, max_tokens=32768,
                                      dtype=torch.float16)
    fp16 = 2 * 1 * 8 * 32768 * 128 * 2
    assert fp16 / cache.nbytes() >= 7.0, fp16 / cache.nbytes()


@pytest.mark.parametrize("call,exc,words", [
    (lambda c, g: c.append(0, torch.randn((1, 3, 4, 64)), torch.randn((1, 3, 4, 64))), ValueError, "k: expected [1, 2, tokens, 64]"),
    (lambda c, g: c.append(0, torch.randn((1, 2, 4, 64)), torch.randn((1, 2, 5, 64))), ValueError, "v: expected"),
    (lambda c, g: c.append(2, torch.randn((1, 2, 4, 64)), torch.randn((1, 2, 4, 64))), ValueError, "layer"),
    (lambda c, g: c.append(0, torch.ones((1, 2, 4, 64), dtype=torch.int32), torch.ones((1, 2, 4, 64), dtype=torch.int32)), TypeError, "float16"),
    (lambda c, g: c.append(0, "k", "v"), TypeError, "k: expected a torch.Tensor"),
    (lambda c, g: c.attend(0, torch.randn((1, 3, 1, 64))), ValueError, "not a multiple"),
    (lambda c, g: c.attend(0, torch.randn((1, 2, 1, 32))), ValueError, "q: expected"),
    (lambda c, g: c.attend(0, torch.randn((1, 2, 1, 64))), ValueError, "holds 0 tokens"),
])
def test_cache_bad_input(quantizer, call, exc, words):
    cache = vecinfer.QuantizedKVCache(quantizer, 1, 2, 64, 40, dtype=torch.float32)
    with pytest.raises(exc, match=words.replace("[", r"\[")):
        call(cache, None)


def test_cache_constructor_checks(quantizer):
    with pytest.raises(ValueError, match="do not match"):
        vecinfer.QuantizedKVCache(quantizer, 1, 4, 64, 10)
    with pytest.raises(ValueError, match="max_tokens"):
        vecinfer.QuantizedKVCache(quantizer, 1, 2, 64, 0)
    with pytest.raises(TypeError, match="dtype"):
        vecinfer.QuantizedKVCache(quantizer, 1, 2, 64, 10, dtype=torch.int8)
    with pytest.raises(TypeError, match="quantizer"):
        vecinfer.QuantizedKVCache(None, 1, 2, 64, 10)
