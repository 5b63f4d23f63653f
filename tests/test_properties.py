"""Property-based tests (hypothesis) with a fixed, derandomized budget: the ops against float64
references, the cache as a random program against a list-of-tokens model, and the file loader
under random corruption. The same properties run on CUDA tensors on a GPU machine (marked gpu)."""
from __future__ import annotations

import os
import tempfile
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vecinfer
from conftest import (CUDA, assert_matches_reference, check_encode_optimal, codebook_for_heads, ref_transform,
                      unpack_codes)
from hardening import assert_same_state, cache_state, small_cache, small_quantizer

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")])]


def budget(n):
    return settings(max_examples=n, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _tensors(data):
    """Shapes, dtype and a seeded generator for one op example."""
    heads = data.draw(st.sampled_from([1, 2, 4]), "heads")
    shape = (data.draw(st.integers(1, 2), "batch"), heads, data.draw(st.integers(1, 5), "tokens"),
             data.draw(st.sampled_from([64, 128, 256]), "head_dim"))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), "dtype")
    rows = data.draw(st.sampled_from([r for r in (1, 2, 4) if heads % r == 0]), "table rows")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), "seed"))
    return shape, dtype, rows, gen


def _tables(data, gen, rows, d, scale_too=True):
    scale = torch.rand((rows, d), generator=gen) * 2 + 0.25 if scale_too and data.draw(st.booleans(), "scale") else None
    mean = torch.randn((rows, d), generator=gen) if data.draw(st.booleans(), "mean") else None
    return scale, mean


def _to(t, device):
    return None if t is None else t.to(device)


@pytest.mark.parametrize("device", DEVICES)
@budget(60)
@given(data=st.data())
def test_transforms_match_float64(device, data):
    shape, dtype, rows, gen = _tensors(data)
    kind = data.draw(st.sampled_from(["key", "query", "inverse"]), "kind")
    hadamard = data.draw(st.booleans(), "hadamard")
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    scale, mean = _tables(data, gen, rows, shape[-1])
    if kind == "query":
        mean = None
    op = {"key": vecinfer.transform_keys, "inverse": vecinfer.inverse_transform_keys}.get(kind)
    if op is None:
        out = vecinfer.transform_queries(x.to(device), _to(scale, device), hadamard=hadamard)
    else:
        out = op(x.to(device), _to(scale, device), _to(mean, device), hadamard=hadamard)
    assert_matches_reference(out, ref_transform(x, scale, mean, hadamard, kind), f"{kind} transform")


@pytest.mark.parametrize("device", DEVICES)
@budget(40)
@given(data=st.data())
def test_encode_picks_nearest_centroid(device, data):
    shape, dtype, rows, gen = _tensors(data)
    sub = data.draw(st.sampled_from([2, 4, 8]), "sub_dim")
    bits = data.draw(st.integers(4, 8), "code_bits")
    groups = data.draw(st.sampled_from([1, shape[1]]), "codebooks")
    magnitude = data.draw(st.sampled_from([1e-3, 1.0, 1e4]), "magnitude")
    x = (torch.randn(shape, generator=gen) * magnitude).to(dtype)
    codebook = torch.randn((groups, 1 << bits, sub), generator=gen) * magnitude
    scale, mean = _tables(data, gen, rows, shape[-1])
    hadamard = data.draw(st.booleans(), "hadamard")
    codes = vecinfer.vq_encode(x.to(device), codebook.to(device), scale=_to(scale, device), mean=_to(mean, device),
                               hadamard=hadamard)
    assert codes.shape == (*shape[:-1], vecinfer.code_row_bytes(shape[-1], sub, bits))
    check_encode_optimal(ref_transform(x, scale, mean, hadamard, "key"), codes.cpu(), codebook, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@budget(40)
@given(data=st.data())
def test_decode_matches_float64(device, data):
    shape, dtype, rows, gen = _tensors(data)
    sub = data.draw(st.sampled_from([2, 4, 8]), "sub_dim")
    bits = data.draw(st.integers(4, 12), "code_bits")
    d, heads = shape[-1], shape[1]
    codebook = torch.randn((1, 1 << bits, sub), generator=gen)
    codes = torch.randint(0, 256, (*shape[:-1], vecinfer.code_row_bytes(d, sub, bits)), generator=gen, dtype=torch.uint8)
    scale, mean = _tables(data, gen, rows, d)
    hadamard = data.draw(st.booleans(), "hadamard")
    out = vecinfer.vq_decode(codes.to(device), codebook.to(device), head_dim=d, dtype=dtype, scale=_to(scale, device),
                             mean=_to(mean, device), hadamard=hadamard)
    idx = unpack_codes(codes, bits, d // sub)
    books = codebook_for_heads(codebook, heads)
    centroids = torch.stack([books[h][idx[:, h]] for h in range(heads)], dim=1).reshape(shape)
    assert_matches_reference(out, ref_transform(centroids, scale, mean, hadamard, "inverse"), "decoded")


# ---- the cache as a random program against a list-of-tokens model ------------------------------

_OPS = ["append", "append", "step", "step", "select", "truncate", "reserve", "bad"]


class _Model:
    """Per sequence, the list of its tokens ([Hkv, D] key and value rows) of layer 0."""

    def __init__(self, batch):
        self.k = [[] for _ in range(batch)]
        self.v = [[] for _ in range(batch)]

    def lengths(self):
        return [len(k) for k in self.k]


def _check_against_model(cache, model, dtype):
    assert cache.lengths(0).tolist() == model.lengths()
    assert cache.lengths(1).tolist() == [0] * cache.batch_size  # the other layer is never touched
    if max(model.lengths()) == 0:
        return
    k_hat, v_hat, _ = cache.dequantize(0, padded=True)
    q = cache.quantizer
    for b, (ks, vs) in enumerate(zip(model.k, model.v)):
        if not ks:
            continue
        k, v = torch.stack(ks, 1)[None], torch.stack(vs, 1)[None]  # [1, Hkv, n, D]
        k_fake, v_fake = (t.cpu() for t in q.fake_quantize(0, k.to(cache.device), v.to(cache.device)))
        s, c, _ = cache._lengths[0][b].tolist()
        full = torch.ones(k.shape[2], dtype=torch.bool)
        full[s:s + c] = False  # positions held as codes
        n = k.shape[2]
        k_exp = torch.where(full[None, :, None], k[0], k_fake[0]).to(dtype)
        v_exp = torch.where(full[None, :, None], v[0], v_fake[0]).to(dtype)
        assert torch.equal(k_hat[b, :, :n].cpu(), k_exp), f"sequence {b}: keys differ from the model"
        assert torch.equal(v_hat[b, :, :n].cpu(), v_exp), f"sequence {b}: values differ from the model"


@pytest.mark.parametrize("device", DEVICES)
@budget(25)
@given(data=st.data())
def test_cache_program_matches_token_model(device, data):
    dtype = torch.float32 if device == "cpu" else torch.float16
    batch = data.draw(st.integers(1, 3), "batch")
    cache = small_cache(max_tokens=data.draw(st.integers(4, 24), "max_tokens"), batch_size=batch, device=device,
                        dtype=dtype)
    model = _Model(batch)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), "seed"))
    for _ in range(data.draw(st.integers(1, 6), "ops")):
        op = data.draw(st.sampled_from(_OPS), "op")
        before = cache_state(cache)
        if op in ("append", "step"):
            t = 1 if op == "step" else data.draw(st.integers(1, 6), "tokens")
            skip = [data.draw(st.integers(0, t), "skip") for _ in range(cache.batch_size)] if op == "append" else None
            k = (torch.randn((cache.batch_size, 2, t, 64), generator=gen) + 2).to(dtype)
            v = torch.randn((cache.batch_size, 2, t, 64), generator=gen).to(dtype)
            new = [t - (skip[b] if skip else 0) for b in range(cache.batch_size)]
            if any(n + new[b] > cache.max_tokens for b, n in enumerate(model.lengths())):
                with pytest.raises(ValueError, match="max_tokens"):
                    cache.append(0, k.to(device), v.to(device), skip=skip)
                assert_same_state(before, cache_state(cache))
                continue
            cache.append(0, k.to(device), v.to(device), skip=skip)
            for b in range(cache.batch_size):
                first = t - new[b]
                model.k[b] += list(k[b, :, first:].float().unbind(1))
                model.v[b] += list(v[b, :, first:].float().unbind(1))
        elif op == "select":
            idx = data.draw(st.lists(st.integers(0, cache.batch_size - 1), min_size=1, max_size=3), "indices")
            cache.select(idx)
            model.k, model.v = [list(model.k[i]) for i in idx], [list(model.v[i]) for i in idx]
        elif op == "truncate":
            n = data.draw(st.integers(0, 4), "truncate")
            s, c, r = cache._lengths[0].unbind(1)
            possible = bool((((r >= n) | ((c == 0) & (s + r >= n)))).all())
            if not possible:
                with pytest.raises(ValueError, match="truncate"):
                    cache.truncate(n, layers=[0])
                assert_same_state(before, cache_state(cache))
                continue
            cache.truncate(n, layers=[0])
            for b in range(cache.batch_size):
                del model.k[b][len(model.k[b]) - n:], model.v[b][len(model.v[b]) - n:]
        elif op == "reserve":
            cache.reserve(cache.max_tokens + data.draw(st.integers(0, 16), "more"))
        else:  # refused calls change nothing
            bad = data.draw(st.sampled_from(["select", "truncate", "reserve", "append"]), "bad call")
            with pytest.raises((ValueError, TypeError)):
                {"select": lambda: cache.select([cache.batch_size]),
                 "truncate": lambda: cache.truncate(-1),
                 "reserve": lambda: cache.reserve(0),
                 "append": lambda: cache.append(0, torch.zeros((cache.batch_size, 2, 1, 32), device=device),
                                                torch.zeros((cache.batch_size, 2, 1, 32), device=device))}[bad]()
            assert_same_state(before, cache_state(cache))
        _check_against_model(cache, model, dtype)


# ---- the file loader under random corruption -----------------------------------------------------

@pytest.fixture(scope="module")
def saved_bytes():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "q.safetensors")
        small_quantizer().save(path)
        with open(path, "rb") as f:
            return f.read()


def _corrupt(data: bytes, draw) -> bytes:
    kind = draw(st.sampled_from(["flip", "byte", "truncate", "insert", "append"]), "corruption")
    at = draw(st.integers(0, len(data) - 1), "position")
    if kind == "flip":
        return data[:at] + bytes([data[at] ^ (1 << draw(st.integers(0, 7), "bit"))]) + data[at + 1:]
    if kind == "byte":
        return data[:at] + bytes([draw(st.integers(0, 255), "value")]) + data[at + 1:]
    if kind == "truncate":
        return data[:at]
    extra = draw(st.binary(min_size=1, max_size=8), "bytes")
    return data[:at] + extra + data[at:] if kind == "insert" else data + extra


@pytest.mark.parametrize("device", DEVICES)
@budget(120)
@given(data=st.data())
def test_corrupted_file_is_refused_or_loads_identically(device, saved_bytes, data):
    corrupted = _corrupt(saved_bytes, data.draw)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.safetensors")
        with open(path, "wb") as f:
            f.write(corrupted)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # a flipped version digit loads as an older version
                loaded = vecinfer.KVQuantizer.load(path, device=device)
        except ValueError:
            return
    reference = small_quantizer()
    assert loaded.config == reference.config
    assert (loaded.num_kv_heads, loaded.head_dim, loaded.num_layers) == (2, 64, 2)
    for a, b in zip(reference.layers, loaded.layers):
        assert a.keys() == b.keys()
        for name in a:
            assert (a[name] is None and b[name] is None) or torch.equal(a[name], b[name].cpu()), name
