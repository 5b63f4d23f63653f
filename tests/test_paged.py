"""PagedKVCache, the serving-engine API: appending into pages through a ring window, plan/run decode
attention, forks sharing pages, merge_states, and a continuous-batching run against per-sequence
references computed independently (quantize-dequantize of each token once, float64 attention)."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

import vecinfer
from conftest import CUDA, DEVICES, small_quantizer
from vecinfer.paged import advance


@pytest.fixture(scope="module")
def quantizer():
    return small_quantizer()


def _windows(quantizer, sinks, residual):
    cfg = dataclasses.replace(quantizer.config, sink_tokens=sinks, residual=residual)
    return vecinfer.KVQuantizer(cfg, quantizer.layers, quantizer.num_kv_heads, quantizer.head_dim)


class Model:
    """What each sequence must hold, kept apart from the cache: per layer, the keys and values of
    its tokens as the cache must return them (coded tokens quantized and dequantized once, by the
    quantizer's own encode/decode, the others as appended)."""

    def __init__(self, quantizer, layers):
        self.q, self.layers = quantizer, layers
        self.sinks, self.residual = quantizer.config.sink_tokens, quantizer.config.residual
        self.tokens = {}  # seq -> {layer: [raw k rows, raw v rows, dequantized k rows, dequantized v rows]}

    def add(self, seq):
        self.tokens[seq] = {layer: ([], [], [], []) for layer in self.layers}

    def fork(self, parent, child):
        self.tokens[child] = {layer: tuple(list(x) for x in lists) for layer, lists in self.tokens[parent].items()}

    def append(self, seq, layer, k, v):  # k, v [T, Hkv, D]
        ks, vs, kq, vq = self.tokens[seq][layer]
        ks.extend(k.float().unbind(0))
        vs.extend(v.float().unbind(0))
        n = len(ks)
        s = min(n, self.sinks)
        coded = max(n - s - self.residual, 0)
        if coded > len(kq):  # tokens that left the window: quantize-dequantize each once
            new = slice(s + len(kq), s + coded)
            kk = torch.stack(ks[new], 1)[None].contiguous()
            vv = torch.stack(vs[new], 1)[None].contiguous()
            kq.extend(self.q.decode_keys(layer, self.q.encode_keys(layer, kk), torch.float32)[0].unbind(1))
            vq.extend(self.q.decode_values(layer, self.q.encode_values(layer, vv), torch.float32)[0].unbind(1))

    def expected_kv(self, seq, layer):
        ks, vs, kq, vq = self.tokens[seq][layer]
        s = min(len(ks), self.sinks)
        c = len(kq)
        k = torch.stack(ks[:s] + kq + ks[s + c:], 1)  # [Hkv, n, D]
        v = torch.stack(vs[:s] + vq + vs[s + c:], 1)
        return k, v


def _attention64(q, k, v):
    """float64 attention of q [Hq, Tq, D] over k, v [Hkv, n, D], queries the last Tq positions."""
    hq, tq, d = q.shape
    g = hq // k.shape[0]
    k, v = k.double().repeat_interleave(g, 0), v.double().repeat_interleave(g, 0)
    s = q.double() @ k.transpose(-1, -2) / d ** 0.5
    n = k.shape[1]
    for i in range(tq):
        s[:, i, n - tq + i + 1:] = float("-inf")
    return torch.softmax(s, -1) @ v


def capture_decode_step(cache, step, plan, k_in, v_in, q_in):
    """A CUDA graph of one decode step over every layer (append k_in, v_in; run q_in into the
    layer's own output): (graph, outputs by layer)."""
    outs = {layer: torch.empty_like(q_in) for layer in cache.layers}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for layer in cache.layers:
            cache.append(layer, k_in, v_in, step)
            plan.run(layer, q_in, out=outs[layer])
    return graph, outs


def _rows(gen, n, dtype, device):
    k = (torch.randn((n, 2, 64), generator=gen) + 3).to(dtype).to(device)
    v = torch.randn((n, 2, 64), generator=gen).to(dtype).to(device)
    return k, v


@pytest.mark.parametrize("sinks,residual", [(2, 16), (0, 16), (3, 0), (0, 1)])
def test_advance_follows_the_token_by_token_rule(sinks, residual):
    rng = random.Random(0)
    for _ in range(300):
        state = (0, 0, 0)
        for _ in range(rng.randrange(1, 6)):
            n = rng.randrange(0, 40)
            s, c, r = state
            for _ in range(n):  # the rule of paged.h, one token at a time
                if s < sinks:
                    s += 1
                elif residual == 0:
                    c += 1
                else:
                    if r == residual:
                        c, r = c + 1, r - 1
                    r += 1
            state = tuple(advance(torch.tensor([state]), torch.tensor([n]), sinks, residual)[0].tolist())
            assert state == (s, c, r)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sinks,residual", [(2, 16), (0, 16), (3, 0)])
def test_append_then_run_equals_reference(quantizer, gen, device, sinks, residual):
    """Prompts of awkward lengths appended in uneven chunks (some crossing the window several times
    in one call), then decode attention through a plan: equal to attention over the model."""
    quant = _windows(quantizer, sinks, residual)
    dtype = torch.float16 if device == "cuda" else torch.float32
    cache = vecinfer.PagedKVCache(quant, num_pages=64, max_seqs=5, max_tokens_per_seq=300, device=device, dtype=dtype)
    model = Model(quant, cache.layers)
    seqs = [cache.add_sequence() for _ in range(4)]
    for s in seqs:
        model.add(s)
    for chunk in ([1, 37, 0, 5], [90, 3, 17, 16], [1, 1, 1, 1], [0, 70, 33, 2]):
        step = cache.plan_append(seqs, chunk)
        cache.begin(step)
        k, v = _rows(gen, step.num_rows, dtype, device)
        for layer in cache.layers:
            cache.append(layer, k, v, step)
            start = 0
            for s, n in zip(seqs, chunk):
                model.append(s, layer, k[start:start + n].cpu(), v[start:start + n].cpu())
                start += n
    for tq in (1, 3, 20):  # 20: the long-query kernel on the GPU
        plan = cache.plan_attention(seqs, num_q_heads=4, num_queries=tq)
        q = torch.randn((4, 4, tq, 64), generator=gen).to(dtype).to(device)
        for layer in cache.layers:
            lse = torch.full((4, 4, tq), float("nan"), device=device)
            out = plan.run(layer, q, out=torch.full_like(q, float("nan")), lse=lse)
            for i, s in enumerate(seqs):
                k, v = model.expected_kv(s, layer)
                ref = _attention64(q[i].cpu(), k, v)
                tol = 2e-3 if dtype == torch.float16 else 1e-4
                torch.testing.assert_close(out[i].cpu().double(), ref, atol=tol, rtol=tol)
            assert not torch.isnan(lse).any()
    # ragged: each sequence its own number of queries (none for one), packed [sum, Hq, D]
    counts = [2, 0, 25, 1]
    plan = cache.plan_attention(seqs, num_q_heads=4, num_queries=counts)
    q = torch.randn((sum(counts), 4, 64), generator=gen).to(dtype).to(device)
    for layer in cache.layers:
        lse = torch.full((sum(counts), 4), float("nan"), device=device)
        out = plan.run(layer, q, out=torch.full_like(q, float("nan")), lse=lse)
        start = 0
        for s, c in zip(seqs, counts):
            k, v = model.expected_kv(s, layer)
            ref = _attention64(q[start:start + c].transpose(0, 1).cpu(), k, v)
            tol = 2e-3 if dtype == torch.float16 else 1e-4
            torch.testing.assert_close(out[start:start + c].transpose(0, 1).cpu().double(), ref, atol=tol, rtol=tol)
            start += c
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()


def test_fork_shares_full_pages_and_copies_the_partial_one(quantizer, gen):
    cache = vecinfer.PagedKVCache(quantizer, num_pages=16, max_seqs=4, max_tokens_per_seq=200, page_size=16,
                                  dtype=torch.float32)
    parent = cache.add_sequence()
    step = cache.plan_append([parent], [2 + 16 + 40])  # 40 coded tokens: pages of 16, 16 and 8
    cache.begin(step)
    k, v = _rows(gen, step.num_rows, torch.float32, "cpu")
    for layer in cache.layers:
        cache.append(layer, k, v, step)
    assert cache.free_pages() == 13
    child = cache.fork(parent)
    assert cache.free_pages() == 12  # one page: the copy of the partial third page
    assert cache._pages_of[child][:2] == cache._pages_of[parent][:2]
    assert cache._pages_of[child][2] != cache._pages_of[parent][2]
    # both continue differently; each sees its own tokens
    q = torch.randn((2, 4, 1, 64), generator=gen)
    extra = {}
    for s in (parent, child):
        step = cache.plan_append([s], [9])
        cache.begin(step)
        extra[s] = _rows(gen, 9, torch.float32, "cpu")
        for layer in cache.layers:
            cache.append(layer, *extra[s], step)
    plan = cache.plan_attention([parent, child], 4)
    model = Model(quantizer, cache.layers)
    for s in (parent, child):
        model.add(s)
        for layer in cache.layers:
            model.append(s, layer, k, v)
            model.append(s, layer, *extra[s])
    for layer in cache.layers:
        out = plan.run(layer, q)
        for i, s in enumerate((parent, child)):
            torch.testing.assert_close(out[i].double(), _attention64(q[i], *model.expected_kv(s, layer)),
                                       atol=1e-4, rtol=1e-4)
    cache.free(parent)
    assert cache.free_pages() == 16 - len(cache._pages_of[child])
    cache.free(child)
    assert cache.free_pages() == 16


def test_bad_calls_raise_and_leave_the_cache_unchanged(quantizer, gen):
    cache = vecinfer.PagedKVCache(quantizer, num_pages=2, max_seqs=2, max_tokens_per_seq=100, page_size=16,
                                  dtype=torch.float32)
    a = cache.add_sequence()
    with pytest.raises(ValueError, match="not a live sequence"):
        cache.plan_append([a + 1], [1])
    with pytest.raises(ValueError, match="appears twice"):
        cache.plan_append([a, a], [1, 1])
    with pytest.raises(ValueError, match="non-negative"):
        cache.plan_append([a], [-1])
    with pytest.raises(ValueError, match="max_tokens_per_seq"):
        cache.begin(cache.plan_append([a], [101]))
    big = cache.plan_append([a], [2 + 16 + 40])  # needs 3 pages, the pool has 2
    with pytest.raises(ValueError, match="pages"):
        cache.begin(big)
    assert cache.length(a) == 0 and cache.free_pages() == 2
    step = cache.plan_append([a], [3])
    k, v = _rows(gen, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match="begin"):
        cache.append(0, k, v, step)  # not begun
    cache.begin(step)
    with pytest.raises(ValueError, match=r"expected \[3, 2, 64\]"):
        cache.append(0, k[:2], v[:2], step)
    cache.append(0, k, v, step)
    with pytest.raises(ValueError, match="begin"):
        cache.append(0, k, v, step)  # twice in one step
    plan = cache.plan_attention([a], 4)
    with pytest.raises(ValueError, match="queries"):
        cache.plan_attention([a], 4, num_queries=4)
    for counts in ([2, 1], [-1], [0], [True], [1.0]):  # ragged: one count >= 0 per sequence, not all zero
        with pytest.raises(ValueError, match="num_queries"):
            cache.plan_attention([a], 4, num_queries=counts)
    with pytest.raises(ValueError, match="hold fewer tokens"):
        cache.plan_attention([a], 4, num_queries=[4])
    ragged = cache.plan_attention([a], 4, num_queries=[2])
    with pytest.raises(ValueError, match=r"expected a contiguous"):
        ragged.run(0, torch.randn(1, 4, 2, 64))  # the dense shape: a ragged plan takes q packed [2, 4, 64]
    with pytest.raises(ValueError, match="multiple"):
        cache.plan_attention([a], 3)
    with pytest.raises(ValueError, match=r"expected a contiguous"):
        plan.run(0, torch.randn(2, 4, 1, 64))  # another batch
    b = cache.add_sequence()
    with pytest.raises(ValueError, match="plan again"):
        plan.run(0, torch.randn(1, 4, 1, 64))
    with pytest.raises(ValueError, match="slots"):
        cache.add_sequence()
    cache.free(b)
    with pytest.raises(ValueError, match="not a live sequence"):
        cache.free(b)


def test_hostile_tensors_and_sizes_are_refused(quantizer, gen):
    """Sizes beyond the machine's memory are refused before allocating; lazily negated views (whose
    sign DLPack would drop) and meta tensors are refused by append and run."""
    with pytest.raises(ValueError, match="memory"):
        vecinfer.PagedKVCache(quantizer, num_pages=2**40, max_seqs=2, max_tokens_per_seq=100)
    with pytest.raises(ValueError, match="memory"):
        vecinfer.PagedKVCache(quantizer, num_pages=4, max_seqs=2**38, max_tokens_per_seq=100)
    cache = vecinfer.PagedKVCache(quantizer, num_pages=8, max_seqs=2, max_tokens_per_seq=100, dtype=torch.float32)
    a = cache.add_sequence()
    step = cache.plan_append([a], [3])
    cache.begin(step)
    k, v = _rows(gen, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match="negated"):
        cache.append(0, torch._neg_view(k), v, step)
    with pytest.raises(ValueError, match="CPU or a CUDA"):
        cache.append(0, k.to("meta"), v, step)
    cache.append(0, k, v, step)
    plan = cache.plan_attention([a], 4)
    q = torch.randn(1, 4, 1, 64, generator=gen)
    with pytest.raises(ValueError, match="negated"):
        plan.run(0, torch._neg_view(q))


def test_merge_states_equals_attention_over_the_union(quantizer, gen):
    """Attention over a cache split in two (two sequences holding halves of the keys) merged by
    lse equals attention over all keys, and an empty side contributes nothing."""
    q = torch.randn(3, 4, 2, 64, generator=gen)
    k, v = torch.randn(3, 2, 50, 64, generator=gen), torch.randn(3, 2, 50, 64, generator=gen)

    def part(kk, vv):
        g = 2
        s = (q.double() @ kk.double().repeat_interleave(g, 1).transpose(-1, -2)) / 8
        return torch.softmax(s, -1) @ vv.double().repeat_interleave(g, 1), torch.logsumexp(s, -1).float()

    out_a, lse_a = part(k[:, :, :20], v[:, :, :20])
    out_b, lse_b = part(k[:, :, 20:], v[:, :, 20:])
    full, lse = part(k, v)
    out, merged = vecinfer.merge_states(out_a.float(), lse_a, out_b.float(), lse_b)
    torch.testing.assert_close(out.double(), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, lse, atol=1e-5, rtol=1e-5)
    empty = torch.full_like(lse_b, float("-inf"))
    out, merged = vecinfer.merge_states(out_a.float(), lse_a, torch.zeros_like(out_a.float()), empty)
    torch.testing.assert_close(out, out_a.float())
    torch.testing.assert_close(merged, lse_a)
    with pytest.raises(TypeError, match="float32"):
        vecinfer.merge_states(out_a.float(), lse_a.double(), out_b.float(), lse_b)
    with pytest.raises(ValueError, match="shape"):
        vecinfer.merge_states(out_a.float(), lse_a[:, :, :1], out_b.float(), lse_b)


def _continuous_batching(quantizer, device, steps, seed, graphs=False):
    """Sequences arrive with random prompts (some forked from a shared prefix), decode one token a
    step, and finish; every step's output of every live sequence is checked against the model.
    With graphs, each decode step (append + run) is captured in a CUDA graph and replayed."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    dtype = torch.float16 if device == "cuda" else torch.float32
    cache = vecinfer.PagedKVCache(quantizer, num_pages=600, max_seqs=64, max_tokens_per_seq=160, device=device,
                                  dtype=dtype, layers=[1])
    model = Model(quantizer, cache.layers)
    prefix = cache.add_sequence()  # a system prompt, stored once and forked
    model.add(prefix)
    step = cache.plan_append([prefix], [50])
    cache.begin(step)
    k, v = _rows(gen, 50, dtype, device)
    for layer in cache.layers:
        cache.append(layer, k, v, step)
        model.append(prefix, layer, k.cpu(), v.cpu())
    live, budget, started, checked = [], {}, 0, 0
    for _ in range(steps):
        while len(live) < 48 and rng.random() < 0.5:  # arrivals: a fresh prompt, a fork of the prefix or a sibling
            kind = rng.random()
            if kind < 0.3:
                s = cache.fork(prefix)
                model.fork(prefix, s)
            elif kind < 0.45 and live:
                parent = rng.choice(live)
                s = cache.fork(parent)
                model.fork(parent, s)
            else:
                s = cache.add_sequence()
                model.add(s)
            room = 159 - cache.length(s)
            prompt = min(rng.randrange(0 if kind < 0.45 else 1, 70), room - 1)
            if prompt:
                step = cache.plan_append([s], [prompt])
                cache.begin(step)
                k, v = _rows(gen, prompt, dtype, device)
                for layer in cache.layers:
                    cache.append(layer, k, v, step)
                    model.append(s, layer, k.cpu(), v.cpu())
            live.append(s)
            budget[s] = rng.randrange(1, 80)
            started += 1
        if not live:
            continue
        step = cache.plan_append(live, [1] * len(live))
        plan = cache.plan_attention(live, num_q_heads=4)
        k, v = _rows(gen, len(live), dtype, device)
        q = torch.randn((len(live), 4, 1, 64), generator=gen).to(dtype).to(device)
        outs = {layer: torch.full_like(q, float("nan")) for layer in cache.layers}
        if graphs:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for layer in cache.layers:
                    cache.append(layer, k, v, step)
                    plan.run(layer, q, out=outs[layer])
            cache.begin(step)
            graph.replay()
        else:
            cache.begin(step)
            for layer in cache.layers:
                cache.append(layer, k, v, step)
                plan.run(layer, q, out=outs[layer])
        for layer in cache.layers:
            out = outs[layer].cpu()
            for i, s in enumerate(live):
                model.append(s, layer, k[i:i + 1].cpu(), v[i:i + 1].cpu())
                ref = _attention64(q[i].cpu(), *model.expected_kv(s, layer))
                tol = 3e-3 if dtype == torch.float16 else 1e-4
                torch.testing.assert_close(out[i].double(), ref, atol=tol, rtol=tol)
                checked += 1
        for s in list(live):
            budget[s] -= 1
            if budget[s] == 0 or cache.length(s) >= 159:
                live.remove(s)
                cache.free(s)
                del model.tokens[s]
    for s in live:
        cache.free(s)
    cache.free(prefix)
    assert cache.free_pages() == cache.num_pages  # every page came back
    assert started > 64 and checked > 1000
    return started, checked


def test_continuous_batching_cpu(quantizer):
    _continuous_batching(quantizer, "cpu", steps=500, seed=1)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (sm_80+)")
def test_continuous_batching_gpu(quantizer):
    _continuous_batching(quantizer, "cuda", steps=500, seed=2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (sm_80+)")
def test_continuous_batching_gpu_graph_replays(quantizer):
    _continuous_batching(quantizer, "cuda", steps=500, seed=3, graphs=True)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (sm_80+)")
def test_graph_captured_step_replays_as_sequences_grow(quantizer, gen):
    """One decode step (append + run, every layer) captured in a CUDA graph and replayed 40 times
    with cache.begin before each replay: every replay's output equals the reference."""
    cache = vecinfer.PagedKVCache(quantizer, num_pages=64, max_seqs=3, max_tokens_per_seq=200, device="cuda",
                                  dtype=torch.float16)
    model = Model(quantizer, cache.layers)
    seqs = [cache.add_sequence() for _ in range(3)]
    for s, n in zip(seqs, (5, 30, 61)):
        model.add(s)
        step = cache.plan_append([s], [n])
        cache.begin(step)
        k, v = _rows(gen, n, torch.float16, "cuda")
        for layer in cache.layers:
            cache.append(layer, k, v, step)
            model.append(s, layer, k.cpu(), v.cpu())
    step = cache.plan_append(seqs, [1, 1, 1])
    plan = cache.plan_attention(seqs, 4)
    k_in = torch.zeros((3, 2, 64), device="cuda", dtype=torch.float16)
    v_in, q_in = torch.zeros_like(k_in), torch.zeros((3, 4, 1, 64), device="cuda", dtype=torch.float16)
    graph, outs = capture_decode_step(cache, step, plan, k_in, v_in, q_in)
    for _ in range(40):
        k, v = _rows(gen, 3, torch.float16, "cuda")
        q = torch.randn((3, 4, 1, 64), generator=gen).half().cuda()
        k_in.copy_(k), v_in.copy_(v), q_in.copy_(q)
        cache.begin(step)
        graph.replay()
        for layer in cache.layers:
            for i, s in enumerate(seqs):
                model.append(s, layer, k[i:i + 1].cpu(), v[i:i + 1].cpu())
                ref = _attention64(q[i].cpu(), *model.expected_kv(s, layer))
                torch.testing.assert_close(outs[layer][i].cpu().double(), ref, atol=3e-3, rtol=3e-3)
