"""QuantizedKVCache: appending, windows, attend == attention over dequantize, bad input."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import vecinfer
from conftest import DEVICES, small_quantizer
from vecinfer.cache import reference_attention


@pytest.fixture(scope="module")
def quantizer():
    return small_quantizer()


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
    check_attend(cache, 1, q)


def check_attend(cache, layer, q):
    """cache.attend(layer, q), written over a NaN-poisoned output, equals float64 attention over
    what the cache holds (dequantize), to the cache dtype's tolerance."""
    out = torch.full_like(q, float("nan"))
    out.copy_(cache.attend(layer, q))
    k_hat, v_hat = cache.dequantize(layer)
    assert not torch.isnan(out).any()
    tol = 1e-5 if q.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double().cpu(), _attention64(q, k_hat, v_hat).cpu(), atol=tol, rtol=tol)


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


# --- per-sequence lengths ---------------------------------------------------------------------

def _with_windows(quantizer, sinks, residual):
    """The same codebooks with other sink / recent-window sizes (they do not affect calibration)."""
    cfg = dataclasses.replace(quantizer.config, sink_tokens=sinks, residual=residual)
    return vecinfer.KVQuantizer(cfg, quantizer.layers, quantizer.num_kv_heads, quantizer.head_dim)


def _expected_parts(n, sinks, residual):
    s = min(n, sinks)
    r = min(n - s, residual)
    return [s, n - s - r, r]


WINDOWS = [(2, 16), (0, 4), (3, 0), (0, 0), (4, 1)]


@pytest.mark.parametrize("sinks,residual", WINDOWS)
@pytest.mark.parametrize("prompts", [[7, 1, 20], [5, 5, 5], [0, 3, 12]])
def test_unequal_lengths_match_per_sequence_caches(quantizer, sinks, residual, prompts):
    """A left-padded batch (skip), then decode steps, a 3-token step and a step skipping one
    sequence, against one batch-1 cache per sequence fed the same tokens without padding."""
    gen = torch.Generator().manual_seed(6)
    q = _with_windows(quantizer, sinks, residual)
    b, t0 = len(prompts), max(prompts)
    cache = vecinfer.QuantizedKVCache(q, b, 2, 64, 64, dtype=torch.float32)
    singles = [vecinfer.QuantizedKVCache(q, 1, 2, 64, 64, dtype=torch.float32) for _ in prompts]
    k, v = _kv(b, t0, gen)
    skip = [t0 - p for p in prompts]
    cache.append(0, k, v, skip=torch.tensor(skip))
    for i, s in enumerate(skip):
        singles[i].append(0, k[i:i + 1, :, s:], v[i:i + 1, :, s:])
    steps = [(1, None)] * 25 + [(3, None), (1, [0, 1, 0][:b]), (1, None)]
    for t, step_skip in steps:
        k, v = _kv(b, t, gen)
        cache.append(0, k, v, skip=step_skip)
        for i in range(b):
            s = step_skip[i] if step_skip else 0
            singles[i].append(0, k[i:i + 1, :, s:], v[i:i + 1, :, s:])
        lens = [c.length(0) for c in singles]
        assert cache.lengths(0).tolist() == lens and cache.length(0) == max(lens)
        stored = cache._attend_inputs(0)[2]
        assert stored.dtype == torch.int32 and stored.tolist() == [_expected_parts(n, sinks, residual) for n in lens]
    k_pad, v_pad, lens = cache.dequantize(0, padded=True)
    assert k_pad.shape == (b, 2, max(lens.tolist()), 64)
    tq = 2
    query = torch.randn((b, 4, tq, 64), generator=gen)
    out = cache.attend(0, query)
    for i, single in enumerate(singles):
        n = single.length(0)
        k_i, v_i = single.dequantize(0)
        assert torch.equal(k_pad[i, :, :n], k_i[0]) and torch.equal(v_pad[i, :, :n], v_i[0])
        assert not k_pad[i, :, n:].any() and not v_pad[i, :, n:].any()
        torch.testing.assert_close(out[i:i + 1], single.attend(0, query[i:i + 1]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[i:i + 1].double(), _attention64(query[i:i + 1], k_i, v_i), atol=1e-5, rtol=1e-5)
    if len(set(lens.tolist())) > 1:
        with pytest.raises(ValueError, match="padded=True"):
            cache.dequantize(0)


@pytest.mark.parametrize("skip", [3, [3, 3], torch.tensor([3, 3], dtype=torch.int32)])
def test_uniform_skip_drops_leading_tokens(quantizer, skip):
    gen = torch.Generator().manual_seed(7)
    cache = vecinfer.QuantizedKVCache(quantizer, 2, 2, 64, 64, dtype=torch.float32)
    plain = vecinfer.QuantizedKVCache(quantizer, 2, 2, 64, 64, dtype=torch.float32)
    k, v = _kv(2, 30, gen)
    cache.append(0, k, v, skip=skip)
    plain.append(0, k[:, :, 3:], v[:, :, 3:])
    assert cache.length(0) == 27
    for a, b in zip(cache.dequantize(0), plain.dequantize(0)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("skip,exc,words", [
    ([0, 5], ValueError, r"skip: entries must lie in \[0, 4\]"),
    ([-1, 0], ValueError, "skip: entries"),
    ([0, 0, 0], ValueError, r"skip: expected \[2\]"),
    (torch.zeros(2), TypeError, "integer tensor"),
    ("0", TypeError, "skip: expected None"),
])
def test_bad_skip(quantizer, skip, exc, words):
    cache = vecinfer.QuantizedKVCache(quantizer, 2, 2, 64, 64, dtype=torch.float32)
    with pytest.raises(exc, match=words):
        cache.append(0, torch.randn((2, 2, 4, 64)), torch.randn((2, 2, 4, 64)), skip=skip)
    assert cache.lengths(0).tolist() == [0, 0]


def _snapshot(cache, layer):
    k, v, lens = cache.dequantize(layer, padded=True)
    return k.clone(), v.clone(), lens.clone(), cache._attend_inputs(layer)[2].clone()


def _assert_same(a, b):
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# the three append paths: all sequences in one state, a one-token step with unequal lengths,
# several tokens with unequal lengths
@pytest.mark.parametrize("path", ["uniform", "step", "loop"])
@pytest.mark.parametrize("failure", ["max_tokens", "encode"])
def test_failing_append_leaves_cache_unchanged(quantizer, path, failure):
    gen = torch.Generator().manual_seed(8)
    q = _with_windows(quantizer, 2, 4)
    cache = vecinfer.QuantizedKVCache(q, 2, 2, 64, 40, dtype=torch.float32)
    k, v = _kv(2, 20, gen)
    cache.append(0, k, v, skip=None if path == "uniform" else [0, 9])
    before = _snapshot(cache, 0)
    t = {"uniform": 6, "step": 1, "loop": 6}[path]
    if failure == "max_tokens":
        k, v = _kv(2, 21, gen)
        with pytest.raises(ValueError, match="exceed max_tokens=40.*the cache is unchanged"):
            cache.append(0, k, v, skip=[0, 0] if path == "uniform" else [0, 21 - t])
    else:  # the last sequence's values fail to encode (NaN), after the other sequence's tokens were planned
        k, v = _kv(2, t, gen)
        v[1] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            cache.append(0, k, v)
    _assert_same(before, _snapshot(cache, 0))


def test_select_reorders_and_repeats_sequences(quantizer):
    gen = torch.Generator().manual_seed(9)
    cache = vecinfer.QuantizedKVCache(quantizer, 3, 2, 64, 64, dtype=torch.float32)
    k, v = _kv(3, 40, gen)
    cache.append(0, k, v, skip=[0, 10, 30])
    k_pad, v_pad, lens = cache.dequantize(0, padded=True)
    cache.select(torch.tensor([2, 0, 0, 1]))
    assert cache.batch_size == 4 and cache.lengths(0).tolist() == [10, 40, 40, 30]
    k2, v2, _ = cache.dequantize(0, padded=True)
    order = [2, 0, 0, 1]
    assert torch.equal(k2, k_pad[order]) and torch.equal(v2, v_pad[order])
    cache.append(0, *_kv(4, 1, gen))  # the cache keeps working at the new batch size
    assert cache.lengths(0).tolist() == [11, 41, 41, 31]
    with pytest.raises(ValueError, match="indices"):
        cache.select([4])


def test_reserve_grows_capacity_keeping_tokens(quantizer):
    gen = torch.Generator().manual_seed(10)
    cache = vecinfer.QuantizedKVCache(quantizer, 2, 2, 64, 30, dtype=torch.float32)
    cache.append(0, *_kv(2, 30, gen))
    before = cache.dequantize(0)
    with pytest.raises(ValueError, match="exceed"):
        cache.append(0, *_kv(2, 1, gen))
    cache.reserve(50)
    k, v = _kv(2, 20, gen)
    cache.append(0, k, v)
    after = cache.dequantize(0)
    assert cache.length(0) == 50 and torch.equal(after[0][:, :, :30 - 16], before[0][:, :, :30 - 16])
    assert torch.equal(after[0][:, :, -16:], k[:, :, -16:])


def test_layers_not_held_take_no_memory(quantizer):
    full = vecinfer.QuantizedKVCache(quantizer, 1, 2, 64, 64)
    one = vecinfer.QuantizedKVCache(quantizer, 1, 2, 64, 64, layers=[1])
    assert one.nbytes() - quantizer.parameter_bytes() == (full.nbytes() - quantizer.parameter_bytes()) // 2
    with pytest.raises(ValueError, match="does not hold layer 0"):
        one.append(0, torch.randn((1, 2, 1, 64)), torch.randn((1, 2, 1, 64)))


@pytest.mark.parametrize("sinks,residual,tokens,ok", [(2, 16, 5, True), (2, 16, 16, True), (2, 16, 17, False),
                                                     (3, 0, 1, False), (4, 8, 0, True)])
def test_truncate_removes_full_precision_tokens_only(quantizer, sinks, residual, tokens, ok):
    gen = torch.Generator().manual_seed(11)
    cache = vecinfer.QuantizedKVCache(_with_windows(quantizer, sinks, residual), 2, 2, 64, 64, dtype=torch.float32)
    cache.append(0, *_kv(2, 40, gen), skip=[0, 8])
    before = _snapshot(cache, 0)
    if not ok:
        with pytest.raises(ValueError, match="only tokens still in full precision"):
            cache.truncate(tokens, layers=[0])
        _assert_same(before, _snapshot(cache, 0))
        return
    cache.truncate(tokens, layers=[0])
    k, v, lens = cache.dequantize(0, padded=True)
    assert lens.tolist() == [40 - tokens, 32 - tokens]
    for i, n in enumerate(lens.tolist()):
        assert torch.equal(k[i, :, :n], before[0][i, :, :n]) and torch.equal(v[i, :, :n], before[1][i, :, :n])


def test_reference_attend_ignores_garbage_in_unused_buffer_entries(quantizer):
    """Unwritten buffer entries (NaN bits on a GPU's reused memory) must not reach the output of a
    sequence that holds fewer tokens than another: masked entries contribute 0, not 0 * NaN."""
    gen = torch.Generator().manual_seed(9)
    cache = vecinfer.QuantizedKVCache(quantizer, 2, 2, 64, 64, dtype=torch.float32)
    k, v = _kv(2, 30, gen)
    cache.append(0, k, v, skip=[0, 24])  # 30 and 6 tokens: sequence 1 has 4 recent tokens of 16
    assert cache._attend_inputs(0)[2][1].tolist() == [2, 0, 4]
    cache._recent_k[0][1, :, 4:] = float("nan")
    cache._recent_v[0][1, :, 4:] = float("nan")
    # 5 queries: the float32 reference path (codes_attention), which pads the batch
    assert not cache._fused_attention_supported(torch.empty((2, 4, 5, 64)))
    out = cache.attend(0, torch.randn((2, 4, 5, 64), generator=gen))
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("device", DEVICES)
def test_steady_decode_steps_equal_one_append_and_keep_device_lengths(quantizer, device):
    """Past the sinks and a full window, a one-token step takes the steady path (code positions
    from the lengths on the cache's device). Over a batch of unequal lengths, after steps,
    select, truncate and more steps: the same buffers as appending each sequence's tokens at once,
    and the device copy of the lengths equal to the host copy."""
    gen = torch.Generator().manual_seed(12)
    k, v = _kv(3, 60, gen, device=device)
    skip = [0, 7, 19]
    cache = vecinfer.QuantizedKVCache(quantizer, 3, 2, 64, 64, device=device, dtype=torch.float32)
    cache.append(0, k[:, :, :30], v[:, :, :30], skip=skip)  # 30, 23 and 11 tokens: 11 < 2 + 16
    steady = []
    for t in range(30, 60):
        steady.append(cache._steady(0))
        cache.append(0, k[:, :, t:t + 1], v[:, :, t:t + 1])
    assert not steady[0] and all(steady[-20:]), "the steps never reached the steady path"
    one = vecinfer.QuantizedKVCache(quantizer, 3, 2, 64, 64, device=device, dtype=torch.float32)
    one.append(0, k, v, skip=skip)
    assert cache.lengths(0).tolist() == one.lengths(0).tolist() == [60, 53, 41]
    for a, b in zip(cache.dequantize(0, padded=True), one.dequantize(0, padded=True)):
        assert torch.equal(a, b)

    def device_lengths_agree():
        if cache._device_lengths is not None:
            assert torch.equal(cache._device_lengths[0].cpu(), cache._lengths[0])

    device_lengths_agree()
    cache.select([2, 0])
    device_lengths_agree()
    cache.truncate(3, layers=[0])
    device_lengths_agree()
    for _ in range(4):
        cache.append(0, *_kv(2, 1, gen, device=device))
    device_lengths_agree()
    q = torch.randn((2, 4, 1, 64), generator=gen).to(device)
    got = cache.attend(0, q)
    k_hat, v_hat, lens = cache.dequantize(0, padded=True)
    for b in range(2):
        n = int(lens[b])
        torch.testing.assert_close(got[b:b + 1].double(), _attention64(q[b:b + 1], k_hat[b:b + 1, :, :n],
                                                                       v_hat[b:b + 1, :, :n]), atol=1e-4, rtol=1e-4)


def test_attend_under_torch_compile_uses_the_custom_operator(quantizer, monkeypatch):
    """cache.attend inside a torch.compile'd function traces through torch.ops.vecinfer.attention
    (not the plain binding) and gives the eager result."""
    import vecinfer.cache as cache_module

    gen = torch.Generator().manual_seed(13)
    cache = vecinfer.QuantizedKVCache(quantizer, 2, 2, 64, 64, dtype=torch.float32)
    cache.append(0, *_kv(2, 40, gen))
    q = torch.randn((2, 4, 1, 64), generator=gen)
    eager = cache.attend(0, q) * 2
    calls = []
    monkeypatch.setattr(cache_module, "attention", lambda *a, **k: calls.append(1))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: cache.attend(0, x) * 2, backend="aot_eager")(q)
    assert not calls, "the compiled function called the plain binding"
    torch.testing.assert_close(compiled, eager)
