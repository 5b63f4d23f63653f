"""The GPU side of the hardening probes (issue 15): the bad inputs of test_harden_*.py on CUDA
tensors, mixed devices, a tensor on another GPU, a non-default stream. The properties of
test_properties.py run on CUDA through their "cuda" parameter. Value checks (NaN inputs, bad
scales, non-finite codebooks) are made by the CUDA transform and codec ops too; the decode
attention and the appends do not check values (they must not synchronise)."""
from __future__ import annotations

import pytest
import torch

import vecinfer
from conftest import CUDA
from hardening import (append_from_two_threads, assert_same_state, cache_state, kv, run_python, small_cache,
                       small_quantizer)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (sm_80+)")]
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2 if CUDA else True, reason="needs two GPUs")


def test_astronomical_codebook_is_rejected_on_cuda():
    result = run_python("""
import torch, vecinfer
huge = torch.empty(0, 1, 4, device="cuda").expand(0, 2**62 + 1, 4)
for call in (lambda: vecinfer.vq_encode(torch.randn(2, 64, device="cuda"), huge),
             lambda: vecinfer.vq_decode(torch.zeros(2, 16, dtype=torch.uint8, device="cuda"), huge, head_dim=64)):
    try:
        call()
    except ValueError as e:
        print("ValueError:", e)
""", timeout=120)
    assert result.stdout.count("ValueError:") == 2, result.stdout + result.stderr


def test_hadamard_overlap_on_cuda():
    base = torch.randn(12 * 64, device="cuda")
    with pytest.raises(ValueError, match="overlaps the input partially"):
        vecinfer.hadamard(base[:6 * 64].view(6, 64), out=base[64:7 * 64].view(6, 64))


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_attend_rejects_non_float_q_on_cuda(dtype):
    cache = small_cache(device="cuda", dtype=torch.float16)
    cache.append(0, *kv(2, 9, device="cuda", dtype=torch.float16))
    with pytest.raises(TypeError, match="floating-point"):
        cache.attend(0, torch.ones((2, 4, 1, 64), device="cuda").to(dtype))


def test_views_and_out_on_cuda():
    x = torch.randn(3, 64, device="cuda")
    with pytest.raises(ValueError, match="lazily negated"):
        vecinfer.hadamard(torch._neg_view(x))
    with pytest.raises(ValueError, match="requires grad"):
        vecinfer.hadamard(x, out=torch.empty(3, 64, device="cuda", requires_grad=True))
    with pytest.raises(ValueError, match="must be contiguous"):
        vecinfer.hadamard(torch.randn(1, 64, device="cuda").expand(2**31, 64))


def test_memory_bounds_on_cuda():
    with pytest.raises(ValueError, match="head_dim"):
        vecinfer.vq_decode(torch.zeros(4, 16, dtype=torch.uint8, device="cuda"), torch.randn(1, 256, 4, device="cuda"),
                           head_dim=2**40)
    with pytest.raises(ValueError, match="max_tokens: a cache .* more than the cuda device's memory"):
        vecinfer.QuantizedKVCache(small_quantizer(), batch_size=100_000, num_kv_heads=2, head_dim=64,
                                  max_tokens=2**31 - 1, device="cuda")
    cache = small_cache(device="cuda", batch_size=1000, max_tokens=16)
    with pytest.raises(ValueError, match="max_tokens: reserving"):
        cache.reserve(2**31 - 1)


def test_failed_reserve_leaves_cuda_cache_unchanged(monkeypatch):
    cache = small_cache(device="cuda", dtype=torch.float16, max_tokens=24)
    cache.append(0, *kv(2, 20, device="cuda", dtype=torch.float16))
    before = cache_state(cache)
    real, calls = torch.Tensor.new_empty, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected allocation failure")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "new_empty", failing)
    with pytest.raises(RuntimeError, match="injected"):
        cache.reserve(4096)
    monkeypatch.undo()
    assert_same_state(before, cache_state(cache))
    q = torch.randn(2, 4, 1, 64, device="cuda", dtype=torch.float16)
    cache.reserve(4096)
    assert cache.attend(0, q).isfinite().all()


def test_threads_on_cuda_cache():
    cache = small_cache(device="cuda", dtype=torch.float16, max_tokens=700, batch_size=1)
    landed, refused = append_from_two_threads(cache, *kv(1, 1, device="cuda", dtype=torch.float16))
    assert landed + refused == 600 and cache.length(0) == landed


def test_clear_errors_on_cuda():
    cache = small_cache(device="cuda", dtype=torch.float16)
    cache.append(0, *kv(2, 9, device="cuda", dtype=torch.float16))
    q = torch.randn(2, 4, 1, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(TypeError, match="scale: expected a real number"):
        cache.attend(0, q, scale="abc")
    with pytest.raises(TypeError, match="bool mask"):
        cache.select(torch.tensor([True, False], device="cuda"))
    codes = torch.zeros(3, 2, 16, 16, dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError, match="key_codes: holds 3 sequences, q 2"):
        vecinfer.attention(q, codes, codes, torch.tensor([[0, 3, 0]] * 2, dtype=torch.int32),
                           torch.randn(1, 16, 4, device="cuda"), torch.randn(1, 16, 4, device="cuda"))


def test_mixed_devices_are_refused():
    cache = small_cache(device="cuda", dtype=torch.float16)
    k, v = kv(2, 3, dtype=torch.float16)
    with pytest.raises(ValueError, match="k: is on cpu"):
        cache.append(0, k, v)
    with pytest.raises(ValueError, match="codebook: must be on the same device"):
        vecinfer.vq_encode(torch.randn(2, 64, device="cuda"), torch.randn(1, 16, 4))
    with pytest.raises(ValueError, match="x: tensors must be on the CPU or a CUDA device"):
        vecinfer.vq_encode(torch.empty(2, 64, device="meta"), torch.randn(1, 16, 4, device="cuda"))


@TWO_GPUS
def test_tensor_on_another_gpu():
    with pytest.raises(ValueError, match="must be on the same device"):
        vecinfer.vq_encode(torch.randn(2, 64, device="cuda:1"), torch.randn(1, 16, 4, device="cuda:0"))
    results = []
    for device in ("cuda:0", "cuda:1"):  # the current device stays 0: the ops switch to the data's
        cache = small_cache(device=device, dtype=torch.float16)
        cache.append(0, *kv(2, 20, device=device, dtype=torch.float16))
        results.append(cache.attend(0, torch.ones(2, 4, 1, 64, device=device, dtype=torch.float16)).cpu())
    assert torch.cuda.current_device() == 0
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_non_default_stream_matches_default():
    x = torch.randn(4, 2, 50, 64, device="cuda", dtype=torch.float16)
    codebook = small_quantizer().layers[0]["key_codebook"].cuda()
    expected = vecinfer.vq_encode(x, codebook)
    cache_default = small_cache(device="cuda", dtype=torch.float16)
    cache_default.append(0, *kv(2, 20, device="cuda", dtype=torch.float16))
    q = torch.ones(2, 4, 1, 64, device="cuda", dtype=torch.float16)
    out_default = cache_default.attend(0, q)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        codes = vecinfer.vq_encode(x, codebook)
        cache = small_cache(device="cuda", dtype=torch.float16)
        cache.append(0, *kv(2, 20, device="cuda", dtype=torch.float16))
        out = cache.attend(0, q)
    stream.synchronize()
    assert torch.equal(codes, expected)
    torch.testing.assert_close(out, out_default, rtol=0, atol=0)


def test_checksum_verified_when_loading_to_cuda(tmp_path):
    path = tmp_path / "q.safetensors"
    small_quantizer().save(str(path))
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        vecinfer.KVQuantizer.load(str(path), device="cuda")


def test_bad_values_are_refused_by_the_cuda_ops():
    q = small_quantizer().to("cuda")
    p = q.layers[0]
    x = torch.randn(2, 5, 64, device="cuda") + 2
    nan_x = x.clone()
    nan_x[1, 3, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        vecinfer.vq_encode(nan_x, p["key_codebook"], scale=p["key_scale"], mean=p["key_mean"], hadamard=True)
    for bad in (0.0, float("nan")):
        scale = p["key_scale"].clone()
        scale[1, 3] = bad
        with pytest.raises(ValueError, match="scale"):
            vecinfer.transform_keys(x, scale, p["key_mean"])
    book = p["key_codebook"].clone()
    book[0, 5, 1] = float("inf")
    codes = vecinfer.vq_encode(x, p["key_codebook"])
    with pytest.raises(ValueError, match="codebook"):
        vecinfer.vq_decode(codes, book, head_dim=64)
    with pytest.raises(ValueError, match="codebook"):
        vecinfer.vq_encode(x, book)
    # the valid calls still run
    assert vecinfer.vq_decode(codes, p["key_codebook"], head_dim=64, dtype=torch.float32).isfinite().all()
