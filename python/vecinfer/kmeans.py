"""k-means codebooks for sub-vectors, with vecinfer's own encode op as the assignment step."""
from __future__ import annotations

import torch

from .ops import unpack_codes, vq_encode

_ROW = 64  # samples are packed into rows of 64 elements so the encode op can assign them


def assign(samples: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for each sub-vector. samples [N, s] float32, codebook [C, s]."""
    n, s = samples.shape
    per_row = _ROW // s
    pad = (-n) % per_row
    if pad:
        samples = torch.cat([samples, samples[:1].expand(pad, s)])
    rows = samples.reshape(-1, _ROW).contiguous()
    code_bits = codebook.shape[0].bit_length() - 1
    codes = vq_encode(rows, codebook[None].contiguous())
    return unpack_codes(codes, code_bits, per_row).reshape(-1)[:n]


def kmeans(samples: torch.Tensor, num_centroids: int, iters: int = 20, seed: int = 0, progress=None) -> torch.Tensor:
    """Lloyd's k-means with k-means++ initialisation and empty-cluster repair; deterministic for a seed.

    samples: [N, s] float32 on the CPU or a CUDA device (N >= num_centroids, finite).
    Returns the codebook [num_centroids, s] float32 on the samples' device.
    """
    if samples.dim() != 2 or samples.shape[1] not in (2, 4, 8):
        raise ValueError(f"samples: expected [N, sub_dim] with sub_dim 2, 4 or 8, got {list(samples.shape)}")
    n = samples.shape[0]
    if n < num_centroids:
        raise ValueError(f"samples: {n} sub-vectors are too few for {num_centroids} centroids")
    if not bool(torch.isfinite(samples).all()):
        raise ValueError("samples: contain NaN or infinity")
    x = samples.float().contiguous()
    codebook = _kmeans_plus_plus(x.cpu(), num_centroids, seed).to(x.device)
    for _ in range(iters):
        labels = assign(x, codebook)
        counts = torch.bincount(labels, minlength=num_centroids)
        sums = torch.zeros_like(codebook).index_add_(0, labels, x)
        filled = counts > 0
        codebook[filled] = sums[filled] / counts[filled, None].to(x.dtype)
        empty = (~filled).nonzero().flatten()
        if len(empty):
            # Repair: move each empty centroid onto one of the worst-served samples.
            dist = ((x - codebook[labels]) ** 2).sum(1)
            worst = dist.topk(len(empty)).indices
            codebook[empty] = x[worst]
        if progress is not None:
            progress()
    return codebook


def _kmeans_plus_plus(x: torch.Tensor, num_centroids: int, seed: int) -> torch.Tensor:
    """k-means++ seeding on the CPU (a few hundred small sequential steps: no device round trips,
    and the same centres whatever device the samples are on)."""
    n = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    picks = [int(torch.randint(n, (1,), generator=gen))]
    closest = ((x - x[picks[0]]) ** 2).sum(1).double()
    for _ in range(1, num_centroids):
        # each next centre drawn with probability proportional to its squared distance to the chosen
        # ones, by inverse-CDF sampling (torch.multinomial is ~100x slower on 64k weights)
        cdf = torch.cumsum(closest, 0)
        if float(cdf[-1]) > 0:
            u = float(torch.rand((), generator=gen, dtype=torch.float64)) * float(cdf[-1])
            pick = min(int(torch.searchsorted(cdf, torch.tensor([u], dtype=torch.float64), right=True)), n - 1)
        else:
            pick = int(torch.randint(n, (1,), generator=gen))
        picks.append(pick)
        closest = torch.minimum(closest, ((x - x[pick]) ** 2).sum(1).double())
    return x[picks].clone()
