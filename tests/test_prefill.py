"""Long query blocks on the compressed cache (more than 16 queries per sequence: the long-query
kernel on the GPU, the streaming float32 path of QuantizedKVCache on the CPU), against the float64
reference of test_attention: tile edges, every head_dim, dtype, group and bit preset, unequal
lengths, causal masks reaching into the codes, pages, splits, real K/V, poisoned outputs."""
from __future__ import annotations

import itertools

import pytest
import torch

import vecinfer
from test_attention import Case, check, needs_cuda, real_kv_case


@needs_cuda
@pytest.mark.parametrize("coded", [0, 1, 63, 64, 65, 700])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lengths_and_dims(gen, coded, d, dtype):
    # sequence 1's window (5 tokens) is shorter than the 40 queries: its mask reaches the codes
    check(Case(gen, d=d, dtype=dtype, tq=40, lengths=[4, coded, 128, 0, coded + 40, 5]), "cuda")


@needs_cuda
@pytest.mark.parametrize("key_bits", [4, 3, 2, 1.5, 1])
@pytest.mark.parametrize("value_bits", [4, 3, 2, 1.5, 1])
def test_bit_presets(gen, key_bits, value_bits):
    check(Case(gen, d=128, tq=33, key_bits=key_bits, value_bits=value_bits, lengths=[4, 300, 20, 2, 177, 40]), "cuda")


@needs_cuda
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("tq", [17, 129])
def test_groups_and_queries(gen, group, tq):
    check(Case(gen, d=64, group=group, tq=tq, lengths=[4, 500, 128, 0, 300, 3], per_head=group == 4), "cuda")


@needs_cuda
@pytest.mark.parametrize("scale", [-0.2, 0.0, 0.05])
def test_any_softmax_scale(gen, scale):
    # a positive scale takes the maximum over the raw products; zero and negative ones another path
    check(Case(gen, d=128, tq=40, lengths=[4, 300, 20, 2, 177, 40]), "cuda", scale=scale)


@needs_cuda
@pytest.mark.parametrize("lengths,tq", [
    ([4, 0, 100, 0, 0, 70], 60),        # no coded tokens at all
    ([0, 1000, 0, 3, 50, 0], 20),       # empty recent windows, no sinks
    ([4, 5000, 128, 0, 20, 1], 17),     # very different lengths in one batch
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_empty_parts_and_mixed_lengths(gen, lengths, tq, dtype):
    check(Case(gen, d=128, dtype=dtype, tq=tq, lengths=lengths), "cuda")


@needs_cuda
@pytest.mark.parametrize("transforms,value_mean", [(False, False), (True, False), (False, True)])
def test_without_transforms(gen, transforms, value_mean):
    check(Case(gen, d=128, tq=24, transforms=transforms, value_mean=value_mean, lengths=[4, 500, 64, 4, 250, 128]),
          "cuda")


@needs_cuda
def test_split_over_a_long_sequence(gen):
    # two row tiles for the whole GPU: the tokens are split over many blocks and merged exactly
    check(Case(gen, batch=1, hkv=2, group=2, tq=64, d=128, lengths=[4, 30011, 128]), "cuda")


@needs_cuda
@pytest.mark.parametrize("page_size", [16, 64])
def test_paged_with_unequal_lengths(gen, page_size):
    case = Case(gen, batch=3, hkv=2, group=4, tq=50, d=128, lengths=[4, 3001, 128, 0, 1133, 7, 1, 70, 2],
                capacity=3072)
    check(case.page(gen, page_size, shared_pages=3), "cuda")


@needs_cuda
@pytest.mark.parametrize("d", [64, 128])
def test_real_kv(gen, d):
    """Real K/V of SmolLM2-135M compressed by a calibrated quantizer; the queries are the
    sequence's own last 48 keys."""
    check(real_kv_case(gen, d, tq=48, recent=32), "cuda")


@needs_cuda
@pytest.mark.parametrize("counts,lengths", [
    ([1, 40, 0, 17], [4, 700, 128, 0, 65, 5, 4, 300, 20, 2, 64, 30]),  # the mask reaches sequence 1's codes
    ([5, 16, 1, 2], [4, 200, 128, 0, 1, 16, 4, 64, 1, 1, 0, 1]),      # all <= 16: still the long-query kernel
    ([130, 3, 0, 64], [4, 500, 128, 0, 300, 3, 4, 10, 10, 2, 999, 64]),
])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ragged_queries(gen, counts, lengths, dtype):
    """Packed queries with query_indptr: every sequence its own number of queries (none included)."""
    check(Case(gen, batch=4, d=128, dtype=dtype, tq=max(counts), lengths=lengths), "cuda", counts=counts)


@needs_cuda
def test_ragged_queries_split_and_paged(gen):
    # one short and one long query block over ~30k tokens: split over many blocks, merged; paged codes
    case = Case(gen, batch=2, hkv=2, group=4, d=64, tq=70, lengths=[4, 30011, 128, 1, 1000, 9], capacity=30016)
    check(case.page(gen, 64), "cuda", counts=[70, 9])


@needs_cuda
def test_ragged_queries_in_a_cuda_graph(gen):
    """With max_queries given, a ragged call reads nothing on the host: it is captured in a CUDA
    graph, and its replays equal the eager call, also after the counts change in place."""
    case = Case(gen, batch=3, d=128, tq=40, lengths=[4, 300, 128, 0, 65, 5, 4, 64, 30]).to("cuda")
    case.lengths = case.lengths.cuda()
    q, indptr = case.packed_queries([40, 0, 20])
    out = torch.full_like(q, float("nan"))

    def run(**kw):
        return case.run(q=q, query_indptr=indptr, max_queries=40, max_coded=300, **kw)

    expected = run().clone()
    torch.testing.assert_close(expected, case.run(q=q, query_indptr=indptr), atol=2e-3, rtol=2e-3)  # read on the host
    run(out=out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(out=out)
    for counts in ([40, 0, 20], [20, 20, 20]):  # the same rows of q, other counts
        indptr.copy_(torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32))
        expected = run().clone()
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected)


def _cache_with_prompt(gen, device, dtype, prompt=900):
    keys = [torch.randn((2, 600, 128), generator=gen) + 2 * torch.randn((2, 1, 128), generator=gen)]
    values = [torch.randn((2, 600, 128), generator=gen)]
    cfg = vecinfer.VQConfig(key_bits=2, value_bits=2, residual=32, sink_tokens=4, kmeans_iters=3)
    quantizer = vecinfer.KVQuantizer.calibrate(keys, values, cfg, progress=False)
    cache = vecinfer.QuantizedKVCache(quantizer, 2, 2, 128, 2000, device=device, dtype=dtype)
    k = (torch.randn((2, 2, prompt, 128), generator=gen) + 1).to(dtype).to(device)
    v = torch.randn((2, 2, prompt, 128), generator=gen).to(dtype).to(device)
    cache.append(0, k, v, skip=torch.tensor([0, 211]))
    return cache


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32),
                                          pytest.param("cuda", torch.float16, marks=needs_cuda),
                                          pytest.param("cuda", torch.bfloat16, marks=needs_cuda)])
def test_cache_attends_a_second_turn_on_the_codes(gen, device, dtype):
    """A 100-token block appended to a cache holding a prompt, then attended: the fused kernel
    (GPU) or the streaming path (CPU) against attention over the dequantized cache."""
    from vecinfer.cache import reference_attention

    cache = _cache_with_prompt(gen, device, dtype)
    k = torch.randn((2, 2, 100, 128), generator=gen).to(dtype).to(device)
    cache.append(0, k, torch.randn_like(k))
    q = torch.randn((2, 8, 100, 128), generator=gen).to(dtype).to(device)
    out = cache.attend(0, q)
    k_hat, v_hat, totals = cache.dequantize(0, padded=True)
    n = k_hat.shape[2]
    for b in range(2):  # sequence b holds totals[b] tokens, its queries are the last 100
        m = int(totals[b])
        ref = reference_attention(q[b:b + 1].double(), k_hat[b:b + 1, :, :m].double(), v_hat[b:b + 1, :, :m].double())
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out[b:b + 1].double(), ref, atol=tol, rtol=tol)
    assert n == int(totals.max())


def test_cpu_streaming_memory_is_bounded(gen):
    """The CPU path decodes the codes in blocks: its largest temporary does not grow with the context."""
    import vecinfer.cache as cache_module

    cache = _cache_with_prompt(gen, "cpu", torch.float32, prompt=1900)
    q = torch.randn((2, 8, 64, 128), generator=gen)
    full = cache.attend(0, q)
    decoded = []
    original = cache.quantizer.decode_keys

    def spy(layer, codes, dtype):
        decoded.append(codes.shape[2])
        return original(layer, codes, dtype)

    cache.quantizer.decode_keys = spy
    saved = cache_module._STREAM_TOKENS
    cache_module._STREAM_TOKENS = 256
    try:
        blocked = cache.attend(0, q)
    finally:
        cache_module._STREAM_TOKENS = saved
        del cache.quantizer.decode_keys
    assert decoded and max(decoded) <= 256 and sum(decoded) >= 1800
    torch.testing.assert_close(blocked, full, atol=1e-5, rtol=1e-5)
