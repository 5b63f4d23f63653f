"""Shared fixtures and float64 reference implementations, written independently of the code under
test (explicit Hadamard matrices, numpy bit unpacking, brute-force distances)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import vecinfer

CUDA = vecinfer.cuda_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (sm_80+)"))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = [64, 128, 256]


@pytest.fixture
def gen():
    """Fresh random inputs for every run; the seed is printed (shown when a test fails) and
    VECINFER_TEST_SEED=<seed> replays it."""
    seed = int(os.environ.get("VECINFER_TEST_SEED", np.random.SeedSequence().entropy % 2**31))
    print(f"VECINFER_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)


class ByteTokenizer:
    """Enough of a tokenizer for the model-level tests: one token per byte, ids 2 + byte % (vocab - 2)
    (ASCII text decodes back exactly for vocab >= 128), optional BOS = 1, no EOS."""

    bos_token_id = 1
    eos_token_id = None

    def __init__(self, vocab: int = 128):
        self.vocab = vocab

    def __call__(self, text, add_special_tokens=True):
        ids = [2 + (b % (self.vocab - 2)) for b in text.encode()]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}

    def decode(self, ids):
        return "".join(chr(i - 2) if i >= 2 else "" for i in ids)


def hadamard_matrix(d: int) -> torch.Tensor:
    """Orthonormal Sylvester Walsh-Hadamard matrix, float64: H[i, j] = (-1)^popcount(i & j) / sqrt(d)."""
    idx = torch.arange(d)
    bits = torch.bitwise_and(idx[:, None], idx[None, :])
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1.0 - 2.0 * parity.double()) / d**0.5


def table_for_heads(table: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Expand a [rows, D] per-KV-head table to [num_heads, 1, D]: head h uses row h // (num_heads // rows)."""
    group = num_heads // table.shape[0]
    return table.double().repeat_interleave(group, dim=0)[:, None, :]


def ref_transform(x, scale=None, mean=None, hadamard=True, kind="key"):
    """float64 reference of the key / query / inverse-key transforms on [..., H, T, D] (or fewer dims)."""
    x = x.double().cpu()
    d = x.shape[-1]
    h = hadamard_matrix(d)
    heads = x.shape[-3] if x.dim() >= 3 else 1
    s = table_for_heads(scale.cpu(), heads) if scale is not None else 1.0
    m = table_for_heads(mean.cpu(), heads) if mean is not None else 0.0
    if x.dim() < 3 and scale is not None:
        s = s[0, 0]
    if x.dim() < 3 and mean is not None:
        m = m[0, 0]
    if kind == "key":
        y = (x - m) / s
        return y @ h if hadamard else y
    if kind == "query":
        y = x * s
        return y @ h if hadamard else y
    y = x @ h if hadamard else x
    return y * s + m


def unpack_codes(codes: torch.Tensor, code_bits: int, num_codes: int) -> torch.Tensor:
    """Little-endian bit stream per row -> int64 codes [..., num_codes] (numpy, independent of the C++)."""
    c = codes.cpu().numpy()
    bits = np.unpackbits(c, axis=-1, bitorder="little")[..., : num_codes * code_bits]
    bits = bits.reshape(*c.shape[:-1], num_codes, code_bits).astype(np.int64)
    weights = (1 << np.arange(code_bits, dtype=np.int64))
    return torch.from_numpy((bits * weights).sum(-1))


def codebook_for_heads(codebook: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[G, C, S] -> [num_heads, C, S], head h using codebook h // (num_heads // G)."""
    return codebook.double().cpu().repeat_interleave(num_heads // codebook.shape[0], dim=0)


def check_encode_optimal(x_transformed: torch.Tensor, codes: torch.Tensor, codebook: torch.Tensor, rtol=2e-5):
    """Each sub-vector's chosen centroid must be at the best squared distance (ties are legal).

    x_transformed: float64 [..., H, T, D] (the exact transformed input); codes as returned by vq_encode.
    Returns the fraction of sub-vectors whose chosen distance is the exact minimum (for reporting).
    """
    g, c, s = codebook.shape
    code_bits = c.bit_length() - 1
    d = x_transformed.shape[-1]
    x4 = x_transformed.reshape(-1, *x_transformed.shape[-3:]) if x_transformed.dim() >= 3 else x_transformed.reshape(1, 1, -1, d)
    heads = x4.shape[1]
    books = codebook_for_heads(codebook, heads)  # [H, C, S]
    chosen = unpack_codes(codes, code_bits, d // s).reshape(x4.shape[0], heads, x4.shape[2], d // s)
    assert int(chosen.max()) < c
    sub = x4.reshape(x4.shape[0], heads, x4.shape[2], d // s, s)
    # distances to every centroid: [N, H, T, M, C]
    dist = ((sub[..., None, :] - books[None, :, None, None, :, :]) ** 2).sum(-1)
    best = dist.min(-1).values
    got = torch.gather(dist, -1, chosen[..., None]).squeeze(-1)
    scale = (sub.norm(dim=-1) + books.norm(dim=-1).amax(-1)[None, :, None, None]) ** 2
    excess = got - best
    assert bool(torch.all(excess <= rtol * scale + 1e-12)), (
        f"encode chose a non-nearest centroid: worst excess {float((excess / scale).max()):.3e} (relative)")
    return float((excess == 0).double().mean())


def assert_matches_reference(out: torch.Tensor, ref64: torch.Tensor, name="output"):
    """Oracle rule: error against the float64 reference at most twice what rounding the reference to
    out's dtype costs, plus a float32 arithmetic floor. NaN never passes; every element written."""
    assert out.shape == ref64.shape, (out.shape, ref64.shape)
    got = out.detach().double().cpu()
    assert not torch.isnan(got).any(), f"{name}: NaN (unwritten or poisoned output)"
    rounding = (ref64.to(out.dtype).double() - ref64).abs().max()
    floor = 2e-6 * max(float(ref64.abs().max()), 1e-30)
    err = (got - ref64).abs().max()
    assert err <= 2 * rounding + floor, f"{name}: max error {float(err):.3e} > 2*{float(rounding):.3e} + {floor:.3e}"


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def small_quantizer() -> "vecinfer.KVQuantizer":
    """Two layers, 2 KV heads, D = 64, calibrated on random keys with per-head offsets; residual 16,
    2 sink tokens (the cache tests' quantizer)."""
    g = torch.Generator().manual_seed(0)
    keys = [torch.randn((2, 400, 64), generator=g) + 3 * torch.randn((2, 1, 64), generator=g) for _ in range(2)]
    values = [torch.randn((2, 400, 64), generator=g) for _ in range(2)]
    cfg = vecinfer.VQConfig(residual=16, sink_tokens=2, kmeans_iters=4)
    return vecinfer.KVQuantizer.calibrate(keys, values, cfg, progress=False)
