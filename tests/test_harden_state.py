"""Issue 15, item 2: reserve, append, select and truncate are all-or-nothing: when an allocation
fails midway (the N-th allocation made to raise) or the input is refused, the cache is left
bit-identical and stays usable."""
from __future__ import annotations

import types

import pytest
import torch

import vecinfer

from hardening import assert_same_state, cache_state, kv, small_cache


def _fail_on_call(monkeypatch, owner, name, n):
    """Makes the n-th call of owner.name raise (a failed allocation); the others run normally."""
    real = getattr(owner, name)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("injected allocation failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return calls


def _filled_cache():
    cache = small_cache(max_tokens=24)
    cache.append(0, *kv(2, 20, seed=1))
    cache.append(1, *kv(2, 7, seed=2))
    return cache


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_reserve_failing_allocation_leaves_cache_unchanged(monkeypatch, n):
    cache = _filled_cache()
    before = cache_state(cache)
    _fail_on_call(monkeypatch, torch.Tensor, "new_empty", n)
    with pytest.raises(RuntimeError, match="injected"):
        cache.reserve(200)
    monkeypatch.undo()
    assert_same_state(before, cache_state(cache))
    q = torch.randn(2, 4, 1, 64)
    out = cache.attend(0, q)  # still usable, and growable
    cache.reserve(200)
    torch.testing.assert_close(cache.attend(0, q), out)
    cache.append(0, *kv(2, 100, seed=3))
    assert cache.length(0) == 120


@pytest.mark.parametrize("n", [1, 3, 6])
def test_select_failing_allocation_leaves_cache_unchanged(monkeypatch, n):
    cache = _filled_cache()
    before = cache_state(cache)
    _fail_on_call(monkeypatch, torch.Tensor, "index_select", n)
    with pytest.raises(RuntimeError, match="injected"):
        cache.select([1, 0, 1])
    monkeypatch.undo()
    assert_same_state(before, cache_state(cache))
    cache.select([1, 0, 1])
    assert cache.batch_size == 3 and cache.lengths(0).tolist() == [20, 20, 20]


def test_append_failing_kernel_leaves_cache_unchanged(monkeypatch):
    """The append kernel fails (as a CUDA error would): nothing of the cache's state has moved."""
    cache = _filled_cache()
    before = cache_state(cache)

    def failing(*args, **kwargs):
        raise RuntimeError("injected append failure")

    monkeypatch.setattr(vecinfer.cache, "_C", types.SimpleNamespace(append_tokens=failing))
    with pytest.raises(RuntimeError, match="injected"):
        cache.append(0, *kv(2, 3, seed=4))  # spills window tokens to codes
    monkeypatch.undo()
    assert_same_state(before, cache_state(cache))


@pytest.mark.parametrize("which", ["k", "v"])
def test_append_of_nan_is_refused_and_leaves_cache_unchanged(which):
    cache = _filled_cache()
    before = cache_state(cache)
    k, v = kv(2, 3, seed=4)
    (k if which == "k" else v)[1, 0, 2, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        cache.append(0, k, v)
    assert_same_state(before, cache_state(cache))


def test_refused_calls_leave_cache_unchanged():
    cache = _filled_cache()
    before = cache_state(cache)
    for call in (lambda: cache.truncate(10),              # would remove coded tokens
                 lambda: cache.truncate(True),
                 lambda: cache.select([0, 2]),
                 lambda: cache.select([0.9, 1.2]),
                 lambda: cache.reserve(2**50),
                 lambda: cache.append(0, *kv(2, 5)),      # beyond max_tokens
                 lambda: cache.append(1, *kv(2, 3), skip=True)):
        with pytest.raises((ValueError, TypeError)):
            call()
        assert_same_state(before, cache_state(cache))
