"""Kept tokens (VQConfig.keep_fraction, keep_tokens): which tokens stay in full precision, what the cache then
holds, and that attention (CPU reference and CUDA kernels) reads them."""
from __future__ import annotations

import pytest
import torch

import vecinfer
from conftest import CUDA, DEVICES, small_quantizer
from test_cache import _assert_same, _attention64, _snapshot, check_attend
from test_paged import capture_decode_step

SINKS, WINDOW = 2, 16  # small_quantizer's


@pytest.fixture(scope="module")
def quantizer():
    return small_quantizer().replace(keep_fraction=0.1)


def _novelty64(keys: torch.Tensor, j: int, window: int = WINDOW) -> float:
    """Key novelty of position j of one sequence's keys [Hkv, n, D], in float64, from its definition."""
    if j == 0:
        return 0.0
    x = keys.double()
    mu = x[:, max(0, j - window):j].mean(1)
    return float((((x[:, j] - mu) ** 2).sum(-1) / (x[:, j] ** 2).sum(-1)).sum())


def _budget(fraction: float, floor: int, left: int) -> int:
    return min(left, max(floor, int(fraction * left + 0.5)))


def _expected_kept(keys: torch.Tensor, chunks, fraction: float, floor: int = 0, sinks: int = SINKS,
                   window: int = WINDOW) -> set:
    """The positions kept after appending one sequence's keys [Hkv, n, D] in `chunks`: after each
    append, of the kept ones and the tokens that left the window in it, the
    min(E, max(floor, round(fraction * E))) with the highest novelty (E: tokens that have left so far)."""
    kept, left, total = [], 0, 0
    for t in chunks:
        total += t
        now = max(0, total - sinks - window)
        new = list(range(sinks + left, sinks + now))
        left = now
        kept = sorted(kept + new, key=lambda p: -_novelty64(keys, p, window))[:_budget(fraction, floor, left)]
    return set(kept)


def _fill(cache, chunks, gen, layer=0, dtype=torch.float32):
    ks, vs = [], []
    for t in chunks:
        k = (torch.randn((cache.batch_size, 2, t, 64), generator=gen) + 3).to(dtype).to(cache.device)
        v = torch.randn((cache.batch_size, 2, t, 64), generator=gen).to(dtype).to(cache.device)
        cache.append(layer, k, v)
        ks.append(k), vs.append(v)
    return torch.cat(ks, 2), torch.cat(vs, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunks", [[1] * 90, [120], [30, 1, 1, 17, 40, 3], [5, 60, 16, 16, 16]])
@pytest.mark.parametrize("fraction,floor", [(0.1, 0), (0.0, 12), (0.1, 6)])
def test_kept_tokens_are_the_most_novel_and_exact(quantizer, device, chunks, fraction, floor, gen):
    """The budget: a fraction, a fixed number of tokens, and both (the floor first, the fraction
    beyond 60 tokens)."""
    cache = vecinfer.QuantizedKVCache(quantizer.replace(keep_fraction=fraction, keep_tokens=floor), 2, 2, 64, 200,
                                      device=device, dtype=torch.float32)
    k, v = _fill(cache, chunks, gen)
    n = k.shape[2]
    k_hat, v_hat = cache.dequantize(0)
    assert k_hat.shape == k.shape
    left = max(0, n - SINKS - WINDOW)
    for b in range(2):
        kept = _expected_kept(k[b].cpu(), chunks, fraction, floor)
        assert len(kept) == _budget(fraction, floor, left)
        sinks, coded, recent = cache._lengths[0][b].tolist()
        assert (sinks, coded, recent) == (min(n, SINKS) + len(kept), left - len(kept), min(n - min(n, SINKS), WINDOW))
        exact = sorted(set(range(min(n, SINKS))) | kept | set(range(n - recent, n)))
        coded_pos = sorted(set(range(n)) - set(exact))
        assert torch.equal(k_hat[b, :, exact], k[b, :, exact]) and torch.equal(v_hat[b, :, exact], v[b, :, exact])
        if coded_pos:
            exp_k, exp_v = cache.quantizer.fake_quantize(0, k[b:b + 1, :, coded_pos], v[b:b + 1, :, coded_pos])
            torch.testing.assert_close(k_hat[b:b + 1, :, coded_pos], exp_k)
            torch.testing.assert_close(v_hat[b:b + 1, :, coded_pos], exp_v)
            assert (k_hat[b, :, coded_pos] - k[b, :, coded_pos]).abs().amax() > 0.1  # really compressed


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fraction,floor", [(0.1, 0), (0.0, 30)])
def test_batched_decode_steps_of_unequal_sequences(quantizer, device, fraction, floor, gen):
    """Decode steps of sequences holding different numbers of tokens (the batched step, each with
    its own budget; with 30 tokens, budgets that fill at different steps and then stay) keep what
    each sequence alone would keep."""
    cache = vecinfer.QuantizedKVCache(quantizer.replace(keep_fraction=fraction, keep_tokens=floor), 3, 2, 64, 300,
                                      device=device, dtype=torch.float32)
    k = torch.randn((3, 2, 60, 64), generator=gen) + 3
    v = torch.randn((3, 2, 60, 64), generator=gen)
    skip = [0, 5, 23]
    cache.append(0, k.to(device), v.to(device), skip=skip)
    steps_k, steps_v = torch.randn((3, 2, 150, 64), generator=gen) + 3, torch.randn((3, 2, 150, 64), generator=gen)
    for i in range(150):
        cache.append(0, steps_k[:, :, i:i + 1].to(device), steps_v[:, :, i:i + 1].to(device))
    k_hat, v_hat, totals = cache.dequantize(0, padded=True)
    for b in range(3):
        seq_k = torch.cat([k[b, :, skip[b]:], steps_k[b]], 1)
        seq_v = torch.cat([v[b, :, skip[b]:], steps_v[b]], 1)
        kept = _expected_kept(seq_k, [60 - skip[b]] + [1] * 150, fraction, floor)
        assert set(cache._keep_state["kept_positions"][0][b, :len(kept)].tolist()) == kept
        n = int(totals[b])
        coded = sorted(set(range(SINKS, n - WINDOW)) - kept)
        exp_k, exp_v = cache.quantizer.fake_quantize(0, seq_k[None, :, coded].to(device), seq_v[None, :, coded].to(device))
        torch.testing.assert_close(k_hat[b:b + 1, :, coded], exp_k)
        torch.testing.assert_close(v_hat[b:b + 1, :, coded], exp_v)
        assert torch.equal(k_hat[b, :, sorted(kept)].cpu(), seq_k[:, sorted(kept)])


def test_large_fraction_keeps_every_token_some_steps(gen):
    """keep_fraction 0.5: a step whose pushed-out token stays kept encodes nothing."""
    cache = vecinfer.QuantizedKVCache(small_quantizer().replace(keep_fraction=0.5), 1, 2, 64, 100,
                                      dtype=torch.float32)
    k, v = _fill(cache, [1] * 40 + [7], gen)
    kept = _expected_kept(k[0], [1] * 40 + [7], 0.5)
    assert set(cache._keep_state["kept_positions"][0][0, :len(kept)].tolist()) == kept
    k_hat, _ = cache.dequantize(0)
    assert torch.equal(k_hat[0, :, sorted(kept)], k[0, :, sorted(kept)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tq,group", [(1, 1), (4, 2), (16, 3)])
def test_attend_with_kept_tokens_equals_attention_over_dequantize(quantizer, device, dtype, tq, group, gen):
    """On CUDA in float16 / bfloat16 this is the fused kernel reading kept tokens as sinks."""
    cache = vecinfer.QuantizedKVCache(quantizer, 2, 2, 64, 400, device=device, dtype=dtype)
    _fill(cache, [150, 1, 33, tq], gen, dtype=dtype)
    assert int(cache._lengths[0][:, 0].min()) > SINKS  # tokens are kept
    check_attend(cache, 0, torch.randn((2, 2 * group, tq, 64), generator=gen).to(dtype).to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tq", [(torch.float16, 1), (torch.bfloat16, 3)])
def test_attend_reads_hundreds_of_kept_tokens(quantizer, device, dtype, tq, gen):
    """Hundreds of full-precision tokens per sequence: the CUDA kernel spreads them over several
    blocks (fp_part_tokens each), the last ones left empty by the lengths."""
    cache = vecinfer.QuantizedKVCache(quantizer.replace(keep_fraction=0.3), 2, 2, 64, 2000, device=device,
                                      dtype=dtype)
    _fill(cache, [1500, tq], gen, dtype=dtype)
    assert cache._lengths[0][:, 0].tolist() == [SINKS + int(0.3 * (1500 + tq - SINKS - WINDOW) + 0.5)] * 2
    check_attend(cache, 0, torch.randn((2, 4, tq, 64), generator=gen).to(dtype).to(device))


@pytest.mark.skipif(not vecinfer.cuda_available(), reason="the CUDA kernel's schedules")
def test_attend_kept_tokens_in_both_cuda_schedules(quantizer, gen):
    """The decode kernel runs several full-precision parts inside its coded blocks when those fit
    in one wave, and as blocks of their own otherwise (a batch beyond the GPU's SMs): both match
    float64 attention over dequantize."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    dtype = torch.float16
    for batch in (1, 4 * sms):  # 2 KV heads, one row tile: 2 * batch groups of one coded split
        cache = vecinfer.QuantizedKVCache(quantizer.replace(keep_fraction=0.5), batch, 2, 64, 600, device="cuda",
                                          dtype=dtype)
        _fill(cache, [500, 1], gen, dtype=dtype)
        assert int(cache._lengths[0][0, 0]) > 144  # more than one part of full-precision tokens
        check_attend(cache, 0, torch.randn((batch, 4, 1, 64), generator=gen).to(dtype).to("cuda"))


@pytest.mark.parametrize("device", DEVICES)
def test_kept_tokens_on_real_kv(device):
    """SmolLM2-135M's post-RoPE keys and values (three layers): the choice against the float64
    reference, and attention (on CUDA the fp16 kernel) against float64 attention over dequantize."""
    from vecinfer.demo import load_real_kv

    _, keys, values, _ = load_real_kv()
    cfg = vecinfer.VQConfig(residual=32, sink_tokens=4, kmeans_iters=3, keep_fraction=0.05)
    q = vecinfer.KVQuantizer.calibrate(keys, values, cfg, progress=False)
    dtype = torch.float16 if device == "cuda" else torch.float32
    chunks = [200, *[1] * 20, 100]
    cache = vecinfer.QuantizedKVCache(q, 1, 3, 64, 320, device=device, dtype=dtype)
    for layer, (k, v) in enumerate(zip(keys, values)):
        start = 0
        for t in chunks:
            cache.append(layer, k[None, :, start:start + t].to(dtype).to(device),
                         v[None, :, start:start + t].to(dtype).to(device))
            start += t
        kept = _expected_kept(k.to(dtype).float(), chunks, 0.05, sinks=4, window=32)
        assert set(cache._keep_state["kept_positions"][layer][0, :len(kept)].tolist()) == kept
        assert torch.equal(cache.dequantize(layer)[0][0, :, sorted(kept)].cpu(), k[:, sorted(kept)].to(dtype))
        check_attend(cache, layer, k[None, :, -4:].repeat_interleave(3, dim=1).to(dtype).to(device))  # 9 heads


def test_skip_reserve_select_and_truncate_keep_the_choice(quantizer, gen):
    """A left-padded prompt is the unpadded one; growing, reordering and truncating the window
    keep the kept tokens; kept tokens cannot be truncated."""
    cache = vecinfer.QuantizedKVCache(quantizer, 2, 2, 64, 60, dtype=torch.float32)
    k = torch.randn((2, 2, 50, 64), generator=gen) + 3
    v = torch.randn((2, 2, 50, 64), generator=gen)
    cache.append(0, k, v, skip=[0, 7])
    single = vecinfer.QuantizedKVCache(quantizer, 1, 2, 64, 60, dtype=torch.float32)
    single.append(0, k[1:, :, 7:], v[1:, :, 7:])
    assert cache._lengths[0][1].tolist() == single._lengths[0][0].tolist()
    torch.testing.assert_close(cache.dequantize(0, padded=True)[0][1:, :, :43], single.dequantize(0)[0])
    cache.reserve(300)  # more kept rows: the later tokens of a long sequence can be kept
    more_k, more_v = torch.randn((2, 2, 200, 64), generator=gen) + 3, torch.randn((2, 2, 200, 64), generator=gen)
    cache.append(0, more_k, more_v)
    full_k = torch.cat([k, more_k], 2)
    expected = _expected_kept(full_k[0], [50, 200], 0.1)
    assert set(cache._keep_state["kept_positions"][0][0, :len(expected)].tolist()) == expected
    before = cache.dequantize(0, padded=True)
    cache.select([1, 0, 0])
    after = cache.dequantize(0, padded=True)
    for new, old in ((0, 1), (1, 0), (2, 0)):
        assert torch.equal(after[0][new], before[0][old]) and torch.equal(after[1][new], before[1][old])
    cache.truncate(WINDOW, layers=[0])
    assert cache._lengths[0][:, 2].tolist() == [0, 0, 0]
    snap = _snapshot(cache, 0)
    with pytest.raises(ValueError, match="only tokens still in full precision"):
        cache.truncate(1, layers=[0])
    _assert_same(snap, _snapshot(cache, 0))


def test_kept_tokens_bad_input_leaves_cache_unchanged(quantizer, gen):
    cache = vecinfer.QuantizedKVCache(quantizer, 1, 2, 64, 100, dtype=torch.float32)
    _fill(cache, [40], gen)
    snap = _snapshot(cache, 0)
    bad = torch.randn((1, 2, 3, 64), generator=gen)
    bad[0, 1, 2, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinity"):
        cache.append(0, bad, torch.zeros_like(bad))
    with pytest.raises(ValueError, match="at most 16 tokens at a time"):
        cache.attend(0, torch.randn((1, 2, 17, 64), generator=gen))
    _assert_same(snap, _snapshot(cache, 0))


def test_kept_step_binding_refuses_bad_buffers(gen):
    """The step kernel's binding (cache-internal, so a direct call): mismatched shapes and dtypes
    and bad lengths are errors, and a refused step writes nothing."""
    B, H, D, sinks, kept, window, codes = 2, 2, 64, 1, 3, 4, 8
    def buffers(**override):
        f = dict(new_keys=torch.randn((B, H, D), generator=gen), new_values=torch.randn((B, H, D), generator=gen),
                 sink_keys=torch.randn((B, H, sinks + kept, D), generator=gen),
                 sink_values=torch.randn((B, H, sinks + kept, D), generator=gen),
                 window_keys=torch.randn((B, H, window, D), generator=gen),
                 window_values=torch.randn((B, H, window, D), generator=gen),
                 window_scores=torch.rand((B, window), generator=gen), kept_scores=torch.zeros((B, kept)),
                 kept_positions=torch.zeros((B, kept), dtype=torch.int32),
                 code_positions=torch.zeros((B, codes), dtype=torch.int32), code_capacity=codes,
                 lengths=torch.tensor([[sinks, 0, window]] * B, dtype=torch.int32), seq_slots=None, sinks=sinks,
                 keep_fraction=0.0, keep_tokens=2, encode_keys=torch.zeros((B, H, D)),
                 encode_values=torch.zeros((B, H, D)), next_lengths=torch.zeros((B, 3), dtype=torch.int32),
                 encode_lengths=torch.zeros((B, 3), dtype=torch.int32), stream=0)
        f.update(override)
        return f
    with pytest.raises(ValueError, match=r"window_values: expected \[2, 2, 4, 64\]"):
        vecinfer._C.kept_step(**buffers(window_values=torch.zeros((B, H, window + 1, D))))
    with pytest.raises(TypeError, match="code_positions: expected an int32 tensor"):
        vecinfer._C.kept_step(**buffers(code_positions=torch.zeros((B, codes), dtype=torch.int64)))
    with pytest.raises(TypeError, match="encode_keys: must have the dtype of new_keys"):
        vecinfer._C.kept_step(**buffers(encode_keys=torch.zeros((B, H, D), dtype=torch.float16)))
    bad = buffers(lengths=torch.tensor([[sinks, 0, window], [sinks, 2, window - 1]], dtype=torch.int32))
    before = {k: v.clone() for k, v in bad.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match="filling its window \\(nothing kept or coded\\)"):
        vecinfer._C.kept_step(**bad)
    for name, value in before.items():  # sequence 0 was valid, but nothing is written
        assert torch.equal(bad[name], value), name
    good = buffers()
    vecinfer._C.kept_step(**good)
    assert good["next_lengths"].tolist() == [[sinks + 1, 0, window]] * B
    # with slots: the batch's sequences are rows of larger buffers; slots in range and distinct
    for slots, error in (([0, 0], "distinct slots"), ([1, 2], "distinct slots"), ([-1, 0], "distinct slots")):
        bad = buffers(seq_slots=torch.tensor(slots, dtype=torch.int32))
        before = {k: v.clone() for k, v in bad.items() if isinstance(v, torch.Tensor)}
        with pytest.raises(ValueError, match=error):
            vecinfer._C.kept_step(**bad)
        for name, value in before.items():
            assert torch.equal(bad[name], value), name
    with pytest.raises(ValueError, match="one row per sequence of the batch"):
        vecinfer._C.kept_step(**buffers(new_keys=torch.randn((1, H, D), generator=gen),
                                        new_values=torch.randn((1, H, D), generator=gen),
                                        encode_keys=torch.zeros((1, H, D)), encode_values=torch.zeros((1, H, D))))


def test_keep_config_and_bits():
    with pytest.raises(ValueError, match="keep_fraction must be in"):
        vecinfer.VQConfig(keep_fraction=1.0)
    with pytest.raises(TypeError, match="keep_fraction must be a number"):
        vecinfer.VQConfig(keep_fraction="0.01")
    with pytest.raises(ValueError, match="residual > 0"):
        vecinfer.VQConfig(keep_fraction=0.01, residual=0)
    q = small_quantizer()
    kept = q.replace(keep_fraction=0.01)
    # 1% of the compressed tokens at 16 bits instead of 2
    assert kept.bits_per_element() == pytest.approx(0.99 * 2 + 0.01 * 16)
    n = 10_000
    extra = (kept.bits_per_element(n) - q.bits_per_element(n)) * 2 * n  # bits per (head, dim) pair
    assert extra == pytest.approx(int(0.01 * (n - 18) + 0.5) * 2 * (16 - 2))
    with pytest.raises(ValueError, match="leave the calibration valid"):
        q.replace(key_bits=3)
    for bad, error in ((-1, ValueError), (2**31, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="keep_tokens must be"):
            vecinfer.VQConfig(keep_tokens=bad)
    with pytest.raises(ValueError, match="residual > 0"):
        vecinfer.VQConfig(keep_tokens=64, residual=0)
    both = vecinfer.VQConfig(keep_fraction=0.01, keep_tokens=64)
    assert both.keeps_tokens and not vecinfer.VQConfig().keeps_tokens
    # at most what has left the window; the floor until 1% exceeds it (past 6,450 tokens)
    assert [both.kept_budget(e) for e in (0, 10, 64, 1000, 6449, 6450, 10_000)] == [0, 10, 64, 64, 64, 65, 100]
    fixed = q.replace(keep_tokens=64)
    assert fixed.bits_per_element() == q.bits_per_element()  # a fixed budget amortised over no end
    extra = (fixed.bits_per_element(n) - q.bits_per_element(n)) * 2 * n
    assert extra == pytest.approx(64 * 2 * (16 - 2))
    # 20 tokens: 18 in the sinks and window, the 2 that left it kept (the budget is at most those)
    assert (fixed.bits_per_element(20) - q.bits_per_element(20)) * 2 * 20 == pytest.approx(2 * 2 * (16 - 2))


def test_kept_quantizer_round_trips(quantizer, tmp_path):
    path = str(tmp_path / "q.safetensors")
    quantizer.save(path)
    assert vecinfer.KVQuantizer.load(path).config.keep_fraction == 0.1
    quantizer.replace(keep_fraction=0, keep_tokens=7).save(path)
    assert vecinfer.KVQuantizer.load(path).config.keep_tokens == 7


def _paged_expected_kv(cache, layer, k, v, kept):
    """What a sequence of keys, values [Hkv, n, D] (float32, on the CPU) must hold: the sinks, the
    kept tokens and the window exact, every other token quantized and dequantized once."""
    n = k.shape[1]
    recent = min(n - min(n, SINKS), WINDOW)
    coded = sorted(set(range(n)) - set(range(min(n, SINKS))) - kept - set(range(n - recent, n)))
    k_hat, v_hat = k.clone(), v.clone()
    if coded:
        fk, fv = cache.quantizer.fake_quantize(layer, k[None, :, coded].to(cache.device),
                                               v[None, :, coded].to(cache.device))
        k_hat[:, coded], v_hat[:, coded] = fk[0].float().cpu(), fv[0].float().cpu()
    return k_hat, v_hat


def _paged_step(cache, seqs, counts, history, gen):
    """Appends counts[i] fresh tokens to sequence seqs[i] on every layer; records them in history
    (seq -> [keys [Hkv, n, D] float32 CPU, values, chunks]). Returns the plan (its kept_step flag)."""
    step = cache.plan_append(seqs, counts)
    cache.begin(step)
    n = sum(counts)
    k = (torch.randn((n, 2, 64), generator=gen) + 3).to(cache.dtype).to(cache.device)
    v = torch.randn((n, 2, 64), generator=gen).to(cache.dtype).to(cache.device)
    for layer in cache.layers:
        cache.append(layer, k, v, step)
    start = 0
    for s, c in zip(seqs, counts):
        hk, hv, chunks = history[s]
        history[s] = [torch.cat([hk, k[start:start + c].float().cpu().transpose(0, 1)], 1),
                      torch.cat([hv, v[start:start + c].float().cpu().transpose(0, 1)], 1), chunks + [c]]
        start += c
    return step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fraction,floor", [(0.1, 0), (0.0, 12)])
def test_paged_cache_keeps_what_each_sequence_alone_keeps(quantizer, device, fraction, floor, gen):
    """PagedKVCache with kept tokens: sequences in scattered slots, prompts of awkward lengths (within
    the window, across it many times, a sequence joining late, one with no prompt), decode steps
    (the kept-token step kernel, sequences filling their sinks or window beside steady ones), then a
    fork decoding beside its parent. Each sequence keeps the most novel tokens, as it would alone,
    and the plan's attention (up to a window of queries) equals float64 attention over the sinks,
    kept tokens and window exact and the other tokens quantized once."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    cache = vecinfer.PagedKVCache(quantizer.replace(keep_fraction=fraction, keep_tokens=floor), num_pages=60,
                                  max_seqs=5, max_tokens_per_seq=260, page_size=16, device=device, dtype=dtype)
    first = cache.add_sequence()
    seqs = [cache.add_sequence() for _ in range(3)]
    cache.free(first)
    seqs.append(cache.add_sequence())  # the sequences are slots 1, 2, 3, 0
    empty = torch.zeros((2, 0, 64))
    history = {s: [empty, empty, []] for s in seqs}
    _paged_step(cache, seqs, [40, 5, 0, 0], history, gen)
    _paged_step(cache, seqs, [0, 30, 17, 0], history, gen)
    # the last sequence decodes from nothing: two sinks, sixteen window rows, then steady
    assert all(_paged_step(cache, seqs, [1, 1, 1, 1], history, gen).kept_step for _ in range(40))
    child = cache.fork(seqs[0])
    history[child] = list(history[seqs[0]])
    assert cache._pages_of[child][:-1] == cache._pages_of[seqs[0]][:-1]  # full pages shared
    assert cache._pages_of[child][-1] != cache._pages_of[seqs[0]][-1]    # the page of the next code its own
    seqs.append(child)
    assert all(_paged_step(cache, seqs, [1] * 5, history, gen).kept_step for _ in range(20))
    for s in seqs:
        k, v, chunks = history[s]
        n = k.shape[1]
        kept = _expected_kept(k, chunks, fraction, floor)
        left = n - SINKS - WINDOW
        assert cache._state[s] == (SINKS + len(kept), left - len(kept), WINDOW)
        for layer in cache.layers:
            assert cache._lengths[layer][s].tolist() == list(cache._state[s])
            assert set(cache._kept_positions[layer][s, :len(kept)].tolist()) == kept
    for tq in (1, 5, WINDOW):
        plan = cache.plan_attention(seqs, num_q_heads=4, num_queries=tq)
        q = torch.randn((len(seqs), 4, tq, 64), generator=gen).to(dtype).to(device)
        for layer in cache.layers:
            out = plan.run(layer, q, out=torch.full_like(q, float("nan")))
            for i, s in enumerate(seqs):
                k, v, chunks = history[s]
                ref = _attention64(q[i:i + 1].cpu(), *(x[None] for x in _paged_expected_kv(
                    cache, layer, k, v, _expected_kept(k, chunks, fraction, floor))))
                tol = 3e-3 if dtype == torch.float16 else 1e-4
                torch.testing.assert_close(out[i:i + 1].cpu().double(), ref, atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="at most residual=16"):
        cache.plan_attention(seqs, num_q_heads=4, num_queries=WINDOW + 1)


def test_paged_kept_tokens_bad_calls_leave_the_cache_unchanged(quantizer, gen):
    """A step past a sequence's capacity and a step the pool cannot hold are refused before anything
    changes; a kept-token step that would leave the steady state runs per sequence."""
    cache = vecinfer.PagedKVCache(quantizer.replace(keep_fraction=0, keep_tokens=8), num_pages=4, max_seqs=2,
                                  max_tokens_per_seq=60, page_size=16, dtype=torch.float32)
    seq = cache.add_sequence()
    empty = torch.zeros((2, 0, 64))
    history = {seq: [empty, empty, []]}
    _paged_step(cache, [seq], [50], history, gen)
    snapshot = [buf[layer].clone() for buf in cache._per_sequence_buffers() for layer in cache.layers]
    state, pages = cache._state[seq], list(cache._pages_of[seq])
    with pytest.raises(ValueError, match="more than max_tokens_per_seq=60"):
        cache.begin(cache.plan_append([seq], [11]))
    other = cache.add_sequence()
    with pytest.raises(ValueError, match="the step needs"):
        cache.begin(cache.plan_append([seq, other], [1, 60]))
    assert cache._state[seq] == state and cache._pages_of[seq] == pages
    after = [buf[layer] for buf in cache._per_sequence_buffers() for layer in cache.layers]
    assert all(torch.equal(a, b) for a, b in zip(snapshot, after))
    # a prompt and a decode step in one plan: not a kept-token step, run per sequence
    history[other] = [empty, empty, []]
    assert not _paged_step(cache, [seq, other], [1, 7], history, gen).kept_step
    for s in (seq, other):
        kept = _expected_kept(history[s][0], history[s][2], 0.0, 8)
        assert set(cache._kept_positions[0][s, :len(kept)].tolist()) == kept


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (sm_80+)")
def test_paged_kept_step_replays_in_a_cuda_graph(quantizer, gen):
    """A kept-token decode step (append + run, every layer) captured in a CUDA graph while a sequence
    still fills its window, replayed 40 times with cache.begin before each: every output and every
    buffer equal an eager twin's. Capturing a step of several tokens to a sequence is refused."""
    quant = quantizer.replace(keep_fraction=0, keep_tokens=12)
    graph_cache, eager = (vecinfer.PagedKVCache(quant, num_pages=64, max_seqs=3, max_tokens_per_seq=200, device="cuda",
                                                dtype=torch.float16) for _ in range(2))
    seqs = [graph_cache.add_sequence() for _ in range(3)]
    assert [eager.add_sequence() for _ in range(3)] == seqs

    def tokens(n):
        return (torch.randn((n, 2, 64), generator=gen) + 3).half().cuda(), torch.randn((n, 2, 64), generator=gen).half().cuda()

    def run(cache, step, k, v, begin=True):
        if begin:
            cache.begin(step)
        for layer in cache.layers:
            cache.append(layer, k, v, step)

    for seq, n in zip(seqs, (1, 40, 25)):  # prompts; the first leaves its sinks short of full
        k, v = tokens(n)
        for cache in (graph_cache, eager):
            run(cache, cache.plan_append([seq], [n]), k, v)
    multi = graph_cache.plan_append(seqs, [2, 1, 1])
    graph_cache.begin(multi)
    assert not multi.kept_step
    k_in = torch.zeros((3, 2, 64), device="cuda", dtype=torch.float16)
    v_in, q_in = torch.zeros_like(k_in), torch.zeros((3, 4, 1, 64), device="cuda", dtype=torch.float16)
    k4, v4 = torch.zeros((4, 2, 64), device="cuda", dtype=torch.float16), torch.zeros((4, 2, 64), device="cuda",
                                                                                      dtype=torch.float16)
    with pytest.raises(ValueError, match="can capture only a step of one token per sequence"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            graph_cache.append(graph_cache.layers[0], k4, v4, multi)
    k, v = tokens(4)  # the refused capture changed nothing: the step runs eagerly on both
    run(graph_cache, multi, k, v, begin=False)
    run(eager, eager.plan_append(seqs, [2, 1, 1]), k, v)
    step, eager_step = graph_cache.plan_append(seqs, [1, 1, 1]), eager.plan_append(seqs, [1, 1, 1])
    graph_cache.begin(step)
    assert step.kept_step and graph_cache._state[seqs[0]] == (2, 0, 2)  # sinks full, a window of two
    plan, eager_plan = graph_cache.plan_attention(seqs, 4), eager.plan_attention(seqs, 4)
    graph, outs = capture_decode_step(graph_cache, step, plan, k_in, v_in, q_in)
    for i in range(40):  # the first sequence fills its window, then keeps its budget, then encodes
        k, v = tokens(3)
        q = torch.randn((3, 4, 1, 64), generator=gen).half().cuda()
        k_in.copy_(k), v_in.copy_(v), q_in.copy_(q)
        if i:  # the capture ran no kernels: its step was begun already
            graph_cache.begin(step)
        graph.replay()
        run(eager, eager_step, k, v)
        for layer in eager.layers:
            torch.testing.assert_close(outs[layer], eager_plan.run(layer, q), atol=0, rtol=0)
    assert graph_cache._state[seqs[0]] == (2 + 12, 43 - 2 - 16 - 12, 16)
    for a, b in zip(graph_cache._per_sequence_buffers(), eager._per_sequence_buffers()):
        for layer in eager.layers:
            assert torch.equal(a[layer], b[layer])


def test_hf_cache_splits_long_blocks_into_window_sized_pieces():
    """With kept tokens VecInferCache runs a block longer than the window as pieces of at most the
    window: the same logits as the pieces fed one forward call each."""
    pytest.importorskip("transformers")
    from test_hf_cache import _prompt, _quantizer, _tiny
    from vecinfer.hf import VecInferCache

    model = _tiny("llama")
    q = _quantizer(model, bits=2, residual=8, sink_tokens=2).replace(keep_fraction=0.2)
    prompt, block = _prompt(40), _prompt(30, seed=3)
    whole, pieces = VecInferCache(model, q), VecInferCache(model, q)
    with torch.no_grad():
        model(prompt, past_key_values=whole, use_cache=True)
        model(prompt, past_key_values=pieces, use_cache=True)
        got = model(block, past_key_values=whole, use_cache=True).logits
        want = torch.cat([model(block[:, i:i + 8], past_key_values=pieces, use_cache=True).logits
                          for i in range(0, 30, 8)], dim=1)
    assert whole.codes._lengths[0][0, 0] > 2  # tokens were kept
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_serving_bench_refuses_a_keep_fraction(capsys):
    """`vecinfer bench --serving` keeps a fixed budget: a --keep-fraction is an error, not ignored."""
    from vecinfer.bench import main

    with pytest.raises(SystemExit):
        main(["--serving", "--keep-fraction", "0.01"])
    assert "--serving keeps a fixed budget: --keep-tokens N, not --keep-fraction" in capsys.readouterr().err
