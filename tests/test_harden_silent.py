"""Issue 15, item 3: inputs that used to give a silently wrong answer now raise, or compute right."""
from __future__ import annotations

import pytest
import torch

import vecinfer
from hardening import kv, small_cache


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_attend_rejects_non_float_queries(dtype):
    cache = small_cache()
    cache.append(0, *kv(2, 9))
    q = torch.ones((2, 4, 1, 64)).to(dtype)
    with pytest.raises(TypeError, match="q: expected a floating-point tensor"):
        cache.attend(0, q)


@pytest.mark.parametrize("shift", [1, 64, 5 * 64])
def test_hadamard_rejects_partially_overlapping_out(shift):
    base = torch.randn(12 * 64)
    x = base[:6 * 64].view(6, 64)
    expected = vecinfer.hadamard(x.clone())
    out = base[shift:shift + 6 * 64].view(6, 64)
    with pytest.raises(ValueError, match="out: overlaps the input partially"):
        vecinfer.hadamard(x, out=out)
    with pytest.raises(ValueError, match="overlaps"):
        vecinfer.transform_keys(x[None], torch.ones(1, 64), out=out[None])
    torch.testing.assert_close(vecinfer.hadamard(x, out=x), expected)  # exactly in place is fine


def test_all_nan_codebook_and_nan_input_raise():
    x = torch.randn(3, 64)
    codebook = torch.randn(1, 16, 4)
    with pytest.raises(ValueError, match="codebook: contains NaN"):
        vecinfer.vq_encode(x, torch.full((1, 16, 4), float("nan")))
    with pytest.raises(ValueError, match="codebook: contains NaN"):
        vecinfer.vq_decode(torch.zeros(3, 8, dtype=torch.uint8), torch.full((1, 16, 4), float("nan")), head_dim=64)
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[1, 7] = bad
        with pytest.raises(ValueError, match="x: contains NaN or infinity"):
            vecinfer.vq_encode(y, codebook)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scale_is_rejected_everywhere(bad):
    x = torch.randn(1, 2, 3, 64)
    scale = torch.ones(2, 64)
    scale[1, 5] = bad
    codebook = torch.randn(1, 16, 4)
    with pytest.raises(ValueError, match="scale: every entry must be finite and > 0"):
        vecinfer.transform_keys(x, scale)
    with pytest.raises(ValueError, match="scale: every entry"):
        vecinfer.vq_encode(x, codebook, scale=scale)
    with pytest.raises(ValueError, match="scale: every entry"):
        vecinfer.vq_decode(torch.zeros(1, 2, 3, 8, dtype=torch.uint8), codebook, head_dim=64, scale=scale)
    codes = torch.zeros(1, 2, 16, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="scale: every entry"):
        vecinfer.attention(torch.randn(1, 2, 1, 64), codes, codes, torch.tensor([[0, 3, 0]], dtype=torch.int32),
                           codebook, codebook, key_scale=scale)


def test_huge_keys_pick_the_nearest_centroid():
    """Keys and centroids around 1e19: float32 squared distances overflow; the encode must still
    pick the nearest centroid (checked in float64 on the exact differences)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn((4, 64), generator=g) * 1e19
    codebook = torch.randn((1, 256, 4), generator=g) * 1e19
    codes = vecinfer.vq_encode(x, codebook)
    sub = x.double().reshape(-1, 1, 4)
    best = ((sub - codebook[0].double()[None]) ** 2).sum(-1).argmin(-1)
    assert torch.equal(codes.reshape(-1).long(), best)


def test_negative_view_is_refused_not_read_without_its_sign():
    x = torch.randn(3, 64)
    neg = torch._neg_view(x)
    with pytest.raises(ValueError, match="x: a lazily negated"):
        vecinfer.hadamard(neg)
    with pytest.raises(ValueError, match="out: a lazily negated"):
        vecinfer.hadamard(x, out=torch._neg_view(torch.empty(3, 64)))
    torch.testing.assert_close(vecinfer.hadamard(neg.resolve_neg()), -vecinfer.hadamard(x))


def test_out_requiring_grad_is_refused():
    out = torch.empty(3, 64, requires_grad=True)
    with pytest.raises(ValueError, match="out: requires grad"):
        vecinfer.hadamard(torch.randn(3, 64), out=out)


def test_cache_keeps_no_autograd_graph():
    cache = small_cache()
    k, v = kv(2, 9)
    k.requires_grad_(True)
    v.requires_grad_(True)
    cache.append(0, k * 2, v * 2)  # non-leaf tensors with a graph behind them
    k_hat, v_hat = cache.dequantize(0)
    assert not k_hat.requires_grad and not v_hat.requires_grad
    assert all(not t.requires_grad for group in (cache._sink_k, cache._recent_k, cache._recent_v)
               for t in group if t is not None)
