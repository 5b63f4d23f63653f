"""VQ encode / decode against brute-force float64 references."""
from __future__ import annotations

import pytest
import torch

import vecinfer
from conftest import (
    CUDA,
    DEVICES,
    DTYPES,
    HEAD_DIMS,
    assert_matches_reference,
    check_encode_optimal,
    codebook_for_heads,
    poisoned_like,
    ref_transform,
    unpack_codes,
)

# (sub_dim, code_bits): 4-bit, 2-bit, 3-bit, 1.5-bit and 1-bit presets, plus odd widths.
CODE_SHAPES = [(2, 8), (4, 8), (4, 12), (8, 12), (8, 8), (2, 5), (8, 4)]


def _make(d, sub, bits, dtype, device, gen, heads=3, tokens=17, per_head=False, transform=False):
    tokens = tokens if bits < 10 else 5
    x = (torch.randn((2, heads, tokens, d), generator=gen, dtype=torch.float64) * 2).to(dtype)
    groups = heads if per_head else 1
    codebook = torch.randn((groups, 1 << bits, sub), generator=gen) * 1.5
    scale = mean = None
    if transform:
        scale = torch.rand((heads, d), generator=gen) * 2 + 0.5
        mean = torch.randn((heads, d), generator=gen)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return x.to(device), to(codebook), to(scale), to(mean)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("sub,bits", CODE_SHAPES)
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("transform", [False, True])
def test_encode_picks_nearest_centroid(device, dtype, d, sub, bits, per_head, transform, gen):
    x, codebook, scale, mean = _make(d, sub, bits, dtype, device, gen, per_head=per_head, transform=transform)
    codes = torch.full((*x.shape[:-1], vecinfer.code_row_bytes(d, sub, bits)), 0xA5, dtype=torch.uint8, device=device)
    vecinfer.vq_encode(x, codebook, scale=scale, mean=mean, hadamard=transform, out=codes)
    xt = ref_transform(x, scale, mean, hadamard=transform, kind="key")
    exact = check_encode_optimal(xt, codes, codebook.cpu())
    assert exact > 0.9, f"only {exact:.2%} of sub-vectors at the exact minimum"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("sub,bits", CODE_SHAPES)
def test_encode_recovers_known_codes_exactly(device, d, sub, bits, gen):
    """Inputs placed exactly on centroids: the codes (and so the bit packing) must come back exactly."""
    heads, tokens = 2, 9
    codebook = torch.randn((heads, 1 << bits, sub), generator=gen)
    true = torch.randint(0, 1 << bits, (1, heads, tokens, d // sub), generator=gen)
    books = codebook_for_heads(codebook, heads).float()
    x = torch.stack([books[h][true[0, h]] for h in range(heads)])[None].reshape(1, heads, tokens, d)
    codes = vecinfer.vq_encode(x.to(device), codebook.to(device))
    assert codes.shape == (1, heads, tokens, d // sub * bits // 8)
    assert torch.equal(unpack_codes(codes, bits, d // sub), true)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("sub,bits", CODE_SHAPES)
@pytest.mark.parametrize("transform", [False, True])
def test_decode_matches_reference(device, dtype, d, sub, bits, transform, gen):
    heads, tokens = 4, 13
    codebook = torch.randn((2, 1 << bits, sub), generator=gen)  # 2 codebooks over 4 heads
    codes = torch.randint(0, 256, (3, heads, tokens, vecinfer.code_row_bytes(d, sub, bits)), generator=gen,
                          dtype=torch.uint8)
    scale = torch.rand((heads, d), generator=gen) + 0.5 if transform else None
    mean = torch.randn((2, d), generator=gen) if transform else None
    if transform:
        scale = scale[:2].contiguous()
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    out = torch.full((3, heads, tokens, d), float("nan"), dtype=dtype, device=device)
    vecinfer.vq_decode(to(codes), to(codebook), head_dim=d, dtype=dtype, scale=to(scale), mean=to(mean),
                       hadamard=transform, out=out)
    idx = unpack_codes(codes, bits, d // sub)  # [3, H, T, M]
    books = codebook_for_heads(codebook, heads)  # [H, C, S]
    centroids = torch.stack([books[h][idx[:, h]] for h in range(heads)], dim=1).reshape(3, heads, tokens, d)
    ref = ref_transform(centroids, scale, mean, hadamard=transform, kind="inverse") if transform else centroids
    assert_matches_reference(out, ref, "decoded")


@pytest.mark.parametrize("device", DEVICES)
def test_round_trip_error_shrinks_with_more_bits(device, gen):
    """A sanity property of the whole codec: 12-bit codes of 4-dim sub-vectors beat 8-bit ones."""
    x = torch.randn((1, 2, 300, 64), generator=gen).to(device)
    errors = []
    for bits in (6, 8, 10):
        sample = x.reshape(-1, 4)[torch.randperm(x.numel() // 4, generator=gen)[: 1 << bits]]
        codebook = sample[None].contiguous().float()
        codes = vecinfer.vq_encode(x, codebook)
        back = vecinfer.vq_decode(codes, codebook, head_dim=64, dtype=torch.float32)
        errors.append(float(((back - x) ** 2).mean()))
    assert errors[0] > errors[1] > errors[2], errors


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sub,bits", [(4, 8), (8, 12), (2, 5)])
def test_cuda_encode_agrees_with_cpu(dtype, sub, bits, gen):
    x, codebook, scale, mean = _make(128, sub, bits, dtype, "cpu", gen, heads=8, tokens=200, transform=True)
    cpu = vecinfer.vq_encode(x, codebook, scale=scale, mean=mean, hadamard=True)
    gpu = vecinfer.vq_encode(x.cuda(), codebook.cuda(), scale=scale.cuda(), mean=mean.cuda(), hadamard=True).cpu()
    m = 128 // sub
    same = (unpack_codes(cpu, bits, m) == unpack_codes(gpu, bits, m)).double().mean()
    assert same > 0.999, f"GPU and CPU codes agree on only {float(same):.4%} of sub-vectors"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_large_rows_and_many_heads(gen):
    """Many tiles and per-head codebooks that change between a block's tiles."""
    heads = 16
    x = torch.randn((4, heads, 1031, 64), generator=gen).to(torch.bfloat16).cuda()
    codebook = torch.randn((heads, 256, 4), generator=gen).cuda()
    codes = vecinfer.vq_encode(x, codebook)
    cpu = vecinfer.vq_encode(x.cpu(), codebook.cpu())
    assert (codes.cpu() == cpu).double().mean() > 0.999
    out = vecinfer.vq_decode(codes, codebook, head_dim=64, dtype=torch.bfloat16)
    assert torch.equal(out.cpu(), vecinfer.vq_decode(codes.cpu(), codebook.cpu(), head_dim=64, dtype=torch.bfloat16))


def test_poisoned_codes_are_overwritten(gen):
    x = torch.randn((3, 5, 64), generator=gen)
    codebook = torch.randn((1, 16, 8), generator=gen)
    codes = torch.full((3, 5, 4), 0xFF, dtype=torch.uint8)
    vecinfer.vq_encode(x, codebook, out=codes)
    check_encode_optimal(x.double(), codes, codebook)
    fresh = vecinfer.vq_encode(x, codebook)
    assert torch.equal(codes, fresh)
