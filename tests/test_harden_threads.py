"""Issue 15, item 4: the thread-safety contract. A cache is not thread-safe; a second thread
entering append/attend/reserve/select/truncate while another runs gets a RuntimeError and changes
nothing, so tokens are never lost silently."""
from __future__ import annotations

import threading
import types

import pytest
import torch

import vecinfer

from hardening import append_from_two_threads, kv, small_cache


def test_concurrent_appends_all_land_or_raise():
    cache = small_cache(max_tokens=700, batch_size=1)
    landed, refused = append_from_two_threads(cache, *kv(1, 1))
    assert landed + refused == 600
    assert cache.length(0) == landed, f"{landed} appends landed, the cache holds {cache.length(0)}"


def test_second_thread_is_refused_while_one_is_inside(monkeypatch):
    cache = small_cache(max_tokens=64)
    cache.append(0, *kv(2, 6))  # window full: the next append encodes
    inside, release = threading.Event(), threading.Event()
    append_tokens = vecinfer.cache._C.append_tokens

    def slow_append(*args, **kwargs):
        inside.set()
        assert release.wait(30)
        return append_tokens(*args, **kwargs)

    monkeypatch.setattr(vecinfer.cache, "_C", types.SimpleNamespace(append_tokens=slow_append))
    first = threading.Thread(target=cache.append, args=(0, *kv(2, 1, seed=1)))
    first.start()
    assert inside.wait(30)
    q = torch.randn(2, 4, 1, 64)
    for call in (lambda: cache.append(0, *kv(2, 1, seed=2)), lambda: cache.attend(0, q),
                 lambda: cache.reserve(100), lambda: cache.select([0, 1]), lambda: cache.truncate(0)):
        with pytest.raises(RuntimeError, match="not thread-safe"):
            call()
    release.set()
    first.join()
    assert cache.length(0) == 7  # the first thread's token, and none of the refused ones
    assert cache.max_tokens == 64
