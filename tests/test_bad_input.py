"""Every public op rejects bad input with a ValueError / TypeError that names the argument."""
from __future__ import annotations

import pytest
import torch

import vecinfer
from conftest import DEVICES


def _x(device, shape=(2, 3, 5, 64), dtype=torch.float32):
    return torch.randn(shape, dtype=dtype, device=device)


def _cb(device, shape=(1, 256, 4)):
    return torch.randn(shape, device=device)


CASES = [
    # (name, call(device), exception, words the message must contain)
    ("int dtype", lambda d: vecinfer.hadamard(torch.ones((4, 64), dtype=torch.int32, device=d)), TypeError, "x: expected a float32"),
    ("float64", lambda d: vecinfer.hadamard(torch.ones((4, 64), dtype=torch.float64, device=d)), TypeError, "float64"),
    ("not a tensor", lambda d: vecinfer.hadamard([1.0] * 64), TypeError, "x: expected a torch.Tensor"),
    ("head_dim 96", lambda d: vecinfer.hadamard(_x(d, (3, 96))), ValueError, "head_dim"),
    ("head_dim 32", lambda d: vecinfer.transform_keys(_x(d, (2, 2, 3, 32))), ValueError, "64, 128 or 256"),
    ("empty", lambda d: vecinfer.hadamard(_x(d, (0, 64))), ValueError, "empty"),
    ("scalar", lambda d: vecinfer.hadamard(torch.tensor(1.0, device=d)), ValueError, "x:"),
    ("non-contiguous", lambda d: vecinfer.hadamard(_x(d, (64, 8)).t()), ValueError, "contiguous"),
    ("strided rows", lambda d: vecinfer.hadamard(_x(d, (8, 128))[:, :64]), ValueError, "contiguous"),
    ("out shape", lambda d: vecinfer.hadamard(_x(d), out=_x(d, (2, 3, 6, 64))), ValueError, "out: expected shape"),
    ("out dtype", lambda d: vecinfer.hadamard(_x(d), out=_x(d, dtype=torch.float16)), TypeError, "out: must have the input's dtype"),
    ("scale dtype", lambda d: vecinfer.transform_keys(_x(d), torch.ones((3, 64), dtype=torch.float16, device=d)), TypeError, "scale: expected a float32"),
    ("scale shape", lambda d: vecinfer.transform_keys(_x(d), torch.ones((3, 128), device=d)), ValueError, "scale: expected shape [num_kv_heads, 64]"),
    ("scale heads", lambda d: vecinfer.transform_keys(_x(d), torch.ones((2, 64), device=d)), ValueError, "scale: has 2 rows"),
    ("mean vs scale", lambda d: vecinfer.transform_keys(_x(d), torch.ones((3, 64), device=d), torch.ones((1, 64), device=d)), ValueError, "same shape"),
    ("query mean", lambda d: vecinfer.ops._transform(_x(d), None, torch.ones((3, 64), device=d), True, 1, None), ValueError, "mean"),
    ("codebook dtype", lambda d: vecinfer.vq_encode(_x(d), _cb(d).half()), TypeError, "codebook: expected a float32"),
    ("codebook rank", lambda d: vecinfer.vq_encode(_x(d), torch.randn((256, 4), device=d)), ValueError, "codebook: expected shape"),
    ("codebook sub_dim 3", lambda d: vecinfer.vq_encode(_x(d), _cb(d, (1, 256, 3))), ValueError, "sub_dim"),
    ("codebook 100 entries", lambda d: vecinfer.vq_encode(_x(d), _cb(d, (1, 100, 4))), ValueError, "power of two"),
    ("codebook 8 entries", lambda d: vecinfer.vq_encode(_x(d), _cb(d, (1, 8, 4))), ValueError, "code_bits 4 to 12"),
    ("codebook 8192 entries", lambda d: vecinfer.vq_encode(_x(d), _cb(d, (1, 8192, 2))), ValueError, "code_bits 4 to 12"),
    ("codebook groups", lambda d: vecinfer.vq_encode(_x(d), _cb(d, (2, 256, 4))), ValueError, "2 codebooks do not divide"),
    ("codes out shape", lambda d: vecinfer.vq_encode(_x(d), _cb(d), out=torch.empty((2, 3, 5, 17), dtype=torch.uint8, device=d)), ValueError, "codes: expected shape [2, 3, 5, 16]"),
    ("codes out dtype", lambda d: vecinfer.vq_encode(_x(d), _cb(d), out=torch.empty((2, 3, 5, 16), dtype=torch.int8, device=d)), TypeError, "codes: expected a uint8"),
    ("decode codes dtype", lambda d: vecinfer.vq_decode(torch.zeros((5, 16), dtype=torch.int32, device=d), _cb(d), head_dim=64), TypeError, "codes: expected a uint8"),
    ("decode wrong width", lambda d: vecinfer.vq_decode(torch.zeros((5, 15), dtype=torch.uint8, device=d), _cb(d), head_dim=64), ValueError, "codes: expected shape [5, 16]"),
    ("decode head_dim", lambda d: vecinfer.vq_decode(torch.zeros((5, 12), dtype=torch.uint8, device=d), _cb(d), head_dim=48), ValueError, "head_dim"),
    ("decode dtype", lambda d: vecinfer.vq_decode(torch.zeros((5, 16), dtype=torch.uint8, device=d), _cb(d), head_dim=64, dtype=torch.int8), TypeError, "dtype"),
    ("row bytes", lambda d: vecinfer.code_row_bytes(64, 3, 8), ValueError, "sub_dim=3"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,call,exc,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_rejected(device, name, call, exc, words):
    with pytest.raises(exc) as info:
        call(device)
    assert words in str(info.value), f"{name}: message {str(info.value)!r} lacks {words!r}"


@pytest.mark.skipif(not vecinfer.cuda_available(), reason="needs a CUDA GPU")
def test_mixed_devices_rejected():
    x = torch.randn((2, 3, 5, 64), device="cuda")
    with pytest.raises(ValueError, match="codebook: must be on the same device"):
        vecinfer.vq_encode(x, torch.randn((1, 256, 4)))
    with pytest.raises(ValueError, match="scale: must be on the same device"):
        vecinfer.transform_keys(x, torch.ones((3, 64)))
    with pytest.raises(ValueError, match="out: must be on the same device"):
        vecinfer.hadamard(x, out=torch.empty((2, 3, 5, 64)))


@pytest.mark.skipif(not vecinfer.cuda_available(), reason="needs a CUDA GPU")
def test_misaligned_cuda_tensor_rejected():
    base = torch.randn(64 * 9 + 4, device="cuda", dtype=torch.float16)
    x = base[4:].view(9, 64)  # 8-byte offset: contiguous but not 16-byte aligned
    with pytest.raises(ValueError, match="16-byte aligned"):
        vecinfer.hadamard(x)


def test_bad_input_leaves_output_untouched():
    x = torch.randn((2, 3, 5, 64))
    out = torch.full((2, 3, 5, 16), 7, dtype=torch.uint8)
    with pytest.raises(ValueError):
        vecinfer.vq_encode(x, torch.randn((2, 256, 4)), out=out)
    assert bool((out == 7).all())
