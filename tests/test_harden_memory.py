"""Issue 15, item 6: memory is checked before it is allocated. Requests larger than the device's
memory raise ValueError naming the argument; a non-contiguous input is refused before its output
is allocated."""
from __future__ import annotations

import pytest
import torch

import vecinfer
from hardening import kv, small_cache, small_quantizer


def test_hadamard_on_huge_expanded_view_is_refused_before_allocating():
    x = torch.randn(1, 64).expand(2**31, 64)  # 512 GiB as float32 if materialised
    with pytest.raises(ValueError, match="x: must be contiguous"):
        vecinfer.hadamard(x)
    with pytest.raises(ValueError, match="x: must be contiguous"):
        vecinfer.vq_encode(x, torch.randn(1, 16, 4))


def test_vq_decode_huge_head_dim():
    with pytest.raises(ValueError, match="head_dim"):
        vecinfer.vq_decode(torch.zeros(4, 16, dtype=torch.uint8), torch.randn(1, 256, 4), head_dim=2**40)
    with pytest.raises(ValueError, match="head_dim: .* does not fit in 64 bits"):
        vecinfer.vq_decode(torch.zeros(4, 16, dtype=torch.uint8), torch.randn(1, 256, 4), head_dim=2**70)


def test_cache_larger_than_memory_is_refused():
    with pytest.raises(ValueError, match="max_tokens"):
        small_cache(max_tokens=2**40)
    with pytest.raises(ValueError, match=r"max_tokens: a cache of 2 layers x 100000 sequences .* more than"):
        vecinfer.QuantizedKVCache(small_quantizer(), batch_size=100_000, num_kv_heads=2, head_dim=64,
                                  max_tokens=2**31 - 1)


def test_reserve_larger_than_memory_is_refused():
    cache = small_cache(max_tokens=16, batch_size=1000)
    cache.append(0, *kv(1000, 3))
    with pytest.raises(ValueError, match="max_tokens"):
        cache.reserve(2**50)
    with pytest.raises(ValueError, match="max_tokens: reserving .* more than"):
        cache.reserve(2**31 - 1)
    assert cache.max_tokens == 16 and cache.length(0) == 3


def test_select_larger_than_memory_is_refused():
    cache = small_cache(max_tokens=2**16, batch_size=1)
    with pytest.raises(ValueError, match="indices: .* more than"):
        cache.select(torch.zeros(2**22, dtype=torch.int64))
    assert cache.batch_size == 1
