"""The ops on real post-RoPE keys and values of SmolLM2-135M (python/vecinfer/data/smollm2_kv.npz)."""
from __future__ import annotations

import pytest
import torch

import vecinfer
from conftest import DEVICES, DTYPES, assert_matches_reference, check_encode_optimal, poisoned_like, ref_transform
from vecinfer.demo import load_real_kv
from vecinfer.kmeans import kmeans

LAYERS, KEYS, VALUES, _ = load_real_kv()


def test_real_kv_file():
    assert LAYERS == [0, 14, 29]
    for k, v in zip(KEYS, VALUES):
        assert k.shape == v.shape == (3, 320, 64)
        assert torch.isfinite(k).all() and torch.isfinite(v).all()


def _tables(k):
    centred = k - k.mean(dim=1, keepdim=True)
    return centred.abs().amax(dim=1).sqrt().contiguous(), k.mean(dim=1).contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_transform_real_keys(device, dtype, layer):
    k = KEYS[layer][None].to(dtype)
    scale, mean = _tables(KEYS[layer])
    out = poisoned_like(k).to(device)
    vecinfer.transform_keys(k.to(device), scale.to(device), mean.to(device), out=out)
    assert_matches_reference(out, ref_transform(k, scale, mean, True, "key"))
    q = KEYS[layer][None, :, -8:].repeat_interleave(3, dim=1).to(dtype)  # 9 query heads over 3 KV heads
    qt = poisoned_like(q).to(device)
    vecinfer.transform_queries(q.to(device), scale.to(device), out=qt)
    assert_matches_reference(qt, ref_transform(q, scale, None, True, "query"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer", [0, 1, 2])
@pytest.mark.parametrize("sub,bits", [(4, 8), (2, 8), (8, 12)])
def test_encode_decode_real_kv(device, layer, sub, bits):
    k = KEYS[layer]
    scale, mean = _tables(k)
    kt = ref_transform(k[None], scale, mean, True, "key")[0].float()
    codebook = kmeans(kt.reshape(-1, sub), 1 << bits, iters=3, seed=layer)[None]
    x = k[None].half().to(device)
    codes = torch.full((1, 3, 320, vecinfer.code_row_bytes(64, sub, bits)), 0x5A, dtype=torch.uint8, device=device)
    vecinfer.vq_encode(x, codebook.to(device), scale=scale.to(device), mean=mean.to(device), hadamard=True, out=codes)
    check_encode_optimal(ref_transform(x, scale, mean, True, "key"), codes, codebook)
    out = poisoned_like(x)
    vecinfer.vq_decode(codes, codebook.to(device), head_dim=64, dtype=torch.float16, scale=scale.to(device),
                       mean=mean.to(device), hadamard=True, out=out)
    idx = vecinfer.unpack_codes(codes.cpu(), bits, 64 // sub)
    centroids = codebook[0][idx].reshape(1, 3, 320, 64)
    assert_matches_reference(out, ref_transform(centroids, scale, mean, True, "inverse"))
    rel = float((out.float().cpu() - k[None]).norm() / (k - k.mean(dim=1, keepdim=True)).norm())
    assert rel < {4: 0.5, 2: 0.3, 8: 0.6}[sub], rel  # a trained codebook reconstructs real keys


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_real_scores_preserved_by_transforms(layer):
    k = KEYS[layer][None]
    scale, mean = _tables(KEYS[layer])
    q = KEYS[layer][None, :, -5:] * 0.7
    scores = vecinfer.transform_queries(q, scale) @ vecinfer.transform_keys(k, scale, mean).transpose(-1, -2)
    exact = q.double() @ k.double().transpose(-1, -2)
    torch.testing.assert_close(torch.softmax(scores.double(), -1), torch.softmax(exact, -1), atol=1e-5, rtol=1e-4)
