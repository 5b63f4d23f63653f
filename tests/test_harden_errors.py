"""Issue 15, item 7: unclear errors. Each bad input raises a TypeError or ValueError that names the
argument, never nanobind's argument-signature dump, an IndexError, a ZeroDivisionError or a raw
RuntimeError; bools and floats are not taken as ints."""
from __future__ import annotations

import pytest
import torch

import vecinfer
from hardening import kv, small_cache


def _attention_args(batch=2, key_batch=2):
    codes = torch.zeros(key_batch, 2, 16, 16, dtype=torch.uint8)
    return (torch.randn(batch, 2, 1, 64), codes, codes, torch.tensor([[0, 3, 0]] * batch, dtype=torch.int32),
            torch.randn(1, 16, 4), torch.randn(1, 16, 4))


def _cached():
    cache = small_cache()
    cache.append(0, *kv(2, 9))
    return cache


CASES = [
    # (name, call, exception, words the message must contain)
    ("int beyond int64", lambda: vecinfer.code_row_bytes(2**70, 4, 8), ValueError, "head_dim: "),
    ("int beyond int32", lambda: vecinfer.code_row_bytes(2**40, 4, 8), ValueError, "head_dim=1099511627776"),
    ("bool as int", lambda: vecinfer.code_row_bytes(64, True, 8), TypeError, "sub_dim: expected an int"),
    ("max_coded beyond int64", lambda: vecinfer.attention(*_attention_args(), max_coded=2**64), ValueError, "max_coded"),
    ("meta tensor", lambda: vecinfer.hadamard(torch.empty(4, 64, device="meta")), ValueError, "x: tensors must be on the CPU"),
    ("meta codebook", lambda: vecinfer.vq_encode(torch.randn(4, 64), torch.empty(1, 16, 4, device="meta")), ValueError, "codebook: tensors must be"),
    ("sink_keys 2-D", lambda: vecinfer.attention(*_attention_args(), sink_keys=torch.zeros(2, 64), sink_values=torch.zeros(2, 64)), ValueError, "sink_keys: expected [batch"),
    ("key_codes batch", lambda: vecinfer.attention(*_attention_args(key_batch=3)), ValueError, "key_codes: holds 3 sequences, q 2"),
    ("scale 'abc'", lambda: vecinfer.attention(*_attention_args(), scale="abc"), TypeError, "scale: expected a real number"),
    ("attend scale 'abc'", lambda: _cached().attend(0, torch.randn(2, 4, 1, 64), scale="abc"), TypeError, "scale: expected a real number"),
    ("truncate(True)", lambda: _cached().truncate(True), TypeError, "tokens: expected an int"),
    ("select(None)", lambda: _cached().select(None), TypeError, "indices: expected a list of ints"),
    ("select floats", lambda: _cached().select([0.9, 1.2]), TypeError, "indices: expected a list of ints"),
    ("select bool mask", lambda: _cached().select(torch.tensor([True, False])), TypeError, "a bool mask is not"),
    ("select float tensor", lambda: _cached().select(torch.tensor([0.0, 1.0])), TypeError, "integer tensor"),
    ("skip=True", lambda: _cached().append(0, *kv(2, 2), skip=True), TypeError, "skip: expected"),
    ("skip bools", lambda: _cached().append(0, *kv(2, 2), skip=[True, False]), TypeError, "skip: expected ints"),
    ("layer True", lambda: _cached().append(True, *kv(2, 2)), ValueError, "layer: expected an int"),
    ("calibrate zero heads", lambda: vecinfer.KVQuantizer.calibrate([torch.zeros(0, 50, 64)], [torch.zeros(0, 50, 64)], vecinfer.VQConfig(), progress=False), ValueError, "keys[0]: no samples"),
    ("calibrate zero tokens", lambda: vecinfer.KVQuantizer.calibrate([torch.zeros(2, 0, 64)], [torch.zeros(2, 0, 64)], vecinfer.VQConfig(), progress=False), ValueError, "no samples"),
    ("config residual float", lambda: vecinfer.VQConfig(residual=1.5), TypeError, "residual must be an int"),
    ("config from_dict list", lambda: vecinfer.VQConfig.from_dict([1]), TypeError, "expected a dict"),
]


@pytest.mark.parametrize("name,call,exc,words", CASES, ids=[c[0] for c in CASES])
def test_clear_errors(name, call, exc, words):
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    assert words in message, f"{name}: {message!r} lacks {words!r}"
    assert "incompatible function arguments" not in message


def test_constant_key_head_calibrates_and_round_trips():
    """A head whose keys are all equal: the smoothing scale rule used to compute 0/0 and report
    'NaN or infinity in samples'. The constant head now gets scale 1 and decodes to its constant."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn((2, 200, 64), generator=g)
    keys[1] = 0.75  # head 1: every key the same vector
    values = torch.randn((2, 200, 64), generator=g)
    cfg = vecinfer.VQConfig(key_bits=4, value_bits=4, kmeans_iters=2, granularity="head")
    q = vecinfer.KVQuantizer.calibrate([keys], [values], cfg, progress=False)
    scale = q.layers[0]["key_scale"]
    assert bool(torch.isfinite(scale).all()) and torch.equal(scale[1], torch.ones(64))
    k = keys[None, :, :5].contiguous()
    k_hat = q.decode_keys(0, q.encode_keys(0, k), torch.float32)
    torch.testing.assert_close(k_hat[0, 1], torch.full((5, 64), 0.75), atol=1e-5, rtol=0)
