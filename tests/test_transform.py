"""Walsh-Hadamard and smoothing transforms against float64 references."""
from __future__ import annotations

import pytest
import torch

import vecinfer
from conftest import DEVICES, DTYPES, HEAD_DIMS, assert_matches_reference, poisoned_like, ref_transform

SHAPES = [(1,), (7,), (3, 17), (2, 4, 33), (2, 3, 1, 5)]  # leading dims; head_dim appended


def _rand(shape, dtype, device, gen, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("lead", SHAPES)
def test_hadamard_matches_matrix(device, dtype, d, lead, gen):
    x = _rand((*lead, d), dtype, device, gen, scale=3.0)
    out = poisoned_like(x)
    vecinfer.hadamard(x, out=out)
    assert_matches_reference(out, ref_transform(x, hadamard=True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_hadamard_twice_is_identity(device, d, gen):
    x = _rand((5, 3, 29, d), torch.float32, device, gen)
    back = vecinfer.hadamard(vecinfer.hadamard(x))
    assert torch.allclose(back, x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("with_mean", [False, True])
@pytest.mark.parametrize("hadamard", [False, True])
def test_key_transform_and_inverse(device, dtype, d, with_mean, hadamard, gen):
    kv_heads = 3
    k = _rand((2, kv_heads, 19, d), dtype, device, gen, scale=4.0)
    scale = (torch.rand((kv_heads, d), generator=gen) * 3 + 0.25).to(device)
    mean = torch.randn((kv_heads, d), generator=gen).to(device) if with_mean else None
    out = poisoned_like(k)
    vecinfer.transform_keys(k, scale, mean, hadamard=hadamard, out=out)
    assert_matches_reference(out, ref_transform(k, scale, mean, hadamard, "key"), "keys")
    back = poisoned_like(k)
    vecinfer.inverse_transform_keys(out, scale, mean, hadamard=hadamard, out=back)
    assert_matches_reference(back, ref_transform(out, scale, mean, hadamard, "inverse"), "inverse")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 4, 7])
def test_query_transform_gqa(device, dtype, group, gen):
    kv_heads, d = 2, 128
    q = _rand((3, kv_heads * group, 4, d), dtype, device, gen)
    scale = (torch.rand((kv_heads, d), generator=gen) * 2 + 0.5).to(device)
    out = poisoned_like(q)
    vecinfer.transform_queries(q, scale, out=out)
    assert_matches_reference(out, ref_transform(q, scale, None, True, "query"), "queries")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_scores_shift_by_a_per_query_constant(device, d, gen):
    """q'.k' = q.k - q.mean for every key: softmax over keys is unchanged."""
    kv_heads, group = 2, 3
    k = _rand((1, kv_heads, 23, d), torch.float32, device, gen, scale=2.0)
    q = _rand((1, kv_heads * group, 2, d), torch.float32, device, gen)
    scale = (torch.rand((kv_heads, d), generator=gen) * 3 + 0.2).to(device)
    mean = (torch.randn((kv_heads, d), generator=gen) * 5).to(device)
    kt = vecinfer.transform_keys(k, scale, mean).double().cpu()
    qt = vecinfer.transform_queries(q, scale).double().cpu()
    k64, q64, m64 = k.double().cpu(), q.double().cpu(), mean.double().cpu()
    k_rep = kt.repeat_interleave(group, dim=1)
    scores = qt @ k_rep.transpose(-1, -2)
    expected = q64 @ k64.repeat_interleave(group, dim=1).transpose(-1, -2)
    shift = (q64 * m64.repeat_interleave(group, dim=0)[None, :, None, :]).sum(-1, keepdim=True)
    torch.testing.assert_close(scores, expected - shift, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(torch.softmax(scores, -1), torch.softmax(expected, -1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_in_place(device, gen):
    x = _rand((4, 2, 9, 64), torch.float16, device, gen)
    ref = ref_transform(x)
    vecinfer.hadamard(x, out=x)
    assert_matches_reference(x, ref)


@pytest.mark.skipif(not vecinfer.cuda_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_cpu(dtype, gen):
    """The kernel uses the CPU reference's butterfly order: results agree to float32 rounding
    (a 16-bit output may land one unit in the last place apart)."""
    x = _rand((3, 5, 77, 128), dtype, "cpu", gen)
    scale = torch.rand((5, 128), generator=gen) + 0.5
    mean = torch.randn((5, 128), generator=gen)
    cpu = vecinfer.transform_keys(x, scale, mean)
    gpu = vecinfer.transform_keys(x.cuda(), scale.cuda(), mean.cuda()).cpu()
    ulp = {torch.float32: 1e-5, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dtype]
    assert torch.allclose(cpu.float(), gpu.float(), atol=1e-5, rtol=2 * ulp)


@pytest.mark.skipif(not vecinfer.cuda_available(), reason="needs a CUDA GPU")
def test_cuda_runs_on_current_stream_and_device_of_tensor(gen):
    x = _rand((64, 4, 256, 128), torch.bfloat16, "cuda", gen)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y = vecinfer.hadamard(x)
        z = vecinfer.hadamard(y)
    s.synchronize()
    assert (z.float() - x.float()).abs().max() < 0.1


@pytest.mark.skipif(not vecinfer.cuda_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture(gen):
    x = _rand((8, 4, 100, 64), torch.float16, "cuda", gen)
    out = torch.empty_like(x)
    vecinfer.hadamard(x, out=out)  # warm-up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        vecinfer.hadamard(x, out=out)
    x.copy_(_rand(x.shape, torch.float16, "cuda", gen))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert_matches_reference(out, ref_transform(x))
